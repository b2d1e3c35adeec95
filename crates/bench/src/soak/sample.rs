//! What the soak samples every 10 s: memory, open files and threads of
//! serve, the watcher and Apache (parent and children together), the
//! database's size and its write-ahead log's, and p50/p99 per kind of
//! request over the last window.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::Duration;

use super::site::SoakSite;

/// One process's (or a group's) resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub rss_kb: u64,
    pub fds: u64,
    pub threads: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, other: Usage) -> Usage {
        Usage {
            rss_kb: self.rss_kb + other.rss_kb,
            fds: self.fds + other.fds,
            threads: self.threads + other.threads,
        }
    }
}

/// Memory (kB), open files and threads of `pid`, from /proc.
pub fn usage(pid: u32) -> Option<Usage> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Usage {
        rss_kb: field("VmRSS:")?,
        fds,
        threads: field("Threads:")?,
    })
}

/// The sum over `pids` (those still there).
pub fn usage_of(pids: &[u32]) -> Usage {
    pids.iter()
        .filter_map(|p| usage(*p))
        .fold(Usage::default(), |a, u| a + u)
}

/// Each Apache child's threads and open sockets at the end of the run
/// (`pids`: the parent first): a child holding about two sockets per
/// worker thread has every worker in a websocket tunnel, and a request on
/// a connection it kept alive waits for one of them to end.
pub fn apache_workers(pids: &[u32]) -> String {
    let mut out = String::from("Apache's children at the end (threads, sockets):");
    for pid in pids.iter().skip(1) {
        let sockets = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |fds| {
            fds.flatten()
                .filter(|fd| {
                    fs::read_link(fd.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        });
        let threads = usage(*pid).map_or(0, |u| u.threads);
        out.push_str(&format!(" {pid}: {threads}, {sockets};"));
    }
    out
}

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub at_secs: u64,
    pub serve: Usage,
    /// serve's pid then: a restart starts a new series of open files.
    pub serve_pid: u32,
    pub watcher: Usage,
    pub watcher_pid: u32,
    pub apache: Usage,
    pub db_kb: u64,
    pub wal_kb: u64,
    pub answers: u64,
    pub p50_ms: HashMap<&'static str, f64>,
    pub p99_ms: HashMap<&'static str, f64>,
}

impl Sample {
    /// p50/p99 per kind from the latencies of the window.
    pub fn set_latencies(&mut self, by_kind: HashMap<&'static str, Vec<Duration>>) {
        for (kind, mut took) in by_kind {
            took.sort();
            self.p50_ms.insert(kind, percentile(&took, 0.5));
            self.p99_ms.insert(kind, percentile(&took, 0.99));
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

fn size_kb(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len() / 1024).unwrap_or(0)
}

/// The database's size and its write-ahead log's, in kB: the file and its
/// `-wal` on SQLite; `pg_database_size` and the cluster's `pg_wal` on
/// PostgreSQL (0 when the server does not answer, as while it restarts).
pub fn database_sizes(site: &SoakSite) -> (u64, u64) {
    match &site.database_url {
        None => {
            let db = site.db_file();
            let wal = db.with_file_name("state.sqlite-wal");
            (size_kb(&db), size_kb(&wal))
        }
        Some(url) => {
            let Ok(mut client) = postgres::Client::connect(url, postgres::NoTls) else {
                return (0, 0);
            };
            let mut kb = |sql: &str| {
                client
                    .query_one(sql, &[])
                    .ok()
                    .and_then(|row| row.get::<_, Option<i64>>(0))
                    .map_or(0, |bytes| bytes.max(0) as u64 / 1024)
            };
            (
                kb("SELECT pg_database_size(current_database())"),
                kb("SELECT sum(size)::bigint FROM pg_ls_waldir()"),
            )
        }
    }
}

const KINDS: [(&str, &str); 5] = [
    ("getlink", "getlink"),
    ("redeemtoken", "redeem"),
    ("proxied", "proxied"),
    ("tokenjobstate", "poll"),
    ("websocket", "websocket"),
];

/// The samples as a table, one row each.
pub fn table(samples: &[Sample]) -> String {
    let mut table = String::new();
    let kinds: Vec<&str> = KINDS.iter().map(|(_, shown)| *shown).collect();
    let _ = writeln!(
        table,
        "  t(s)  answers  serve kB/fds/thr     watcher kB/fds/thr  apache kB/fds/thr        db kB  wal kB  p50/p99 ms: {}",
        kinds.join(" ")
    );
    for s in samples {
        let lat: Vec<String> = KINDS
            .iter()
            .map(|(kind, _)| {
                format!(
                    "{:.1}/{:.1}",
                    s.p50_ms.get(kind).copied().unwrap_or(0.0),
                    s.p99_ms.get(kind).copied().unwrap_or(0.0)
                )
            })
            .collect();
        let usage = |u: &Usage| format!("{:>7}/{:>4}/{:>3}", u.rss_kb, u.fds, u.threads);
        let _ = writeln!(
            table,
            "{:>6} {:>8}  {}     {}     {:>8}/{:>5}/{:>4}  {:>8} {:>7}  {}",
            s.at_secs,
            s.answers,
            usage(&s.serve),
            usage(&s.watcher),
            s.apache.rss_kb,
            s.apache.fds,
            s.apache.threads,
            s.db_kb,
            s.wal_kb,
            lat.join(" ")
        );
    }
    table
}

/// How much `what`'s open files grew over the samples of its last run
/// (since its last restart), from the first of them to the last: `None`
/// when that run has fewer than 3 samples (too short to tell).
pub fn fd_growth(samples: &[Sample], what: impl Fn(&Sample) -> (u32, u64)) -> Option<i64> {
    let last_pid = what(samples.last()?).0;
    let run: Vec<u64> = samples
        .iter()
        .rev()
        .take_while(|s| what(s).0 == last_pid)
        .map(|s| what(s).1)
        .collect();
    if run.len() < 3 || last_pid == 0 {
        return None;
    }
    // `run` is newest first; the first sample of a run may still be
    // warming up (connections opened on first use): start at the second.
    let first = run[run.len() - 2];
    Some(run[0] as i64 - first as i64)
}
