//! The admin subcommands of `satellite`: looking at tokens, revoking them,
//! expiry now, what cron would write, counts, migration of a Perl-era
//! database, creating an install tree, and pushing job states.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use satellite_core::config::Routing;
use satellite_core::routes::{self, RouteSet};
use satellite_core::store::{TokenRow, ADDED_COLUMNS, SCHEMA_VERSION};
use satellite_core::{Config, SqliteStore, Store};
use satellite_sched::Scheduler;

use crate::AboutPath;

pub fn open_store(config: &Config) -> Result<Box<dyn Store>> {
    about_database(
        satellite_core::store::open_configured(config),
        "opening",
        config,
    )
}

/// Context naming the configured database once: the SQLite file unless
/// the error names it already, or `database_url` (never its value: it may
/// hold a password).
fn about_database<T>(result: satellite_core::Result<T>, what: &str, config: &Config) -> Result<T> {
    match config.database_url {
        Some(_) => result.with_context(|| format!("{what} the PostgreSQL database (database_url)")),
        None => result.about_path(what, &config.dbfile),
    }
}

fn age_seconds(modified: &str) -> Option<i64> {
    let then = chrono::NaiveDateTime::parse_from_str(modified, "%Y-%m-%d %H:%M:%S").ok()?;
    Some((Utc::now().naive_utc() - then).num_seconds().max(0))
}

fn age(modified: &str) -> String {
    let Some(secs) = age_seconds(modified) else {
        return "?".into();
    };
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn target(row: &TokenRow) -> String {
    match (&row.dsthost, row.dstport) {
        (Some(host), Some(port)) if host.contains(':') => format!("[{host}]:{port}"),
        (Some(host), Some(port)) => format!("{host}:{port}"),
        _ => "-".into(),
    }
}

pub fn list(config: &Config, json: bool) -> Result<String> {
    let rows = open_store(config)?.list_tokens()?;
    if json {
        let objects: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "alias": r.alias,
                    "state": r.state,
                    "dsthost": r.dsthost,
                    "dstport": r.dstport,
                    "jobid": r.jobid,
                    "modified": r.modified,
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&objects)? + "\n");
    }
    let mut out = format!(
        "{:<32} {:<8} {:>5} {:<24} {}\n",
        "TOKEN", "STATE", "AGE", "TARGET", "JOB"
    );
    for row in &rows {
        let _ = writeln!(
            out,
            "{:<32} {:<8} {:>5} {:<24} {}",
            row.alias,
            row.state,
            age(&row.modified),
            target(row),
            row.jobid.as_deref().unwrap_or("-")
        );
    }
    Ok(out)
}

/// One token; `json`: an object with alias, url, state, dsthost, dstport,
/// jobid, modified (UTC text as stored) and age_seconds (null if unreadable).
pub fn show(config: &Config, token: &str, json: bool) -> Result<String> {
    let row = open_store(config)?
        .find_token(token)?
        .with_context(|| format!("no token {token}"))?;
    if json {
        let object = serde_json::json!({
            "alias": row.alias,
            "url": format!("{}/", config.alias_origin(&row.alias)),
            "state": row.state,
            "dsthost": row.dsthost,
            "dstport": row.dstport,
            "jobid": row.jobid,
            "modified": row.modified,
            "age_seconds": age_seconds(&row.modified),
        });
        return Ok(serde_json::to_string_pretty(&object)? + "\n");
    }
    Ok(format!(
        "token:    {}\nurl:      {}/\nstate:    {}\ntarget:   {}\njob:      {}\nmodified: {} UTC ({} ago)\n",
        row.alias,
        config.alias_origin(&row.alias),
        row.state,
        target(&row),
        row.jobid.as_deref().unwrap_or("-"),
        row.modified,
        age(&row.modified)
    ))
}

