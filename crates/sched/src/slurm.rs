//! Slurm: one `squeue` call per snapshot, parsed from a delimited format.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chrono::{Local, NaiveDateTime, TimeZone};

use crate::{hostlist, run_with_timeout, JobInfo, JobSnapshot, JobState, SchedError, Scheduler};

/// Where Debian and RHEL install `squeue`: the broker's PATH is not
/// trusted to find it (cron and CGI environments differ).
pub const DEFAULT_SQUEUE: &str = "/usr/bin/squeue";

/// Fields are separated by ASCII unit separator (0x1f): no job id, state,
/// reason, user or node name can contain it, unlike `|` or blanks (reasons
/// such as "Nodes required for job are DOWN, DRAINED…" contain both).
pub const FIELD_SEPARATOR: char = '\x1f';

/// `%i` job id (`123`, `123_4` for an array task), `%T` long state, `%r`
/// reason, `%S` start (actual, or expected while pending), `%l` time limit,
/// `%u` user, `%U` uid, `%N` compact node list. No widths: `-o` fields
/// without a width are printed whole.
pub const FORMAT: &str = "%i\x1f%T\x1f%r\x1f%S\x1f%l\x1f%u\x1f%U\x1f%N";

/// The Slurm implementation of [`Scheduler`].
#[derive(Clone, Debug)]
pub struct SlurmScheduler {
    squeue: PathBuf,
    conf: Option<PathBuf>,
}

impl Default for SlurmScheduler {
    fn default() -> Self {
        SlurmScheduler {
            squeue: PathBuf::from(DEFAULT_SQUEUE),
            conf: None,
        }
    }
}

impl SlurmScheduler {
    /// `squeue` at [`DEFAULT_SQUEUE`], Slurm's own configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs the `squeue` at `path` instead.
    pub fn with_squeue(mut self, path: impl Into<PathBuf>) -> Self {
        self.squeue = path.into();
        self
    }

    /// Points `squeue` at this `slurm.conf` (`SLURM_CONF`).
    pub fn with_conf(mut self, path: impl Into<PathBuf>) -> Self {
        self.conf = Some(path.into());
        self
    }

    pub fn squeue(&self) -> &Path {
        &self.squeue
    }

    /// The one query: every state (`--states=all` keeps finished jobs
    /// until MinJobAge purges them), every partition (`--all`), every user
    /// (no `--user`, and the `SQUEUE_*` variables that could narrow or
    /// reshape the output are removed). `SLURM_TIME_FORMAT=%s` makes
    /// squeue print times as epoch seconds, free of time zones.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.squeue);
        command.args([
            "--noheader",
            "--all",
            "--states=all",
            &format!("--format={FORMAT}"),
        ]);
        for (name, _) in std::env::vars_os() {
            let text = name.to_string_lossy();
            if text.starts_with("SQUEUE_") || text == "SLURM_CLUSTERS" {
                command.env_remove(&name);
            }
        }
        command.env("SLURM_TIME_FORMAT", "%s");
        if let Some(conf) = &self.conf {
            command.env("SLURM_CONF", conf);
        }
        command
    }
}

impl Scheduler for SlurmScheduler {
    fn snapshot(&self, timeout: Duration) -> Result<JobSnapshot, SchedError> {
        let taken_at = chrono::Utc::now().timestamp();
        let output = run_with_timeout(self.command(), timeout)?;
        Ok(parse_squeue(&output.stdout, taken_at))
    }
}

/// Parses the output of [`SlurmScheduler::command`]. A line that does not
/// have the eight fields, is not UTF-8 or holds a bad value is skipped and
/// makes the snapshot incomplete; blank lines are ignored.
pub fn parse_squeue(output: &[u8], taken_at: i64) -> JobSnapshot {
    let mut snapshot = JobSnapshot {
        complete: true,
        taken_at,
        jobs: Vec::new(),
    };
    for line in output.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match std::str::from_utf8(line).ok().and_then(parse_line) {
            Some(job) => snapshot.jobs.push(job),
            None => snapshot.complete = false,
        }
    }
    snapshot
}

