//! Running a helper program with a deadline: the admin commands call
//! apachectl, openssl, squeue and sudo, any of which can hang (a stuck NFS
//! mount, a password prompt, a dead slurmctld), and a cron job or a
//! `check` that never returns is worse than one that fails.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How often a waiting caller looks at the child.
const POLL: Duration = Duration::from_millis(10);

pub trait OutputWithin {
    /// Like `Command::output`, but the child (and whatever it started in
    /// its process group) is killed after `timeout`, which is an error of
    /// kind `TimedOut`. Stdin is /dev/null: nothing may prompt.
    fn output_within(&mut self, timeout: Duration) -> io::Result<Output>;
}

/// Output kept per stream; the rest is read and dropped, so a chatty child
/// can neither fill memory nor block on a full pipe.
pub const OUTPUT_CAP: usize = 1 << 20;

/// Reads a pipe to its end on a thread of its own, keeping the first
/// [`OUTPUT_CAP`] bytes; the receiver hears when the pipe closed.
fn drain(pipe: Option<Box<dyn Read + Send>>) -> (Arc<Mutex<Vec<u8>>>, mpsc::Receiver<()>) {
    let kept = Arc::new(Mutex::new(Vec::new()));
    let (closed, on_close) = mpsc::channel();
    let into = Arc::clone(&kept);
    thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut kept = into.lock().unwrap_or_else(|p| p.into_inner());
                        let room = OUTPUT_CAP.saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..n.min(room)]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = closed.send(());
    });
    (kept, on_close)
}

impl OutputWithin for Command {
    fn output_within(&mut self, timeout: Duration) -> io::Result<Output> {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let (stdout, stdout_closed) = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let (stderr, stderr_closed) = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                // The whole group: apachectl's httpd, sudo's command.
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?} (killed)"),
                ));
            }
            thread::sleep(POLL);
        };
        // A grandchild that outlived the child (a daemon it started) may
        // hold the pipes open: the deadline covers reading them too, and
        // what was read by then is the output.
        for closed in [stdout_closed, stderr_closed] {
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = closed.recv_timeout(left.max(POLL));
        }
        let take = |kept: Arc<Mutex<Vec<u8>>>| {
            std::mem::take(&mut *kept.lock().unwrap_or_else(|p| p.into_inner()))
        };
        Ok(Output {
            status,
            stdout: take(stdout),
            stderr: take(stderr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hanging_program_is_killed_at_its_deadline() {
        let err = Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30"])
            .output_within(Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "no answer within 300ms (killed)");
    }

    #[test]
    fn a_grandchild_holding_the_pipes_does_not_outlast_the_deadline() {
        // The child exits at once; the process it left behind (in its own
        // session, as a daemon would be) keeps stdout open for 30 s.
        let started = Instant::now();
        let out = Command::new("sh")
            .args(["-c", "echo started; setsid sleep 30 & exit 0"])
            .output_within(Duration::from_millis(500))
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(out.status.success());
        assert_eq!(out.stdout, b"started\n");
    }

    #[test]
    fn output_beyond_the_cap_is_read_and_dropped() {
        let out = Command::new("sh")
            .args(["-c", "head -c 3000000 /dev/zero; echo done >&2"])
            .output_within(Duration::from_secs(30))
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), OUTPUT_CAP);
        assert_eq!(out.stderr, b"done\n");
    }

    #[test]
    fn a_quick_program_gives_its_output_and_status() {
        let out = Command::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .output_within(Duration::from_secs(30))
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }
}
