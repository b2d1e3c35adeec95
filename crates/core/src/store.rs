//! The SQLite store: the `proxy` table of alias → host:port mappings and the
//! `jobstates` feed, in the original's formats so that the Perl scripts can
//! still run on a database satellite has written.
//!
//! Formats kept from the original: `alias_compare_hash` is unpadded base64
//! SHA-256 (43 characters); `modified` is UTC `YYYY-MM-DD HH:MM:SS` text
//! (expiry compares it as a string); `jobstates.lastseen` is an integer
//! epoch. Every write is one `BEGIN IMMEDIATE` transaction whose conditional
//! statement is checked by its affected-row count, so two racing requests
//! can never both succeed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::error::{CoreError, Result};
use crate::ratelimit::Limits;
use crate::token::alias_compare_hash;

/// Written to `PRAGMA user_version` once a database has satellite's indexes
/// and route table. Legacy databases have 0; 1 had the indexes only; 2 had
/// no `unknown_answers`.
pub const SCHEMA_VERSION: i64 = 3;

/// Job states older than this are purged whenever new ones arrive.
pub const JOBSTATE_RETENTION_SECS: i64 = 3 * 24 * 3600;

const CREATE_PROXY: &str = "CREATE TABLE proxy ( alias text not null, alias_compare_hash text not null, modified timestamp default current_timestamp, dsthost text, dstport integer, dstpath text, state text not null, jobid text default null)";
const CREATE_JOBSTATES: &str = "CREATE TABLE jobstates ( jobid text primary key, state text not null, lastseen timestamp default current_timestamp)";
const CREATE_INDEXES: &str = "
    CREATE UNIQUE INDEX IF NOT EXISTS proxy_alias_compare_hash ON proxy (alias_compare_hash);
    CREATE INDEX IF NOT EXISTS proxy_state_alias ON proxy (state, alias);
    CREATE INDEX IF NOT EXISTS proxy_modified ON proxy (modified);
    CREATE INDEX IF NOT EXISTS jobstates_lastseen ON jobstates (lastseen);
";
/// The data plane of map routing: Apache's `dbd:` RewriteMap reads this
/// table on every request for a token's host, so a row written here is live
/// at the commit that writes it, and gone at the commit that deletes it.
/// Only validated routes are written (`target` is a rendered `ip:port`), and
/// `expires` is the row's TTL end, compared by Apache with SQLite's own
/// clock, so a route dies on time even if nothing runs. The triggers keep it
/// equal to the `proxy` table whoever writes there (the Perl scripts
/// included): a deleted token, or one that is no longer `proxied`, has no
/// route.
const CREATE_ROUTES: &str = "
    CREATE TABLE IF NOT EXISTS routes ( alias text primary key not null, target text not null, expires text not null ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS unknown_answers ( client text primary key not null, debt real not null, at real not null ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS jobdetails ( jobid text primary key not null, reason text, start_time integer, time_limit integer, job_user text, job_uid integer, nodes text ) WITHOUT ROWID;
    CREATE TRIGGER IF NOT EXISTS proxy_delete_drops_route AFTER DELETE ON proxy
        BEGIN DELETE FROM routes WHERE alias = old.alias; END;
    CREATE TRIGGER IF NOT EXISTS proxy_update_drops_route
        AFTER UPDATE OF alias, state, dsthost, dstport ON proxy
        WHEN new.state IS NOT 'proxied' OR new.alias IS NOT old.alias
          OR new.dsthost IS NOT old.dsthost OR new.dstport IS NOT old.dstport
        BEGIN DELETE FROM routes WHERE alias = old.alias; END;
";
// `unknown_answers` is the rate limit's memory for the CGI programs, which
// live for one request: per client address (see `ratelimit::client_key`),
// the unknown-token answers not yet paid back (`debt`) as of `at` (epoch
// seconds). A row whose debt has drained says nothing and is deleted.

/// Columns satellite adds to the legacy tables, all nullable, so the Perl
/// scripts' inserts (which name their columns) keep working.
/// `jobid` is the master branch's; the rest are satellite's: when a token
/// was linked and when and why its session ended (state `ended`, a
/// tombstone kept until the TTL so the alias is never issued again), and
/// why.
/// `jobstates` itself is left as the original made it (a site's own
/// scripts may insert into it without naming columns): the rest of what the
/// scheduler says of a job lives in satellite's `jobdetails`.
const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    ("proxy", "jobid", "text default null"),
    ("proxy", "linked_at", "text default null"),
    ("proxy", "ended_at", "text default null"),
    ("proxy", "end_cause", "text default null"),
];
const PROXY_COLUMNS: [&str; 7] = [
    "alias",
    "alias_compare_hash",
    "modified",
    "dsthost",
    "dstport",
    "dstpath",
    "state",
];

/// The states a `proxy` row can be in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyState {
    Pending,
    Mapped,
    Proxied,
    /// The session is over (its job ended, or its redeem did not match its
    /// job): no route, and the alias stays taken until the TTL.
    Ended,
    /// Anything else a hand-edited database may hold.
    Other(String),
}

impl ProxyState {
    pub fn parse(text: &str) -> Self {
        match text {
            "pending" => ProxyState::Pending,
            "mapped" => ProxyState::Mapped,
            "proxied" => ProxyState::Proxied,
            "ended" => ProxyState::Ended,
            other => ProxyState::Other(other.to_owned()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum RedeemOutcome {
    Redeemed,
    Unknown,
    AlreadyRedeemed,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DestroyOutcome {
    Destroyed,
    Unknown,
    WrongHost,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    Linked,
    Unknown,
    AlreadyLinked,
}

enum Written {
    Applied,
    Refused,
    NoSuchRow,
}

/// What tokenjobstate needs of a token.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenJob {
    pub proxy_state: ProxyState,
    pub jobid: Option<String>,
    pub job_state: Option<String>,
    pub job_lastseen: Option<i64>,
    /// The rest of what the scheduler said, when a push carried it.
    pub job: Option<JobRecord>,
    /// The token was redeemed (it has a host), whatever its state now.
    pub redeemed: bool,
    /// When the session ended (`ended` rows), and why.
    pub ended_at: Option<String>,
    pub end_cause: Option<String>,
}

/// What the scheduler said of one job, as stored in `jobstates`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobRecord {
    pub jobid: String,
    /// The scheduler's own state text (`RUNNING`, `CA`...).
    pub state: String,
    pub reason: Option<String>,
    /// Epoch seconds: the start, or the scheduler's estimate while pending.
    pub start_time: Option<i64>,
    pub time_limit_secs: Option<i64>,
    pub user: Option<String>,
    pub uid: Option<i64>,
    /// Node names, expanded.
    pub nodes: Vec<String>,
}

/// A live token linked to a job, with what is known of the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkedSession {
    pub alias: String,
    pub state: ProxyState,
    pub jobid: String,
    pub dsthost: Option<String>,
    pub linked_at: Option<DateTime<Utc>>,
    /// `None` when no push has mentioned the job.
    pub job: Option<JobRecord>,
}

/// A row of `proxy` as a route candidate; values are raw, to be validated
/// before anything is written into Apache's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRow {
    pub alias: String,
    /// `modified` as stored; a route lives until it plus the TTL.
    pub modified: Option<String>,
    pub dsthost: Option<String>,
    pub dstport: Option<String>,
    pub state: ProxyState,
}

/// What opening a database did to it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migration {
    pub created: bool,
    pub added_columns: Vec<&'static str>,
    pub from_version: i64,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// How a redeem publishes its route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutePublication<'a> {
    /// Map routing: the validated `ip:port` goes into `routes` with the
    /// redeem, and the row is `proxied` at once.
    Live { target: &'a str },
    /// Vhost routing: the row stays `mapped` until cron has reloaded Apache.
    Deferred,
}

/// A route as map routing publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedRoute {
    pub alias: String,
    /// A rendered, validated `ip:port` (`[v6]:port`).
    pub target: String,
    /// `modified` + TTL, in `modified`'s text format.
    pub expires: String,
}