/// After rows were deleted: in map routing their routes went with them (the
/// store's triggers, same transaction); in vhost routing run cron (config
/// test and reload).
fn republish(config: &Config, store: &mut dyn Store) -> Result<String> {
    match config.routing {
        Routing::Map => Ok(format!(
            "routes table updated ({} live)",
            store.live_route_count(Utc::now())?
        )),
        Routing::Vhost => {
            let report = satellite_cron::run_once(config, Utc::now())?;
            Ok(if report.skipped {
                "another cron run is in progress; it will drop the route".into()
            } else {
                format!("Apache config updated ({} live)", report.published.routes)
            })
        }
    }
}

pub fn revoke(config: &Config, token: &str) -> Result<String> {
    let mut store = open_store(config)?;
    if !store.revoke(token, Utc::now())? {
        match store.find_token(token)? {
            Some(row) if row.state == "ended" => bail!("token {token} had already ended"),
            _ => bail!("no token {token}"),
        }
    }
    let routes = republish(config, store.as_mut())?;
    Ok(format!("revoked {token}; {routes}\n"))
}

pub fn gc(config: &Config) -> Result<String> {
    let mut store = open_store(config)?;
    let expired = store.expire(Utc::now(), config.ttl_secs)?;
    let routes = republish(config, store.as_mut())?;
    Ok(format!("expired {expired} token(s); {routes}\n"))
}

pub fn render(config: &Config) -> Result<String> {
    let store = open_store(config)?;
    let set = RouteSet::from_rows(
        &store.route_rows(chrono::Utc::now(), config.ttl_secs)?,
        config,
    );
    for line in set.refusal_lines() {
        eprintln!("satellite: {line}");
    }
    Ok(match config.routing {
        Routing::Map => routes::render_map(&set.routes),
        Routing::Vhost => routes::render_vhosts(&set.routes, config),
    })
}

/// Counts; `json`: an object with tokens_by_state (state → count),
/// oldest_modified (UTC text or null), jobstates, and sessions_per_host
/// (host → count).
pub fn stats(config: &Config, json: bool) -> Result<String> {
    let stats = open_store(config)?.stats()?;
    if json {
        let counts = |pairs: &[(String, i64)]| -> serde_json::Map<String, serde_json::Value> {
            pairs
                .iter()
                .map(|(key, n)| (key.clone(), serde_json::Value::from(*n)))
                .collect()
        };
        let object = serde_json::json!({
            "tokens_by_state": counts(&stats.by_state),
            "oldest_modified": stats.oldest_modified,
            "jobstates": stats.jobstates,
            "sessions_per_host": counts(&stats.sessions_per_host),
        });
        return Ok(serde_json::to_string_pretty(&object)? + "\n");
    }
    let mut out = String::from("tokens by state:\n");
    if stats.by_state.is_empty() {
        out.push_str("  (none)\n");
    }
    for (state, n) in &stats.by_state {
        let _ = writeln!(out, "  {state:<10} {n}");
    }
    if let Some(oldest) = &stats.oldest_modified {
        let _ = writeln!(out, "oldest:    {oldest} UTC ({} ago)", age(oldest));
    }
    let _ = writeln!(out, "job states: {}", stats.jobstates);
    out.push_str("sessions per compute node:\n");
    if stats.sessions_per_host.is_empty() {
        out.push_str("  (none)\n");
    }
    for (host, n) in &stats.sessions_per_host {
        let _ = writeln!(out, "  {host:<24} {n}");
    }
    Ok(out)
}

/// The store's gauges in Prometheus text format, for node_exporter's
/// textfile collector (CGI sites have no process to scrape).
pub fn metrics(config: &Config) -> Result<String> {
    let now = Utc::now();
    let gauges = about_database(
        open_store(config)?.gauges(now, config.ttl_secs),
        "reading metrics from",
        config,
    )?;
    let mut out = String::new();
    satellite_core::metrics::render_gauges(&mut out, &gauges, now);
    render_apache_workers(&mut out, &config.apache_status_url);
    Ok(out)
}

