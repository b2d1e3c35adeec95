//! The satellite cron: expires tokens, publishes the live routes, and in
//! vhost routing tests and gracefully reloads Apache, marking rows
//! `proxied` only once Apache has the route.
//!
//! One run at a time (a lock file; a second run exits at once), every file
//! written atomically, nothing written or reloaded when nothing changed, and
//! a config that fails Apache's test is never left in place.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use satellite_core::config::Routing;
use satellite_core::routes::{self, FileLock, RouteSet};
use satellite_core::{Config, Store};

/// How often `--watch` looks for database changes.
pub const WATCH_POLL: Duration = Duration::from_millis(200);
/// How long `--watch` waits for a burst of changes to settle.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(100);
/// `--watch` runs at least this often, for expiry.
pub const WATCH_IDLE_RUN: Duration = Duration::from_secs(60);

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Another run held the lock; this one did nothing.
    pub skipped: bool,
    pub expired: usize,
    pub routes: usize,
    pub written: bool,
    pub reloaded: bool,
    pub flipped: usize,
    pub refused: Vec<String>,
}

impl Report {
    /// The lines worth printing: what changed and what was refused. A run
    /// that changed nothing prints nothing (cron mails any output).
    pub fn lines(&self) -> Vec<String> {
        let mut lines = self.refused.clone();
        if self.expired > 0 {
            lines.push(format!("expired {} token(s)", self.expired));
        }
        if self.written || self.reloaded || self.flipped > 0 {
            lines.push(format!(
                "{} route(s) published{}{}",
                self.routes,
                if self.reloaded {
                    ", Apache reloaded"
                } else {
                    ""
                },
                if self.flipped > 0 {
                    format!(", {} now proxied", self.flipped)
                } else {
                    String::new()
                }
            ));
        }
        lines
    }
}

/// One cron run under the run lock; `Report::skipped` if another run holds
/// it.
pub fn run_once(config: &Config) -> Result<Report> {
    let Some(_lock) = FileLock::try_acquire(&config.lockfile)? else {
        return Ok(Report {
            skipped: true,
            ..Report::default()
        });
    };
    run_locked(config)
}

/// One run; the caller holds the run lock.
pub fn run_locked(config: &Config) -> Result<Report> {
    let timeout = Duration::from_millis(config.busy_timeout_ms);
    let mut store = Store::open(&config.dbfile, timeout)
        .with_context(|| format!("opening the database {}", config.dbfile.display()))?;
    let expired = store
        .expire(Utc::now(), config.ttl_secs)
        .context("expiring old tokens")?;
    let mut report = match config.routing {
        Routing::Map => {
            let published = routes::publish_map(&mut store, config).with_context(|| {
                format!("publishing the route map {}", config.mapfile.display())
            })?;
            Report {
                routes: published.routes,
                written: published.changed,
                flipped: published.flipped,
                refused: published.refused,
                ..Report::default()
            }
        }
        Routing::Vhost => publish_vhosts(&mut store, config)?,
    };
    report.expired = expired;
    Ok(report)
}

fn publish_vhosts(store: &mut Store, config: &Config) -> Result<Report> {
    let set = RouteSet::from_rows(
        &store.route_rows(chrono::Utc::now(), config.ttl_secs)?,
        config,
    );
    let text = routes::render_vhosts(&set.routes, config);
    let path = &config.httpdstubfile;
    let previous = routes::read_if_exists(path)?;
    let changed = previous.as_deref() != Some(text.as_bytes());
    let to_flip = set.to_flip();
    let mut report = Report {
        routes: set.routes.len(),
        refused: set.refusal_lines(),
        ..Report::default()
    };
    // Rows still `mapped` with an unchanged file mean an earlier reload did
    // not happen (or failed): reload again before calling them proxied.
    if !changed && to_flip.is_empty() {
        return Ok(report);
    }
    if changed {
        routes::write_atomically(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        report.written = true;
    }
    if let Err(err) = config_test(config) {
        if changed {
            restore(path, previous.as_deref())
                .with_context(|| format!("putting the previous {} back", path.display()))?;
        }
        return Err(err.context(format!(
            "Apache's config test failed with the new {}; the previous routes stay in place",
            path.display()
        )));
    }
    reload(config).context("reloading Apache")?;
    report.reloaded = true;
    report.flipped = store.mark_proxied(&to_flip)?;
    Ok(report)
}

fn restore(path: &Path, previous: Option<&[u8]>) -> Result<()> {
    match previous {
        Some(bytes) => routes::write_atomically(path, bytes)?,
        None => std::fs::remove_file(path)?,
    }
    Ok(())
}

fn run_command(argv: &[String], what: &str) -> Result<()> {
    let (program, args) = argv.split_first().context("empty command")?;
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {what} `{}`", argv.join(" ")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        bail!(
            "{what} `{}` failed ({}): {}",
            argv.join(" "),
            output.status,
            format!("{} {}", stderr.trim(), stdout.trim()).trim()
        );
    }
    Ok(())
}

fn config_test(config: &Config) -> Result<()> {
    run_command(&config.apache_configtest, "config test")
}

/// `apache_reload` if configured, else SIGUSR1 (graceful restart) to the
/// pid in `apache_pidfile`: one process, never a `killall`.
fn reload(config: &Config) -> Result<()> {
    if let Some(command) = &config.apache_reload {
        return run_command(command, "reload command");
    }
    let pidfile = &config.apache_pidfile;
    let text = std::fs::read_to_string(pidfile)
        .with_context(|| format!("reading Apache's pid file {}", pidfile.display()))?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .with_context(|| {
            format!(
                "{} does not hold a pid: {:?}",
                pidfile.display(),
                text.trim()
            )
        })?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .with_context(|| {
        format!(
            "sending SIGUSR1 to Apache (pid {pid} from {})",
            pidfile.display()
        )
    })?;
    Ok(())
}

/// `cron --watch`: stays running, and runs again shortly after any change
/// to the database (and at least every minute, for expiry). Holds the run
/// lock for its whole life, so a crontab `cron` beside it exits at once.
pub fn watch(config: &Config, mut on_report: impl FnMut(Result<Report>)) -> Result<()> {
    let Some(_lock) = FileLock::try_acquire(&config.lockfile)? else {
        bail!(
            "another cron holds {}; not starting a second watcher",
            config.lockfile.display()
        );
    };
    let watcher = rusqlite::Connection::open_with_flags(
        &config.dbfile,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .with_context(|| format!("opening {} to watch it", config.dbfile.display()))?;
    let data_version =
        || -> Result<i64> { Ok(watcher.query_row("PRAGMA data_version", [], |r| r.get(0))?) };
    let mut seen = data_version()?;
    on_report(run_locked(config));
    let mut last_run = Instant::now();
    loop {
        thread::sleep(WATCH_POLL);
        let now = data_version()?;
        if now != seen || last_run.elapsed() >= WATCH_IDLE_RUN {
            // Let a burst of writes (getlink, redeem, link) settle first.
            thread::sleep(WATCH_DEBOUNCE);
            seen = data_version()?;
            on_report(run_locked(config));
            // Our own writes (expiry, flips) bump the version too; they
            // need no second run.
            seen = seen.max(data_version()?);
            last_run = Instant::now();
        }
    }
}
