//! [`Store`] on PostgreSQL: one database shared by several Apache
//! frontends (issue 16).
//!
//! The tables, their text formats (`modified`, `routes.expires` and the
//! other instants are UTC `YYYY-MM-DD HH:MM:SS` text, compared as strings)
//! and the semantics of every method are those of [`super::SqliteStore`];
//! see `postgres_schema` for the triggers, the change marker and the
//! writers' lock.
//!
//! Racing writers: every write transaction that reads before it writes, or
//! touches `proxy`, `routes`, `route_ends` or `watchers`, first takes the
//! writers' lock (the row of `satellite_changes`, `FOR UPDATE`), as
//! SQLite's `BEGIN IMMEDIATE` does, and runs at READ COMMITTED: each
//! statement after the lock sees every earlier writer's commit, so a
//! conditional statement's affected-row count decides the answer exactly
//! as on SQLite, and a read-then-write (destroy, the repair pass) cannot
//! interleave with another writer. SERIALIZABLE would do too, but would
//! turn every conflict into a retry of the whole request; a lock queues
//! the writers instead, and readers (Apache's map lookups, tokenjobstate
//! polls) never wait for it. The configured busy timeout bounds the waits
//! of a write transaction, all together (then [`CoreError::Busy`], a 503):
//! a statement timeout the writers' lock statement (`lock_timeout` alone
//! would restart at each writer it queues behind), `lock_timeout` what is
//! left for the locks after it; a deadlock
//! or serialization failure with a program outside satellite is retried a
//! few times, then is `Busy` too. The unknown-answer count takes no lock:
//! its one upsert is atomic by itself, and a flood of guesses must not
//! queue behind redeems.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, IsolationLevel, NoTls, Row, Transaction};

use super::postgres_schema;
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

type PgResult<T> = std::result::Result<T, postgres::Error>;

/// The store on one PostgreSQL connection. The [`Store`] trait reads
/// through `&self` while the client needs `&mut` for every query: the
/// `RefCell` is never borrowed twice (no method calls another while it
/// holds the client).
pub struct PgStore {
    client: RefCell<Client>,
    /// The database as messages name it (never its password).
    database: String,
    /// This connection holds the leadership lock ([`Store::lead`]).
    leading: bool,
    /// What `lock_timeout` was set to: the budget of a write
    /// transaction's lock waits, all of them together.
    busy_timeout: Duration,
}

/// The advisory lock key of the site's once-only work ("satellit" in
/// ASCII): one per database, which is one per site.
const LEADER_LOCK: i64 = 0x7361_7465_6c6c_6974;

/// Takes the writers' lock (see the module's documentation).
const WRITE_LOCK: &str = "SELECT 1 FROM satellite_changes FOR UPDATE";

/// A wait for the writers' lock shorter than this counts as none.
const UNCONTENDED: Duration = Duration::from_millis(20);

/// Tries of a write transaction that lost to a deadlock or a
/// serialization failure before it is answered `Busy`.
const WRITE_TRIES: u32 = 4;

impl PgStore {
    /// Writes a site's data read from another store (`satellite migrate
    /// --to`) into this database, which must hold no token yet: one
    /// transaction, which counts every table afterwards and rolls back
    /// unless each holds exactly what was read. The endings' triggers do
    /// not fire (nothing ends: rows are inserted as they were).
    pub fn import(
        &mut self,
        snapshot: &super::transfer::Snapshot,
    ) -> Result<super::transfer::Counts> {
        let expected = snapshot.counts();
        self.write(true, |tx| {
            let existing: i64 = tx.query_one("SELECT count(*) FROM proxy", &[])?.try_get(0)?;
            if existing > 0 {
                return Ok(Err(existing));
            }
            let proxy = tx.prepare(
                "INSERT INTO proxy (alias, alias_compare_hash, modified, dsthost, dstport, dstpath, \
                 state, jobid, linked_at, ended_at, end_cause, end_kind) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )?;
            for p in &snapshot.proxy {
                tx.execute(
                    &proxy,
                    &[
                        &p.alias,
                        &p.alias_compare_hash,
                        &p.modified,
                        &p.dsthost,
                        &p.dstport,
                        &p.dstpath,
                        &p.state,
                        &p.jobid,
                        &p.linked_at,
                        &p.ended_at,
                        &p.end_cause,
                        &p.end_kind,
                    ],
                )?;
            }
            let jobstate =
                tx.prepare("INSERT INTO jobstates (jobid, state, lastseen) VALUES ($1, $2, $3)")?;
            for (jobid, state, lastseen) in &snapshot.jobstates {
                tx.execute(&jobstate, &[jobid, state, lastseen])?;
            }
            let detail = tx.prepare(
                "INSERT INTO jobdetails (jobid, reason, start_time, time_limit, job_user, job_uid, nodes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )?;
            for d in &snapshot.jobdetails {
                tx.execute(
                    &detail,
                    &[&d.jobid, &d.reason, &d.start_time, &d.time_limit, &d.job_user, &d.job_uid, &d.nodes],
                )?;
            }
            let route = tx.prepare("INSERT INTO routes (alias, target, expires) VALUES ($1, $2, $3)")?;
            for (alias, target, expires) in &snapshot.routes {
                tx.execute(&route, &[alias, target, expires])?;
            }
            let ended = tx.prepare("INSERT INTO session_ends (cause, count) VALUES ($1, $2)")?;
            for (cause, count) in &snapshot.session_ends {
                tx.execute(&ended, &[cause, count])?;
            }
            let debt =
                tx.prepare("INSERT INTO unknown_answers (client, debt, at) VALUES ($1, $2, $3)")?;
            for (client, owed, at) in &snapshot.unknown_answers {
                tx.execute(&debt, &[client, owed, at])?;
            }
            let count = |tx: &mut Transaction<'_>, table: &str| -> PgResult<i64> {
                tx.query_one(&format!("SELECT count(*) FROM {table}"), &[])?
                    .try_get(0)
            };
            let written = super::transfer::Counts {
                proxy: count(tx, "proxy")?,
                jobstates: count(tx, "jobstates")?,
                jobdetails: count(tx, "jobdetails")?,
                routes: count(tx, "routes")?,
                session_ends: count(tx, "session_ends")?,
                unknown_answers: count(tx, "unknown_answers")?,
            };
            if written != expected {
                // An error rolls the whole transaction back: nothing kept.
                tx.batch_execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'the rows written differ from the rows read; nothing was kept'; END $$",
                )?;
            }
            Ok(Ok(written))
        })?
        .map_err(|tokens| CoreError::NotEmpty {
            database: self.database.clone(),
            tokens,
        })
    }

    /// Connects to a database that has satellite's schema; one without it
    /// is refused (programs that answer requests never create a schema in a
    /// database nobody prepared). `busy_timeout` bounds the wait for the
    /// writers' lock and, unless the URL says otherwise, for the
    /// connection.
    pub fn open(url: &str, busy_timeout: Duration) -> Result<Self> {
        let store = Self::connect(url, busy_timeout)?;
        postgres_schema::check(&mut store.client.borrow_mut(), &store.database)?;
        Ok(store)
    }

