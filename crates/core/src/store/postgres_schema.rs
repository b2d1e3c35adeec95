//! The PostgreSQL schema: the same tables as SQLite's schema
//! [`SCHEMA_VERSION`] (`proxy`, `jobstates` and satellite's own), the same
//! text formats where the shared code reads them, and PL/pgSQL triggers
//! that keep `routes` equal to the routed rows of `proxy` and record every
//! ended route in `route_ends`, whoever writes.
//!
//! There is no legacy PostgreSQL database to bring forward: a database is
//! either empty (and gets the whole schema in one transaction) or has
//! satellite's schema at a version recorded in `satellite_schema`.
//!
//! Two one-row tables do what SQLite gives for free:
//!
//! - `satellite_changes` is the change marker (SQLite's `data_version`).
//!   A counter row, not a sequence: `nextval` is visible to every session
//!   at once, before the writer commits, so a watcher could see the marker
//!   move, read nothing new yet, and then never see it move again for that
//!   commit. A row updated inside the writer's transaction changes exactly
//!   when its data becomes visible. It is bumped once per transaction (by
//!   row triggers, only when a row of `proxy` or `routes` changed or a
//!   route end was added), so a statement that changes nothing, such as
//!   cron's idle repair pass, wakes nobody.
//! - Its row lock is also the writers' lock. SQLite's `BEGIN IMMEDIATE`
//!   serialises writers; here every satellite write transaction starts by
//!   locking that row (`FOR UPDATE`), and a statement-level `BEFORE`
//!   trigger takes the same lock for any other program that writes
//!   `proxy`, `routes` or `route_ends`, before it locks any of their rows
//!   (so all writers take the locks in one order and cannot deadlock on
//!   them). Readers never wait for it. Because an ended route's id is
//!   drawn while that lock is held and the lock is held until commit,
//!   `route_ends` ids are in commit order: a watcher that has seen id `n`
//!   has seen every id below it, as with SQLite's single writer.

use postgres::error::SqlState;
use postgres::Client;

use super::{Migration, SCHEMA_VERSION};
use crate::error::{CoreError, Result};

/// Text columns compare bytewise (`COLLATE "C"`), as SQLite's do: expiry
/// compares `modified` text with a cutoff, and a locale's collation could
/// order punctuation otherwise.
const CREATE_SCHEMA: &str = r#"
CREATE TABLE satellite_schema (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL
);
CREATE TABLE satellite_changes (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n bigint NOT NULL DEFAULT 0,
    xact bigint
);
INSERT INTO satellite_changes (n) VALUES (0);

-- SQLite's current_timestamp text: UTC `YYYY-MM-DD HH:MM:SS`.
CREATE FUNCTION satellite_now() RETURNS text LANGUAGE sql STABLE
    AS $f$ SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') $f$;

-- Apache's route lookup (httpd-conf/satellite.conf) is one query for both
-- stores: SQLite's datetime('now'), the same text here.
CREATE FUNCTION datetime(what text) RETURNS text LANGUAGE sql STABLE
    AS $f$ SELECT CASE WHEN what = 'now' THEN satellite_now() END $f$;

CREATE TABLE proxy (
    alias text COLLATE "C" NOT NULL,
    alias_compare_hash text COLLATE "C" NOT NULL,
    modified text COLLATE "C" DEFAULT satellite_now(),
    dsthost text COLLATE "C",
    dstport integer,
    dstpath text,
    state text COLLATE "C" NOT NULL,
    jobid text COLLATE "C" DEFAULT NULL,
    linked_at text COLLATE "C" DEFAULT NULL,
    ended_at text COLLATE "C" DEFAULT NULL,
    end_cause text DEFAULT NULL,
    end_kind text COLLATE "C" DEFAULT NULL
);
CREATE UNIQUE INDEX proxy_alias_compare_hash ON proxy (alias_compare_hash);
CREATE INDEX proxy_state_alias ON proxy (state, alias);
CREATE INDEX proxy_modified ON proxy (modified);
CREATE INDEX proxy_alias ON proxy (alias);

CREATE TABLE jobstates (
    jobid text COLLATE "C" PRIMARY KEY,
    state text NOT NULL,
    lastseen bigint
);
CREATE INDEX jobstates_lastseen ON jobstates (lastseen);
CREATE TABLE jobdetails (
    jobid text COLLATE "C" PRIMARY KEY,
    reason text,
    start_time bigint,
    time_limit bigint,
    job_user text,
    job_uid bigint,
    nodes text
);

