//! Running a helper program with a deadline: the admin commands call
//! apachectl, openssl, squeue and sudo, any of which can hang (a stuck NFS
//! mount, a password prompt, a dead slurmctld), and a cron job, a watcher
//! or a `check` that never returns is worse than one that fails. The one
//! place that does it, for core, the scheduler crate and the demo: the
//! child runs in its own process group (killed whole at the deadline),
//! its pipes are read by threads of their own up to a cap (the rest read
//! and dropped, so a chatty child neither fills memory nor blocks), and the
//! deadline covers reading them too (a daemon the child left behind may
//! hold them open for ever).

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Output, Stdio};
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

/// Output [`OutputWithin`] keeps per stream.
pub const OUTPUT_CAP: usize = 1 << 20;

/// How a run with a deadline ended, when it did not give its output.
#[derive(Debug)]
pub enum RunError {
    /// The program could not be started.
    Spawn(io::Error),
    /// It was still running at the deadline: its process group was killed.
    TimedOut(Duration),
    /// Waiting for it failed.
    Wait(io::Error),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Spawn(e) => write!(f, "cannot start: {e}"),
            RunError::TimedOut(after) => write!(f, "no answer within {after:?} (killed)"),
            RunError::Wait(e) => write!(f, "waiting for it: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

impl From<RunError> for io::Error {
    fn from(err: RunError) -> io::Error {
        match err {
            RunError::Spawn(e) | RunError::Wait(e) => e,
            timed_out @ RunError::TimedOut(_) => {
                io::Error::new(io::ErrorKind::TimedOut, timed_out.to_string())
            }
        }
    }
}

/// What a finished program gave.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Either stream had more than the cap (the rest was dropped).
    pub truncated: bool,
}

/// A pipe read to its end on a thread of its own, keeping the first `cap`
/// bytes; the receiver hears when the pipe closed.
struct Drain {
    kept: Arc<Mutex<(Vec<u8>, bool)>>,
    closed: mpsc::Receiver<()>,
}

fn drain(pipe: Option<Box<dyn Read + Send>>, cap: usize) -> Drain {
    let kept = Arc::new(Mutex::new((Vec::new(), false)));
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
                        let room = cap.saturating_sub(kept.0.len());
                        kept.0.extend_from_slice(&chunk[..n.min(room)]);
                        kept.1 |= n > room;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        let _ = closed.send(());
    });
    Drain {
        kept,
        closed: on_close,
    }
}

impl Drain {
    /// What was read, once the pipe closed or the deadline passed.
    fn take(self, deadline: Instant) -> (Vec<u8>, bool) {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = self.closed.recv_timeout(left.max(POLL));
        std::mem::take(&mut *self.kept.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Runs `command` (stdin /dev/null, its own process group) to its end
/// within `timeout`, keeping up to `cap` bytes of each output stream.
///
/// # Errors
/// [`RunError`]: it could not start, or was killed at the deadline.
pub fn run(command: &mut Command, timeout: Duration, cap: usize) -> Result<Finished, RunError> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(RunError::Spawn)?;
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        cap,
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        cap,
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            waited => {
                // The whole group: apachectl's httpd, sudo's command.
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(match waited {
                    Err(e) => RunError::Wait(e),
                    _ => RunError::TimedOut(timeout),
                });
            }
        }
    };
    let (stdout, out_cut) = stdout.take(deadline);
    let (stderr, err_cut) = stderr.take(deadline);
    Ok(Finished {
        status,
        stdout,
        stderr,
        truncated: out_cut || err_cut,
    })
}

impl OutputWithin for Command {
    fn output_within(&mut self, timeout: Duration) -> io::Result<Output> {
        let finished = run(self, timeout, OUTPUT_CAP)?;
        Ok(Output {
            status: finished.status,
            stdout: finished.stdout,
            stderr: finished.stderr,
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