fn parse_line(line: &str) -> Option<JobInfo> {
    let fields: Vec<&str> = line.split(FIELD_SEPARATOR).collect();
    let [id, state, reason, start, limit, user, uid, nodes] = fields[..] else {
        return None;
    };
    let id = id.trim();
    if !valid_job_id(id) {
        return None;
    }
    let state = state.trim();
    if state.is_empty() || !state.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return None;
    }
    let reason = reason.trim();
    let user = user.trim();
    let uid = match uid.trim() {
        "" | "N/A" => None,
        text => Some(text.parse::<u32>().ok()?),
    };
    Some(JobInfo {
        id: id.to_owned(),
        state: JobState::new(state),
        reason: (!reason.is_empty() && reason != "None").then(|| reason.to_owned()),
        start: parse_time(start.trim())?,
        time_limit_secs: parse_time_limit(limit.trim())?,
        user: (!user.is_empty()).then(|| user.to_owned()),
        uid,
        nodes: hostlist::expand(nodes.trim()).ok()?,
    })
}

/// Job ids are `123`, `123_4`, `123_[1-5%2]` (a pending array), `123+0`
/// (a heterogeneous job): short and printable, never blank.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// `Some(None)` for squeue's words for "no time", `None` for garbage.
/// Epoch seconds are what we ask for; the local ISO form squeue prints
/// without `SLURM_TIME_FORMAT` is read too.
fn parse_time(text: &str) -> Option<Option<i64>> {
    match text {
        "" | "N/A" | "n/a" | "Unknown" | "None" | "0" => Some(None),
        _ if text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok().map(Some),
        _ => {
            let naive = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S").ok()?;
            Some(
                Local
                    .from_local_datetime(&naive)
                    .earliest()
                    .map(|t| t.timestamp()),
            )
        }
    }
}

/// Slurm's time limits: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`;
/// `UNLIMITED`, `INVALID`, `NOT_SET`, `Partition_Limit` are no limit we
/// know.
pub fn parse_time_limit(text: &str) -> Option<Option<i64>> {
    if text.is_empty() || text.bytes().any(|b| b.is_ascii_alphabetic() || b == b'/') {
        return Some(None);
    }
    let number = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (days, rest) = match text.split_once('-') {
        Some((days, rest)) => (Some(number(days)?), rest),
        None => (None, text),
    };
    let parts: Vec<i64> = rest.split(':').map(number).collect::<Option<_>>()?;
    let (h, m, s) = match (days, &parts[..]) {
        (Some(_), &[h]) => (h, 0, 0),
        (Some(_), &[h, m]) => (h, m, 0),
        (None, &[m]) => (0, m, 0),
        (None, &[m, s]) => (0, m, s),
        (_, &[h, m, s]) => (h, m, s),
        _ => return None,
    };
    Some(Some(days.unwrap_or(0) * 86_400 + h * 3_600 + m * 60 + s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits_in_every_slurm_form() {
        assert_eq!(parse_time_limit("1:00"), Some(Some(60)));
        assert_eq!(parse_time_limit("30"), Some(Some(1800)));
        assert_eq!(parse_time_limit("1:00:00"), Some(Some(3600)));
        assert_eq!(parse_time_limit("2-03:04:05"), Some(Some(183_845)));
        assert_eq!(parse_time_limit("2-03"), Some(Some(183_600)));
        assert_eq!(parse_time_limit("2-03:04"), Some(Some(183_840)));
        assert_eq!(parse_time_limit("UNLIMITED"), Some(None));
        assert_eq!(parse_time_limit("Partition_Limit"), Some(None));
        assert_eq!(parse_time_limit("1:2:3:4"), None);
        assert_eq!(parse_time_limit("-5"), None);
        assert_eq!(parse_time_limit("99999999999999:00"), None);
    }

    #[test]
    fn times_as_epoch_or_words() {
        assert_eq!(parse_time("1795696021"), Some(Some(1_795_696_021)));
        assert_eq!(parse_time("N/A"), Some(None));
        assert_eq!(parse_time("soon"), None);
        assert!(matches!(parse_time("2026-11-26T12:27:01"), Some(Some(_))));
    }
}