-- Map routing's data plane: Apache's dbd map reads it (see sqlite_schema).
CREATE TABLE routes (
    alias text COLLATE "C" PRIMARY KEY,
    target text COLLATE "C" NOT NULL,
    expires text COLLATE "C" NOT NULL
);
CREATE TABLE session_ends (cause text COLLATE "C" PRIMARY KEY, count bigint NOT NULL);
CREATE TABLE unknown_answers (
    client text COLLATE "C" PRIMARY KEY,
    debt double precision NOT NULL,
    at double precision NOT NULL
);
-- An identity never hands out an id twice, as SQLite's AUTOINCREMENT.
CREATE TABLE route_ends (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target text COLLATE "C" NOT NULL,
    at text COLLATE "C" NOT NULL DEFAULT satellite_now()
);
CREATE INDEX route_ends_at ON route_ends (at);
CREATE TABLE watchers (
    name text COLLATE "C" PRIMARY KEY,
    last_end_id bigint NOT NULL DEFAULT 0,
    heartbeat text COLLATE "C",
    pid bigint
);

CREATE FUNCTION satellite_write_lock() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM 1 FROM satellite_changes FOR UPDATE;
    RETURN NULL;
END $f$;

CREATE FUNCTION satellite_changed() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    UPDATE satellite_changes SET n = n + 1, xact = txid_current()
        WHERE xact IS DISTINCT FROM txid_current();
    RETURN NULL;
END $f$;

CREATE FUNCTION satellite_route_target(host text, port integer) RETURNS text
    LANGUAGE sql IMMUTABLE AS $f$
    SELECT CASE WHEN position(':' IN host) > 0 THEN '[' || host || ']' ELSE host END
        || ':' || coalesce(port::text, '')
$f$;

CREATE FUNCTION proxy_deleted() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    DELETE FROM routes WHERE alias = OLD.alias;
    IF OLD.state IN ('mapped', 'proxied') AND coalesce(OLD.dsthost, '') <> '' THEN
        INSERT INTO route_ends (target)
            VALUES (satellite_route_target(OLD.dsthost, OLD.dstport));
    END IF;
    RETURN NULL;
END $f$;

CREATE FUNCTION proxy_updated() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    IF NEW.state IS DISTINCT FROM 'proxied' OR NEW.alias IS DISTINCT FROM OLD.alias
        OR NEW.dsthost IS DISTINCT FROM OLD.dsthost
        OR NEW.dstport IS DISTINCT FROM OLD.dstport THEN
        DELETE FROM routes WHERE alias = OLD.alias;
    END IF;
    IF OLD.state IN ('mapped', 'proxied') AND coalesce(OLD.dsthost, '') <> ''
        AND (NEW.state NOT IN ('mapped', 'proxied')
             OR NEW.dsthost IS DISTINCT FROM OLD.dsthost
             OR NEW.dstport IS DISTINCT FROM OLD.dstport
             OR (OLD.state = 'proxied' AND NEW.state = 'mapped')) THEN
        INSERT INTO route_ends (target)
            VALUES (satellite_route_target(OLD.dsthost, OLD.dstport));
    END IF;
    RETURN NULL;
END $f$;

CREATE FUNCTION routes_deleted() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO route_ends (target) VALUES (OLD.target);
    RETURN NULL;
END $f$;

CREATE TRIGGER proxy_write_lock BEFORE INSERT OR UPDATE OR DELETE ON proxy
    FOR EACH STATEMENT EXECUTE FUNCTION satellite_write_lock();
CREATE TRIGGER routes_write_lock BEFORE INSERT OR UPDATE OR DELETE ON routes
    FOR EACH STATEMENT EXECUTE FUNCTION satellite_write_lock();
CREATE TRIGGER route_ends_write_lock BEFORE INSERT OR UPDATE OR DELETE ON route_ends
    FOR EACH STATEMENT EXECUTE FUNCTION satellite_write_lock();

CREATE TRIGGER proxy_changed AFTER INSERT OR UPDATE OR DELETE ON proxy
    FOR EACH ROW EXECUTE FUNCTION satellite_changed();
CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE ON routes
    FOR EACH ROW EXECUTE FUNCTION satellite_changed();
CREATE TRIGGER route_ends_added AFTER INSERT ON route_ends
    FOR EACH ROW EXECUTE FUNCTION satellite_changed();

CREATE TRIGGER proxy_delete_ends_route AFTER DELETE ON proxy
    FOR EACH ROW EXECUTE FUNCTION proxy_deleted();
CREATE TRIGGER proxy_update_ends_route AFTER UPDATE OF alias, state, dsthost, dstport ON proxy
    FOR EACH ROW EXECUTE FUNCTION proxy_updated();