/// What [`Store::sync_routes`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteSync {
    pub written: usize,
    pub removed: usize,
    pub flipped: usize,
    pub unrouted: usize,
}

/// What a database file holds, read without writing anything.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    pub version: i64,
    pub has_proxy: bool,
    pub proxy_columns: Vec<String>,
    pub tokens_by_state: Vec<(String, i64)>,
    /// Aliases that share one hash, joined by ` = ` per group.
    pub colliding_aliases: Vec<String>,
}

/// The instant a row modified at `modified` stops being live, as text.
pub fn route_expiry(modified: DateTime<Utc>, ttl_secs: i64) -> String {
    sql_timestamp(modified + chrono::Duration::seconds(ttl_secs))
}

/// The instant a `modified` text names, if it is one.
pub fn parse_sql_timestamp(text: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
        .ok()
        .map(|naive| naive.and_utc())
}

/// `modified` text for an instant: what SQLite's `current_timestamp` writes.
pub fn sql_timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// The `modified` value below which a row has outlived `ttl_secs`.
pub fn expiry_cutoff(now: DateTime<Utc>, ttl_secs: i64) -> String {
    sql_timestamp(now - chrono::Duration::seconds(ttl_secs))
}

impl Store {
    /// Opens an existing database, bringing a legacy schema forward.
    /// A missing file or one without the tables is an error: programs that
    /// answer requests never create a database in a place nobody chose.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Self> {
        Self::open_inner(path, busy_timeout, false).map(|(store, _)| store)
    }

    /// Opens the database, creating the file and the tables when missing.
    pub fn open_or_create(path: &Path, busy_timeout: Duration) -> Result<(Self, Migration)> {
        Self::open_inner(path, busy_timeout, true)
    }

    fn open_inner(path: &Path, busy_timeout: Duration, create: bool) -> Result<(Self, Migration)> {
        if !create && !path.exists() {
            return Err(CoreError::DatabaseMissing {
                path: path.to_owned(),
            });
        }
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let mut conn = Connection::open_with_flags(path, flags)?;
        conn.busy_handler(Some(busy_handler(busy_timeout)))?;
        let mut store = Store {
            conn,
            path: path.to_owned(),
        };
        let migration = store.migrate(create)?;
        Ok((store, migration))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))?)
    }

    fn migrate(&mut self, create: bool) -> Result<Migration> {
        let from_version = self.schema_version()?;
        if from_version == SCHEMA_VERSION {
            return Ok(Migration {
                from_version,
                ..Migration::default()
            });
        }
        if from_version > SCHEMA_VERSION {
            return Err(CoreError::DatabaseFromFuture {
                path: self.path.clone(),
                found: from_version,
                known: SCHEMA_VERSION,
            });
        }
        // Look before taking the write lock, so a database we refuse is left
        // exactly as it was.
        if !create && !self.has_table("proxy")? {
            return Err(CoreError::DatabaseEmpty {
                path: self.path.clone(),
            });
        }
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut migration = Migration {
            from_version,
            ..Migration::default()
        };
        let has_table = |name: &str| table_exists(&tx, name);
        if !has_table("proxy")? {
            tx.execute_batch(CREATE_PROXY)?;
            migration.created = true;
        }
        if !has_table("jobstates")? {
            tx.execute_batch(CREATE_JOBSTATES)?;
        }
        let columns: Vec<String> = {
            let mut stmt = tx.prepare("SELECT name FROM pragma_table_info('proxy')")?;
            let names = stmt.query_map([], |row| row.get(0))?;
            names.collect::<rusqlite::Result<_>>()?
        };
        if let Some(missing) = PROXY_COLUMNS
            .iter()
            .find(|c| !columns.iter().any(|have| have == *c))
        {
            return Err(CoreError::NotSatelliteDatabase {
                path,
                why: format!("table proxy has no column {missing}"),
            });
        }
        for (table, column, declaration) in ADDED_COLUMNS {
            let present: Vec<String> = {
                let mut stmt =
                    tx.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
                let names = stmt.query_map([], |row| row.get(0))?;
                names.collect::<rusqlite::Result<_>>()?
            };
            if !present.iter().any(|c| c == column) {
                tx.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
                ))?;
                migration.added_columns.push(column);
            }
        }
        let duplicates: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT group_concat(alias, ' = ') FROM proxy \
                 GROUP BY alias_compare_hash HAVING count(*) > 1 LIMIT 20",
            )?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if !duplicates.is_empty() {
            return Err(CoreError::DuplicateAliases {
                path,
                aliases: duplicates.join("; "),
            });
        }
        tx.execute_batch(CREATE_INDEXES)?;
        tx.execute_batch(CREATE_ROUTES)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        // WAL lets readers (tokenjobstate polls, index) run beside a writer.
        // It is a property of the file, so it is set once, here.
        let _mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        Ok(migration)
    }

    fn has_table(&self, name: &str) -> Result<bool> {
        table_exists(&self.conn, name)
    }

    /// Runs one conditional statement on the row of `alias` (given its
    /// hash) in a write transaction, and tells a refusal (the row is there,
    /// younger than `cutoff`, but the condition did not hold) from a row
    /// that does not exist. One statement, so racing requests cannot both
    /// pass the condition.
    fn conditional_write(
        &mut self,
        alias: &str,
        cutoff: &str,
        statement: impl FnOnce(&Connection, &str) -> rusqlite::Result<usize>,
    ) -> Result<Written> {
        let hash = alias_compare_hash(alias.as_bytes());
        let tx = self.write_tx()?;
        let written = if statement(&tx, &hash)? == 1 {
            Written::Applied
        } else if live_row_exists(&tx, &hash, alias, cutoff)? {
            Written::Refused
        } else {
            Written::NoSuchRow
        };
        tx.commit()?;
        Ok(written)
    }

    fn write_tx(&mut self) -> Result<rusqlite::Transaction<'_>> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }

    /// The unknown-token debt of `client` as of now (`now` and the result
    /// in the terms of [`Limits`]); a read only, so that a client under its
    /// limit costs no write.
    pub fn unknown_debt(&self, client: &str, limits: &Limits, now: f64) -> Result<f64> {
        let row: Option<(f64, f64)> = self
            .conn
            .query_row(
                "SELECT debt, at FROM unknown_answers WHERE client = ?1",
                [client],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map_or(0.0, |(debt, at)| limits.debt_at(debt, at, now)))
    }

    /// Counts one unknown-token answer to `client`, and drops the rows of
    /// clients whose debt has drained. One transaction, so concurrent
    /// answers to one client each count. The sweep reads every row; there
    /// are only as many as clients that got an unknown answer within the
    /// last `burst / rate` seconds.
    ///
    /// The count is not worth an fsync: the commit runs with `synchronous
    /// = NORMAL` (in WAL mode a power cut may forget it, and never corrupts
    /// anything).
    pub fn charge_unknown(&mut self, client: &str, limits: &Limits, now: f64) -> Result<()> {
        let synchronous: i64 = self
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))?;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let charged = self.charge_unknown_tx(client, limits, now);
        self.conn.pragma_update(None, "synchronous", synchronous)?;
        charged
    }

    fn charge_unknown_tx(&mut self, client: &str, limits: &Limits, now: f64) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO unknown_answers (client, debt, at) VALUES (?1, 1.0, ?2) \
             ON CONFLICT (client) DO UPDATE SET \
               debt = max(0.0, debt - max(0.0, ?2 - at) * ?3) + 1.0, at = max(at, ?2)",
            params![client, now, limits.per_sec],
        )?;
        if limits.per_sec > 0.0 {
            tx.execute(
                "DELETE FROM unknown_answers WHERE debt <= (?1 - at) * ?2",
                params![now, limits.per_sec],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Inserts a new pending token. Returns false, writing nothing, when a
    /// row with the same alias already exists (the caller draws again).
    pub fn insert_pending(&mut self, alias: &str, now: DateTime<Utc>) -> Result<bool> {
        let hash = alias_compare_hash(alias.as_bytes());
        let tx = self.write_tx()?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO proxy (alias, alias_compare_hash, modified, state) \
             VALUES (?1, ?2, ?3, 'pending')",
            params![alias, hash, sql_timestamp(now)],
        )?;
        tx.commit()?;
        Ok(inserted == 1)
    }

    /// Binds a live pending token to `host:port`. With
    /// [`RoutePublication::Live`] the route is written to `routes` in the
    /// same transaction and the row becomes `proxied`: the route is live
    /// when this returns `Redeemed`, and a failure leaves nothing behind.
    pub fn redeem(
        &mut self,
        alias: &str,
        host: &str,
        port: u16,
        now: DateTime<Utc>,
        ttl_secs: i64,
        publication: RoutePublication<'_>,
    ) -> Result<RedeemOutcome> {
        let cutoff = expiry_cutoff(now, ttl_secs);
        let state = match publication {
            RoutePublication::Live { .. } => "proxied",
            RoutePublication::Deferred => "mapped",
        };
        let written = self.conditional_write(alias, &cutoff, |tx, hash| {
            let updated = tx.execute(
                "UPDATE proxy SET dsthost = ?1, dstport = ?2, dstpath = '/', state = ?3, \
                 modified = ?4 WHERE alias_compare_hash = ?5 AND alias = ?6 AND state = 'pending' \
                 AND modified >= ?7",
                params![host, port, state, sql_timestamp(now), hash, alias, cutoff],
            )?;
            if let (1, RoutePublication::Live { target }) = (updated, publication) {
                tx.execute(
                    "INSERT OR REPLACE INTO routes (alias, target, expires) VALUES (?1, ?2, ?3)",
                    params![alias, target, route_expiry(now, ttl_secs)],
                )?;
            }
            Ok(updated)
        })?;
        Ok(match written {
            Written::Applied => RedeemOutcome::Redeemed,
            Written::Refused => RedeemOutcome::AlreadyRedeemed,
            Written::NoSuchRow => RedeemOutcome::Unknown,
        })
    }

    /// Deletes a token. A redeemed one may only be destroyed from the host
    /// it was redeemed on; a pending one from anywhere allowed (galyleo
    /// destroys from the login node when `sbatch` fails). Expired rows may
    /// be destroyed too: it only hastens the inevitable.
    pub fn destroy(&mut self, alias: &str, requester: &str) -> Result<DestroyOutcome> {
        let written = self.conditional_write(alias, "", |tx, hash| {
            tx.execute(
                "DELETE FROM proxy WHERE alias_compare_hash = ?1 AND alias = ?2 \
                 AND (dsthost IS NULL OR dsthost = '' OR dsthost = ?3)",
                params![hash, alias, requester],
            )
        })?;
        Ok(match written {
            Written::Applied => DestroyOutcome::Destroyed,
            Written::Refused => DestroyOutcome::WrongHost,
            Written::NoSuchRow => DestroyOutcome::Unknown,
        })
    }

    /// Records the batch job id of a live token, once.
    pub fn link(
        &mut self,
        alias: &str,
        jobid: &str,
        now: DateTime<Utc>,
        ttl_secs: i64,
    ) -> Result<LinkOutcome> {
        let cutoff = expiry_cutoff(now, ttl_secs);
        let written = self.conditional_write(alias, &cutoff, |tx, hash| {
            tx.execute(
                "UPDATE proxy SET jobid = ?1, linked_at = ?5 WHERE alias_compare_hash = ?2 \
                 AND alias = ?3 AND (jobid IS NULL OR jobid = '') AND modified >= ?4",
                params![jobid, hash, alias, cutoff, sql_timestamp(now)],
            )
        })?;
        Ok(match written {
            Written::Applied => LinkOutcome::Linked,
            Written::Refused => LinkOutcome::AlreadyLinked,
            Written::NoSuchRow => LinkOutcome::Unknown,
        })
    }

    /// The state of a live token, for the waiting page.
    pub fn proxy_state(
        &self,
        alias: &str,
        now: DateTime<Utc>,
        ttl_secs: i64,
    ) -> Result<Option<ProxyState>> {
        let hash = alias_compare_hash(alias.as_bytes());
        let state: Option<String> = self
            .conn
            .query_row(
                "SELECT state FROM proxy WHERE alias_compare_hash = ?1 AND alias = ?2 \
                 AND modified >= ?3",
                params![hash, alias, expiry_cutoff(now, ttl_secs)],
                |row| row.get(0),
            )
            .optional()?;
        Ok(state.map(|s| ProxyState::parse(&s)))
    }

    /// A live token with its job's last pushed state.
    pub fn token_job(
        &self,
        alias: &str,
        now: DateTime<Utc>,
        ttl_secs: i64,
    ) -> Result<Option<TokenJob>> {
        let hash = alias_compare_hash(alias.as_bytes());
        let row = self
            .conn
            .query_row(
                &format!(
                    "SELECT ps.state, ps.jobid, js.state, js.lastseen, ps.ended_at, ps.end_cause, \
                     {JOB_DETAIL_COLUMNS}, ps.dsthost FROM proxy ps \
                     LEFT JOIN jobstates js ON js.jobid = ps.jobid \
                     LEFT JOIN jobdetails jd ON jd.jobid = ps.jobid \
                     WHERE ps.alias_compare_hash = ?1 AND ps.alias = ?2 AND ps.modified >= ?3"
                ),
                params![hash, alias, expiry_cutoff(now, ttl_secs)],
                |row| {
                    let jobid = value_text(row.get(1)?).filter(|j| !j.is_empty());
                    let job_state = value_text(row.get(2)?);
                    Ok(TokenJob {
                        proxy_state: ProxyState::parse(
                            &value_text(row.get(0)?).unwrap_or_default(),
                        ),
                        job: job_record(row, 6, jobid.as_deref(), job_state.as_deref())?,
                        jobid,
                        job_state,
                        job_lastseen: value_integer(row.get(3)?),
                        redeemed: value_text(row.get(12)?).is_some_and(|h| !h.is_empty()),
                        ended_at: value_text(row.get(4)?),
                        end_cause: value_text(row.get(5)?),
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// Replaces job states with a fresh batch and purges those not seen for
    /// three days, in one transaction. Returns how many were written.
    pub fn update_jobstates(
        &mut self,
        states: &[(String, String)],
        now_epoch: i64,
    ) -> Result<usize> {
        let records: Vec<JobRecord> = states
            .iter()
            .map(|(jobid, state)| JobRecord {
                jobid: jobid.clone(),
                state: state.clone(),
                ..JobRecord::default()
            })
            .collect();
        self.record_jobs(&records, now_epoch)
    }

    /// Writes what the scheduler said of these jobs (seen now) and purges
    /// jobs not seen for three days, in one transaction.
    pub fn record_jobs(&mut self, jobs: &[JobRecord], now_epoch: i64) -> Result<usize> {
        let tx = self.write_tx()?;
        tx.execute(
            "DELETE FROM jobstates WHERE lastseen < ?1 OR typeof(lastseen) <> 'integer'",
            [now_epoch - JOBSTATE_RETENTION_SECS],
        )?;
        tx.execute(
            "DELETE FROM jobdetails WHERE jobid NOT IN (SELECT jobid FROM jobstates)",
            [],
        )?;
        {
            let mut state = tx.prepare(
                "INSERT OR REPLACE INTO jobstates (jobid, state, lastseen) VALUES (?1, ?2, ?3)",
            )?;
            let mut details = tx.prepare(
                "INSERT OR REPLACE INTO jobdetails (jobid, reason, start_time, time_limit, \
                 job_user, job_uid, nodes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for job in jobs {
                state.execute(params![job.jobid, job.state, now_epoch])?;
                let nodes = (!job.nodes.is_empty()).then(|| job.nodes.join(","));
                details.execute(params![
                    job.jobid,
                    job.reason,
                    job.start_time,
                    job.time_limit_secs,
                    job.user,
                    job.uid,
                    nodes
                ])?;
            }
        }
        tx.commit()?;
        Ok(jobs.len())
    }

    /// Live tokens that are linked to a job and not ended, with what the
    /// last pushes said of their job.
    pub fn linked_sessions(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<LinkedSession>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT ps.alias, ps.state, ps.jobid, ps.dsthost, ps.linked_at, js.state, \
             {JOB_DETAIL_COLUMNS} FROM proxy ps LEFT JOIN jobstates js ON js.jobid = ps.jobid \
             LEFT JOIN jobdetails jd ON jd.jobid = ps.jobid \
             WHERE ps.jobid IS NOT NULL AND ps.jobid <> '' \
             AND ps.state IN ('pending', 'mapped', 'proxied') AND ps.modified >= ?1 \
             ORDER BY ps.alias"
        ))?;
        let rows = stmt.query_map([expiry_cutoff(now, ttl_secs)], |row| {
            let jobid = value_text(row.get(2)?).unwrap_or_default();
            let job_state = value_text(row.get(5)?);
            Ok(LinkedSession {
                alias: value_text(row.get(0)?).unwrap_or_default(),
                state: ProxyState::parse(&value_text(row.get(1)?).unwrap_or_default()),
                job: job_record(row, 6, Some(&jobid), job_state.as_deref())?,
                jobid,
                dsthost: value_text(row.get(3)?).filter(|h| !h.is_empty()),
                linked_at: value_text(row.get(4)?).and_then(|t| parse_sql_timestamp(&t)),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Ends these sessions (state `ended`, when and why): their routes go in
    /// the same transaction (the triggers), the rows stay as tombstones
    /// until the TTL so their aliases are never issued again. Rows already
    /// ended or gone are left alone. Returns how many ended now.
    pub fn end_sessions(&mut self, ends: &[(String, String)], now: DateTime<Utc>) -> Result<usize> {
        let tx = self.write_tx()?;
        let mut ended = 0;
        {
            let mut end = tx.prepare(
                "UPDATE proxy SET state = 'ended', ended_at = ?1, end_cause = ?2 \
                 WHERE alias = ?3 AND state IN ('pending', 'mapped', 'proxied')",
            )?;
            for (alias, cause) in ends {
                ended += end.execute(params![sql_timestamp(now), cause, alias])?;
            }
        }
        tx.commit()?;
        Ok(ended)
    }

    /// Deletes rows of every state whose `modified` is older than the TTL.
    pub fn expire(&mut self, now: DateTime<Utc>, ttl_secs: i64) -> Result<usize> {
        let tx = self.write_tx()?;
        let deleted = tx.execute(
            "DELETE FROM proxy WHERE modified < ?1",
            [expiry_cutoff(now, ttl_secs)],
        )?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Rows that should have a route: live `mapped` and `proxied` ones, by
    /// alias. An expired row loses its route at the next publication, even
    /// before cron deletes it.
    pub fn route_rows(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<RouteRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT alias, dsthost, dstport, state, modified FROM proxy \
             WHERE state IN ('mapped', 'proxied') AND modified >= ?1 ORDER BY alias ASC",
        )?;
        let rows = stmt.query_map([expiry_cutoff(now, ttl_secs)], |row| {
            Ok(RouteRow {
                alias: value_text(row.get(0)?).unwrap_or_default(),
                modified: value_text(row.get(4)?),
                dsthost: value_text(row.get(1)?),
                dstport: value_text(row.get(2)?),
                state: ProxyState::parse(&value_text(row.get(3)?).unwrap_or_default()),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Flips `mapped` rows to `proxied` once their route is live.
    pub fn mark_proxied(&mut self, aliases: &[String]) -> Result<usize> {
        let tx = self.write_tx()?;
        let mut flipped = 0;
        {
            let mut update = tx.prepare(
                "UPDATE proxy SET state = 'proxied' WHERE alias = ?1 AND state = 'mapped'",
            )?;
            for alias in aliases {
                flipped += update.execute([alias])?;
            }
        }
        tx.commit()?;
        Ok(flipped)
    }

    /// Map routing's repair pass (cron): makes `routes` hold exactly
    /// `wanted`, flips their rows to `proxied`, and turns rows that are
    /// `proxied` without a wanted route back to `mapped` (their route was
    /// refused), so the state always says what is routed. One transaction;
    /// only differences are written, so a run with nothing to do writes
    /// nothing and Apache's readers never see a half-done set.
    pub fn sync_routes(&mut self, wanted: &[PublishedRoute]) -> Result<RouteSync> {
        let tx = self.write_tx()?;
        let mut sync = RouteSync::default();
        let current: std::collections::HashMap<String, (String, String)> = {
            let mut stmt = tx.prepare("SELECT alias, target, expires FROM routes")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let wanted_aliases: std::collections::HashSet<&str> =
            wanted.iter().map(|r| r.alias.as_str()).collect();
        {
            let mut flip = tx.prepare(
                "UPDATE proxy SET state = 'proxied' WHERE alias = ?1 AND state = 'mapped'",
            )?;
            let mut write = tx.prepare(
                "INSERT OR REPLACE INTO routes (alias, target, expires) VALUES (?1, ?2, ?3)",
            )?;
            for route in wanted {
                sync.flipped += flip.execute([&route.alias])?;
                let same = current.get(&route.alias).is_some_and(|(target, expires)| {
                    *target == route.target && *expires == route.expires
                });
                if !same {
                    write.execute(params![route.alias, route.target, route.expires])?;
                    sync.written += 1;
                }
            }
            let mut remove = tx.prepare("DELETE FROM routes WHERE alias = ?1")?;
            for alias in current.keys() {
                if !wanted_aliases.contains(alias.as_str()) {
                    sync.removed += remove.execute([alias])?;
                }
            }
        }
        {
            let mut proxied = tx.prepare("SELECT alias FROM proxy WHERE state = 'proxied'")?;
            let stale: Vec<String> = proxied
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?
                .into_iter()
                .filter(|alias| !wanted_aliases.contains(alias.as_str()))
                .collect();
            drop(proxied);
            let mut unroute = tx.prepare(
                "UPDATE proxy SET state = 'mapped' WHERE alias = ?1 AND state = 'proxied'",
            )?;
            for alias in stale {
                sync.unrouted += unroute.execute([alias])?;
            }
        }
        tx.commit()?;
        Ok(sync)
    }

    /// The target Apache's `dbd:` map answers for `alias` at `now` (the same
    /// query, with `now` for SQLite's clock): what the data plane sees.
    pub fn live_route(&self, alias: &str, now: DateTime<Utc>) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT target FROM routes WHERE alias = ?1 AND expires >= ?2",
                params![alias, sql_timestamp(now)],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The targets of the routes live at `now`, and when the first of them
    /// expires.
    pub fn live_targets(&self, now: DateTime<Utc>) -> Result<(Vec<String>, Option<DateTime<Utc>>)> {
        let now_text = sql_timestamp(now);
        let mut stmt = self
            .conn
            .prepare("SELECT DISTINCT target FROM routes WHERE expires >= ?1")?;
        let targets = stmt
            .query_map([&now_text], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        let first_expiry: Option<String> = self.conn.query_row(
            "SELECT min(expires) FROM routes WHERE expires >= ?1",
            [&now_text],
            |r| r.get(0),
        )?;
        Ok((targets, first_expiry.and_then(|t| parse_sql_timestamp(&t))))
    }

    /// How many routes the data plane holds that are live at `now`.
    pub fn live_route_count(&self, now: DateTime<Utc>) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM routes WHERE expires >= ?1",
            [sql_timestamp(now)],
            |r| r.get(0),
        )?)
    }

    /// SQLite's `PRAGMA data_version`: changes whenever another connection
    /// commits, so a watcher can poll it cheaply.
    pub fn data_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Reads a database without writing to it (no migration, no WAL switch):
    /// for `migrate --dry-run` and `check`.
    pub fn inspect(path: &Path) -> Result<Inspection> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(2))?;
        let mut inspection = Inspection {
            version: conn.query_row("PRAGMA user_version", [], |r| r.get(0))?,
            has_proxy: table_exists(&conn, "proxy")?,
            ..Inspection::default()
        };
        if !inspection.has_proxy {
            return Ok(inspection);
        }
        let strings = |sql: &str| -> Result<Vec<String>> {
            let mut stmt = conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        };
        inspection.proxy_columns = strings("SELECT name FROM pragma_table_info('proxy')")?;
        inspection.colliding_aliases = strings(
            "SELECT group_concat(alias, ' = ') FROM proxy \
             GROUP BY alias_compare_hash HAVING count(*) > 1",
        )?;
        let mut stmt =
            conn.prepare("SELECT state, count(*) FROM proxy GROUP BY state ORDER BY state")?;
        let counts = stmt.query_map([], |r| {
            Ok((value_text(r.get(0)?).unwrap_or_default(), r.get(1)?))
        })?;
        inspection.tokens_by_state = counts.collect::<rusqlite::Result<_>>()?;
        Ok(inspection)
    }

    /// A consistent copy of the database at `backup` (`VACUUM INTO`), safe
    /// while other processes write.
    pub fn backup_to(path: &Path, backup: &Path) -> Result<()> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute("VACUUM INTO ?1", [backup.to_string_lossy()])?;
        Ok(())
    }
}

/// A `proxy` row as admins see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    pub alias: String,
    pub state: String,
    pub dsthost: Option<String>,
    pub dstport: Option<i64>,
    pub jobid: Option<String>,
    pub modified: String,
}

/// Counts for `satellite stats`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub by_state: Vec<(String, i64)>,
    pub oldest_modified: Option<String>,
    pub sessions_per_host: Vec<(String, i64)>,
    pub jobstates: i64,
}

impl Store {
    /// Every token, oldest first.
    pub fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        self.query_tokens("ORDER BY modified ASC, alias ASC", [])
    }

    pub fn find_token(&self, alias: &str) -> Result<Option<TokenRow>> {
        let hash = alias_compare_hash(alias.as_bytes());
        Ok(self
            .query_tokens(
                "WHERE alias_compare_hash = ?1 AND alias = ?2",
                params![hash, alias],
            )?
            .into_iter()
            .next())
    }

    fn query_tokens<P: rusqlite::Params>(&self, tail: &str, params: P) -> Result<Vec<TokenRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT alias, state, dsthost, dstport, jobid, modified FROM proxy {tail}"
        ))?;
        let rows = stmt.query_map(params, |row| {
            Ok(TokenRow {
                alias: value_text(row.get(0)?).unwrap_or_default(),
                state: value_text(row.get(1)?).unwrap_or_default(),
                dsthost: value_text(row.get(2)?),
                dstport: value_integer(row.get(3)?),
                jobid: value_text(row.get(4)?),
                modified: value_text(row.get(5)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes a token whatever its state or host (an admin's revoke).
    pub fn revoke(&mut self, alias: &str) -> Result<bool> {
        let hash = alias_compare_hash(alias.as_bytes());
        let tx = self.write_tx()?;
        let deleted = tx.execute(
            "DELETE FROM proxy WHERE alias_compare_hash = ?1 AND alias = ?2",
            params![hash, alias],
        )?;
        tx.commit()?;
        Ok(deleted == 1)
    }

    pub fn stats(&self) -> Result<Stats> {
        let pairs = |sql: &str| -> Result<Vec<(String, i64)>> {
            let mut stmt = self.conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| {
                Ok((value_text(r.get(0)?).unwrap_or_default(), r.get(1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        };
        Ok(Stats {
            by_state: pairs("SELECT state, count(*) FROM proxy GROUP BY state ORDER BY state")?,
            oldest_modified: self
                .conn
                .query_row("SELECT min(modified) FROM proxy", [], |r| r.get(0))?,
            sessions_per_host: pairs(
                "SELECT dsthost, count(*) FROM proxy WHERE dsthost IS NOT NULL AND dsthost <> '' \
                 GROUP BY dsthost ORDER BY count(*) DESC, dsthost",
            )?,
            jobstates: self
                .conn
                .query_row("SELECT count(*) FROM jobstates", [], |r| r.get(0))?,
        })
    }
}

/// What the store can say about the service at one instant, for metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Rows by state, expired ones cron has not deleted yet included.
    pub by_state: Vec<(String, i64)>,
    /// Routes the data plane serves now (map routing's `routes` table).
    pub live_routes: i64,
    /// Live rows (not `ended`, not past the TTL) never linked to a job.
    pub unbound: i64,
    /// `ended` rows by cause class: see [`Store::gauges`].
    pub ended_job_end: i64,
    pub ended_binding_mismatch: i64,
    /// `max(jobstates.lastseen)` as an epoch; `None` when nothing was pushed.
    pub newest_jobstate: Option<i64>,
}

impl Store {
    /// Counts for the metrics, read in one transaction so they agree.
    ///
    /// Ended sessions are classed by the text `sessions` writes to
    /// `end_cause`: `job … ended (…)` and `job … is no longer known to the
    /// scheduler` are the job's end; every other cause (a foreign node, a
    /// denied user) is a binding mismatch.
    pub fn gauges(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Gauges> {
        let tx = self.conn.unchecked_transaction()?;
        let mut stmt =
            tx.prepare("SELECT state, count(*) FROM proxy GROUP BY state ORDER BY state")?;
        let by_state = stmt
            .query_map([], |r| {
                Ok((value_text(r.get(0)?).unwrap_or_default(), r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        drop(stmt);
        let live_routes = tx.query_row(
            "SELECT count(*) FROM routes WHERE expires >= ?1",
            [sql_timestamp(now)],
            |r| r.get(0),
        )?;
        let unbound = tx.query_row(
            "SELECT count(*) FROM proxy WHERE state <> 'ended' AND modified >= ?1 \
             AND (jobid IS NULL OR jobid = '')",
            [expiry_cutoff(now, ttl_secs)],
            |r| r.get(0),
        )?;
        let (ended_job_end, ended_binding_mismatch) = tx.query_row(
            "SELECT \
               coalesce(sum(end_cause LIKE 'job % ended (%' \
                   OR end_cause LIKE 'job % is no longer known to the scheduler'), 0), \
               coalesce(sum(NOT (coalesce(end_cause, '') LIKE 'job % ended (%' \
                   OR coalesce(end_cause, '') LIKE 'job % is no longer known to the scheduler')), 0) \
             FROM proxy WHERE state = 'ended'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let newest: Value =
            tx.query_row("SELECT max(lastseen) FROM jobstates", [], |r| r.get(0))?;
        Ok(Gauges {
            by_state,
            live_routes,
            unbound,
            ended_job_end,
            ended_binding_mismatch,
            newest_jobstate: value_integer(newest),
        })
    }
}

/// The longest pause between two tries for a lock.
const BUSY_PAUSE_MAX: Duration = Duration::from_millis(2);

/// Waits for SQLite's locks up to `timeout`, trying again soon. SQLite's
/// own busy timeout sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and then
/// 100 ms between tries, while a writer holds the lock for about one fsync
/// (a millisecond or two): under a burst of redeems the lock sat free while
/// the waiters slept. Here the pause doubles from 0.1 ms to
/// [`BUSY_PAUSE_MAX`], each drawn between half and all of that so that
/// waiters do not wake in step.
fn busy_handler(timeout: Duration) -> impl FnMut(i32) -> bool + Send + 'static {
    let mut started = std::time::Instant::now();
    move |count| {
        // SQLite counts from 0 for each lock it waits for.
        if count == 0 {
            started = std::time::Instant::now();
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return false;
        }
        let ceiling = Duration::from_micros(100)
            .saturating_mul(1 << count.clamp(0, 5))
            .min(BUSY_PAUSE_MAX);
        let spread = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let half = ceiling / 2;
        let jitter = Duration::from_nanos(u64::from(spread) % (half.as_nanos() as u64).max(1));
        std::thread::sleep((half + jitter).min(timeout - waited));
        true
    }
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Whether a row for this alias exists and is younger than `cutoff`
/// (an empty cutoff matches every row).
fn live_row_exists(conn: &Connection, hash: &str, alias: &str, cutoff: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM proxy WHERE alias_compare_hash = ?1 AND alias = ?2 AND modified >= ?3",
            params![hash, alias, cutoff],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The `jobstates` columns beyond state and lastseen, in [`job_record`]'s
/// order.
const JOB_DETAIL_COLUMNS: &str =
    "jd.reason, jd.start_time, jd.time_limit, jd.job_user, jd.job_uid, jd.nodes";

/// A job record from [`JOB_DETAIL_COLUMNS`] starting at column `first`;
/// `None` when no push mentioned the job.
fn job_record(
    row: &rusqlite::Row<'_>,
    first: usize,
    jobid: Option<&str>,
    state: Option<&str>,
) -> rusqlite::Result<Option<JobRecord>> {
    let (Some(jobid), Some(state)) = (jobid, state) else {
        return Ok(None);
    };
    Ok(Some(JobRecord {
        jobid: jobid.to_owned(),
        state: state.to_owned(),
        reason: value_text(row.get(first)?),
        start_time: value_integer(row.get(first + 1)?),
        time_limit_secs: value_integer(row.get(first + 2)?),
        user: value_text(row.get(first + 3)?),
        uid: value_integer(row.get(first + 4)?),
        nodes: value_text(row.get(first + 5)?)
            .map(|n| {
                n.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    }))
}

/// Legacy columns are loosely typed: read whatever is there as text.
fn value_text(value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Integer(i) => Some(i.to_string()),
        Value::Real(r) => Some(r.to_string()),
        Value::Text(t) => Some(t),
        Value::Blob(b) => Some(String::from_utf8_lossy(&b).into_owned()),
    }
}

fn value_integer(value: Value) -> Option<i64> {
    match value {
        Value::Integer(i) => Some(i),
        Value::Real(r) => Some(r as i64),
        Value::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn new_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let (store, migration) =
            Store::open_or_create(&dir.path().join("state.sqlite"), Duration::from_secs(1))
                .unwrap();
        assert!(migration.created);
        (dir, store)
    }

    const LIMITS: Limits = Limits {
        burst: 3.0,
        per_sec: 0.5,
    };

    #[test]
    fn unknown_answers_are_counted_per_client_and_pay_back_over_time() {
        let (_dir, mut store) = new_store();
        assert_eq!(
            store.unknown_debt("192.0.2.1", &LIMITS, 100.0).unwrap(),
            0.0
        );
        for _ in 0..3 {
            store.charge_unknown("192.0.2.1", &LIMITS, 100.0).unwrap();
        }
        assert_eq!(
            store.unknown_debt("192.0.2.1", &LIMITS, 100.0).unwrap(),
            3.0
        );
        assert_eq!(
            store.unknown_debt("192.0.2.1", &LIMITS, 102.0).unwrap(),
            2.0
        );
        assert_eq!(
            store.unknown_debt("192.0.2.2", &LIMITS, 100.0).unwrap(),
            0.0
        );
        store.charge_unknown("192.0.2.1", &LIMITS, 102.0).unwrap();
        assert_eq!(
            store.unknown_debt("192.0.2.1", &LIMITS, 102.0).unwrap(),
            3.0
        );
        // A clock that went back neither pays back nor moves `at` back.
        store.charge_unknown("192.0.2.1", &LIMITS, 90.0).unwrap();
        assert_eq!(
            store.unknown_debt("192.0.2.1", &LIMITS, 102.0).unwrap(),
            4.0
        );
    }

    #[test]
    fn drained_rows_go_at_the_next_charge() {
        let (_dir, mut store) = new_store();
        store.charge_unknown("192.0.2.1", &LIMITS, 100.0).unwrap();
        store.charge_unknown("192.0.2.2", &LIMITS, 101.0).unwrap();
        // 192.0.2.1 has paid its 1 back at 102; 192.0.2.2 still owes.
        store.charge_unknown("192.0.2.3", &LIMITS, 102.5).unwrap();
        let clients: Vec<String> = {
            let mut stmt = store
                .conn
                .prepare("SELECT client FROM unknown_answers ORDER BY client")
                .unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.collect::<rusqlite::Result<_>>().unwrap()
        };
        assert_eq!(clients, ["192.0.2.2", "192.0.2.3"]);
    }

    #[test]
    fn a_schema_2_database_gets_the_unknown_answers_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        drop(Store::open_or_create(&path, Duration::from_secs(1)).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE unknown_answers; PRAGMA user_version = 2;")
            .unwrap();
        let mut store = Store::open(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.charge_unknown("192.0.2.1", &LIMITS, 1.0).unwrap();
    }

    /// Another connection's write transaction on `path`, held until the
    /// returned sender is dropped or sent to.
    fn hold_write_lock(path: &Path) -> std::sync::mpsc::Sender<()> {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || {
            let conn = Connection::open(path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked.send(()).unwrap();
            let _ = released.recv();
            conn.execute_batch("COMMIT").unwrap();
        });
        is_locked.recv().unwrap();
        release
    }

    #[test]
    fn a_writer_waiting_for_the_lock_gets_it_once_the_holder_commits() {
        let (dir, _) = new_store();
        let path = dir.path().join("state.sqlite");
        let release = hold_write_lock(&path);
        let waiter = std::thread::spawn(move || {
            let mut store = Store::open(&path, Duration::from_secs(30)).unwrap();
            store.insert_pending("able-acorn-zoo", at("2026-01-01T12:00:00Z"))
        });
        std::thread::sleep(Duration::from_millis(50));
        release.send(()).unwrap();
        assert!(waiter.join().unwrap().unwrap());
    }

    #[test]
    fn a_lock_held_past_the_busy_timeout_is_busy_not_a_hang() {
        let (dir, _) = new_store();
        let path = dir.path().join("state.sqlite");
        let _release = hold_write_lock(&path);
        let mut store = Store::open(&path, Duration::from_millis(100)).unwrap();
        let err = store
            .insert_pending("able-acorn-zoo", at("2026-01-01T12:00:00Z"))
            .unwrap_err();
        assert!(matches!(err, CoreError::Busy), "{err:?}");
    }

    #[test]
    fn a_token_is_redeemed_once_and_destroyed_only_from_its_host() {
        let (_dir, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        assert!(store.insert_pending("able-acorn-zoo", now).unwrap());
        assert!(!store.insert_pending("able-acorn-zoo", now).unwrap());
        assert_eq!(
            store
                .redeem(
                    "able-acorn-zoo",
                    "10.0.0.5",
                    8888,
                    now,
                    100,
                    RoutePublication::Deferred
                )
                .unwrap(),
            RedeemOutcome::Redeemed
        );
        assert_eq!(
            store
                .redeem(
                    "able-acorn-zoo",
                    "10.0.0.6",
                    9999,
                    now,
                    100,
                    RoutePublication::Deferred
                )
                .unwrap(),
            RedeemOutcome::AlreadyRedeemed
        );
        assert_eq!(
            store.destroy("able-acorn-zoo", "10.0.0.6").unwrap(),
            DestroyOutcome::WrongHost
        );
        assert_eq!(
            store.destroy("able-acorn-zoo", "10.0.0.5").unwrap(),
            DestroyOutcome::Destroyed
        );
        assert_eq!(
            store.destroy("able-acorn-zoo", "10.0.0.5").unwrap(),
            DestroyOutcome::Unknown
        );
    }

    #[test]
    fn an_expired_token_behaves_as_unknown_before_cron_deletes_it() {
        let (_dir, mut store) = new_store();
        store
            .insert_pending("old-token-here", at("2026-01-01T00:00:00Z"))
            .unwrap();
        let later = at("2026-01-01T00:01:41Z");
        assert_eq!(
            store
                .redeem(
                    "old-token-here",
                    "10.0.0.5",
                    8888,
                    later,
                    100,
                    RoutePublication::Deferred
                )
                .unwrap(),
            RedeemOutcome::Unknown
        );
        assert_eq!(
            store.proxy_state("old-token-here", later, 100).unwrap(),
            None
        );
        assert_eq!(store.expire(later, 100).unwrap(), 1);
    }

    #[test]
    fn modified_keeps_the_legacy_text_format() {
        let (_dir, mut store) = new_store();
        store
            .insert_pending("a-b-c", at("2026-03-04T05:06:07Z"))
            .unwrap();
        let modified: String = store
            .connection()
            .query_row("SELECT modified FROM proxy", [], |r| r.get(0))
            .unwrap();
        assert_eq!(modified, "2026-03-04 05:06:07");
    }

    fn live(target: &str) -> RoutePublication<'_> {
        RoutePublication::Live { target }
    }

    #[test]
    fn a_live_redeem_routes_in_its_own_transaction_until_the_ttl_ends() {
        let (_dir, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        store.insert_pending("able-acorn-zoo", now).unwrap();
        assert_eq!(
            store
                .redeem(
                    "able-acorn-zoo",
                    "10.0.0.5",
                    8888,
                    now,
                    100,
                    live("10.0.0.5:8888")
                )
                .unwrap(),
            RedeemOutcome::Redeemed
        );
        assert_eq!(
            store.proxy_state("able-acorn-zoo", now, 100).unwrap(),
            Some(ProxyState::Proxied)
        );
        let at_ttl_end = at("2026-01-01T12:01:40Z");
        assert_eq!(
            store
                .live_route("able-acorn-zoo", at_ttl_end)
                .unwrap()
                .as_deref(),
            Some("10.0.0.5:8888")
        );
        assert_eq!(
            store
                .live_route("able-acorn-zoo", at("2026-01-01T12:01:41Z"))
                .unwrap(),
            None
        );
        // A refused second redeem writes no route either.
        store.insert_pending("other-token-here", now).unwrap();
        store.revoke("other-token-here").unwrap();
        assert_eq!(
            store
                .redeem(
                    "other-token-here",
                    "10.0.0.6",
                    8888,
                    now,
                    100,
                    live("10.0.0.6:8888")
                )
                .unwrap(),
            RedeemOutcome::Unknown
        );
        assert_eq!(store.live_route_count(now).unwrap(), 1);
    }

    #[test]
    fn any_delete_or_state_change_of_a_token_drops_its_route() {
        let (_dir, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        for alias in ["one-a-b", "two-a-b", "three-a-b"] {
            store.insert_pending(alias, now).unwrap();
            store
                .redeem(alias, "10.0.0.5", 8888, now, 100, live("10.0.0.5:8888"))
                .unwrap();
        }
        store.destroy("one-a-b", "10.0.0.5").unwrap();
        // What a Perl script or a hand edit does, with no satellite code.
        store
            .connection()
            .execute(
                "UPDATE proxy SET state = 'mapped' WHERE alias = 'two-a-b'",
                [],
            )
            .unwrap();
        assert_eq!(store.live_route("one-a-b", now).unwrap(), None);
        assert_eq!(store.live_route("two-a-b", now).unwrap(), None);
        assert!(store.live_route("three-a-b", now).unwrap().is_some());
        assert_eq!(store.expire(at("2026-01-01T13:00:00Z"), 100).unwrap(), 2);
        assert_eq!(store.live_route_count(now).unwrap(), 0);
    }

    #[test]
    fn sync_routes_writes_only_differences_and_unroutes_refused_rows() {
        let (_dir, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        for alias in ["kept-a-b", "moved-a-b", "refused-a-b"] {
            store.insert_pending(alias, now).unwrap();
            store
                .redeem(alias, "10.0.0.5", 8888, now, 100, live("10.0.0.5:8888"))
                .unwrap();
        }
        store.insert_pending("late-a-b", now).unwrap();
        store
            .redeem(
                "late-a-b",
                "10.0.0.7",
                8888,
                now,
                100,
                RoutePublication::Deferred,
            )
            .unwrap();
        let expires = route_expiry(now, 100);
        let route = |alias: &str, target: &str| PublishedRoute {
            alias: alias.into(),
            target: target.into(),
            expires: expires.clone(),
        };
        let wanted = [
            route("kept-a-b", "10.0.0.5:8888"),
            route("moved-a-b", "10.0.0.6:8888"),
            route("late-a-b", "10.0.0.7:8888"),
        ];
        let sync = store.sync_routes(&wanted).unwrap();
        assert_eq!(
            sync,
            RouteSync {
                written: 2,
                removed: 1,
                flipped: 1,
                unrouted: 1
            }
        );
        assert_eq!(
            store.proxy_state("refused-a-b", now, 100).unwrap(),
            Some(ProxyState::Mapped)
        );
        assert_eq!(
            store.live_route("moved-a-b", now).unwrap().as_deref(),
            Some("10.0.0.6:8888")
        );
        assert_eq!(store.sync_routes(&wanted).unwrap(), RouteSync::default());
    }

    #[test]
    fn a_version_1_database_gains_the_routes_table_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(CREATE_PROXY).unwrap();
            conn.execute_batch(CREATE_JOBSTATES).unwrap();
            conn.execute_batch(CREATE_INDEXES).unwrap();
            conn.execute_batch(
                "INSERT INTO proxy (alias, alias_compare_hash, state) VALUES ('a-b-c', 'h', 'pending'); \
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = Store::open(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(table_exists(store.connection(), "routes").unwrap());
        let found = Store::inspect(&path).unwrap();
        assert_eq!(found.tokens_by_state, vec![("pending".to_owned(), 1)]);
    }
}
