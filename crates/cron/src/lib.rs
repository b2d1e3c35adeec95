//! The satellite cron: expires tokens, publishes the live routes, and in
//! vhost routing tests and gracefully reloads Apache, marking rows
//! `proxied` only once Apache has the route.
//!
//! One run at a time (a lock file; a second run exits at once), every file
//! written atomically, nothing written or reloaded when nothing changed, and
//! a config that fails Apache's test is never left in place.

pub mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use chrono::Utc;
use satellite_core::files::FileLock;
use satellite_core::publish::{self, Publisher};
use satellite_core::store::RouteEnd;
use satellite_core::tunnels::{self, CutError};
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
    /// Backends (`ip:port`) whose route ended and no live route leads to,
    /// whose open connections were cut (`--watch` only).
    pub tunnels_cut: Vec<String>,
    /// How many connections that was.
    pub sockets_cut: usize,
    pub cut_failures: Vec<String>,
    /// `--watch`'s first run: it now watches, with this many live backends.
    pub watching: Option<usize>,
    /// How long expiry and publication took (for the metrics).
    pub took: Duration,
    /// `--watch`: this watcher now leads the site's once-only work (true)
    /// or another one does (false); `None` when that did not change.
    pub leading: Option<bool>,
    /// `--watch`: why it restarted its Apache gracefully for the database
    /// (a restart or fail-over of the server, a lost connection).
    pub apache_reconnected: Option<String>,
    /// `--watch`: its program file was replaced (an upgrade): it starts
    /// the new one in its place.
    pub upgraded: Option<PathBuf>,
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
        if let Some(program) = &self.upgraded {
            lines.push(format!(
                "{} was replaced (an upgrade): starting the new program in this one's place",
                program.display()
            ));
        }
        if let Some(why) = &self.apache_reconnected {
            lines.push(format!(
                "{why}: Apache restarted gracefully, so that its route lookups reconnect with their statements"
            ));
        }
        match self.leading {
            Some(true) => lines.push(
                "leading: this watcher expires tokens and repairs routes for the site".to_owned(),
            ),
            Some(false) => lines.push(
                "another frontend's watcher expires tokens and repairs routes; this one cuts its own Apache's tunnels".to_owned(),
            ),
            None => {}
        }
        if !self.tunnels_cut.is_empty() {
            lines.push(format!(
                "closed {} open connection(s) to {} backend(s) whose route ended: {}",
                self.sockets_cut,
                self.tunnels_cut.len(),
                self.tunnels_cut.join(", ")
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

/// One cron run under the run lock, as of `now`; `Report::skipped` if
/// another run holds it. The caller's clock decides what has expired.
pub fn run_once(config: &Config, now: chrono::DateTime<Utc>) -> Result<Report> {
    let Some(_lock) = FileLock::try_acquire(&config.lockfile)? else {
        return Ok(Report {
            skipped: true,
            ..Report::default()
        });
    };
    run_locked(config, now)
}

fn open_store(config: &Config) -> Result<Box<dyn Store>> {
    // The store's errors name the database already.
    Ok(satellite_core::store::open_configured(config)?)
}

/// One run as of `now`; the caller holds the run lock.
pub fn run_locked(config: &Config, now: chrono::DateTime<Utc>) -> Result<Report> {
    run_as(config, now, true)
}

/// One run; `leading`: this process does the site's once-only work
/// (expiry; in map routing the whole repair pass, in vhost routing each
/// frontend still publishes its own Apache's vhosts).
fn run_as(config: &Config, now: chrono::DateTime<Utc>, leading: bool) -> Result<Report> {
    let started = Instant::now();
    let mut store = open_store(config)?;
    let expired = if leading {
        store
            .expire(now, config.ttl_secs)
            .context("expiring old tokens")?
    } else {
        0
    };
    if !leading && config.routing == satellite_core::config::Routing::Map {
        return Ok(Report {
            took: started.elapsed(),
            ..Report::default()
        });
    }
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
/// to the database (and at least every minute, for expiry), and cuts the
/// open tunnels of every route that ended (see [`Watcher`]). Holds the run
/// lock for its whole life, so a crontab `cron` beside it exits at once.
/// Store and subprocess failures are reported through `on_report` and
/// retried with a growing pause; only a configuration it cannot work with
/// or a held run lock ends it.
pub fn watch(config: &Config, mut on_report: impl FnMut(Result<Report>)) -> Result<()> {
    let Some(_lock) = FileLock::try_acquire(&config.lockfile)? else {
        bail!(
            "another cron holds {}; not starting a second watcher",
            config.lockfile.display()
        );
    };
    let owner = config
        .apache_uid()
        .map_err(|why| anyhow::anyhow!("{why}"))
        .context("finding whose tunnels to cut")?;
    let mut watcher = Watcher::new(config, owner);
    let mut own_program = OwnProgram::running();
    let mut pause = WATCH_POLL;
    loop {
        if let Some(program) = own_program.take_if(|p| p.replaced()) {
            on_report(Ok(Report {
                upgraded: Some(program.path.clone()),
                ..Report::default()
            }));
            // Returns only when the new program cannot be started: this
            // one goes on (and looks no more). The lock and the store's
            // connections are close-on-exec: the new one takes them anew.
            let failed = program.exec_again();
            on_report(Err(anyhow::Error::new(failed).context(format!(
                "starting the new {}: this watcher goes on with the old program",
                program.path.display()
            ))));
        }
        match watcher.step(&mut on_report) {
            Ok(()) => {
                pause = WATCH_POLL;
                thread::sleep(WATCH_POLL);
            }
            Err(err) => {
                on_report(Err(err.context(format!(
                    "watching the database (trying again in {pause:?})"
                ))));
                // A store that failed may be a broken connection: open anew.
                watcher.store = None;
                watcher.reconnecting = true;
                thread::sleep(pause);
                pause = (pause * 2).min(WATCH_BACKOFF_MAX);
            }
        }
    }
}

/// The longest pause between two tries after a failure.
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one batch of tunnel cuts may take before the loop goes on.
pub const CUT_DEADLINE: Duration = Duration::from_secs(5);
/// How often a watcher says it is alive when nothing ends.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Route ends taken in one batch.
const ENDS_PER_BATCH: usize = 5_000;
/// At most one graceful restart per this long for failed lookups, doubled
/// while restarting does not stop them, up to the most.
const LOOKUP_RESTART_EVERY: Duration = Duration::from_secs(10);
const LOOKUP_RESTART_MAX: Duration = Duration::from_secs(320);

/// The state of `cron --watch` between two steps.
///
/// Cutting is driven by the record of ended routes (`route_ends`), not by
/// comparing snapshots: every ending is recorded in the transaction that
/// makes it, with an increasing id, and the watcher keeps the id of the
/// last one it acted on in the store (`watchers`, under its name), so a
/// route that lived and died between two polls, or while the watcher was
/// down, is still cut. Map routing cuts as soon as the record is seen (the
/// route is gone from Apache's map at that commit); vhost routing first
/// reloads Apache without the route, so that the client cannot reconnect
/// through the old configuration.
pub struct Watcher<'a> {
    config: &'a Config,
    publisher: Publisher<'a>,
    name: String,
    /// Apache's workers' uid: only their connections are cut.
    owner: u32,
    store: Option<Box<dyn Store>>,
    /// The last route end acted on; `None` until read from the store.
    cursor: Option<i64>,
    seen_version: Option<i64>,
    first_expiry: Option<chrono::DateTime<Utc>>,
    last_run: Option<Instant>,
    last_heartbeat: Instant,
    /// Vhost routing: route ends up to this id were recorded before the
    /// last reload, so Apache no longer routes them.
    published_through: i64,
    /// Whether this watcher led the site's once-only work at its last
    /// run ([`Store::lead`]); reported when it changes.
    leading: Option<bool>,
    /// The database server's run ([`Store::server_epoch`]) last seen.
    server_epoch: Option<String>,
    /// A step failed and the store is opened anew: its server may have
    /// dropped every connection, Apache's included.
    reconnecting: bool,
    /// The size of Apache's log of failed lookups at the last look.
    lookup_failures_seen: Option<u64>,
    /// When Apache was last restarted for the database's sake.
    restarted_for_lookups: Option<Instant>,
    lookup_restart_every: Duration,
}

impl<'a> Watcher<'a> {
    pub fn new(config: &'a Config, owner: u32) -> Self {
        Watcher {
            config,
            publisher: Publisher::new(config),
            name: config.watcher_name(),
            owner,
            store: None,
            cursor: None,
            seen_version: None,
            first_expiry: None,
            last_run: None,
            last_heartbeat: Instant::now(),
            published_through: 0,
            leading: None,
            server_epoch: None,
            reconnecting: false,
            lookup_failures_seen: None,
            restarted_for_lookups: None,
            lookup_restart_every: LOOKUP_RESTART_EVERY,
        }
    }

    /// One look at the database: publish if anything changed, cut the
    /// tunnels of every route that ended since the last step.
    pub fn step(&mut self, on_report: &mut dyn FnMut(Result<Report>)) -> Result<()> {
        if self.store.is_none() {
            self.store = Some(open_store(self.config)?);
        }
        let pid = std::process::id();
        let cursor = match self.cursor {
            Some(cursor) => cursor,
            None => {
                let name = self.name.clone();
                let cursor = self.store_mut().watcher_cursor(&name, pid, Utc::now())?;
                self.cursor = Some(cursor);
                cursor
            }
        };
        self.reconnect_apache(on_report)?;
        let ends = self.store_ref().route_ends_after(cursor, ENDS_PER_BATCH)?;
        let version = self.store_ref().change_marker()?;
        let vhost = self.config.routing == satellite_core::config::Routing::Vhost;
        let last_end = ends.last().map(|end| end.id);
        let first = self.last_run.is_none();
        if !vhost {
            self.cut(&ends, on_report)?;
        }
        // Asked every step, so that when the leading frontend dies another
        // takes its work over at its next step, not at its next run.
        let leading = self.store_mut().lead()?;
        let due = self.leading != Some(leading)
            || first
            || self.seen_version != Some(version)
            || self.first_expiry.is_some_and(|at| Utc::now() > at)
            || self
                .last_run
                .is_some_and(|at| at.elapsed() >= WATCH_IDLE_RUN)
            || (vhost && last_end.is_some_and(|id| id > self.published_through));
        if due {
            if !first {
                // Let a burst of writes (getlink, redeem, link) settle.
                thread::sleep(WATCH_DEBOUNCE);
            }
            // What is seen is the version before the run: a commit made by
            // anyone during the run (which may wait seconds on Apache's
            // config test) then triggers the next run. The run's own
            // writes trigger one more, which finds nothing to do.
            self.seen_version = Some(self.store_ref().change_marker()?);
            let mut report = run_as(self.config, Utc::now(), leading);
            if let (Ok(report), true) = (report.as_mut(), self.leading != Some(leading)) {
                report.leading = Some(leading);
            }
            self.leading = Some(leading);
            // Even a failed run leaves Apache's configuration as it will
            // stay until the next one: cutting cannot wait for it.
            if let Some(id) = last_end {
                self.published_through = self.published_through.max(id);
            }
            let (live, first_expiry) = self.publisher.live_targets(self.store_ref(), Utc::now())?;
            self.first_expiry = first_expiry;
            if let (true, Ok(report)) = (first, report.as_mut()) {
                report.watching = Some(live.len());
            }
            on_report(report);
            self.last_run = Some(Instant::now());
        }
        if vhost {
            let published: Vec<RouteEnd> = ends
                .into_iter()
                .filter(|end| end.id <= self.published_through)
                .collect();
            self.cut(&published, on_report)?;
        }
        if self.last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
            let cursor = self.cursor.unwrap_or_default();
            let name = self.name.clone();
            self.store_mut()
                .watcher_advance(&name, cursor, pid, Utc::now())?;
            self.last_heartbeat = Instant::now();
        }
        Ok(())
    }

    /// With a database server (PostgreSQL), Apache's kept lookup
    /// connections lose their prepared statements whenever the server
    /// drops them (a restart, a fail-over, a network cut), and APR's pgsql
    /// driver never prepares them again: every lookup on them would fail
    /// (503) until Apache's children are replaced. So when the server's
    /// run changes, or this watcher itself had to reconnect, Apache is
    /// restarted gracefully (open tunnels stay; new children connect anew).
    /// A connection of Apache's cut alone (an admin's
    /// `pg_terminate_backend`, a firewall's idle timeout) shows neither:
    /// Apache's log of failed lookups growing while the database answers
    /// (this step just read it) does.
    fn reconnect_apache(&mut self, on_report: &mut dyn FnMut(Result<Report>)) -> Result<()> {
        let epoch = self.store_ref().server_epoch()?;
        let Some(now) = epoch else {
            self.reconnecting = false;
            return Ok(());
        };
        let failures = file_size(&self.config.apache_lookup_failures_log);
        let grew = self
            .lookup_failures_seen
            .is_some_and(|seen| failures > seen);
        self.lookup_failures_seen = Some(failures);
        // The old children's last lookups may still fail just after a
        // restart; and if restarting does not help, restarts slow down.
        let settled = self
            .restarted_for_lookups
            .is_none_or(|at| at.elapsed() >= self.lookup_restart_every);
        if settled && !grew {
            self.lookup_restart_every = LOOKUP_RESTART_EVERY;
        }
        let lookups_failed = grew && settled;
        let why = match &self.server_epoch {
            Some(seen) if *seen != now => Some(format!(
                "the database server restarted (or failed over) at {now}"
            )),
            Some(_) if self.reconnecting => {
                Some("the connection to the database was lost and is back".to_owned())
            }
            _ if lookups_failed => Some(format!(
                "Apache's route lookups failed while the database answers ({})",
                self.config.apache_lookup_failures_log.display()
            )),
            _ => None,
        };
        if let Some(why) = why {
            if lookups_failed && self.restarted_for_lookups.is_some() {
                self.lookup_restart_every = (self.lookup_restart_every * 2).min(LOOKUP_RESTART_MAX);
            }
            self.restarted_for_lookups = Some(Instant::now());
            satellite_core::publish::reload_apache(self.config)
                .with_context(|| format!("{why}: restarting Apache gracefully"))?;
            on_report(Ok(Report {
                apache_reconnected: Some(why),
                ..Report::default()
            }));
        }
        self.server_epoch = Some(now);
        self.reconnecting = false;
        Ok(())
    }

    fn store_ref(&self) -> &dyn Store {
        self.store
            .as_deref()
            .expect("opened at the start of the step")
    }

    fn store_mut(&mut self) -> &mut dyn Store {
        self.store
            .as_deref_mut()
            .expect("opened at the start of the step")
    }

    /// Cuts Apache's tunnels to the targets of `ends` that no live route
    /// leads to, then records them as acted on. Targets that cannot be cut
    /// here at all (no CAP_NET_ADMIN, a kernel without socket destroy) are
    /// reported and passed; a deadline or a netlink failure leaves them
    /// for the next step.
    fn cut(&mut self, ends: &[RouteEnd], on_report: &mut dyn FnMut(Result<Report>)) -> Result<()> {
        let Some(last) = ends.last().map(|end| end.id) else {
            return Ok(());
        };
        let mut targets: Vec<(String, SocketAddr)> = Vec::new();
        let mut refused = Vec::new();
        for end in ends {
            if targets.iter().any(|(t, _)| *t == end.target) || refused.contains(&end.target) {
                continue;
            }
            match end.target.parse::<SocketAddr>() {
                Ok(addr) => targets.push((end.target.clone(), addr)),
                // A Perl-era row may hold anything; it never had a route.
                Err(_) => refused.push(end.target.clone()),
            }
        }
        let addrs: Vec<SocketAddr> = targets.iter().map(|(_, a)| *a).collect();
        // The sockets first, then which targets a live route still names:
        // a session redeemed on an ended session's ip:port before the dump
        // is seen live and spared, and one redeemed after it opens its
        // connections after the dump, so they are not in it. (Read the
        // other way round, a redeem in between lost its first request to
        // the cut: issue 19.)
        let found = tunnels::find(&addrs, Some(self.owner), CUT_DEADLINE);
        let (live, _) = self.publisher.live_targets(self.store_ref(), Utc::now())?;
        let (spared, ended): (Vec<_>, Vec<_>) = targets
            .into_iter()
            .partition(|(target, _)| live.contains(target));
        let spare: Vec<SocketAddr> = spared.iter().map(|(_, a)| *a).collect();
        let mut report = Report::default();
        match found.and_then(|found| found.destroy(&spare)) {
            Ok(done) => {
                report.sockets_cut = done.destroyed;
                report.tunnels_cut = ended.into_iter().map(|(t, _)| t).collect();
            }
            Err(err @ (CutError::NotPermitted | CutError::Unsupported)) => {
                report.cut_failures.push(format!(
                    "could not cut the open connections to {}: {err}",
                    ended
                        .iter()
                        .map(|(t, _)| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Err(err) => {
                return Err(anyhow::Error::new(err).context(format!(
                    "cutting the open connections to {} backend(s)",
                    ended.len()
                )))
            }
        }
        for target in refused {
            report.cut_failures.push(format!(
                "ended route to {target:?}: not an ip:port, nothing to cut"
            ));
        }
        let name = self.name.clone();
        self.store_mut()
            .watcher_advance(&name, last, std::process::id(), Utc::now())?;
        self.cursor = Some(last);
        self.last_heartbeat = Instant::now();
        if !report.tunnels_cut.is_empty() || !report.cut_failures.is_empty() {
            on_report(Ok(report));
        }
        Ok(())
    }
}

/// A file's size; 0 when it is not there (not written yet, or rotated
/// away).
fn file_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |meta| meta.len())
}

/// The program file this process runs, to notice an upgrade replacing it
/// (a package installs the new file beside it and renames it over): a
/// watcher started by hand, with no service manager to restart it, would
/// otherwise run the old program for ever.
struct OwnProgram {
    path: PathBuf,
    running: (u64, u64),
}

impl OwnProgram {
    /// `None` when it cannot tell (no /proc, or already replaced).
    fn running() -> Option<OwnProgram> {
        use std::os::unix::fs::MetadataExt;
        let image = std::fs::metadata("/proc/self/exe").ok()?;
        let path = std::fs::read_link("/proc/self/exe").ok()?;
        if path.to_string_lossy().ends_with(" (deleted)") {
            return None;
        }
        Some(OwnProgram {
            path,
            running: (image.dev(), image.ino()),
        })
    }

    /// Another file is at the program's path now. A missing one (the
    /// package removed) is not an upgrade.
    fn replaced(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).is_ok_and(|now| (now.dev(), now.ino()) != self.running)
    }

    /// Runs the new program in this process, with the same arguments
    /// (and so the same pid, for whoever supervises it). Returns only
    /// the error that kept it from starting.
    fn exec_again(&self) -> std::io::Error {
        use std::os::unix::process::CommandExt;
        std::process::Command::new(&self.path)
            .args(std::env::args_os().skip(1))
            .exec()
    }
}
