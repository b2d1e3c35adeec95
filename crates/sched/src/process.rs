//! Running a scheduler's client program with a deadline (satellite-process),
//! its failures as [`SchedError`]s.

use std::process::Command;
use std::time::Duration;

use satellite_process::RunError;

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

/// Runs `command` to its end, or kills it (its whole process group) once
/// `timeout` has passed. A non-zero exit is an error carrying its stderr.
///
/// # Errors
/// [`SchedError`] for a program that cannot start, fails, times out or
/// prints more than [`MAX_OUTPUT`] bytes.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<Output, SchedError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let finished =
        satellite_process::run(&mut command, timeout, MAX_OUTPUT).map_err(|err| match err {
            RunError::Spawn(source) => SchedError::Spawn {
                program: program.clone(),
                source,
            },
            RunError::TimedOut(after) => SchedError::Timeout {
                program: program.clone(),
                after,
            },
            RunError::Wait(source) => SchedError::Io {
                program: program.clone(),
                source,
            },
        })?;
    if !finished.status.success() {
        return Err(SchedError::Failed {
            program,
            status: finished.status.to_string(),
            // One log line per failure, however many lines squeue printed.
            stderr: String::from_utf8_lossy(&finished.stderr)
                .lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    if finished.truncated {
        return Err(SchedError::TooLarge {
            program,
            limit: MAX_OUTPUT,
        });
    }
    Ok(Output {
        stdout: finished.stdout,
        stderr: finished.stderr,
    })
}