    /// Connects, creating satellite's schema when the database has none
    /// (one transaction). A database with other tables named like
    /// satellite's is refused and left as it was.
    pub fn open_or_create(url: &str, busy_timeout: Duration) -> Result<(Self, Migration)> {
        let store = Self::connect(url, busy_timeout)?;
        let migration =
            postgres_schema::create_or_check(&mut store.client.borrow_mut(), &store.database)?;
        Ok((store, migration))
    }

    fn connect(url: &str, busy_timeout: Duration) -> Result<Self> {
        let mut config: postgres::Config = url.parse().map_err(|err| CoreError::PgSchema {
            database: "(database_url)".into(),
            why: format!("database_url cannot be read: {err}"),
        })?;
        let database = describe(&config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(busy_timeout.max(Duration::from_secs(1)));
        }
        if config.get_application_name().is_none() {
            config.application_name("satellite");
        }
        // In the start-up packet, so that it costs no round trip.
        let lock_timeout = format!("-c lock_timeout={}", busy_timeout.as_millis().max(1));
        let options = match config.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} {lock_timeout}"),
            _ => lock_timeout,
        };
        config.options(&options);
        let client = config.connect(NoTls).map_err(pg_error);
        let client = match client {
            Ok(client) => client,
            Err(err) => {
                return Err(match err {
                    CoreError::Unreachable { why, .. } => CoreError::Unreachable { database, why },
                    other => other,
                })
            }
        };
        Ok(PgStore {
            client: RefCell::new(client),
            database,
            leading: false,
            busy_timeout,
        })
    }

    /// The database as messages name it.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The state of a live token (tests and the admin's eyes).
    pub fn proxy_state(
        &self,
        alias: &str,
        now: DateTime<Utc>,
        ttl_secs: i64,
    ) -> Result<Option<ProxyState>> {
        let hash = alias_compare_hash(alias.as_bytes());
        let row = self.client.borrow_mut().query_opt(
            "SELECT state FROM proxy WHERE alias_compare_hash = $1 AND alias = $2 \
             AND modified >= $3",
            &[&hash, &alias, &expiry_cutoff(now, ttl_secs)],
        )?;
        Ok(match row {
            Some(row) => Some(ProxyState::parse(&text(&row, 0)?.unwrap_or_default())),
            None => None,
        })
    }

    /// The target Apache's `dbd:` map would answer for `alias` at `now`.
    pub fn live_route(&self, alias: &str, now: DateTime<Utc>) -> Result<Option<String>> {
        let row = self.client.borrow_mut().query_opt(
            "SELECT target FROM routes WHERE alias = $1 AND expires >= $2",
            &[&alias, &sql_timestamp(now)],
        )?;
        Ok(match row {
            Some(row) => text(&row, 0)?,
            None => None,
        })
    }

    /// The connection, for this module's tests to write as another program
    /// would.
    #[cfg(test)]
    pub(crate) fn client(&self) -> std::cell::RefMut<'_, Client> {
        self.client.borrow_mut()
    }

    /// Runs `body` in a write transaction, after the writers' lock when
    /// `locked`, and commits; tries again when it lost to a deadlock or a
    /// serialization failure.
    fn write<T>(
        &self,
        locked: bool,
        mut body: impl FnMut(&mut Transaction<'_>) -> PgResult<T>,
    ) -> Result<T> {
        let mut client = self.client.borrow_mut();
        let mut tries = 0;
        loop {
            tries += 1;
            let attempt = (|| {
                let mut tx = client.transaction()?;
                if locked {
                    let waiting = Instant::now();
                    // `lock_timeout` bounds each lock acquisition, not the
                    // statement: queued behind two writers, the statement
                    // waits for the first, then for the second, up to the
                    // timeout each (the soak's lock fault saw 9.5 s). A
                    // statement timeout bounds it as a whole, set and
                    // reset in the same round trip.
                    tx.batch_execute(&format!(
                        "SET LOCAL statement_timeout = {}; {WRITE_LOCK}; \
                         SET LOCAL statement_timeout TO DEFAULT",
                        self.busy_timeout.as_millis().max(1)
                    ))?;
                    // The writers' lock and any lock after it (a table
                    // another program holds) share one busy timeout, as
                    // SQLite's one wait at BEGIN IMMEDIATE does: without
                    // this, a request queued behind a writer stuck on such
                    // a table waited twice the timeout. An uncontended
                    // lock leaves the setting alone (no round trip more).
                    let waited = waiting.elapsed();
                    if waited > UNCONTENDED {
                        let left = self.busy_timeout.saturating_sub(waited);
                        tx.batch_execute(&format!(
                            "SET LOCAL lock_timeout = {}",
                            left.as_millis().max(1)
                        ))?;
                    }
                }
                let value = body(&mut tx)?;
                tx.commit()?;
                Ok(value)
            })();
            match attempt {
                Err(err) if tries < WRITE_TRIES && lost_a_race(&err) => continue,
                other => return other.map_err(|err| self.named(pg_error(err))),
            }
        }
    }

    /// Names this database in an `Unreachable` error made without it.
    fn named(&self, err: CoreError) -> CoreError {
        match err {
            CoreError::Unreachable { why, .. } => CoreError::Unreachable {
                database: self.database.clone(),
                why,
            },
            other => other,
        }
    }

    /// One conditional statement on the row of `alias` (given its hash),
    /// under the writers' lock: tells a refusal (the row is there, younger
    /// than `cutoff`) from a row that does not exist.
    fn conditional_write(
        &self,
        alias: &str,
        cutoff: &str,
        mut statement: impl FnMut(&mut Transaction<'_>, &str) -> PgResult<u64>,
    ) -> Result<Written> {
        let hash = alias_compare_hash(alias.as_bytes());
        self.write(true, |tx| {
            Ok(if statement(tx, &hash)? == 1 {
                Written::Applied
            } else if live_row_exists(tx, &hash, alias, cutoff)? {
                Written::Refused
            } else {
                Written::NoSuchRow
            })
        })
    }

    fn query_tokens(&self, tail: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<TokenRow>> {
        let rows = self.client.borrow_mut().query(
            &format!("SELECT alias, state, dsthost, dstport, jobid, modified FROM proxy {tail}"),
            params,
        )?;
        rows.iter()
            .map(|row| {
                Ok(TokenRow {
                    alias: text(row, 0)?.unwrap_or_default(),
                    state: text(row, 1)?.unwrap_or_default(),
                    dsthost: text(row, 2)?,
                    dstport: row.try_get::<_, Option<i32>>(3)?.map(i64::from),
                    jobid: text(row, 4)?,
                    modified: text(row, 5)?.unwrap_or_default(),
                })
            })
            .collect()
    }
}

impl Store for PgStore {
    fn unknown_debt(&self, client: &str, limits: &Limits, now: f64) -> Result<f64> {
        let row = self.client.borrow_mut().query_opt(
            "SELECT debt, at FROM unknown_answers WHERE client = $1",
            &[&client],
        )?;
        Ok(match row {
            Some(row) => limits.debt_at(row.try_get(0)?, row.try_get(1)?, now),
            None => 0.0,
        })
    }

    // Not worth waiting for the disk (a crash may forget the count), as
    // SQLite's `synchronous = NORMAL` for the same write.
    fn charge_unknown(&mut self, client: &str, limits: &Limits, now: f64) -> Result<f64> {
        self.write(false, |tx| {
            tx.batch_execute("SET LOCAL synchronous_commit = off")?;
            let debt: f64 = tx
                .query_one(
                    "INSERT INTO unknown_answers (client, debt, at) VALUES ($1, 1.0, $2) \
                     ON CONFLICT (client) DO UPDATE SET \
                       debt = greatest(0.0, unknown_answers.debt \
                         - greatest(0.0, $2 - unknown_answers.at) * $3) + 1.0, \
                       at = greatest(unknown_answers.at, $2) \
                     RETURNING debt",
                    &[&client, &now, &limits.per_sec],
                )?
                .try_get(0)?;
            if limits.per_sec > 0.0 {
                tx.execute(
                    "DELETE FROM unknown_answers WHERE debt <= ($1 - at) * $2",
                    &[&now, &limits.per_sec],
                )?;
            }
            Ok(debt)
        })
    }

    fn insert_pending(&mut self, alias: &str, now: DateTime<Utc>) -> Result<bool> {
        let hash = alias_compare_hash(alias.as_bytes());
        let modified = sql_timestamp(now);
        let inserted = self.write(true, |tx| {
            tx.execute(
                "INSERT INTO proxy (alias, alias_compare_hash, modified, state) \
                 VALUES ($1, $2, $3, 'pending') ON CONFLICT DO NOTHING",
                &[&alias, &hash, &modified],
            )
        })?;
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
        let modified = sql_timestamp(now);
        let expires = route_expiry(now, ttl_secs);
        let port = i32::from(port);
        let written = self.conditional_write(alias, &cutoff, |tx, hash| {
            let updated = tx.execute(
                "UPDATE proxy SET dsthost = $1, dstport = $2, dstpath = '/', state = $3, \
                 modified = $4 WHERE alias_compare_hash = $5 AND alias = $6 \
                 AND state = 'pending' AND modified >= $7",
                &[&host, &port, &state, &modified, &hash, &alias, &cutoff],
            )?;
            if let (1, RoutePublication::Live { target }) = (updated, publication) {
                tx.execute(
                    "INSERT INTO routes (alias, target, expires) VALUES ($1, $2, $3) \
                     ON CONFLICT (alias) DO UPDATE SET target = excluded.target, \
                     expires = excluded.expires",
                    &[&alias, &target, &expires],
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
        self.write(true, |tx| {
            let Some(row) = tx.query_opt(
                "SELECT state, dsthost, end_kind FROM proxy \
                 WHERE alias_compare_hash = $1 AND alias = $2",
                &[&hash, &alias],
            )?
            else {
                return Ok(DestroyOutcome::Unknown);
            };
            let (state, dsthost, end_kind) = (text(&row, 0)?, text(&row, 1)?, text(&row, 2)?);
            let (outcome, ending) = decide_destroy(
                state.as_deref(),
                dsthost.as_deref(),
                end_kind.as_deref(),
                requester,
            );
            if let Some(cause) = ending {
                end_rows(tx, &hash, alias, EndCause::Destroy, &cause, now)?;
            }
            Ok(outcome)
        })
    }

    fn link(
        &mut self,
        alias: &str,
        jobid: &str,
        now: DateTime<Utc>,
        ttl_secs: i64,
    ) -> Result<LinkOutcome> {
        let cutoff = expiry_cutoff(now, ttl_secs);
        let linked_at = sql_timestamp(now);
        let written = self.conditional_write(alias, &cutoff, |tx, hash| {
            tx.execute(
                "UPDATE proxy SET jobid = $1, linked_at = $5 WHERE alias_compare_hash = $2 \
                 AND alias = $3 AND (jobid IS NULL OR jobid = '') AND modified >= $4",
                &[&jobid, &hash, &alias, &cutoff, &linked_at],
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
        let row = self.client.borrow_mut().query_opt(
            &format!(
                "SELECT ps.state, ps.jobid, js.state, js.lastseen, ps.ended_at, ps.end_cause, \
                 {JOB_DETAIL_COLUMNS}, ps.dsthost, ps.end_kind, \
                 coalesce(ps.modified < $3, true) FROM proxy ps \
                 LEFT JOIN jobstates js ON js.jobid = ps.jobid \
                 LEFT JOIN jobdetails jd ON jd.jobid = ps.jobid \
                 WHERE ps.alias_compare_hash = $1 AND ps.alias = $2"
            ),
            &[&hash, &alias, &expiry_cutoff(now, ttl_secs)],
        )?;
        let Some(row) = row else {
            return Ok(None);
        };
        let jobid = text(&row, 1)?.filter(|j| !j.is_empty());
        let job_state = text(&row, 2)?;
        Ok(Some(TokenJob {
            proxy_state: ProxyState::parse(&text(&row, 0)?.unwrap_or_default()),
            job: job_record(&row, 6, jobid.as_deref(), job_state.as_deref())?,
            jobid,
            job_state,
            job_lastseen: row.try_get(3)?,
            redeemed: text(&row, 12)?.is_some_and(|h| !h.is_empty()),
            ended_at: text(&row, 4)?,
            end_cause: text(&row, 5)?,
            end_kind: text(&row, 13)?.and_then(|k| EndCause::from_label(&k)),
            expired: row.try_get(14)?,
        }))
    }

    fn record_jobs(
        &mut self,
        jobs: &[JobRecord],
        ends: &[SessionEnd],
        now_epoch: i64,
    ) -> Result<usize> {
        let now = DateTime::from_timestamp(now_epoch, 0).unwrap_or_default();
        // One row per job (the last word on a job wins, as with SQLite's
        // INSERT OR REPLACE in order), sent as arrays: one round trip
        // however many jobs the scheduler has.
        let mut last: HashMap<&str, &JobRecord> = HashMap::new();
        for job in jobs {
            last.insert(job.jobid.as_str(), job);
        }
        let unique: Vec<&JobRecord> = last.into_values().collect();
        let ids: Vec<&str> = unique.iter().map(|j| j.jobid.as_str()).collect();
        let states: Vec<&str> = unique.iter().map(|j| j.state.as_str()).collect();
        let reasons: Vec<Option<&str>> = unique.iter().map(|j| j.reason.as_deref()).collect();
        let starts: Vec<Option<i64>> = unique.iter().map(|j| j.start_time).collect();
        let limits: Vec<Option<i64>> = unique.iter().map(|j| j.time_limit_secs).collect();
        let users: Vec<Option<&str>> = unique.iter().map(|j| j.user.as_deref()).collect();
        let uids: Vec<Option<i64>> = unique.iter().map(|j| j.uid).collect();
        let nodes: Vec<Option<String>> = unique
            .iter()
            .map(|j| (!j.nodes.is_empty()).then(|| j.nodes.join(",")))
            .collect();
        let purge_before = now_epoch - JOBSTATE_RETENTION_SECS;
        self.write(true, |tx| {
            for end in ends {
                let hash = alias_compare_hash(end.alias.as_bytes());
                end_rows(tx, &hash, &end.alias, end.kind, &end.cause, now)?;
            }
            tx.execute(
                "DELETE FROM jobstates WHERE lastseen < $1 OR lastseen IS NULL",
                &[&purge_before],
            )?;
            tx.execute(
                "DELETE FROM jobdetails jd WHERE NOT EXISTS \
                 (SELECT 1 FROM jobstates js WHERE js.jobid = jd.jobid)",
                &[],
            )?;
            if !ids.is_empty() {
                tx.execute(
                    "INSERT INTO jobstates (jobid, state, lastseen) \
                     SELECT j, s, $3::int8 FROM unnest($1::text[], $2::text[]) AS u (j, s) \
                     ON CONFLICT (jobid) DO UPDATE SET state = excluded.state, \
                     lastseen = excluded.lastseen",
                    &[&ids, &states, &now_epoch],
                )?;
                tx.execute(
                    "INSERT INTO jobdetails (jobid, reason, start_time, time_limit, job_user, \
                     job_uid, nodes) SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], \
                     $4::int8[], $5::text[], $6::int8[], $7::text[]) \
                     ON CONFLICT (jobid) DO UPDATE SET reason = excluded.reason, \
                     start_time = excluded.start_time, time_limit = excluded.time_limit, \
                     job_user = excluded.job_user, job_uid = excluded.job_uid, \
                     nodes = excluded.nodes",
                    &[&ids, &reasons, &starts, &limits, &users, &uids, &nodes],
                )?;
            }
            Ok(())
        })?;
        Ok(jobs.len())
    }

    fn linked_sessions(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<LinkedSession>> {
        let rows = self.client.borrow_mut().query(
            &format!(
                "SELECT ps.alias, ps.state, ps.jobid, ps.dsthost, ps.linked_at, js.state, \
                 {JOB_DETAIL_COLUMNS} FROM proxy ps LEFT JOIN jobstates js ON js.jobid = ps.jobid \
                 LEFT JOIN jobdetails jd ON jd.jobid = ps.jobid \
                 WHERE ps.jobid IS NOT NULL AND ps.jobid <> '' \
                 AND ps.state IN ('pending', 'mapped', 'proxied') AND ps.modified >= $1 \
                 ORDER BY ps.alias"
            ),
            &[&expiry_cutoff(now, ttl_secs)],
        )?;
        rows.iter()
            .map(|row| {
                let jobid = text(row, 2)?.unwrap_or_default();
                let job_state = text(row, 5)?;
                Ok(LinkedSession {
                    alias: text(row, 0)?.unwrap_or_default(),
                    state: ProxyState::parse(&text(row, 1)?.unwrap_or_default()),
                    job: job_record(row, 6, Some(&jobid), job_state.as_deref())?,
                    jobid,
                    dsthost: text(row, 3)?.filter(|h| !h.is_empty()),
                    linked_at: text(row, 4)?.and_then(|t| parse_sql_timestamp(&t)),
                })
            })
            .collect()
    }

    fn end_sessions(&mut self, ends: &[SessionEnd], now: DateTime<Utc>) -> Result<usize> {
        self.write(true, |tx| {
            let mut ended = 0;
            for end in ends {
                let hash = alias_compare_hash(end.alias.as_bytes());
                ended += end_rows(tx, &hash, &end.alias, end.kind, &end.cause, now)?;
            }
            Ok(ended)
        })
    }

    fn expire(&mut self, now: DateTime<Utc>, ttl_secs: i64) -> Result<usize> {
        let cutoff = expiry_cutoff(now, ttl_secs);
        // Route ends no watcher took within the forget period would pile up.
        let forget_before = sql_timestamp(now - chrono::Duration::seconds(WATCHER_FORGET_SECS));
        self.write(true, |tx| {
            let states: Vec<Option<String>> = tx
                .query(
                    "DELETE FROM proxy WHERE modified < $1 RETURNING state",
                    &[&cutoff],
                )?
                .iter()
                .map(|row| text(row, 0))
                .collect::<PgResult<_>>()?;
            let sessions = states
                .iter()
                .filter(|state| state.as_deref() != Some("ended"))
                .count();
            count_ends(tx, EndCause::Ttl, sessions)?;
            tx.execute("DELETE FROM route_ends WHERE at < $1", &[&forget_before])?;
            tx.execute(
                "DELETE FROM watchers WHERE heartbeat IS NULL OR heartbeat < $1",
                &[&forget_before],
            )?;
            Ok(states.len())
        })
    }

    fn route_rows(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<RouteRow>> {
        let rows = self.client.borrow_mut().query(
            "SELECT alias, dsthost, dstport, state, modified FROM proxy \
             WHERE state IN ('mapped', 'proxied') AND modified >= $1 ORDER BY alias ASC",
            &[&expiry_cutoff(now, ttl_secs)],
        )?;
        rows.iter()
            .map(|row| {
                Ok(RouteRow {
                    alias: text(row, 0)?.unwrap_or_default(),
                    modified: text(row, 4)?,
                    dsthost: text(row, 1)?,
                    dstport: row.try_get::<_, Option<i32>>(2)?.map(|p| p.to_string()),
                    state: ProxyState::parse(&text(row, 3)?.unwrap_or_default()),
                })
            })
            .collect()
    }

    fn mark_proxied(&mut self, aliases: &[String]) -> Result<usize> {
        let flipped = self.write(true, |tx| {
            tx.execute(
                "UPDATE proxy SET state = 'proxied' WHERE alias = ANY($1) AND state = 'mapped'",
                &[&aliases],
            )
        })?;
        Ok(usize::try_from(flipped).unwrap_or(usize::MAX))
    }

    fn unmark_proxied(&mut self, routed: &[String]) -> Result<usize> {
        let keep: HashSet<&str> = routed.iter().map(String::as_str).collect();
        self.write(true, |tx| {
            let stale: Vec<String> = tx
                .query("SELECT alias FROM proxy WHERE state = 'proxied'", &[])?
                .iter()
                .map(|row| text(row, 0).map(Option::unwrap_or_default))
                .collect::<PgResult<Vec<String>>>()?
                .into_iter()
                .filter(|alias| !keep.contains(alias.as_str()))
                .collect();
            let unrouted = tx.execute(
                "UPDATE proxy SET state = 'mapped' WHERE alias = ANY($1) AND state = 'proxied'",
                &[&stale],
            )?;
            Ok(usize::try_from(unrouted).unwrap_or(usize::MAX))
        })
    }

    fn sync_routes(&mut self, wanted: &[PublishedRoute], refused: &[String]) -> Result<RouteSync> {
        self.write(true, |tx| {
            let mut sync = RouteSync::default();
            let current: HashMap<String, (String, String)> = tx
                .query("SELECT alias, target, expires FROM routes", &[])?
                .iter()
                .map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?))))
                .collect::<PgResult<_>>()?;
            let flip = tx.prepare(
                "UPDATE proxy SET state = 'proxied' WHERE alias = $1 AND state = 'mapped'",
            )?;
            // Only while the row is still routable: one ended since the
            // caller read it gets no route back.
            let write = tx.prepare(
                "INSERT INTO routes (alias, target, expires) SELECT $1::text, $2::text, $3::text \
                 WHERE EXISTS (SELECT 1 FROM proxy WHERE alias = $1::text AND state = 'proxied') \
                 ON CONFLICT (alias) DO UPDATE SET target = excluded.target, \
                 expires = excluded.expires",
            )?;
            for route in wanted {
                sync.flipped += count(tx.execute(&flip, &[&route.alias])?);
                let same = current.get(&route.alias).is_some_and(|(target, expires)| {
                    *target == route.target && *expires == route.expires
                });
                if !same {
                    sync.written +=
                        count(tx.execute(&write, &[&route.alias, &route.target, &route.expires])?);
                }
            }
            let remove = tx.prepare("DELETE FROM routes WHERE alias = $1")?;
            let unroute = tx.prepare(
                "UPDATE proxy SET state = 'mapped' WHERE alias = $1 AND state = 'proxied'",
            )?;
            for alias in refused {
                sync.removed += count(tx.execute(&remove, &[alias])?);
                sync.unrouted += count(tx.execute(&unroute, &[alias])?);
            }
            sync.removed += count(tx.execute(
                "DELETE FROM routes r WHERE NOT EXISTS \
                 (SELECT 1 FROM proxy p WHERE p.alias = r.alias AND p.state = 'proxied')",
                &[],
            )?);
            Ok(sync)
        })
    }

    fn live_targets(&self, now: DateTime<Utc>) -> Result<(Vec<String>, Option<DateTime<Utc>>)> {
        let now_text = sql_timestamp(now);
        let mut client = self.client.borrow_mut();
        let targets = client
            .query(
                "SELECT DISTINCT target FROM routes WHERE expires >= $1",
                &[&now_text],
            )?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<PgResult<Vec<String>>>()?;
        let first_expiry: Option<String> = client
            .query_one(
                "SELECT min(expires) FROM routes WHERE expires >= $1",
                &[&now_text],
            )?
            .try_get(0)?;
        Ok((targets, first_expiry.and_then(|t| parse_sql_timestamp(&t))))
    }

    fn live_route_count(&self, now: DateTime<Utc>) -> Result<i64> {
        Ok(self
            .client
            .borrow_mut()
            .query_one(
                "SELECT count(*) FROM routes WHERE expires >= $1",
                &[&sql_timestamp(now)],
            )?
            .try_get(0)?)
    }

    // The counter the triggers bump once per transaction that changed a
    // route, a token or recorded a route end (see postgres_schema).
    fn lead(&mut self) -> Result<bool> {
        if self.leading {
            return Ok(true);
        }
        // A session-level advisory lock: held for as long as this
        // connection lives, released by the server when it goes however it
        // goes (a killed frontend included), so no lease has to expire.
        let taken: bool = self
            .client
            .borrow_mut()
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])?
            .try_get(0)?;
        self.leading = taken;
        Ok(taken)
    }

    fn server_epoch(&self) -> Result<Option<String>> {
        Ok(Some(
            self.client
                .borrow_mut()
                .query_one("SELECT pg_postmaster_start_time()::text", &[])?
                .try_get(0)?,
        ))
    }

    fn change_marker(&self) -> Result<i64> {
        Ok(self
            .client
            .borrow_mut()
            .query_one("SELECT n FROM satellite_changes", &[])?
            .try_get(0)?)
    }

    fn route_ends_after(&self, after: i64, limit: usize) -> Result<Vec<RouteEnd>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.client.borrow_mut().query(
            "SELECT id, target FROM route_ends WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after, &limit],
        )?;
        rows.iter()
            .map(|r| {
                Ok(RouteEnd {
                    id: r.try_get(0)?,
                    target: text(r, 1)?.unwrap_or_default(),
                })
            })
            .collect()
    }

    fn watcher_cursor(&mut self, name: &str, pid: u32, now: DateTime<Utc>) -> Result<i64> {
        let heartbeat = sql_timestamp(now);
        let pid = i64::from(pid);
        self.write(true, |tx| {
            tx.query_one(
                "INSERT INTO watchers (name, last_end_id, heartbeat, pid) \
                 VALUES ($1, (SELECT coalesce(min(id), 1) - 1 FROM route_ends), $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET heartbeat = excluded.heartbeat, \
                 pid = excluded.pid RETURNING last_end_id",
                &[&name, &heartbeat, &pid],
            )?
            .try_get(0)
        })
    }

    fn watcher_advance(
        &mut self,
        name: &str,
        last_end_id: i64,
        pid: u32,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let heartbeat = sql_timestamp(now);
        let forget_before = sql_timestamp(now - chrono::Duration::seconds(WATCHER_FORGET_SECS));
        let pid = i64::from(pid);
        self.write(true, |tx| {
            tx.execute(
                "INSERT INTO watchers (name, last_end_id, heartbeat, pid) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET \
                   last_end_id = greatest(watchers.last_end_id, excluded.last_end_id), \
                   heartbeat = excluded.heartbeat, pid = excluded.pid",
                &[&name, &last_end_id, &heartbeat, &pid],
            )?;
            tx.execute(
                "DELETE FROM watchers WHERE heartbeat IS NULL OR heartbeat < $1",
                &[&forget_before],
            )?;
            tx.execute(
                "DELETE FROM route_ends WHERE id <= (SELECT min(last_end_id) FROM watchers)",
                &[],
            )?;
            Ok(())
        })
    }

    fn watchers(&self) -> Result<Vec<WatcherRow>> {
        watchers(&mut *self.client.borrow_mut())
    }

    fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        self.query_tokens("ORDER BY modified ASC, alias ASC", &[])
    }

    fn find_token(&self, alias: &str) -> Result<Option<TokenRow>> {
        let hash = alias_compare_hash(alias.as_bytes());
        Ok(self
            .query_tokens(
                "WHERE alias_compare_hash = $1 AND alias = $2",
                &[&hash, &alias],
            )?
            .into_iter()
            .next())
    }

    fn revoke(&mut self, alias: &str, now: DateTime<Utc>) -> Result<bool> {
        let hash = alias_compare_hash(alias.as_bytes());
        let ended = self.write(true, |tx| {
            end_rows(
                tx,
                &hash,
                alias,
                EndCause::Revoke,
                "revoked by an administrator",
                now,
            )
        })?;
        Ok(ended == 1)
    }

    fn stats(&self) -> Result<Stats> {
        let mut client = self.client.borrow_mut();
        Ok(Stats {
            by_state: counted_pairs(&mut *client, TOKENS_BY_STATE)?,
            oldest_modified: client
                .query_one("SELECT min(modified) FROM proxy", &[])?
                .try_get(0)?,
            sessions_per_host: counted_pairs(
                &mut *client,
                "SELECT dsthost, count(*) FROM proxy WHERE dsthost IS NOT NULL AND dsthost <> '' \
                 GROUP BY dsthost ORDER BY count(*) DESC, dsthost",
            )?,
            jobstates: client
                .query_one("SELECT count(*) FROM jobstates", &[])?
                .try_get(0)?,
        })
    }

    fn gauges(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Gauges> {
        let mut client = self.client.borrow_mut();
        // One snapshot for every count, so that they agree.
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let by_state = counted_pairs(&mut tx, TOKENS_BY_STATE)?;
        let live_routes: i64 = tx
            .query_one(
                "SELECT count(*) FROM routes WHERE expires >= $1",
                &[&sql_timestamp(now)],
            )?
            .try_get(0)?;
        let unbound: i64 = tx
            .query_one(
                "SELECT count(*) FROM proxy WHERE state <> 'ended' AND modified >= $1 \
                 AND (jobid IS NULL OR jobid = '')",
                &[&expiry_cutoff(now, ttl_secs)],
            )?
            .try_get(0)?;
        let mut ended: Vec<(EndCause, i64)> =
            EndCause::ALL.into_iter().map(|cause| (cause, 0)).collect();
        for row in tx.query(
            "SELECT end_kind, count(*) FROM proxy WHERE state = 'ended' GROUP BY end_kind",
            &[],
        )? {
            let count: i64 = row.try_get(1)?;
            // A kind this build does not know is left out rather than
            // misfiled.
            let kind = text(&row, 0)?.as_deref().and_then(EndCause::from_label);
            if let Some(slot) = ended.iter_mut().find(|(c, _)| Some(*c) == kind) {
                slot.1 += count;
            }
        }
        let newest_jobstate: Option<i64> = tx
            .query_one("SELECT max(lastseen) FROM jobstates", &[])?
            .try_get(0)?;
        let mut ends_total: Vec<(EndCause, i64)> =
            EndCause::ALL.into_iter().map(|cause| (cause, 0)).collect();
        for row in tx.query("SELECT cause, count FROM session_ends", &[])? {
            let label: String = row.try_get(0)?;
            let count: i64 = row.try_get(1)?;
            if let Some(slot) = ends_total.iter_mut().find(|(c, _)| c.label() == label) {
                slot.1 = count;
            }
        }
        let watchers = watchers(&mut tx)?;
        tx.commit()?;
        Ok(Gauges {
            by_state,
            live_routes,
            unbound,
            ended,
            ends_total,
            newest_jobstate,
            watchers,
        })
    }
}

/// The database a configuration names, for messages: never the password.
fn describe(config: &postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("(default)");
    format!("`{dbname}` on {host}")
}

/// Whether a failed transaction lost a race that a new try may win.
fn lost_a_race(err: &postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE) | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    )
}

/// Classes PostgreSQL failures as callers need them: a held lock, a lost
/// race or a server going away is temporary (503 and `Retry-After`), a
/// full disk is [`CoreError::Full`], a read-only server (a standby) is
/// [`CoreError::ReadOnly`].
pub(crate) fn pg_error(err: postgres::Error) -> CoreError {
    if let Some(code) = err.code() {
        let temporary = [
            SqlState::LOCK_NOT_AVAILABLE,
            // A statement timeout (the writers' lock, see `write`) or a
            // statement cancelled by an admin: the same request may pass
            // in a moment.
            SqlState::QUERY_CANCELED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ];
        let going_away = [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::IDLE_SESSION_TIMEOUT,
        ];
        if temporary.contains(code) {
            return CoreError::Busy;
        }
        if going_away.contains(code) || code.code().starts_with("08") {
            return CoreError::Unreachable {
                database: "PostgreSQL".into(),
                why: err.to_string(),
            };
        }
        if *code == SqlState::DISK_FULL {
            return CoreError::Full;
        }
        if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            return CoreError::ReadOnly;
        }
        return CoreError::Postgres(err);
    }
    // No SQLSTATE: the connection failed or was lost (refused, reset,
    // timed out, closed), or a value could not be converted.
    let io = std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
    if err.is_closed() || io || err.to_string().starts_with("error connecting") {
        return CoreError::Unreachable {
            database: "PostgreSQL".into(),
            why: err.to_string(),
        };
    }
    CoreError::Postgres(err)
}

impl From<postgres::Error> for CoreError {
    fn from(err: postgres::Error) -> Self {
        pg_error(err)
    }
}

fn count(rows: u64) -> usize {
    usize::try_from(rows).unwrap_or(usize::MAX)
}

/// A text column that may be NULL.
fn text(row: &Row, index: usize) -> PgResult<Option<String>> {
    row.try_get(index)
}

/// Whether a row for this alias exists and is younger than `cutoff`.
fn live_row_exists(
    tx: &mut Transaction<'_>,
    hash: &str,
    alias: &str,
    cutoff: &str,
) -> PgResult<bool> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM proxy WHERE alias_compare_hash = $1 AND alias = $2 AND modified >= $3",
            &[&hash, &alias, &cutoff],
        )?
        .is_some())
}

