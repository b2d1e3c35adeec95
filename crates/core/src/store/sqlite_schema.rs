//! The SQLite schema: the legacy tables as the original made them, what
//! satellite adds to them (columns, indexes, the `routes` data plane and its
//! triggers, the rate limit's and the scheduler's tables), and the one-way
//! migration of an older file to [`SCHEMA_VERSION`].
//!
//! The migration is one `BEGIN IMMEDIATE` transaction of named steps, each
//! of which may refuse the file: a refused database is left exactly as it
//! was.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::error::{CoreError, Result};

/// Written to `PRAGMA user_version` once a database has satellite's indexes
/// and route table. Legacy databases have 0; 1 had the indexes only; 2 had
/// no `unknown_answers`; 3 had no `session_ends`; 4 had no `route_ends`,
/// `watchers` or `proxy.end_kind`.
pub const SCHEMA_VERSION: i64 = 5;

pub(super) const CREATE_PROXY: &str = "CREATE TABLE proxy ( alias text not null, alias_compare_hash text not null, modified timestamp default current_timestamp, dsthost text, dstport integer, dstpath text, state text not null, jobid text default null)";
pub(super) const CREATE_JOBSTATES: &str = "CREATE TABLE jobstates ( jobid text primary key, state text not null, lastseen timestamp default current_timestamp)";
pub(super) const CREATE_INDEXES: &str = "
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
    CREATE TABLE IF NOT EXISTS session_ends ( cause text primary key not null, count integer not null ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS unknown_answers ( client text primary key not null, debt real not null, at real not null ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS jobdetails ( jobid text primary key not null, reason text, start_time integer, time_limit integer, job_user text, job_uid integer, nodes text ) WITHOUT ROWID;
    CREATE TRIGGER IF NOT EXISTS proxy_delete_drops_route AFTER DELETE ON proxy
        BEGIN DELETE FROM routes WHERE alias = old.alias; END;
    CREATE TRIGGER IF NOT EXISTS proxy_update_drops_route
        AFTER UPDATE OF alias, state, dsthost, dstport ON proxy
        WHEN new.state IS NOT 'proxied' OR new.alias IS NOT old.alias
          OR new.dsthost IS NOT old.dsthost OR new.dstport IS NOT old.dstport
        BEGIN DELETE FROM routes WHERE alias = old.alias; END;
    CREATE TABLE IF NOT EXISTS route_ends ( id integer primary key autoincrement, target text not null, at text not null default current_timestamp );
    CREATE TABLE IF NOT EXISTS watchers ( name text primary key not null, last_end_id integer not null default 0, heartbeat text, pid integer ) WITHOUT ROWID;
    CREATE TRIGGER IF NOT EXISTS proxy_delete_records_route_end AFTER DELETE ON proxy
        WHEN old.state IN ('mapped', 'proxied') AND coalesce(old.dsthost, '') <> ''
        BEGIN INSERT INTO route_ends (target) VALUES (
            CASE WHEN instr(old.dsthost, ':') > 0 THEN '[' || old.dsthost || ']' ELSE old.dsthost END
            || ':' || old.dstport); END;
    CREATE TRIGGER IF NOT EXISTS proxy_update_records_route_end
        AFTER UPDATE OF state, dsthost, dstport ON proxy
        WHEN old.state IN ('mapped', 'proxied') AND coalesce(old.dsthost, '') <> ''
          AND (new.state NOT IN ('mapped', 'proxied') OR new.dsthost IS NOT old.dsthost
               OR new.dstport IS NOT old.dstport
               OR (old.state = 'proxied' AND new.state = 'mapped'))
        BEGIN INSERT INTO route_ends (target) VALUES (
            CASE WHEN instr(old.dsthost, ':') > 0 THEN '[' || old.dsthost || ']' ELSE old.dsthost END
            || ':' || old.dstport); END;
    CREATE TRIGGER IF NOT EXISTS routes_delete_records_route_end AFTER DELETE ON routes
        BEGIN INSERT INTO route_ends (target) VALUES (old.target); END;
";
// `unknown_answers` is the rate limit's memory for the CGI programs, which
// live for one request: per client address (see `ratelimit::client_key`),
// the unknown-token answers not yet paid back (`debt`) as of `at` (epoch
// seconds). A row whose debt has drained says nothing and is deleted.
// `session_ends` counts ended sessions by cause (`EndCause::label`) for the
// metrics, written in the transaction that ends them.
//
// `route_ends` is the record every watcher (`cron --watch`, one per Apache
// frontend) cuts open tunnels from: whatever ends a route (a redeem's row
// changing, destroy, revoke, a job end, the TTL, a Perl script's delete,
// cron's repair dropping a refused route) adds the target it led to, in the
// transaction that ends it, with an increasing id. The triggers fire for
// writes of any program, so no ending is missed, and the ids never repeat
// (AUTOINCREMENT), so a watcher's cursor in `watchers` (`last_end_id`) says
// exactly what it has acted on, across its restarts. A target may be
// recorded twice for one ending (the row and its route); cutting is
// idempotent. `watchers` also holds each watcher's heartbeat.

/// Columns satellite adds to the legacy tables, all nullable, so the Perl
/// scripts' inserts (which name their columns) keep working.
/// `jobid` is the master branch's; the rest are satellite's: when a token
/// was linked and when and why its session ended (state `ended`, a
/// tombstone kept until the TTL so the alias is never issued again), and
/// why.
/// `jobstates` itself is left as the original made it (a site's own
/// scripts may insert into it without naming columns): the rest of what the
/// scheduler says of a job lives in satellite's `jobdetails`.
pub const ADDED_COLUMNS: [(&str, &str, &str); 5] = [
    ("proxy", "jobid", "text default null"),
    ("proxy", "linked_at", "text default null"),
    ("proxy", "ended_at", "text default null"),
    ("proxy", "end_cause", "text default null"),
    ("proxy", "end_kind", "text default null"),
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

/// What opening a database did to it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migration {
    pub created: bool,
    pub added_columns: Vec<&'static str>,
    pub from_version: i64,
}

/// Brings the database behind `conn` to [`SCHEMA_VERSION`], creating the
/// legacy tables first when `create` is set.
pub(super) fn migrate(conn: &mut Connection, path: &Path, create: bool) -> Result<Migration> {
    let from_version = schema_version(conn)?;
    let migration = Migration {
        from_version,
        ..Migration::default()
    };
    if from_version == SCHEMA_VERSION {
        return Ok(migration);
    }
    if from_version > SCHEMA_VERSION {
        return Err(CoreError::DatabaseFromFuture {
            path: path.to_owned(),
            found: from_version,
            known: SCHEMA_VERSION,
        });
    }
    // Look before taking the write lock, so a database we refuse is left
    // exactly as it was.
    if !create && !table_exists(conn, "proxy")? {
        return Err(CoreError::DatabaseEmpty {
            path: path.to_owned(),
        });
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let migration = Migration {
        created: create_legacy_tables(&tx)?,
        added_columns: add_satellite_columns(&tx, path)?,
        ..migration
    };
    refuse_duplicate_aliases(&tx, path)?;
    tx.execute_batch(CREATE_INDEXES)?;
    tx.execute_batch(CREATE_ROUTES)?;
    classify_old_tombstones(&tx)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    // WAL lets readers (tokenjobstate polls, index) run beside a writer.
    // It is a property of the file, so it is set once, here.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    Ok(migration)
}

pub(super) fn schema_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA user_version", [], |row| row.get(0))?)
}

/// Creates `proxy` and `jobstates` as the original did, where missing.
/// Returns whether `proxy` was created (a new database).
fn create_legacy_tables(tx: &Transaction<'_>) -> Result<bool> {
    let created = !table_exists(tx, "proxy")?;
    if created {
        tx.execute_batch(CREATE_PROXY)?;
    }
    if !table_exists(tx, "jobstates")? {
        tx.execute_batch(CREATE_JOBSTATES)?;
    }
    Ok(created)
}

/// Refuses a `proxy` table without the original's columns, then adds
/// satellite's, returning those it added.
fn add_satellite_columns(tx: &Transaction<'_>, path: &Path) -> Result<Vec<&'static str>> {
    let proxy_columns = column_names(tx, "proxy")?;
    if let Some(missing) = PROXY_COLUMNS
        .iter()
        .find(|c| !proxy_columns.iter().any(|have| have == *c))
    {
        return Err(CoreError::NotSatelliteDatabase {
            path: path.to_owned(),
            why: format!("table proxy has no column {missing}"),
        });
    }
    let mut added = Vec::new();
    for (table, column, declaration) in ADDED_COLUMNS {
        if !column_names(tx, table)?.iter().any(|c| c == column) {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))?;
            added.push(column);
        }
    }
    Ok(added)
}

/// Tombstones made before `end_kind` existed get it from their cause text,
/// once, so that every later reader classes ends by `end_kind` alone.
fn classify_old_tombstones(tx: &Transaction<'_>) -> Result<()> {
    let causes: Vec<(String, String)> = {
        let mut stmt = tx.prepare(
            "SELECT alias, coalesce(end_cause, '') FROM proxy \
             WHERE state = 'ended' AND end_kind IS NULL",
        )?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut update = tx.prepare("UPDATE proxy SET end_kind = ?1 WHERE alias = ?2")?;
    for (alias, cause) in causes {
        let kind = crate::store::EndCause::of_legacy_cause(&cause);
        update.execute(rusqlite::params![kind.label(), alias])?;
    }
    Ok(())
}

/// The unique index on `alias_compare_hash` cannot be built over two rows
/// with one hash (a hand-edited database): name them instead.
fn refuse_duplicate_aliases(tx: &Transaction<'_>, path: &Path) -> Result<()> {
    let duplicates: Vec<String> = {
        let mut stmt = tx.prepare(
            "SELECT group_concat(alias, ' = ') FROM proxy \
             GROUP BY alias_compare_hash HAVING count(*) > 1 LIMIT 20",
        )?;
        let rows = stmt.query_map([], |row| row.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if duplicates.is_empty() {
        return Ok(());
    }
    Err(CoreError::DuplicateAliases {
        path: path.to_owned(),
        aliases: duplicates.join("; "),
    })
}

pub(super) fn column_names(conn: &Connection, table: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
    let names = stmt.query_map([], |row| row.get(0))?;
    Ok(names.collect::<rusqlite::Result<_>>()?)
}

pub(super) fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}