/// How long `satellite metrics` waits for Apache's mod_status page.
const APACHE_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Apache's workers from mod_status (`apache_status_url`): every open
/// websocket holds one, so running short is what an alert must see first.
/// `satellite_apache_status_up` says whether the page could be read.
fn render_apache_workers(out: &mut String, url: &str) {
    if url.is_empty() {
        return;
    }
    let workers = crate::apache_status::fetch(url, APACHE_STATUS_TIMEOUT)
        .ok()
        .and_then(|page| crate::apache_status::parse_auto(&page));
    out.push_str("# HELP satellite_apache_status_up Whether Apache's mod_status page (apache_status_url) could be read.\n");
    out.push_str("# TYPE satellite_apache_status_up gauge\n");
    let _ = writeln!(
        out,
        "satellite_apache_status_up {}",
        u8::from(workers.is_some())
    );
    out.push_str(
        "# HELP satellite_apache_workers Apache's workers by state: busy, idle, and open scoreboard slots (room to start more); absent when mod_status cannot be read.\n\
         # TYPE satellite_apache_workers gauge\n",
    );
    if let Some(workers) = workers {
        for (state, count) in [
            ("busy", workers.busy),
            ("idle", workers.idle),
            ("open", workers.open_slots),
        ] {
            let _ = writeln!(out, "satellite_apache_workers{{state=\"{state}\"}} {count}");
        }
    }
}

/// The tables satellite adds to a legacy database, as `migrate --dry-run`
/// names them.
const SATELLITE_TABLES: [(&str, &str); 6] = [
    (
        "routes",
        "the routes table that Apache reads (map routing) and its triggers",
    ),
    (
        "unknown_answers",
        "the table that counts unknown-token answers per client (rate limit)",
    ),
    (
        "jobdetails",
        "the table of what the scheduler says of each job (reason, start, limit, nodes)",
    ),
    (
        "session_ends",
        "the table that counts ended sessions by cause (metrics)",
    ),
    (
        "route_ends",
        "the record of ended routes that each frontend's cron --watch cuts the tunnels of",
    ),
    (
        "watchers",
        "the table of watchers (each frontend's place in that record, and its heartbeat)",
    ),
];

/// What a database holds and what migrating it will change, read without
/// writing anything.
pub fn inspect(db: &Path) -> Result<String> {
    let found = SqliteStore::inspect(db).about_path("reading read-only", db)?;
    let version = found.version;
    let mut out = format!(
        "{}:\n  schema version {version} (this build writes {SCHEMA_VERSION})\n",
        db.display()
    );
    if version > SCHEMA_VERSION {
        bail!(
            "{} was written by a newer satellite (schema {version}); refusing",
            db.display()
        );
    }
    if !found.has_proxy {
        out.push_str("  no proxy table: the tables will be created\n");
        return Ok(out);
    }
    let has_column = |name: &str| found.proxy_columns.iter().any(|c| c == name);
    let variant = if has_column("revssh_user") {
        "revssh"
    } else if has_column("jobid") {
        "master"
    } else {
        "base (no jobid)"
    };
    let _ = writeln!(out, "  legacy schema variant: {variant}");
    for (state, n) in &found.tokens_by_state {
        let _ = writeln!(out, "  {n} {state} token(s)");
    }
    if version < SCHEMA_VERSION {
        for (table, column, _) in ADDED_COLUMNS {
            if table == "proxy" && !has_column(column) {
                let _ = writeln!(out, "  will add column proxy.{column}");
            }
        }
        if version < 1 {
            out.push_str("  will add a unique index on alias_compare_hash and lookup indexes\n");
        }
        for (table, what) in SATELLITE_TABLES {
            if !found.tables.iter().any(|t| t == table) {
                let _ = writeln!(out, "  will add {what}");
            }
        }
        out.push_str("  will switch the file to WAL (if it is not already)\n");
    }
    if found.colliding_aliases.is_empty() {
        out.push_str("  no colliding aliases\n");
    } else {
        let _ = writeln!(
            out,
            "  BLOCKED: these rows share a hash (the original treated them as unknown); delete all but one of each: {}",
            found.colliding_aliases.join("; ")
        );
    }
    Ok(out)
}

