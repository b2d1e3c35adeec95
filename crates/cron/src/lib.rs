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
    /// Backends (`ip:port`) whose routes went away since the last run, and
    /// whose open connections were cut (`--watch` only).
    pub tunnels_cut: Vec<String>,
    pub cut_failures: Vec<String>,
    /// `--watch`'s first run: it now watches, with this many live backends.
    pub watching: Option<usize>,
    /// How long expiry and publication took (for the metrics).
    pub took: Duration,
}

impl Report {
    /// The lines worth printing: what changed and what was refused. A run
    /// that changed nothing prints nothing (cron mails any output).
    pub fn lines(&self) -> Vec<String> {
        let published = &self.published;
        let mut lines = published.refused.clone();
        lines.extend(self.cut_failures.iter().cloned());
        if let Some(backends) = self.watching {
            lines.push(format!(
                "watching the database; routes lead to {backends} backend(s)"
            ));
        }
        if !self.tunnels_cut.is_empty() {
            lines.push(format!(
                "closed open connections to {} backend(s) whose route is gone",
                self.tunnels_cut.len()
            ));
        }
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

fn open_store(config: &Config) -> Result<Box<dyn Store>> {
    let timeout = Duration::from_millis(config.busy_timeout_ms);
    // The store's errors name the database file already.
    Ok(satellite_core::store::open(&config.dbfile, timeout)?)
}

/// One run; the caller holds the run lock.
pub fn run_locked(config: &Config) -> Result<Report> {
    let started = Instant::now();
    let mut store = open_store(config)?;
    let now = Utc::now();
    let expired = store
        .expire(now, config.ttl_secs)
        .context("expiring old tokens")?;
    let published = Publisher::new(config)
        .reconcile(store.as_mut(), now)
        .context("publishing routes")?;
    Ok(Report {
        skipped: false,
        expired,
        published,
        took: started.elapsed(),
        ..Report::default()
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
    let publisher = Publisher::new(config);
    let data_version = || -> Result<i64> { Ok(watcher.data_version()?) };
    let mut seen = data_version()?;
    let mut first = run_locked(config);
    let (mut live, mut first_expiry) = publisher.live_targets(watcher.as_ref(), Utc::now())?;
    if let Ok(report) = first.as_mut() {
        report.watching = Some(live.len());
    }
    on_report(first);
    let mut last_run = Instant::now();
    loop {
        thread::sleep(WATCH_POLL);
        let now = data_version()?;
        let expired = first_expiry.is_some_and(|at| Utc::now() > at);
        if now != seen || expired || last_run.elapsed() >= WATCH_IDLE_RUN {
            // Let a burst of writes (getlink, redeem, link) settle first.
            thread::sleep(WATCH_DEBOUNCE);
            // What is seen is the version before the run: a commit made by
            // anyone during the run (which may wait seconds on Apache's
            // config test) then triggers the next run. The run's own
            // writes trigger one more, which finds nothing to do and
            // writes nothing.
            seen = data_version()?;
            let mut report = run_locked(config);
            // Open tunnels (websockets) to a backend whose route is gone
            // would outlive the route: cut them.
            let (still_live, next_expiry) = publisher.live_targets(watcher.as_ref(), Utc::now())?;
            let mut gone: Vec<String> = live.difference(&still_live).cloned().collect();
            gone.sort();
            if let Ok(report) = report.as_mut() {
                report.tunnels_cut = gone.clone();
                report.cut_failures = publish::cut_tunnels(&gone);
            }
            (live, first_expiry) = (still_live, next_expiry);
            on_report(report);
            last_run = Instant::now();
        }
    }
}
