//! Route publication: the one place that decides how a route reaches Apache,
//! used by redeem, destroy, cron, the admin commands and serve alike.
//!
//! - **Map routing** (the default): the data plane is the store's `routes`
//!   table, which Apache reads per request through a `dbd:` RewriteMap
//!   (mod_dbd, SQLite driver). A redeem writes its validated route in its own
//!   transaction, so the route is live when `Success!` goes out and its cost
//!   does not depend on how many routes exist; deletes drop routes through
//!   triggers. Nothing is rendered, written to a file or reloaded.
//! - **Vhost routing**: one `<VirtualHost>` per route in a file that Apache
//!   includes; cron renders it, runs Apache's config test (restoring the old
//!   file on failure) and reloads gracefully, then marks the rows `proxied`.
//!
//! [`Publisher::reconcile`] (cron) repairs whatever the fast path could not
//! do: rows written by other programs, a changed `tgtipmask` or TTL.
//!
//! To add a routing mode: a `Routing` variant in `config.rs`, its arms in
//! [`Publisher::redeem`] and [`Publisher::reconcile`] (the only places that
//! match on it), and its Apache side in `httpd-conf/satellite.conf`.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Config, Routing};
use crate::error::{CoreError, Result};
use crate::files;
use crate::routes::{self, RouteSet};
use crate::store::{
    route_expiry, PublishedRoute, RedeemOutcome, RoutePublication, RouteRow, Store,
};
use crate::subprocess::OutputWithin;

/// How long Apache's config test or reload command may run.
pub const APACHE_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What one reconcile pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Routes that should be live.
    pub routes: usize,
    /// Something reached the data plane (routes rows or the vhost file).
    pub written: bool,
    pub reloaded: bool,
    /// Rows that became `proxied`.
    pub flipped: usize,
    /// Rows that lost a route they should not have had.
    pub unrouted: usize,
    /// One line per row whose route was refused (no token in it).
    pub refused: Vec<String>,
}

/// Publishes routes the way the configured routing mode does.
pub struct Publisher<'a> {
    config: &'a Config,
}

impl<'a> Publisher<'a> {
    pub fn new(config: &'a Config) -> Self {
        Publisher { config }
    }

    /// Redeems `alias` for `host:port`. The route is validated first
    /// (alias shape, host in `tgtipmask`, port 1024-65535): a route that
    /// cannot be published is refused with nothing written.
    ///
    /// # Errors
    /// [`CoreError::RouteRefused`] for an invalid route, or the store's error;
    /// in both cases the token is left as it was.
    pub fn redeem(
        &self,
        store: &mut dyn Store,
        alias: &str,
        host: IpAddr,
        port: u16,
        now: DateTime<Utc>,
    ) -> Result<RedeemOutcome> {
        let host_text = host.to_string();
        let route = routes::validate(
            &RouteRow {
                alias: alias.to_owned(),
                modified: Some(crate::store::sql_timestamp(now)),
                dsthost: Some(host_text.clone()),
                dstport: Some(port.to_string()),
                state: crate::store::ProxyState::Mapped,
            },
            self.config,
        )
        .map_err(|why| CoreError::RouteRefused {
            token_id: crate::token::log_id(&crate::token::alias_compare_hash(alias.as_bytes()))
                .to_owned(),
            why,
        })?;
        let ttl = self.config.ttl_secs;
        match self.config.routing {
            Routing::Map => {
                let target = route.target();
                store.redeem(
                    alias,
                    &host_text,
                    port,
                    now,
                    ttl,
                    RoutePublication::Live { target: &target },
                )
            }
            Routing::Vhost => store.redeem(
                alias,
                &host_text,
                port,
                now,
                ttl,
                RoutePublication::Deferred,
            ),
        }
    }

    /// Makes the data plane equal to the database: every live, valid
    /// `mapped` or `proxied` row routed, nothing else.
    pub fn reconcile(&self, store: &mut dyn Store, now: DateTime<Utc>) -> Result<Report> {
        let set = RouteSet::from_rows(&store.route_rows(now, self.config.ttl_secs)?, self.config);
        match self.config.routing {
            Routing::Map => self.reconcile_map(store, &set),
            Routing::Vhost => self.reconcile_vhosts(store, &set),
        }
    }

    /// The backends that live routes lead to (`ip:port`), and when the
    /// first of those routes expires: the targets `cron --watch` must not cut
    /// (see [`crate::tunnels`]).
    pub fn live_targets(
        &self,
        store: &dyn Store,
        now: DateTime<Utc>,
    ) -> Result<(HashSet<String>, Option<DateTime<Utc>>)> {
        match self.config.routing {
            Routing::Map => {
                let (targets, first_expiry) = store.live_targets(now)?;
                Ok((targets.into_iter().collect(), first_expiry))
            }
            Routing::Vhost => {
                let set =
                    RouteSet::from_rows(&store.route_rows(now, self.config.ttl_secs)?, self.config);
                let ttl = chrono::Duration::seconds(self.config.ttl_secs);
                let first_expiry = set.routes.iter().map(|r| r.modified + ttl).min();
                Ok((
                    set.routes.iter().map(|r| r.target()).collect(),
                    first_expiry,
                ))
            }
        }
    }