/// `satellite migrate` with `database_url` set: creates satellite's schema
/// in an empty PostgreSQL database, or checks the one it has.
pub fn migrate_postgres(config: &Config, dry_run: bool) -> Result<String> {
    let Some(url) = config.database_url.as_deref() else {
        bail!("no database_url in the configuration");
    };
    let timeout = Duration::from_millis(config.busy_timeout_ms);
    if dry_run {
        return Ok(match satellite_core::PgStore::open(url, timeout) {
            Ok(store) => format!("{}: current schema ({SCHEMA_VERSION})\n", store.database()),
            Err(err) => format!("{err}\n"),
        });
    }
    let (store, migration) = satellite_core::PgStore::open_or_create(url, timeout)
        .context("creating satellite's schema in the PostgreSQL database (database_url)")?;
    Ok(if migration.created {
        format!("{}: schema {SCHEMA_VERSION} created\n", store.database())
    } else {
        format!("{}: already current; nothing to do\n", store.database())
    })
}

/// `satellite migrate --to URL`: the SQLite database's site moved into an
/// empty PostgreSQL database. The file is read through a copy brought to
/// the current schema (a Perl-era file included), so it is left exactly as
/// it was; the import is one transaction that keeps nothing unless every
/// table holds what was read.
pub fn migrate_to_postgres(db: &Path, url: &str) -> Result<String> {
    if !db.exists() {
        bail!("{}: no such database to move", db.display());
    }
    let copy = tempfile::Builder::new()
        .prefix("satellite-migrate-")
        .tempdir()
        .context("a temporary directory for the copy")?;
    let copied = copy.path().join("state.sqlite");
    SqliteStore::backup_to(db, &copied).with_context(|| format!("copying {}", db.display()))?;
    let (source, _) = SqliteStore::open_or_create(&copied, Duration::from_secs(10))
        .about_path("bringing a copy to the current schema", db)?;
    let snapshot = source.snapshot().about_path("reading", db)?;
    let (mut target, _) = satellite_core::PgStore::open_or_create(url, Duration::from_secs(10))
        .context("opening the PostgreSQL database (creating satellite's schema if it has none)")?;
    let written = target
        .import(&snapshot)
        .with_context(|| format!("moving {} into {}", db.display(), target.database()))?;
    let mut out = format!(
        "{}: moved into {}: {written}; the counts match what was read
",
        db.display(),
        target.database()
    );
    if snapshot.unreadable > 0 {
        let _ = writeln!(
            out,
            "  {} value(s) that were not numbers where numbers belong (a port, a time) moved as empty",
            snapshot.unreadable
        );
    }
    out.push_str(
        "  next: set database_url on every frontend, SATELLITE_DBD_DRIVER/SATELLITE_DBD_PARAMS in Apache, and restart (docs/high-availability.md)\n",
    );
    Ok(out)
}

