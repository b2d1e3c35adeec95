//! Moving a site from its SQLite file to PostgreSQL (`satellite migrate
//! --to URL`): everything a running site needs, read from the SQLite
//! store ([`SqliteStore::snapshot`]) and written into an empty PostgreSQL
//! database in one transaction ([`PgStore::import`]), which counts what it
//! wrote and rolls back unless every table holds exactly what was read.
//!
//! Not moved: the record of ended routes and the watchers' cursors (each
//! frontend's watcher starts afresh on the new database; the old host's
//! watcher has cut what ended before the move), nothing else is left out.

/// A `proxy` row, values as stored (a Perl-era file may hold text where
/// satellite writes numbers: the reader converts what it can).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyRecord {
    pub alias: String,
    pub alias_compare_hash: String,
    pub modified: Option<String>,
    pub dsthost: Option<String>,
    pub dstport: Option<i32>,
    pub dstpath: Option<String>,
    pub state: String,
    pub jobid: Option<String>,
    pub linked_at: Option<String>,
    pub ended_at: Option<String>,
    pub end_cause: Option<String>,
    pub end_kind: Option<String>,
}

/// A `jobdetails` row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobDetailRecord {
    pub jobid: String,
    pub reason: Option<String>,
    pub start_time: Option<i64>,
    pub time_limit: Option<i64>,
    pub job_user: Option<String>,
    pub job_uid: Option<i64>,
    pub nodes: Option<String>,
}

/// Everything that moves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub proxy: Vec<ProxyRecord>,
    /// (jobid, state, lastseen epoch)
    pub jobstates: Vec<(String, String, Option<i64>)>,
    pub jobdetails: Vec<JobDetailRecord>,
    /// (alias, target, expires)
    pub routes: Vec<(String, String, String)>,
    /// (cause, count)
    pub session_ends: Vec<(String, i64)>,
    /// (client, debt, at)
    pub unknown_answers: Vec<(String, f64, f64)>,
    /// Values that could not be read as what the column holds (a port
    /// that is not a number), moved as NULL.
    pub unreadable: usize,
}

/// Rows per table, as read and as written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub proxy: i64,
    pub jobstates: i64,
    pub jobdetails: i64,
    pub routes: i64,
    pub session_ends: i64,
    pub unknown_answers: i64,
}

impl Snapshot {
    pub fn counts(&self) -> Counts {
        let n = |len: usize| i64::try_from(len).unwrap_or(i64::MAX);
        Counts {
            proxy: n(self.proxy.len()),
            jobstates: n(self.jobstates.len()),
            jobdetails: n(self.jobdetails.len()),
            routes: n(self.routes.len()),
            session_ends: n(self.session_ends.len()),
            unknown_answers: n(self.unknown_answers.len()),
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens, {} job states, {} job details, {} routes, {} ending counters, {} unknown-answer debts",
            self.proxy,
            self.jobstates,
            self.jobdetails,
            self.routes,
            self.session_ends,
            self.unknown_answers
        )
    }
}
