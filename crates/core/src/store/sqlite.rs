//! [`Store`] on SQLite: the legacy `state.sqlite`.
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

use super::sqlite_schema::{self, table_exists};
use super::{
    decide_destroy, expiry_cutoff, node_list, parse_sql_timestamp, route_expiry, sql_timestamp,
    DestroyOutcome, EndCause, Gauges, JobRecord, LinkOutcome, LinkedSession, Migration, ProxyState,
    PublishedRoute, RedeemOutcome, RouteEnd, RoutePublication, RouteRow, RouteSync, SessionEnd,
    Stats, Store, TokenJob, TokenRow, WatcherRow, Written, JOBSTATE_RETENTION_SECS,
    WATCHER_FORGET_SECS,
};
use crate::error::{CoreError, Result};
use crate::ratelimit::Limits;
use crate::token::alias_compare_hash;

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
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
    /// Every table the file has.
    pub tables: Vec<String>,
}

impl SqliteStore {
    /// Everything a move to another store takes (see `transfer`), read in
    /// one transaction so that the tables agree.
    pub fn snapshot(&self) -> Result<super::transfer::Snapshot> {
        use super::transfer::{JobDetailRecord, ProxyRecord, Snapshot};
        let tx = self.conn.unchecked_transaction()?;
        let mut snapshot = Snapshot::default();
        let mut unreadable = 0;
        {
            let mut stmt = tx.prepare(
                "SELECT alias, alias_compare_hash, modified, dsthost, dstport, dstpath, state, \
                 jobid, linked_at, ended_at, end_cause, end_kind FROM proxy",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let port: Value = row.get(4)?;
                let stored = port != Value::Null;
                let dstport = value_integer(port).and_then(|n| i32::try_from(n).ok());
                if dstport.is_none() && stored {
                    unreadable += 1;
                }
                snapshot.proxy.push(ProxyRecord {
                    alias: value_text(row.get(0)?).unwrap_or_default(),
                    alias_compare_hash: value_text(row.get(1)?).unwrap_or_default(),
                    modified: value_text(row.get(2)?),
                    dsthost: value_text(row.get(3)?),
                    dstport,
                    dstpath: value_text(row.get(5)?),
                    state: value_text(row.get(6)?).unwrap_or_default(),
                    jobid: value_text(row.get(7)?),
                    linked_at: value_text(row.get(8)?),
                    ended_at: value_text(row.get(9)?),
                    end_cause: value_text(row.get(10)?),
                    end_kind: value_text(row.get(11)?),
                });
            }
        }
        {
            let mut stmt = tx.prepare("SELECT jobid, state, lastseen FROM jobstates")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let seen: Value = row.get(2)?;
                let stored = seen != Value::Null;
                // The Perl service wrote a timestamp's text here.
                let as_time = value_text(seen.clone())
                    .and_then(|t| super::parse_sql_timestamp(&t))
                    .map(|at| at.timestamp());
                let lastseen = value_integer(seen).or(as_time);
                if lastseen.is_none() && stored {
                    unreadable += 1;
                }
                snapshot.jobstates.push((
                    value_text(row.get(0)?).unwrap_or_default(),
                    value_text(row.get(1)?).unwrap_or_default(),
                    lastseen,
                ));
            }
        }
        {
            let mut stmt = tx.prepare(
                "SELECT jobid, reason, start_time, time_limit, job_user, job_uid, nodes FROM jobdetails",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                snapshot.jobdetails.push(JobDetailRecord {
                    jobid: value_text(row.get(0)?).unwrap_or_default(),
                    reason: value_text(row.get(1)?),
                    start_time: value_integer(row.get(2)?),
                    time_limit: value_integer(row.get(3)?),
                    job_user: value_text(row.get(4)?),
                    job_uid: value_integer(row.get(5)?),
                    nodes: value_text(row.get(6)?),
                });
            }
        }
        snapshot.routes = tx
            .prepare("SELECT alias, target, expires FROM routes")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        snapshot.session_ends = tx
            .prepare("SELECT cause, count FROM session_ends")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        snapshot.unknown_answers = tx
            .prepare("SELECT client, debt, at FROM unknown_answers")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        snapshot.unreadable = unreadable;
        Ok(snapshot)
    }

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
        let mut store = SqliteStore {
            conn,
            path: path.to_owned(),
        };
        let migration = sqlite_schema::migrate(&mut store.conn, path, create)?;
        Ok((store, migration))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for this module's tests to write as another
    /// program would (a Perl script, a hand edit). Nothing outside the
    /// store gets it: every other write goes through [`Store`].
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Commits on this connection stop waiting for the disk: for a bulk
    /// load whose loss in a crash does not matter (the bench's fill).
    pub fn without_fsync(&mut self) -> Result<()> {
        self.conn.execute_batch("PRAGMA synchronous = OFF")?;
        Ok(())
    }

    /// The state of a live token (tests and the admin's eyes).
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

    /// The target Apache's `dbd:` map answers for `alias` at `now` (the
    /// same query, with `now` for the database's clock): what the data
    /// plane sees.
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

    pub fn schema_version(&self) -> Result<i64> {
        sqlite_schema::schema_version(&self.conn)
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

    fn charge_unknown_tx(&mut self, client: &str, limits: &Limits, now: f64) -> Result<f64> {
        let tx = self.write_tx()?;
        let debt: f64 = tx.query_row(
            "INSERT INTO unknown_answers (client, debt, at) VALUES (?1, 1.0, ?2) \
             ON CONFLICT (client) DO UPDATE SET \
               debt = max(0.0, debt - max(0.0, ?2 - at) * ?3) + 1.0, at = max(at, ?2) \
             RETURNING debt",
            params![client, now, limits.per_sec],
            |r| r.get(0),
        )?;
        if limits.per_sec > 0.0 {
            tx.execute(
                "DELETE FROM unknown_answers WHERE debt <= (?1 - at) * ?2",
                params![now, limits.per_sec],
            )?;
        }
        tx.commit()?;
        Ok(debt)
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
        inspection.tables =
            strings("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
        inspection.colliding_aliases = strings(
            "SELECT group_concat(alias, ' = ') FROM proxy \
             GROUP BY alias_compare_hash HAVING count(*) > 1",
        )?;
        inspection.tokens_by_state = counted_pairs(&conn, TOKENS_BY_STATE)?;
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

impl Store for SqliteStore {
    fn unknown_debt(&self, client: &str, limits: &Limits, now: f64) -> Result<f64> {
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

    // The count is not worth an fsync: the commit runs with `synchronous =
    // NORMAL` (in WAL mode a power cut may forget it, and never corrupts
    // anything).
    fn charge_unknown(&mut self, client: &str, limits: &Limits, now: f64) -> Result<f64> {
        let synchronous: i64 = self
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))?;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let charged = self.charge_unknown_tx(client, limits, now);
        self.conn.pragma_update(None, "synchronous", synchronous)?;
        charged
    }

    fn insert_pending(&mut self, alias: &str, now: DateTime<Utc>) -> Result<bool> {
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

    fn redeem(
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
        Ok(written.into())
    }

    fn destroy(
        &mut self,
        alias: &str,
        requester: &str,
        now: DateTime<Utc>,
    ) -> Result<DestroyOutcome> {
        let hash = alias_compare_hash(alias.as_bytes());
        let tx = self.write_tx()?;
        let row: Option<(Option<String>, Option<String>, Option<String>)> = tx
            .query_row(
                "SELECT state, dsthost, end_kind FROM proxy \
                 WHERE alias_compare_hash = ?1 AND alias = ?2",
                params![hash, alias],
                |r| {
                    Ok((
                        value_text(r.get(0)?),
                        value_text(r.get(1)?),
                        value_text(r.get(2)?),
                    ))
                },
            )
            .optional()?;
        let Some((state, dsthost, end_kind)) = row else {
            return Ok(DestroyOutcome::Unknown);
        };
        let (outcome, ending) = decide_destroy(
            state.as_deref(),
            dsthost.as_deref(),
            end_kind.as_deref(),
            requester,
        );
        if let Some(cause) = ending {
            end_rows(&tx, &hash, alias, EndCause::Destroy, &cause, now)?;
        }
        tx.commit()?;
        Ok(outcome)
    }

    fn link(
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
        Ok(written.into())
    }

    fn token_job(
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
                     {JOB_DETAIL_COLUMNS}, ps.dsthost, ps.end_kind, \
                     coalesce(ps.modified < ?3, 1) FROM proxy ps \
                     LEFT JOIN jobstates js ON js.jobid = ps.jobid \
                     LEFT JOIN jobdetails jd ON jd.jobid = ps.jobid \
                     WHERE ps.alias_compare_hash = ?1 AND ps.alias = ?2"
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
                        end_kind: value_text(row.get(13)?).and_then(|k| EndCause::from_label(&k)),
                        expired: value_integer(row.get(14)?) != Some(0),
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    fn record_jobs(
        &mut self,
        jobs: &[JobRecord],
        ends: &[SessionEnd],
        now_epoch: i64,
    ) -> Result<usize> {
        let tx = self.write_tx()?;
        let now = DateTime::from_timestamp(now_epoch, 0).unwrap_or_default();
        for end in ends {
            let hash = alias_compare_hash(end.alias.as_bytes());
            end_rows(&tx, &hash, &end.alias, end.kind, &end.cause, now)?;
        }
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

    fn linked_sessions(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<LinkedSession>> {
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

    fn end_sessions(&mut self, ends: &[SessionEnd], now: DateTime<Utc>) -> Result<usize> {
        let tx = self.write_tx()?;
        let mut ended = 0;
        for end in ends {
            let hash = alias_compare_hash(end.alias.as_bytes());
            ended += end_rows(&tx, &hash, &end.alias, end.kind, &end.cause, now)?;
        }
        tx.commit()?;
        Ok(ended)
    }

    fn expire(&mut self, now: DateTime<Utc>, ttl_secs: i64) -> Result<usize> {
        let tx = self.write_tx()?;
        let deleted = delete_counting(
            &tx,
            "modified < ?1",
            [expiry_cutoff(now, ttl_secs)],
            EndCause::Ttl,
        )?;
        // Route ends no watcher took within the forget period (a site with
        // no watcher running, or one long gone) would pile up.
        let forget_before = sql_timestamp(now - chrono::Duration::seconds(WATCHER_FORGET_SECS));
        tx.execute("DELETE FROM route_ends WHERE at < ?1", [&forget_before])?;
        tx.execute(
            "DELETE FROM watchers WHERE heartbeat IS NULL OR heartbeat < ?1",
            [&forget_before],
        )?;
        tx.commit()?;
        Ok(deleted)
    }

    fn route_rows(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<RouteRow>> {
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

    fn mark_proxied(&mut self, aliases: &[String]) -> Result<usize> {
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

    fn sync_routes(&mut self, wanted: &[PublishedRoute], refused: &[String]) -> Result<RouteSync> {
        let tx = self.write_tx()?;
        let mut sync = RouteSync::default();
        let current: std::collections::HashMap<String, (String, String)> = {
            let mut stmt = tx.prepare("SELECT alias, target, expires FROM routes")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        {
            let mut flip = tx.prepare(
                "UPDATE proxy SET state = 'proxied' WHERE alias = ?1 AND state = 'mapped'",
            )?;
            // Only while the row is still routable: one ended since the
            // caller read it (destroy, revoke, a job end) gets no route back.
            let mut write = tx.prepare(
                "INSERT OR REPLACE INTO routes (alias, target, expires) SELECT ?1, ?2, ?3 \
                 WHERE EXISTS (SELECT 1 FROM proxy WHERE alias = ?1 AND state = 'proxied')",
            )?;
            for route in wanted {
                sync.flipped += flip.execute([&route.alias])?;
                let same = current.get(&route.alias).is_some_and(|(target, expires)| {
                    *target == route.target && *expires == route.expires
                });
                if !same {
                    sync.written +=
                        write.execute(params![route.alias, route.target, route.expires])?;
                }
            }
            // Refused rows lose their route and are `mapped` again; rows
            // redeemed since the caller read (not in either list) keep
            // theirs.
            let mut remove = tx.prepare("DELETE FROM routes WHERE alias = ?1")?;
            let mut unroute = tx.prepare(
                "UPDATE proxy SET state = 'mapped' WHERE alias = ?1 AND state = 'proxied'",
            )?;
            for alias in refused {
                sync.removed += remove.execute([alias])?;
                sync.unrouted += unroute.execute([alias])?;
            }
        }
        // Routes without a routed token (a hand edit): the triggers keep
        // every other route equal to its row.
        sync.removed += tx.execute(
            "DELETE FROM routes WHERE alias NOT IN (SELECT alias FROM proxy WHERE state = 'proxied')",
            [],
        )?;
        tx.commit()?;
        Ok(sync)
    }

    fn unmark_proxied(&mut self, routed: &[String]) -> Result<usize> {
        let tx = self.write_tx()?;
        let keep: std::collections::HashSet<&str> = routed.iter().map(String::as_str).collect();
        let unrouted = unmark_proxied_except(&tx, &keep)?;
        tx.commit()?;
        Ok(unrouted)
    }

    fn live_targets(&self, now: DateTime<Utc>) -> Result<(Vec<String>, Option<DateTime<Utc>>)> {
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

    fn live_route_count(&self, now: DateTime<Utc>) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT count(*) FROM routes WHERE expires >= ?1",
            [sql_timestamp(now)],
            |r| r.get(0),
        )?)
    }

    // SQLite's own change counter for this connection's view of the file.
    fn change_marker(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    fn route_ends_after(&self, after: i64, limit: usize) -> Result<Vec<RouteEnd>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, target FROM route_ends WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![after, limit], |r| {
            Ok(RouteEnd {
                id: r.get(0)?,
                target: value_text(r.get(1)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn watcher_cursor(&mut self, name: &str, pid: u32, now: DateTime<Utc>) -> Result<i64> {
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO watchers (name, last_end_id, heartbeat, pid) \
             VALUES (?1, (SELECT coalesce(min(id), 1) - 1 FROM route_ends), ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET heartbeat = excluded.heartbeat, pid = excluded.pid",
            params![name, sql_timestamp(now), pid],
        )?;
        let cursor = tx.query_row(
            "SELECT last_end_id FROM watchers WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(cursor)
    }

    fn watcher_advance(
        &mut self,
        name: &str,
        last_end_id: i64,
        pid: u32,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO watchers (name, last_end_id, heartbeat, pid) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET \
               last_end_id = max(last_end_id, excluded.last_end_id), \
               heartbeat = excluded.heartbeat, pid = excluded.pid",
            params![name, last_end_id, sql_timestamp(now), pid],
        )?;
        let forget_before = sql_timestamp(now - chrono::Duration::seconds(WATCHER_FORGET_SECS));
        tx.execute(
            "DELETE FROM watchers WHERE heartbeat IS NULL OR heartbeat < ?1",
            [&forget_before],
        )?;
        tx.execute(
            "DELETE FROM route_ends WHERE id <= (SELECT min(last_end_id) FROM watchers)",
            [],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn watchers(&self) -> Result<Vec<WatcherRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT name, last_end_id, heartbeat, pid, \
             (SELECT count(*) FROM route_ends e WHERE e.id > w.last_end_id) \
             FROM watchers w ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(WatcherRow {
                name: r.get(0)?,
                last_end_id: r.get(1)?,
                heartbeat: value_text(r.get(2)?).and_then(|t| parse_sql_timestamp(&t)),
                pid: value_integer(r.get(3)?),
                behind: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        self.query_tokens("ORDER BY modified ASC, alias ASC", [])
    }

    fn find_token(&self, alias: &str) -> Result<Option<TokenRow>> {
        let hash = alias_compare_hash(alias.as_bytes());
        Ok(self
            .query_tokens(
                "WHERE alias_compare_hash = ?1 AND alias = ?2",
                params![hash, alias],
            )?
            .into_iter()
            .next())
    }

    fn revoke(&mut self, alias: &str, now: DateTime<Utc>) -> Result<bool> {
        let hash = alias_compare_hash(alias.as_bytes());
        let tx = self.write_tx()?;
        let ended = end_rows(
            &tx,
            &hash,
            alias,
            EndCause::Revoke,
            "revoked by an administrator",
            now,
        )?;
        tx.commit()?;
        Ok(ended == 1)
    }

    fn stats(&self) -> Result<Stats> {
        let pairs = |sql: &str| counted_pairs(&self.conn, sql);
        Ok(Stats {
            by_state: pairs(TOKENS_BY_STATE)?,
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

    fn gauges(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Gauges> {
        let tx = self.conn.unchecked_transaction()?;
        let by_state = counted_pairs(&tx, TOKENS_BY_STATE)?;
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
        let mut ended: Vec<(EndCause, i64)> =
            EndCause::ALL.into_iter().map(|cause| (cause, 0)).collect();
        let mut stmt = tx.prepare(
            "SELECT end_kind, count(*) FROM proxy WHERE state = 'ended' GROUP BY end_kind",
        )?;
        let kinds = stmt.query_map([], |r| Ok((value_text(r.get(0)?), r.get::<_, i64>(1)?)))?;
        for row in kinds {
            let (label, count) = row?;
            // A kind this build does not know (a newer one wrote it, or a
            // hand edit) is left out rather than misfiled.
            let kind = label.as_deref().and_then(EndCause::from_label);
            if let Some(slot) = ended.iter_mut().find(|(c, _)| Some(*c) == kind) {
                slot.1 += count;
            }
        }
        drop(stmt);
        let newest: Value =
            tx.query_row("SELECT max(lastseen) FROM jobstates", [], |r| r.get(0))?;
        let mut ends_total: Vec<(EndCause, i64)> =
            EndCause::ALL.into_iter().map(|cause| (cause, 0)).collect();
        let mut stmt = tx.prepare("SELECT cause, count FROM session_ends")?;
        let stored = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in stored {
            let (label, count) = row?;
            // A label this build does not know (a newer one wrote it) is
            // left out rather than misfiled.
            if let Some(slot) = ends_total.iter_mut().find(|(c, _)| c.label() == label) {
                slot.1 = count;
            }
        }
        drop(stmt);
        Ok(Gauges {
            ends_total,
            by_state,
            live_routes,
            unbound,
            ended,
            newest_jobstate: value_integer(newest),
            watchers: self.watchers()?,
        })
    }
}

/// Deletes the `proxy` rows `condition` selects and counts the sessions
/// among them (rows not already `ended`: a tombstone's end was counted when
/// it was made) as ended by `cause`, in the caller's transaction. Returns
/// how many rows went.
fn delete_counting(
    tx: &Connection,
    condition: &str,
    params: impl rusqlite::Params,
    cause: EndCause,
) -> rusqlite::Result<usize> {
    let mut delete = tx.prepare(&format!(
        "DELETE FROM proxy WHERE {condition} RETURNING state"
    ))?;
    let states = delete
        .query_map(params, |r| Ok(value_text(r.get(0)?)))?
        .collect::<rusqlite::Result<Vec<Option<String>>>>()?;
    let sessions = states
        .iter()
        .filter(|state| state.as_deref() != Some("ended"))
        .count();
    count_ends(tx, cause, sessions)?;
    Ok(states.len())
}

/// Turns every `proxied` row not in `keep` back to `mapped`, in the
/// caller's transaction (the trigger records their ends).
fn unmark_proxied_except(
    tx: &Connection,
    keep: &std::collections::HashSet<&str>,
) -> rusqlite::Result<usize> {
    let stale: Vec<String> = {
        let mut proxied = tx.prepare("SELECT alias FROM proxy WHERE state = 'proxied'")?;
        let aliases = proxied.query_map([], |r| r.get(0))?;
        aliases
            .collect::<rusqlite::Result<Vec<String>>>()?
            .into_iter()
            .filter(|alias| !keep.contains(alias.as_str()))
            .collect()
    };
    let mut unroute =
        tx.prepare("UPDATE proxy SET state = 'mapped' WHERE alias = ?1 AND state = 'proxied'")?;
    let mut unrouted = 0;
    for alias in stale {
        unrouted += unroute.execute([alias])?;
    }
    Ok(unrouted)
}

/// Rows by state, for `inspect`, `stats` and the metrics alike.
const TOKENS_BY_STATE: &str = "SELECT state, count(*) FROM proxy GROUP BY state ORDER BY state";

/// The (text, count) rows of a counting query.
fn counted_pairs(conn: &Connection, sql: &str) -> Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| {
        Ok((value_text(r.get(0)?).unwrap_or_default(), r.get(1)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Ends the live session of one token (state `ended`, when, why and its
/// kind) and counts it by kind, in the caller's transaction; its route
/// goes by the triggers. A row already ended or gone is left alone.
/// Returns how many ended (0 or 1).
fn end_rows(
    tx: &Connection,
    hash: &str,
    alias: &str,
    kind: EndCause,
    cause: &str,
    now: DateTime<Utc>,
) -> rusqlite::Result<usize> {
    let ended = tx.execute(
        "UPDATE proxy SET state = 'ended', ended_at = ?1, end_cause = ?2, end_kind = ?3 \
         WHERE alias_compare_hash = ?4 AND alias = ?5 AND state IS NOT 'ended'",
        params![sql_timestamp(now), cause, kind.label(), hash, alias],
    )?;
    count_ends(tx, kind, ended)?;
    Ok(ended)
}

/// Adds `ended` sessions to the `session_ends` counter of `cause`.
fn count_ends(tx: &Connection, cause: EndCause, ended: usize) -> rusqlite::Result<()> {
    if ended > 0 {
        tx.execute(
            "INSERT INTO session_ends (cause, count) VALUES (?1, ?2) \
             ON CONFLICT (cause) DO UPDATE SET count = count + excluded.count",
            params![cause.label(), ended as i64],
        )?;
    }
    Ok(())
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
        nodes: node_list(value_text(row.get(first + 5)?)),
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
// The store's semantics are tested on both backends (store/tests.rs);
// what is here is SQLite's own: legacy files, their migration, its locks.
#[cfg(test)]
mod tests {
    use super::super::sqlite_schema::{CREATE_INDEXES, CREATE_JOBSTATES, CREATE_PROXY};
    use super::super::SCHEMA_VERSION;
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn new_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let (store, migration) =
            SqliteStore::open_or_create(&dir.path().join("state.sqlite"), Duration::from_secs(1))
                .unwrap();
        assert!(migration.created);
        (dir, store)
    }

    const LIMITS: Limits = Limits {
        burst: 3.0,
        per_sec: 0.5,
    };

    #[test]
    fn a_schema_2_database_gets_the_unknown_answers_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        drop(SqliteStore::open_or_create(&path, Duration::from_secs(1)).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE unknown_answers; PRAGMA user_version = 2;")
            .unwrap();
        let mut store = SqliteStore::open(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.charge_unknown("192.0.2.1", &LIMITS, 1.0).unwrap();
    }

    #[test]
    fn a_schema_3_database_gets_the_session_ends_table_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let now = at("2026-01-01T12:00:00Z");
        {
            let (mut store, _) =
                SqliteStore::open_or_create(&path, Duration::from_secs(1)).unwrap();
            store.insert_pending("kept-row-here", now).unwrap();
        }
        Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE session_ends; PRAGMA user_version = 3;")
            .unwrap();
        let (mut store, migration) =
            SqliteStore::open_or_create(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(
            migration,
            Migration {
                from_version: 3,
                ..Migration::default()
            }
        );
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(store.revoke("kept-row-here", now).unwrap());
        let counted = store.gauges(now, 100).unwrap().ends_total;
        assert!(counted.contains(&(EndCause::Revoke, 1)), "{counted:?}");
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
            let mut store = SqliteStore::open(&path, Duration::from_secs(30)).unwrap();
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
        let mut store = SqliteStore::open(&path, Duration::from_millis(100)).unwrap();
        let err = store
            .insert_pending("able-acorn-zoo", at("2026-01-01T12:00:00Z"))
            .unwrap_err();
        assert!(matches!(err, CoreError::Busy), "{err:?}");
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
        let store = SqliteStore::open(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(table_exists(store.connection(), "routes").unwrap());
        let found = SqliteStore::inspect(&path).unwrap();
        assert_eq!(found.tokens_by_state, vec![("pending".to_owned(), 1)]);
    }
}
