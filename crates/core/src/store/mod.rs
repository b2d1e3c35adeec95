//! The store: what satellite keeps of its tokens, their jobs and their
//! routes, behind the [`Store`] trait, so that the endpoints, the route
//! publisher, the session logic, cron and the admin commands never name a
//! database. [`SqliteStore`] is the legacy `state.sqlite`, kept in the
//! original's formats so that the Perl scripts still run on it, and read by
//! Apache's `dbd:` RewriteMap for map routing; [`PgStore`] keeps the same
//! tables in PostgreSQL, for several frontends sharing one database
//! (`database_url` in the configuration).
//!
//! Every write a trait method makes is atomic and conditional: two racing
//! requests can never both succeed, and a failure leaves nothing half
//! written; a method that ends sessions counts them by [`EndCause`] in the
//! same transaction. The PostgreSQL backend gives the same guarantees and
//! keeps a `routes` relation equal to its live routed tokens for Apache's
//! `dbd:` map (with its own query: the shipped one uses SQLite's
//! `datetime('now')`).

#[cfg(any(test, feature = "pg-test-harness"))]
pub mod pg_harness;
mod postgres;
mod postgres_schema;
mod sqlite;
mod sqlite_schema;
#[cfg(test)]
mod tests;
pub mod transfer;

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::error::Result;
use crate::ratelimit::Limits;

pub use self::postgres::PgStore;
pub use sqlite::{Inspection, SqliteStore};
pub use sqlite_schema::{Migration, ADDED_COLUMNS, SCHEMA_VERSION};

/// Opens the configured store for a program that answers requests: the
/// database must exist (nothing is created in a place nobody chose) and is
/// brought forward if it has an older schema.
pub fn open(dbfile: &Path, busy_timeout: Duration) -> Result<Box<dyn Store>> {
    Ok(Box::new(SqliteStore::open(dbfile, busy_timeout)?))
}

/// Opens the store the configuration names for a program that answers
/// requests: PostgreSQL when `database_url` is set (its schema must be
/// there), else the SQLite file at `dbfile` (see [`open`]).
pub fn open_configured(config: &Config) -> Result<Box<dyn Store>> {
    let busy_timeout = Duration::from_millis(config.busy_timeout_ms);
    match &config.database_url {
        Some(url) => Ok(Box::new(PgStore::open(url, busy_timeout)?)),
        None => open(&config.dbfile, busy_timeout),
    }
}

/// The operations satellite needs of a database. Times come from the
/// caller (`now`), so that a request, a cron run or a test decides what
/// "now" is, and `ttl_secs` is the configured lifetime of a token.
pub trait Store {
    /// The unknown-token debt of `client` as of now (`now` and the result
    /// in the terms of [`Limits`]); a read only, so that a client under its
    /// limit costs no write.
    fn unknown_debt(&self, client: &str, limits: &Limits, now: f64) -> Result<f64>;

    /// Counts one unknown-token answer to `client`, and drops the rows of
    /// clients whose debt has drained. One transaction, so concurrent
    /// answers to one client each count; returns the debt with this answer
    /// counted, so that of concurrent guesses that all passed the check
    /// only those within the burst are answered. The sweep reads every
    /// row; there are only as many as clients that got an unknown answer
    /// within the last `burst / rate` seconds.
    /// The count need not be durable: a crash may forget it.
    fn charge_unknown(&mut self, client: &str, limits: &Limits, now: f64) -> Result<f64>;

    /// Inserts a new pending token. Returns false, writing nothing, when a
    /// row with the same alias already exists (the caller draws again).
    fn insert_pending(&mut self, alias: &str, now: DateTime<Utc>) -> Result<bool>;

    /// Binds a live pending token to `host:port`. With
    /// [`RoutePublication::Live`] the route is written to `routes` in the
    /// same transaction and the row becomes `proxied`: the route is live
    /// when this returns `Redeemed`, and a failure leaves nothing behind.
    fn redeem(
        &mut self,
        alias: &str,
        host: &str,
        port: u16,
        now: DateTime<Utc>,
        ttl_secs: i64,
        publication: RoutePublication<'_>,
    ) -> Result<RedeemOutcome>;

    /// Ends a token's session as its job asked (destroytoken): the row
    /// becomes an `ended` tombstone (kind [`EndCause::Destroy`]) until its
    /// TTL and its route goes in the same transaction. A redeemed one may
    /// only be destroyed from the host it was redeemed on; a pending one
    /// from anywhere allowed (galyleo destroys from the login node when
    /// `sbatch` fails). Expired rows may be destroyed too: it only hastens
    /// the inevitable. A tombstone of a job end is destroyed without
    /// change (the job's end is the better news); one of a destroy or a
    /// revoke answers `Unknown`, as the original did for a second destroy.
    fn destroy(
        &mut self,
        alias: &str,
        requester: &str,
        now: DateTime<Utc>,
    ) -> Result<DestroyOutcome>;

