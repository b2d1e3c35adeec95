//! Running a scheduler's client program with a deadline.

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::SchedError;

/// More output than this is refused: 64 MiB holds half a million squeue
/// lines, far beyond any real queue.
pub const MAX_OUTPUT: usize = 64 << 20;

/// What a finished program printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `command` to its end, or kills and reaps it once `timeout` has
/// passed. A non-zero exit is an error carrying its stderr.
///
/// # Errors
/// [`SchedError`] for a program that cannot start, fails, times out or
/// prints more than [`MAX_OUTPUT`] bytes.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<Output, SchedError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| SchedError::Spawn {
            program: program.clone(),
            source,
        })?;
    // Both pipes are drained at once so that a full stderr pipe cannot
    // stall the child while we wait on stdout.
    let stdout = child
        .stdout
        .take()
        .map(|pipe| thread::spawn(|| drain(pipe)));
    let stderr = child
        .stderr
        .take()
        .map(|pipe| thread::spawn(|| drain(pipe)));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SchedError::Timeout {
                    program,
                    after: timeout,
                });
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SchedError::Io { program, source });
            }
        }
    };
    let join = |handle: Option<thread::JoinHandle<Drained>>| {
        handle
            .map(|h| h.join().unwrap_or_else(|_| Ok((Vec::new(), false))))
            .unwrap_or_else(|| Ok((Vec::new(), false)))
    };
    let io = |source| SchedError::Io {
        program: program.clone(),
        source,
    };
    let (out, out_cut) = join(stdout).map_err(io)?;
    let (err, _) = join(stderr).map_err(io)?;
    if !status.success() {
        return Err(SchedError::Failed {
            program,
            status: status.to_string(),
            // One log line per failure, however many lines squeue printed.
            stderr: String::from_utf8_lossy(&err)
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    if out_cut {
        return Err(SchedError::TooLarge {
            program,
            limit: MAX_OUTPUT,
        });
    }
    Ok(Output {
        stdout: out,
        stderr: err,
    })
}

/// The bytes kept from a pipe, and whether more were thrown away.
type Drained = std::io::Result<(Vec<u8>, bool)>;

/// Reads up to [`MAX_OUTPUT`] bytes and discards the rest (so the child
/// can finish), saying whether anything was cut.
fn drain(pipe: impl Read) -> Drained {
    let mut pipe = pipe;
    let mut kept = Vec::new();
    (&mut pipe).take(MAX_OUTPUT as u64).read_to_end(&mut kept)?;
    let rest = std::io::copy(&mut pipe, &mut std::io::sink())?;
    Ok((kept, rest > 0))
}
