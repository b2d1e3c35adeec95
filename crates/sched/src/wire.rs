//! The `update-jobs.cgi` body that carries a snapshot from the host that
//! queries the scheduler to the broker.
//!
//! ```text
//! jobstates=<lines>&complete=1&taken=<epoch seconds>
//! <line> = <jobid> <state> <reason> <start> <time limit> <user> <uid> <nodes>
//! ```
//!
//! Old brokers read `jobstates` only, one `<jobid> <state>` per line, and
//! ignore the further fields, so a new push means to them what an old one
//! did. The extra fields are read only when the body has `taken` (a new
//! pusher); `complete=1` marks a snapshot of every job the scheduler knows.
//! A body without it is never complete: an old push never said anything
//! about the jobs it did not list.
//!
//! Fields are separated by blanks, so within a field blanks, control
//! characters, `%` and non-ASCII bytes are percent-escaped; `-` is an
//! unknown value (a literal `-` is `%2D`). `start` is epoch seconds,
//! `time limit` seconds, `nodes` a compressed hostlist. The whole value is
//! then form-urlencoded like any other.

use std::fmt::Write as _;

use crate::slurm::valid_job_id;
use crate::{hostlist, JobInfo, JobSnapshot, JobState};

/// The POST body for `snapshot`.
pub fn to_form_body(snapshot: &JobSnapshot) -> String {
    let mut table = String::new();
    for job in &snapshot.jobs {
        let fields = [
            Some(job.id.clone()),
            Some(job.state.base().to_owned()),
            job.reason.clone(),
            job.start.map(|t| t.to_string()),
            job.time_limit_secs.map(|t| t.to_string()),
            job.user.clone(),
            job.uid.map(|u| u.to_string()),
            (!job.nodes.is_empty()).then(|| hostlist::compress(&job.nodes)),
        ];
        let line: Vec<String> = fields
            .iter()
            .map(|f| f.as_deref().map_or_else(|| "-".to_owned(), escape_field))
            .collect();
        table.push_str(&line.join(" "));
        table.push('\n');
    }
    // Brokers refuse an empty `jobstates` as missing; a lone newline is
    // an empty table to every reader (old pushes always began with one).
    if table.is_empty() {
        table.push('\n');
    }
    let mut body = format!("jobstates={}", form_encode(&table));
    if snapshot.complete {
        body.push_str("&complete=1");
    }
    let _ = write!(body, "&taken={}", snapshot.taken_at);
    body
}

/// Reads a POST body, old or new. Lenient: a line that cannot be read is
/// skipped and makes the snapshot incomplete. `taken_at` is the body's
/// `taken`, or now when it has none (an old pusher sends what it just saw).
pub fn parse_form_body(body: &[u8]) -> JobSnapshot {
    let (mut table, mut complete, mut taken) = (None, None, None);
    for pair in body.split(|&b| b == b'&' || b == b';') {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        // As CGI.pm's param(): the first of repeated names counts.
        let slot = match form_decode(name).as_slice() {
            b"jobstates" => &mut table,
            b"complete" => &mut complete,
            b"taken" => &mut taken,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(form_decode(value));
        }
    }
    let taken_at = taken
        .as_deref()
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.trim().parse::<i64>().ok());
    let extended = taken.is_some();
    let mut snapshot = JobSnapshot {
        complete: complete.as_deref() == Some(b"1") && taken_at.is_some(),
        taken_at: taken_at.unwrap_or_else(|| chrono::Utc::now().timestamp()),
        jobs: Vec::new(),
    };
    for line in table.as_deref().unwrap_or_default().split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|f| !f.is_empty())
            .collect();
        if fields.is_empty() {
            continue;
        }
        let job = if extended {
            parse_extended(&fields)
        } else {
            parse_legacy(&fields)
        };
        match job {
            Some(job) => snapshot.jobs.push(job),
            None => snapshot.complete = false,
        }
    }
    snapshot
}

/// An old-style table (`<jobid> <state>` lines, extra fields ignored, as
/// `squeue --format='%i %T'` prints it): the jobs it names.
pub fn parse_legacy_table(table: &[u8]) -> Vec<JobInfo> {
    table
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line
                .split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty())
                .collect();
            parse_legacy(&fields)
        })
        .collect()
}

/// `<jobid> <state>` as old brokers read it: the id keeps letters, digits
/// and `-._`, the state letters, digits and `_`.
fn parse_legacy(fields: &[&[u8]]) -> Option<JobInfo> {
    let keep = |field: &[u8], extra: &[u8]| -> String {
        field
            .iter()
            .filter(|b| b.is_ascii_alphanumeric() || extra.contains(b))
            .map(|&b| b as char)
            .collect()
    };
    let id = keep(fields.first()?, b"-._");
    let state = keep(fields.get(1)?, b"_");
    let usable = |s: &str| !s.is_empty() && s != "0";
    (usable(&id) && usable(&state) && id.len() < 48).then(|| JobInfo::new(id, JobState::new(state)))
}

fn parse_extended(fields: &[&[u8]]) -> Option<JobInfo> {
    let [id, state, reason, start, limit, user, uid, nodes, ..] = fields[..] else {
        return None;
    };
    let text = |field: &[u8]| -> Option<Option<String>> {
        if field == b"-" {
            return Some(None);
        }
        String::from_utf8(unescape_field(field)).ok().map(Some)
    };
    let number = |field: &[u8]| -> Option<Option<i64>> {
        match text(field)? {
            None => Some(None),
            Some(t) => t.parse::<i64>().ok().map(Some),
        }
    };
    let id = text(id)?.filter(|id| valid_job_id(id))?;
    let state = text(state)?.filter(|s| !s.trim().is_empty())?;
    let uid = match text(uid)? {
        None => None,
        Some(u) => Some(u.parse::<u32>().ok()?),
    };
    let nodes = match text(nodes)? {
        None => Vec::new(),
        Some(list) => hostlist::expand(&list).ok()?,
    };
    Some(JobInfo {
        id,
        state: JobState::new(state),
        reason: text(reason)?,
        start: number(start)?,
        time_limit_secs: number(limit)?,
        user: text(user)?,
        uid,
        nodes,
    })
}

fn escape_field(value: &str) -> String {
    if value == "-" {
        return "%2D".to_owned();
    }
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn unescape_field(field: &[u8]) -> Vec<u8> {
    percent_decode(field, false)
}

/// application/x-www-form-urlencoded: unreserved bytes as they are, blanks
/// as `+`, everything else `%XX`.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3 / 2);
    for &b in value.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

fn form_decode(value: &[u8]) -> Vec<u8> {
    percent_decode(value, true)
}

/// `%XX` to its byte; a `%` not followed by two hex digits stays as it is,
/// as CGI.pm leaves it.
fn percent_decode(value: &[u8], plus_is_space: bool) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'%' => match (
                value.get(i + 1).copied().and_then(hex),
                value.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}