    /// Records the batch job id of a live token, once.
    fn link(
        &mut self,
        alias: &str,
        jobid: &str,
        now: DateTime<Utc>,
        ttl_secs: i64,
    ) -> Result<LinkOutcome>;

    /// A token with its job's last pushed state, tombstones and rows past
    /// their TTL (`expired`, not yet deleted) included.
    fn token_job(&self, alias: &str, now: DateTime<Utc>, ttl_secs: i64)
        -> Result<Option<TokenJob>>;

    /// Writes a batch of job states (a job's earlier state and details are
    /// overwritten, other jobs are kept) and purges those not seen for
    /// three days, in one transaction. Returns how many were written.
    fn update_jobstates(&mut self, states: &[(String, String)], now_epoch: i64) -> Result<usize> {
        let records: Vec<JobRecord> = states
            .iter()
            .map(|(jobid, state)| JobRecord {
                jobid: jobid.clone(),
                state: state.clone(),
                ..JobRecord::default()
            })
            .collect();
        self.record_jobs(&records, &[], now_epoch)
    }

    /// Writes what the scheduler said of these jobs (seen now), purges
    /// jobs not seen for three days, and ends the sessions that news ends
    /// (as [`Store::end_sessions`] does), in one transaction: a crash
    /// leaves either all of a snapshot or none of it. Returns how many job
    /// records were written.
    fn record_jobs(
        &mut self,
        jobs: &[JobRecord],
        ends: &[SessionEnd],
        now_epoch: i64,
    ) -> Result<usize>;