pub fn migrate(db: &Path, dry_run: bool) -> Result<String> {
    if !db.exists() {
        if dry_run {
            return Ok(format!(
                "{}: does not exist; it would be created\n",
                db.display()
            ));
        }
        let (_store, _) =
            SqliteStore::open_or_create(db, Duration::from_secs(10)).about_path("creating", db)?;
        return Ok(format!("{}: created\n", db.display()));
    }
    let mut out = inspect(db)?;
    if dry_run {
        return Ok(out);
    }
    if SqliteStore::inspect(db)?.version == SCHEMA_VERSION {
        out.push_str("  already current; nothing to do\n");
        return Ok(out);
    }
    let backup = PathBuf::from(format!(
        "{}.pre-satellite-{}",
        db.display(),
        Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    SqliteStore::backup_to(db, &backup)
        .with_context(|| format!("backing up to {}", backup.display()))?;
    let _ = writeln!(out, "  backup written to {}", backup.display());
    SqliteStore::open(db, Duration::from_secs(10)).about_path("migrating", db)?;
    out.push_str("  migrated; in map routing run `satellite cron` once to fill the routes table\n");
    Ok(out)
}

/// Job states from `squeue` (or its saved output), pushed to update-jobs or
/// written straight into the database.
/// Where `jobstates push` gets its job states.
pub enum JobSource<'a> {
    /// One complete snapshot: every job the scheduler knows now.
    Scheduler(&'a dyn Scheduler),
    /// `<jobid> <state>` lines from a file, or stdin for `-`: an old-style
    /// table, which says nothing about the jobs it does not list.
    Table(&'a Path),
}

pub struct PushOptions<'a> {
    pub source: JobSource<'a>,
    /// Write into this database instead of POSTing.
    pub db: Option<&'a Path>,
    /// The update-jobs URL (when not writing a database).
    pub url: Option<String>,
    /// For the scheduler query and, separately, for the POST.
    pub timeout: Duration,
}

/// One push: the scheduler queried once (or the table read), then the
/// states POSTed to update-jobs or written to the database.
///
/// # Errors
/// A failed scheduler query (nothing is sent: a scheduler error is no
/// news), an unreadable table, a database error, or a POST that does not
/// answer `Success…` within the timeout.
pub fn push_jobstates(options: &PushOptions) -> Result<String> {
    let (states, body, complete) = match options.source {
        JobSource::Table(path) => {
            let table = read_table(path)?;
            let states: Vec<(String, String)> =
                satellite_sched::wire::parse_legacy_table(table.as_bytes())
                    .into_iter()
                    .map(|job| (job.id, job.state.base().to_owned()))
                    .collect();
            // The body old pushes sent, unchanged: no `complete`, no `taken`.
            let mut body = String::from("jobstates=\n");
            for (jobid, state) in &states {
                let _ = writeln!(body, "{jobid} {state}");
            }
            (states, body, false)
        }
        JobSource::Scheduler(scheduler) => {
            let snapshot = scheduler
                .snapshot(options.timeout)
                .context("the scheduler query failed; nothing was sent")?;
            let states = snapshot
                .jobs
                .iter()
                .map(|job| (job.id.clone(), job.state.base().to_owned()))
                .collect();
            (states, snapshot.to_form_body(), snapshot.complete)
        }
    };
    if let Some(db) = options.db {
        // States only, for the waiting page: ending the sessions of jobs
        // that are over needs the broker's configuration (`jobstates poll`
        // on the broker host, or a POST to update-jobs).
        let mut store =
            satellite_core::store::open(db, Duration::from_secs(10)).about_path("opening", db)?;
        let n = store.update_jobstates(&states, Utc::now().timestamp())?;
        return Ok(format!("wrote {n} job state(s) to {}\n", db.display()));
    }
    let url = options.url.as_deref().context("give --url or --db")?;
    post_form(url, &body, options.timeout)?;
    Ok(if complete {
        format!(
            "pushed a complete snapshot of {} job(s) to {url}\n",
            states.len()
        )
    } else {
        format!("pushed {} job state(s) to {url}\n", states.len())
    })
}

/// `push_jobstates` every `every` (±10 %, so that many pushers do not
/// hit the broker in step), forever. A failed cycle is logged to stderr
/// and the next one tried: it sent nothing, so the broker keeps what it
/// knew.
pub fn push_jobstates_every(options: &PushOptions, every: Duration) -> ! {
    use rand::RngExt;
    let mut rng = rand::rng();
    loop {
        match push_jobstates(options) {
            Ok(text) => crate::say(&text),
            Err(err) => crate::complain(&format!("satellite: jobstates push: {err:#}")),
        }
        let factor: f64 = rng.random_range(0.9..=1.1);
        std::thread::sleep(every.mul_f64(factor));
    }
}

fn read_table(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading job states from stdin")?;
        Ok(text)
    } else {
        fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

/// POSTs a form body with curl, which speaks the TLS the broker's Apache
/// does without adding an HTTP client to the workspace.
fn post_form(url: &str, body: &str, timeout: Duration) -> Result<()> {
    let mut child = std::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            &format!("{:.3}", timeout.as_secs_f64()),
            "--data-binary",
            "@-",
            "-X",
            "POST",
            url,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running curl")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("curl's stdin")?,
        body.as_bytes(),
    )?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !answer.starts_with("Success") {
        let why = if answer.trim().is_empty() {
            String::from_utf8_lossy(&out.stderr).trim().to_owned()
        } else {
            answer.trim().to_owned()
        };
        bail!("pushing to {url} failed: {why}");
    }
    Ok(())
}

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}
