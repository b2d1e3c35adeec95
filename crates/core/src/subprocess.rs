//! Running a helper program with a deadline: the admin commands call
//! apachectl, openssl, squeue and sudo, any of which can hang (a stuck NFS
//! mount, a password prompt, a dead slurmctld), and a cron job or a
//! `check` that never returns is worse than one that fails.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
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

impl OutputWithin for Command {
    fn output_within(&mut self, timeout: Duration) -> io::Result<Output> {
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
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
        Ok(Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
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