    /// Live tokens that are linked to a job and not ended, with what the
    /// last pushes said of their job.
    fn linked_sessions(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<LinkedSession>>;

    /// Ends these sessions (state `ended`, when, why and its kind, each
    /// counted by its kind): their routes go in the same transaction, the
    /// rows stay as tombstones until the TTL so their aliases are never
    /// issued again. Rows already ended or gone are left alone. Returns how
    /// many ended now.
    fn end_sessions(&mut self, ends: &[SessionEnd], now: DateTime<Utc>) -> Result<usize>;

    /// Deletes rows of every state whose `modified` is older than the TTL;
    /// those not already ended count as [`EndCause::Ttl`].
    fn expire(&mut self, now: DateTime<Utc>, ttl_secs: i64) -> Result<usize>;

    /// Rows that should have a route: live `mapped` and `proxied` ones, by
    /// alias. An expired row loses its route at the next publication, even
    /// before cron deletes it.
    fn route_rows(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Vec<RouteRow>>;

    /// Flips `mapped` rows to `proxied` once their route is live.
    fn mark_proxied(&mut self, aliases: &[String]) -> Result<usize>;

    /// Vhost routing's repair: turns `proxied` rows whose alias is not in
    /// `routed` back to `mapped` (their route was refused, or Apache no
    /// longer has it), so that `proxied` always means routed; their ends
    /// are recorded for the watchers. Returns how many.
    fn unmark_proxied(&mut self, routed: &[String]) -> Result<usize>;

    /// Map routing's repair pass (cron), from rows the caller read before:
    /// writes the `wanted` routes and flips their rows to `proxied`, and
    /// takes the route of each `refused` row, turning it back to `mapped`
    /// (so the state always says what is routed), and drops routes with no
    /// routed token. One transaction, and it never undoes a write made
    /// after the caller's read: a route is written only while its row is
    /// still routed, and a token redeemed since (in neither list) keeps its
    /// route. Only differences are written, so a run with nothing to do
    /// writes nothing and Apache's readers never see a half-done set.
    fn sync_routes(&mut self, wanted: &[PublishedRoute], refused: &[String]) -> Result<RouteSync>;

    /// The targets of the routes live at `now`, and when the first of them
    /// expires.
    fn live_targets(&self, now: DateTime<Utc>) -> Result<(Vec<String>, Option<DateTime<Utc>>)>;

    /// How many routes the data plane holds that are live at `now`.
    fn live_route_count(&self, now: DateTime<Utc>) -> Result<i64>;

    /// A value that changes whenever another connection has committed, so
    /// that a watcher (`cron --watch`) can poll for changes cheaply.
    /// SQLite gives its `data_version`; a backend without such a counter
    /// keeps one its triggers bump.
    fn change_marker(&self) -> Result<i64>;

    /// Whether this store connection leads the site's once-only work
    /// (expiry, map routing's repair pass): true while it holds the site's
    /// leadership lock, taken here if free. Several frontends' watchers
    /// share one database; one of them does that work, and when its
    /// connection goes (the frontend died), the next watcher to ask takes
    /// over. A SQLite store serves one host, whose run lock already lets
    /// one watcher run: it always leads.
    fn lead(&mut self) -> Result<bool> {
        Ok(true)
    }

    /// Which run of the database server this is (PostgreSQL: when it
    /// started), so that a watcher sees a restart or a fail-over: Apache's
    /// kept lookup connections then lost their prepared statements, which
    /// APR's pgsql driver never prepares again. `None`: nothing to watch
    /// (SQLite has no server).
    fn server_epoch(&self) -> Result<Option<String>> {
        Ok(None)
    }

    /// The recorded route ends with an id above `after`, oldest first, at
    /// most `limit` of them: what a watcher has not acted on yet.
    fn route_ends_after(&self, after: i64, limit: usize) -> Result<Vec<RouteEnd>>;

    /// Registers the watcher `name` (if new, at the first retained record,
    /// so that it acts on everything still recorded) and returns the id of
    /// the last route end it has acted on.
    fn watcher_cursor(&mut self, name: &str, pid: u32, now: DateTime<Utc>) -> Result<i64>;

    /// Records that watcher `name` has acted on every route end up to
    /// `last_end_id`, and that it is alive (its heartbeat); drops the
    /// records every watcher heard of within [`WATCHER_FORGET_SECS`] has
    /// passed, and the watchers silent for longer. One transaction.
    fn watcher_advance(
        &mut self,
        name: &str,
        last_end_id: i64,
        pid: u32,
        now: DateTime<Utc>,
    ) -> Result<()>;

    /// Every registered watcher, by name.
    fn watchers(&self) -> Result<Vec<WatcherRow>>;

    /// Every token, oldest first.
    fn list_tokens(&self) -> Result<Vec<TokenRow>>;

    /// One token, by alias, whatever its state or age.
    fn find_token(&self, alias: &str) -> Result<Option<TokenRow>>;

    /// Ends a token's session whatever its state or host (an admin's
    /// revoke): a tombstone of kind [`EndCause::Revoke`] until the TTL, its
    /// route gone in the same transaction. False when no such token is
    /// there or it had already ended.
    fn revoke(&mut self, alias: &str, now: DateTime<Utc>) -> Result<bool>;

    /// Counts for `satellite stats`.
    fn stats(&self) -> Result<Stats>;

    /// Counts for the metrics, read in one transaction so they agree.
    /// Ended sessions are classed by their `end_kind`.
    fn gauges(&self, now: DateTime<Utc>, ttl_secs: i64) -> Result<Gauges>;
}

/// How a conditional write went, the same for every store: it changed
/// the row, the row refused it (already redeemed, already linked), or
/// there was no live row.
pub(crate) enum Written {
    Applied,
    Refused,
    NoSuchRow,
}

impl From<Written> for RedeemOutcome {
    fn from(written: Written) -> Self {
        match written {
            Written::Applied => RedeemOutcome::Redeemed,
            Written::Refused => RedeemOutcome::AlreadyRedeemed,
            Written::NoSuchRow => RedeemOutcome::Unknown,
        }
    }
}

impl From<Written> for LinkOutcome {
    fn from(written: Written) -> Self {
        match written {
            Written::Applied => LinkOutcome::Linked,
            Written::Refused => LinkOutcome::AlreadyLinked,
            Written::NoSuchRow => LinkOutcome::Unknown,
        }
    }
}

/// What destroytoken does to the row it found, decided the same way by
/// every store (see [`Store::destroy`]): the answer, and the cause to end
/// the session with when there is one to end.
pub(crate) fn decide_destroy(
    state: Option<&str>,
    dsthost: Option<&str>,
    end_kind: Option<&str>,
    requester: &str,
) -> (DestroyOutcome, Option<String>) {
    let ended = state == Some("ended");
    let ended_by_request = matches!(
        end_kind.and_then(EndCause::from_label),
        Some(EndCause::Destroy | EndCause::Revoke)
    );
    let redeemed = dsthost.is_some_and(|host| !host.is_empty());
    if ended && ended_by_request {
        (DestroyOutcome::Unknown, None)
    } else if redeemed && dsthost != Some(requester) {
        (DestroyOutcome::WrongHost, None)
    } else if ended {
        (DestroyOutcome::Destroyed, None)
    } else if redeemed {
        (
            DestroyOutcome::Destroyed,
            Some(format!(
                "shut down by its job (destroytoken from {requester})"
            )),
        )
    } else {
        (
            DestroyOutcome::Destroyed,
            Some(format!(
                "destroyed before its job redeemed it (destroytoken from {requester})"
            )),
        )
    }
}

/// A job's nodes as stored (`jobdetails.nodes`: names joined by commas).
pub(crate) fn node_list(stored: Option<String>) -> Vec<String> {
    stored
        .map(|n| {
            n.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A watcher silent for this long is forgotten: route ends it has not
/// acted on no longer wait for it (its Apache is presumably gone too).
pub const WATCHER_FORGET_SECS: i64 = 24 * 3600;

/// A route that ended: the backend (`ip:port`, as recorded) whose open
/// tunnels must be cut, unless a live route still leads there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEnd {
    pub id: i64,
    pub target: String,
}

/// A watcher as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatcherRow {
    pub name: String,
    pub last_end_id: i64,
    pub heartbeat: Option<DateTime<Utc>>,
    pub pid: Option<i64>,
    /// Route ends recorded after its cursor.
    pub behind: i64,
}

/// One session to end, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEnd {
    pub alias: String,
    pub kind: EndCause,
    /// What happened, for the log and the admin (`job 7 ended (TIMEOUT)`).
    pub cause: String,
}

/// Job states older than this are purged whenever new ones arrive.
pub const JOBSTATE_RETENTION_SECS: i64 = 3 * 24 * 3600;

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
    pub end_kind: Option<EndCause>,
    /// The row has outlived its TTL and waits for cron to delete it.
    pub expired: bool,
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

/// What the store can say about the service at one instant, for metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Rows by state, expired ones cron has not deleted yet included.
    pub by_state: Vec<(String, i64)>,
    /// Routes the data plane serves now (map routing's `routes` table).
    pub live_routes: i64,
    /// Live rows (not `ended`, not past the TTL) never linked to a job.
    pub unbound: i64,
    /// `ended` rows (tombstones) by their kind, every kind listed.
    pub ended: Vec<(EndCause, i64)>,
    /// Sessions ended since the database was made, by cause, every cause
    /// listed (a counter: it only grows).
    pub ends_total: Vec<(EndCause, i64)>,
    /// `max(jobstates.lastseen)` as an epoch; `None` when nothing was pushed.
    pub newest_jobstate: Option<i64>,
    /// Every frontend's watcher, its heartbeat and what it has not cut yet.
    pub watchers: Vec<WatcherRow>,
}

/// Why a token's session ended, as the `satellite_session_ends_total` counter
/// classes it. A token ends once: deleting an `ended` tombstone (by TTL,
/// destroy or revoke) counts nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndCause {
    /// `destroytoken` from the job's host (or anywhere, while pending).
    Destroy,
    /// An admin's `satellite revoke`.
    Revoke,
    /// Deleted by cron at the end of its TTL.
    Ttl,
    /// The scheduler said the job ended, or no longer knows it.
    JobEnd,
    /// Redeemed from outside its job, or the job's user is denied.
    BindingMismatch,
}