/// Ends the live session of one token and counts it by kind, in the
/// caller's transaction; its route goes by the triggers. Returns how many
/// ended (0 or 1).
fn end_rows(
    tx: &mut Transaction<'_>,
    hash: &str,
    alias: &str,
    kind: EndCause,
    cause: &str,
    now: DateTime<Utc>,
) -> PgResult<usize> {
    let ended = count(tx.execute(
        "UPDATE proxy SET state = 'ended', ended_at = $1, end_cause = $2, end_kind = $3 \
         WHERE alias_compare_hash = $4 AND alias = $5 AND state IS DISTINCT FROM 'ended'",
        &[&sql_timestamp(now), &cause, &kind.label(), &hash, &alias],
    )?);
    count_ends(tx, kind, ended)?;
    Ok(ended)
}

/// Adds `ended` sessions to the `session_ends` counter of `cause`.
fn count_ends(tx: &mut Transaction<'_>, cause: EndCause, ended: usize) -> PgResult<()> {
    if ended > 0 {
        let ended = i64::try_from(ended).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO session_ends (cause, count) VALUES ($1, $2) \
             ON CONFLICT (cause) DO UPDATE SET count = session_ends.count + excluded.count",
            &[&cause.label(), &ended],
        )?;
    }
    Ok(())
}

