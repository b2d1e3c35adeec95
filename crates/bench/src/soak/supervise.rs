//! A long-running program restarted one second after it dies, as systemd's
//! `Restart=always` (`RestartSec=1`) does for serve and `cron --watch`;
//! its current pid for the sampler and the faults.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

pub struct Supervised {
    pid: Arc<AtomicU32>,
    restarts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Supervised {
    pub fn start(make: impl Fn() -> Command + Send + 'static) -> Supervised {
        let pid = Arc::new(AtomicU32::new(0));
        let restarts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, r, s) = (pid.clone(), restarts.clone(), stop.clone());
        let thread = thread::spawn(move || loop {
            // A program that cannot even be started is tried again, as
            // systemd would; the soak then counts what it could not do.
            if let Ok(child) = make().spawn() {
                p.store(child.id(), Ordering::SeqCst);
                if watch(child, &s) {
                    return;
                }
            }
            if s.load(Ordering::SeqCst) {
                return;
            }
            r.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_secs(1));
        });
        Supervised {
            pid,
            restarts,
            stop,
            thread: Some(thread),
        }
    }

    /// The current process's pid (0 before the first start).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// The pid as it changes, for a thread that kills it.
    pub fn pid_cell(&self) -> Arc<AtomicU32> {
        self.pid.clone()
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::SeqCst)
    }
}

/// Waits for `child` to die (false) or for the stop flag (true: the child
/// is killed and reaped).
fn watch(mut child: Child, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