impl EndCause {
    pub const ALL: [EndCause; 5] = [
        EndCause::Destroy,
        EndCause::Revoke,
        EndCause::Ttl,
        EndCause::JobEnd,
        EndCause::BindingMismatch,
    ];

    /// The label value, also the key stored in the database.
    pub fn label(self) -> &'static str {
        match self {
            EndCause::Destroy => "destroy",
            EndCause::Revoke => "revoke",
            EndCause::Ttl => "ttl",
            EndCause::JobEnd => "job_end",
            EndCause::BindingMismatch => "binding_mismatch",
        }
    }

    /// The kind stored in `end_kind`, if this build knows it.
    pub fn from_label(label: &str) -> Option<EndCause> {
        EndCause::ALL.into_iter().find(|c| c.label() == label)
    }

    /// The class of an `end_cause` text of a tombstone made before
    /// `end_kind` existed (schema 4 and older), when only job ends and
    /// binding mismatches made tombstones: `job … ended (…)` and `job … is
    /// no longer known to the scheduler` are the job's end; every other
    /// cause is a binding mismatch. Used once, by the migration.
    pub fn of_legacy_cause(text: &str) -> EndCause {
        let job_end = text.strip_prefix("job ").is_some_and(|rest| {
            rest.contains(" ended (") || rest.ends_with(" is no longer known to the scheduler")
        });
        if job_end {
            EndCause::JobEnd
        } else {
            EndCause::BindingMismatch
        }
    }
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