fn watchers(client: &mut impl GenericClient) -> Result<Vec<WatcherRow>> {
    let rows = client.query(
        "SELECT name, last_end_id, heartbeat, pid, \
         (SELECT count(*) FROM route_ends e WHERE e.id > w.last_end_id) \
         FROM watchers w ORDER BY name",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            Ok(WatcherRow {
                name: r.try_get(0)?,
                last_end_id: r.try_get(1)?,
                heartbeat: text(r, 2)?.and_then(|t| parse_sql_timestamp(&t)),
                pid: r.try_get(3)?,
                behind: r.try_get(4)?,
            })
        })
        .collect()
}

/// Rows by state, for `stats` and the metrics alike.
const TOKENS_BY_STATE: &str = "SELECT state, count(*) FROM proxy GROUP BY state ORDER BY state";

/// The (text, count) rows of a counting query.
fn counted_pairs(client: &mut impl GenericClient, sql: &str) -> Result<Vec<(String, i64)>> {
    client
        .query(sql, &[])?
        .iter()
        .map(|r| Ok((text(r, 0)?.unwrap_or_default(), r.try_get(1)?)))
        .collect()
}

/// The job detail columns, in [`job_record`]'s order.
const JOB_DETAIL_COLUMNS: &str =
    "jd.reason, jd.start_time, jd.time_limit, jd.job_user, jd.job_uid, jd.nodes";