    fn reconcile_map(&self, store: &mut dyn Store, set: &RouteSet) -> Result<Report> {
        let wanted: Vec<PublishedRoute> = set
            .routes
            .iter()
            .map(|route| PublishedRoute {
                alias: route.alias.clone(),
                target: route.target(),
                expires: route_expiry(route.modified, self.config.ttl_secs),
            })
            .collect();
        let refused: Vec<String> = set.refused.iter().map(|(alias, _)| alias.clone()).collect();
        let sync = store.sync_routes(&wanted, &refused)?;
        Ok(Report {
            routes: wanted.len(),
            written: sync.written + sync.removed > 0,
            reloaded: false,
            flipped: sync.flipped,
            unrouted: sync.unrouted,
            refused: set.refusal_lines(),
        })
    }

    fn reconcile_vhosts(&self, store: &mut dyn Store, set: &RouteSet) -> Result<Report> {
        let config = self.config;
        let text = routes::render_vhosts(&set.routes, config);
        let path = &config.httpdstubfile;
        let previous = files::read_if_exists(path)?;
        let changed = previous.as_deref() != Some(text.as_bytes());
        let to_flip = set.to_flip();
        let mut report = Report {
            routes: set.routes.len(),
            refused: set.refusal_lines(),
            ..Report::default()
        };
        // Rows still `mapped` with an unchanged file mean an earlier reload
        // did not happen (or failed): reload again before calling them
        // proxied. Rows `proxied` without a route in the file (refused
        // since: a changed tgtipmask, a hand edit) are `mapped` again, so
        // that `proxied` means routed here too.
        let routed: Vec<String> = set.routes.iter().map(|r| r.alias.clone()).collect();
        if !changed && to_flip.is_empty() {
            report.unrouted = store.unmark_proxied(&routed)?;
            return Ok(report);
        }
        if changed {
            files::write_atomically(path, text.as_bytes())?;
            report.written = true;
        }
        if let Err(err) = run_command(&config.apache_configtest, "Apache's config test") {
            if changed {
                restore(path, previous.as_deref())?;
            }
            return Err(CoreError::Publication(format!(
                "Apache's config test failed with the new {}; the previous routes stay in place: {err}",
                path.display()
            )));
        }
        reload_apache(config)?;
        report.reloaded = true;
        report.flipped = store.mark_proxied(&to_flip)?;
        report.unrouted = store.unmark_proxied(&routed)?;
        Ok(report)
    }
}

fn restore(path: &Path, previous: Option<&[u8]>) -> Result<()> {
    match previous {
        Some(bytes) => files::write_atomically(path, bytes),
        None => fs::remove_file(path)
            .map_err(|e| CoreError::io(format!("removing {}", path.display()), e)),
    }
}

/// Runs an admin-configured command with a timeout, its output captured for
/// the error message.
///
/// # Errors
/// [`CoreError::Publication`] when it cannot start, fails or times out.
pub fn run_command(argv: &[String], what: &str) -> Result<()> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| CoreError::Publication(format!("{what}: empty command")))?;
    let shown = argv.join(" ");
    let output = Command::new(program)
        .args(args)
        .output_within(APACHE_COMMAND_TIMEOUT)
        .map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => CoreError::Publication(format!(
                "{what} `{shown}` did not finish within {}s",
                APACHE_COMMAND_TIMEOUT.as_secs()
            )),
            _ => CoreError::Publication(format!("running {what} `{shown}`: {e}")),
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    Err(CoreError::Publication(format!(
        "{what} `{shown}` failed ({}): {}",
        output.status,
        format!("{} {}", stderr.trim(), stdout.trim()).trim()
    )))
}

/// `apache_reload` if configured, else SIGUSR1 (graceful restart) to the
/// pid in `apache_pidfile`: one process, never a `killall`.
pub fn reload_apache(config: &Config) -> Result<()> {
    if let Some(command) = &config.apache_reload {
        return run_command(command, "the reload command");
    }
    let pidfile = &config.apache_pidfile;
    let text = fs::read_to_string(pidfile).map_err(|e| {
        CoreError::io(
            format!("reading Apache's pid file {}", pidfile.display()),
            e,
        )
    })?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 1).ok_or_else(|| {
        CoreError::Publication(format!(
            "{} does not hold a pid: {:?}",
            pidfile.display(),
            text.trim()
        ))
    })?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .map_err(|e| {
        CoreError::Publication(format!(
            "sending SIGUSR1 to Apache (pid {pid} from {}): {e}",
            pidfile.display()
        ))
    })?;
    Ok(())
}
