//! The satellite cron: expires tokens, publishes the live routes, and in
//! vhost routing tests and gracefully reloads Apache, marking rows
//! `proxied` only once Apache has the route.
//!
//! One run at a time (a lock file; a second run exits at once), every file
//! written atomically, nothing written or reloaded when nothing changed, and
//! a config that fails Apache's test is never left in place.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use satellite_core::publish::{self, Publisher};
use satellite_core::routes::FileLock;
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
    pub published: publish::Report,
}

impl Report {
    /// The lines worth printing: what changed and what was refused. A run
    /// that changed nothing prints nothing (cron mails any output).
    pub fn lines(&self) -> Vec<String> {
        let published = &self.published;
        let mut lines = published.refused.clone();
        if self.expired > 0 {
            lines.push(format!("expired {} token(s)", self.expired));
        }
        if published.unrouted > 0 {
            lines.push(format!(
                "{} token(s) lost a route that was refused (now mapped)",
                published.unrouted
            ));
        }
        if published.written || published.reloaded || published.flipped > 0 {
            lines.push(format!(
                "{} route(s) published{}{}",
                published.routes,
                if published.reloaded {
                    ", Apache reloaded"
                } else {
                    ""
                },
                if published.flipped > 0 {
                    format!(", {} now proxied", published.flipped)
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

fn open_store(config: &Config) -> Result<Store> {
    let timeout = Duration::from_millis(config.busy_timeout_ms);
    Store::open(&config.dbfile, timeout).context("opening the database")
}

/// One run; the caller holds the run lock.
pub fn run_locked(config: &Config) -> Result<Report> {
    let mut store = open_store(config)?;
    let now = Utc::now();
    let expired = store
        .expire(now, config.ttl_secs)
        .context("expiring old tokens")?;
    let published = Publisher::new(config)
        .reconcile(&mut store, now)
        .context("publishing routes")?;
    Ok(Report {
        skipped: false,
        expired,
        published,
    })
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
    let watcher = open_store(config)?;
    let data_version = || -> Result<i64> { Ok(watcher.data_version()?) };
    let mut seen = data_version()?;
    on_report(run_locked(config));
    let mut last_run = Instant::now();
    loop {
        thread::sleep(WATCH_POLL);
        let now = data_version()?;
        if now != seen || last_run.elapsed() >= WATCH_IDLE_RUN {
            // Let a burst of writes (getlink, redeem, link) settle first.
            thread::sleep(WATCH_DEBOUNCE);
            // What is seen is the version before the run: a commit made by
            // anyone during the run (which may wait seconds on Apache's
            // config test) then triggers the next run. The run's own
            // writes trigger one more, which finds nothing to do and
            // writes nothing.
            seen = data_version()?;
            on_report(run_locked(config));
            last_run = Instant::now();
        }
    }
}