CREATE TRIGGER routes_delete_records_route_end AFTER DELETE ON routes
    FOR EACH ROW EXECUTE FUNCTION routes_deleted();
"#;

/// Serialises `open_or_create`s racing on one empty database, so that one
/// creates the schema and the others find it (any constant will do: it
/// only has to be satellite's).
const CREATE_LOCK_KEY: i64 = 0x5a7e_1117_0016;

/// What the database holds of satellite's schema.
enum Found {
    Version(i64),
    Nothing,
    /// Tables named like satellite's, without its version record.
    Foreign(String),
}

fn look(client: &mut impl postgres::GenericClient) -> Result<Found, postgres::Error> {
    let row = client.query_one(
        "SELECT to_regclass('satellite_schema') IS NOT NULL, \
         (SELECT string_agg(relname::text, ', ' ORDER BY relname) FROM pg_class \
          WHERE relkind IN ('r', 'p', 'v') AND pg_table_is_visible(oid) \
          AND relname IN ('proxy', 'jobstates', 'routes', 'route_ends', 'watchers'))",
        &[],
    )?;
    let has_version: bool = row.try_get(0)?;
    if has_version {
        let version: Option<i32> = client
            .query_opt("SELECT version FROM satellite_schema", &[])?
            .map(|r| r.try_get(0))
            .transpose()?;
        return Ok(match version {
            Some(v) => Found::Version(i64::from(v)),
            None => Found::Foreign("satellite_schema has no row".into()),
        });
    }
    let tables: Option<String> = row.try_get(1)?;
    Ok(match tables {
        Some(names) => Found::Foreign(format!("tables {names} but no satellite_schema")),
        None => Found::Nothing,
    })
}

/// Checks that the database has satellite's schema at [`SCHEMA_VERSION`];
/// `database` names it in errors. One round trip when it has: every CGI
/// program pays for this.
pub(super) fn check(client: &mut Client, database: &str) -> Result<()> {
    match client.query_opt("SELECT version FROM satellite_schema", &[]) {
        Ok(Some(row)) => {
            let version: i32 = row.try_get(0).map_err(super::postgres::pg_error)?;
            check_version(i64::from(version), database)
        }
        Ok(None) => Err(CoreError::PgSchema {
            database: database.to_owned(),
            why: "satellite_schema has no row".into(),
        }),
        Err(err) if err.code() == Some(&SqlState::UNDEFINED_TABLE) => Err(CoreError::PgNoSchema {
            database: database.to_owned(),
        }),
        Err(err) => Err(super::postgres::pg_error(err)),
    }
}

fn check_version(version: i64, database: &str) -> Result<()> {
    if version == SCHEMA_VERSION {
        Ok(())
    } else if version > SCHEMA_VERSION {
        Err(CoreError::PgSchema {
            database: database.to_owned(),
            why: format!(
                "written by a newer satellite (schema version {version}, this build knows {SCHEMA_VERSION})"
            ),
        })
    } else {
        Err(CoreError::PgSchema {
            database: database.to_owned(),
            why: format!(
                "schema version {version}, which no satellite made for PostgreSQL (this build knows {SCHEMA_VERSION})"
            ),
        })
    }
}

/// Creates the schema in an empty database (one transaction: a failure
/// leaves it empty), or checks the one it has.
pub(super) fn create_or_check(client: &mut Client, database: &str) -> Result<Migration> {
    let mut tx = client.transaction().map_err(super::postgres::pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CREATE_LOCK_KEY])
        .map_err(super::postgres::pg_error)?;
    let found = look(&mut tx).map_err(super::postgres::pg_error)?;
    let migration = match found {
        Found::Version(version) => {
            check_version(version, database)?;
            Migration {
                from_version: version,
                ..Migration::default()
            }
        }
        Found::Foreign(why) => {
            return Err(CoreError::PgSchema {
                database: database.to_owned(),
                why: format!("not satellite's schema ({why}); refusing to add to it"),
            })
        }
        Found::Nothing => {
            tx.batch_execute(CREATE_SCHEMA)
                .map_err(super::postgres::pg_error)?;
            tx.execute(
                "INSERT INTO satellite_schema (version) VALUES ($1)",
                &[&i32::try_from(SCHEMA_VERSION).unwrap_or(i32::MAX)],
            )
            .map_err(super::postgres::pg_error)?;
            Migration {
                created: true,
                ..Migration::default()
            }
        }
    };
    tx.commit().map_err(super::postgres::pg_error)?;
    Ok(migration)
}