/// A job record from [`JOB_DETAIL_COLUMNS`] starting at column `first`;
/// `None` when no push mentioned the job.
fn job_record(
    row: &Row,
    first: usize,
    jobid: Option<&str>,
    state: Option<&str>,
) -> PgResult<Option<JobRecord>> {
    let (Some(jobid), Some(state)) = (jobid, state) else {
        return Ok(None);
    };
    Ok(Some(JobRecord {
        jobid: jobid.to_owned(),
        state: state.to_owned(),
        reason: text(row, first)?,
        start_time: row.try_get(first + 1)?,
        time_limit_secs: row.try_get(first + 2)?,
        user: text(row, first + 3)?,
        uid: row.try_get(first + 4)?,
        nodes: node_list(text(row, first + 5)?),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;
    use crate::store::pg_harness::new_database;
    use crate::store::SCHEMA_VERSION;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    const BUSY: Duration = Duration::from_secs(5);

    fn new_store() -> (String, PgStore) {
        let url = new_database();
        let (store, _) = PgStore::open_or_create(&url, BUSY).unwrap();
        (url, store)
    }

    #[test]
    fn open_refuses_a_database_without_the_schema_and_open_or_create_makes_it() {
        let url = new_database();
        let err = PgStore::open(&url, BUSY).err().unwrap();
        assert!(matches!(err, CoreError::PgNoSchema { .. }), "{err:?}");
        let (_, migration) = PgStore::open_or_create(&url, BUSY).unwrap();
        assert!(migration.created);
        let (_, again) = PgStore::open_or_create(&url, BUSY).unwrap();
        assert_eq!(
            again,
            Migration {
                from_version: SCHEMA_VERSION,
                ..Migration::default()
            }
        );
        let store = PgStore::open(&url, BUSY).unwrap();
        let version: i32 = store
            .client()
            .query_one("SELECT version FROM satellite_schema", &[])
            .unwrap()
            .get(0);
        assert_eq!(i64::from(version), SCHEMA_VERSION);
        // A newer satellite's database, or someone else's tables.
        store
            .client()
            .batch_execute("UPDATE satellite_schema SET version = version + 1")
            .unwrap();
        let err = PgStore::open(&url, BUSY).err().unwrap();
        assert!(err.to_string().contains("newer satellite"), "{err}");
        let other = new_database();
        let mut client = postgres::Client::connect(&other, NoTls).unwrap();
        client
            .batch_execute("CREATE TABLE proxy (alias text)")
            .unwrap();
        let err = PgStore::open_or_create(&other, BUSY).err().unwrap();
        assert!(err.to_string().contains("refusing"), "{err}");
        let tables: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(tables, 1, "a refused database is left as it was");
    }

    #[test]
    fn two_connections_racing_a_redeem_of_one_token_have_one_winner() {
        let (url, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        let aliases: Vec<String> = (0..20).map(|n| format!("race-{n}-token")).collect();
        for alias in &aliases {
            assert!(store.insert_pending(alias, now).unwrap());
        }
        let start = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["10.0.0.1", "10.0.0.2"]
            .into_iter()
            .map(|host| {
                let (url, start, aliases) = (url.clone(), start.clone(), aliases.clone());
                std::thread::spawn(move || {
                    let mut store = PgStore::open(&url, BUSY).unwrap();
                    let target = format!("{host}:8888");
                    aliases
                        .iter()
                        .map(|alias| {
                            start.wait();
                            let publication = RoutePublication::Live { target: &target };
                            store
                                .redeem(alias, host, 8888, now, 100, publication)
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let outcomes: Vec<Vec<RedeemOutcome>> =
            racers.into_iter().map(|r| r.join().unwrap()).collect();
        for (n, alias) in aliases.iter().enumerate() {
            let mut pair = [&outcomes[0][n], &outcomes[1][n]];
            pair.sort_by_key(|o| **o != RedeemOutcome::Redeemed);
            assert_eq!(
                pair,
                [&RedeemOutcome::Redeemed, &RedeemOutcome::AlreadyRedeemed],
                "{alias}"
            );
            // The winner's route is the one live.
            let winner = if outcomes[0][n] == RedeemOutcome::Redeemed {
                "10.0.0.1:8888"
            } else {
                "10.0.0.2:8888"
            };
            assert_eq!(
                store.live_route(alias, now).unwrap().as_deref(),
                Some(winner)
            );
        }
    }

    #[test]
    fn a_plain_sql_delete_from_another_connection_records_the_route_end() {
        let (url, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        store.insert_pending("perl-deleted", now).unwrap();
        store
            .redeem(
                "perl-deleted",
                "fd00::5",
                8888,
                now,
                100,
                RoutePublication::Live {
                    target: "[fd00::5]:8888",
                },
            )
            .unwrap();
        let mut other = postgres::Client::connect(&url, NoTls).unwrap();
        other
            .batch_execute("DELETE FROM proxy WHERE alias = 'perl-deleted'")
            .unwrap();
        assert_eq!(store.live_route("perl-deleted", now).unwrap(), None);
        let mut targets: Vec<String> = store
            .route_ends_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|end| end.target)
            .collect();
        targets.dedup();
        assert_eq!(targets, ["[fd00::5]:8888"]);
    }

    #[test]
    fn the_change_marker_moves_when_another_connection_commits_and_not_before() {
        let (url, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        let before = store.change_marker().unwrap();
        let mut other = postgres::Client::connect(&url, NoTls).unwrap();
        let mut tx = other.transaction().unwrap();
        tx.batch_execute(
            "INSERT INTO proxy (alias, alias_compare_hash, state) VALUES ('x-y-z', 'h', 'pending')",
        )
        .unwrap();
        assert_eq!(store.change_marker().unwrap(), before);
        tx.commit().unwrap();
        let after = store.change_marker().unwrap();
        assert_ne!(after, before);
        // A write that changes nothing wakes nobody (cron's idle pass).
        assert_eq!(store.sync_routes(&[], &[]).unwrap(), RouteSync::default());
        assert_eq!(store.expire(now, 100).unwrap(), 0);
        assert_eq!(store.change_marker().unwrap(), after);
        // Reading the marker sees our own commits too.
        store.insert_pending("a-b-c", now).unwrap();
        assert_ne!(store.change_marker().unwrap(), after);
    }

    #[test]
    fn route_end_ids_follow_commit_order_across_writers() {
        let (url, mut store) = new_store();
        let now = at("2026-01-01T12:00:00Z");
        for alias in ["first-a-b", "second-a-b"] {
            store.insert_pending(alias, now).unwrap();
            store
                .redeem(
                    alias,
                    "10.0.0.5",
                    8888,
                    now,
                    100,
                    RoutePublication::Deferred,
                )
                .unwrap();
        }
        // A plain writer ends a route but has not committed: another
        // writer waits for it, so its end cannot get a lower id and
        // become visible first (a watcher would skip it).
        let mut perl = postgres::Client::connect(&url, NoTls).unwrap();
        let mut tx = perl.transaction().unwrap();
        tx.batch_execute("DELETE FROM proxy WHERE alias = 'first-a-b'")
            .unwrap();
        let waiter = std::thread::spawn(move || {
            let mut store = PgStore::open(&url, BUSY).unwrap();
            store.revoke("second-a-b", now).unwrap()
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(store.route_ends_after(0, 10).unwrap().is_empty());
        tx.commit().unwrap();
        assert!(waiter.join().unwrap());
        let ends = store.route_ends_after(0, 10).unwrap();
        assert_eq!(ends.len(), 2, "{ends:?}");
        assert!(ends[0].id < ends[1].id);
    }

    #[test]
    fn a_lock_held_past_the_busy_timeout_is_busy_and_a_lost_connection_unreachable() {
        let (url, _) = new_store();
        let mut holder = postgres::Client::connect(&url, NoTls).unwrap();
        let mut tx = holder.transaction().unwrap();
        tx.batch_execute("SELECT 1 FROM satellite_changes FOR UPDATE")
            .unwrap();
        let mut store = PgStore::open(&url, Duration::from_millis(100)).unwrap();
        let now = at("2026-01-01T12:00:00Z");
        let err = store.insert_pending("a-b-c", now).unwrap_err();
        assert!(matches!(err, CoreError::Busy), "{err:?}");
        // Readers never wait for the writers' lock.
        assert_eq!(store.live_route_count(now).unwrap(), 0);
        tx.rollback().unwrap();
        assert!(store.insert_pending("a-b-c", now).unwrap());

        let pid: i32 = store
            .client()
            .query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get(0);
        holder
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
        let err = store.insert_pending("d-e-f", now).unwrap_err();
        assert!(err.is_temporary(), "{err:?}");
        assert!(matches!(err, CoreError::Unreachable { .. }), "{err:?}");
        assert!(
            err.to_string().contains("test_"),
            "names the database: {err}"
        );
    }

    /// The writers' lock statement waits at most the busy timeout in all,
    /// also when the lock passes from one holder to another queued before
    /// it: `lock_timeout` alone restarted its wait at each holder (the
    /// soak's getlink answered after 9.5 s, with a busy timeout of 5 s).
    /// Without the statement's own bound, the write gets the lock when
    /// the second holder lets go (1.5 s after the first, 0.5 s before its
    /// second wait would end) and succeeds.
    #[test]
    fn the_writers_lock_is_waited_for_once_across_holders() {
        let (url, _) = new_store();
        let waiting = |pid: i32| {
            let mut watcher = postgres::Client::connect(&url, NoTls).unwrap();
            for _ in 0..600 {
                let row = watcher
                    .query_one(
                        "SELECT coalesce(wait_event_type, '') FROM pg_stat_activity WHERE pid = $1",
                        &[&pid],
                    )
                    .unwrap();
                if row.get::<_, String>(0) == "Lock" {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("backend {pid} never waited for a lock");
        };
        let pid_of = |client: &mut Client| -> i32 {
            client
                .query_one("SELECT pg_backend_pid()", &[])
                .unwrap()
                .get(0)
        };
        let mut first = postgres::Client::connect(&url, NoTls).unwrap();
        first
            .batch_execute("BEGIN; SELECT 1 FROM satellite_changes FOR UPDATE")
            .unwrap();
        // The second holder queues behind the first.
        let mut second = postgres::Client::connect(&url, NoTls).unwrap();
        let second_pid = pid_of(&mut second);
        let (release_second, released) = std::sync::mpsc::channel::<()>();
        let second_holder = std::thread::spawn(move || {
            second
                .batch_execute("BEGIN; SELECT 1 FROM satellite_changes FOR UPDATE")
                .unwrap();
            released.recv().unwrap();
            second.batch_execute("COMMIT").unwrap();
        });
        waiting(second_pid);
        // The store queues behind both.
        let mut store = PgStore::open(&url, Duration::from_secs(2)).unwrap();
        let store_pid = pid_of(&mut store.client());
        let writer =
            std::thread::spawn(move || store.insert_pending("a-b-c", at("2026-01-01T12:00:00Z")));
        waiting(store_pid);
        std::thread::sleep(Duration::from_millis(1500));
        first.batch_execute("COMMIT").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        release_second.send(()).unwrap();
        second_holder.join().unwrap();
        let written = writer.join().unwrap();
        assert!(matches!(written, Err(CoreError::Busy)), "{written:?}");
    }

    /// What a CGI program pays to reach the store, once per request:
    /// `cargo test -p satellite-core --release -- --ignored --nocapture
    /// what_opening`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn what_opening_a_store_costs() {
        let (url, _) = new_store();
        let dir = tempfile::tempdir().unwrap();
        let sqlite = dir.path().join("state.sqlite");
        drop(crate::store::SqliteStore::open_or_create(&sqlite, BUSY).unwrap());
        let rounds = 200;
        let time = |open: &dyn Fn()| {
            open();
            let started = std::time::Instant::now();
            for _ in 0..rounds {
                open();
            }
            started.elapsed() / rounds
        };
        let connect = time(&|| drop(postgres::Client::connect(&url, NoTls).unwrap()));
        let pg = time(&|| drop(PgStore::open(&url, BUSY).unwrap()));
        let pg_first_read = time(&|| {
            let store = PgStore::open(&url, BUSY).unwrap();
            store.token_job("no-such-token", Utc::now(), 100).unwrap();
        });
        let lite = time(&|| drop(crate::store::SqliteStore::open(&sqlite, BUSY).unwrap()));
        eprintln!(
            "per open, mean of {rounds}: postgres::Client::connect {connect:?}; \
             PgStore::open (connect + schema check) {pg:?}; PgStore::open + one read \
             {pg_first_read:?}; SqliteStore::open {lite:?}"
        );
    }

    #[test]
    fn an_unreachable_server_is_temporary_and_names_no_password() {
        let err = PgStore::open(
            "host=/nonexistent/socket/dir user=u password=sekrit dbname=d connect_timeout=1",
            BUSY,
        )
        .err()
        .unwrap();
        assert!(err.is_temporary(), "{err:?}");
        assert!(!err.to_string().contains("sekrit"), "{err}");
        assert!(err.to_string().contains("`d`"), "{err}");
    }
}
