//! Which store the rows run on (`--store`): SQLite files, as before, or a
//! database of the private PostgreSQL cluster of the tests
//! (`pg_harness`, a Unix socket, run as `nobody` when we are root), read
//! by Apache through APR's pgsql driver as several frontends would.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use satellite_core::store::pg_harness;
use satellite_core::{Config, PgStore, SqliteStore, Store};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// The connections the PostgreSQL rows may open at once: two Apaches
/// (mod_dbd keeps up to `DBDMax` 64 per child) and a burst of 200 redeem
/// processes, beyond the harness's 100.
const PG_MAX_CONNECTIONS: u32 = 600;

impl StoreKind {
    /// `--store sqlite|postgres|both`.
    pub fn parse_list(text: &str) -> Result<Vec<StoreKind>> {
        Ok(match text {
            "sqlite" => vec![StoreKind::Sqlite],
            "postgres" | "pg" => vec![StoreKind::Postgres],
            "both" => vec![StoreKind::Sqlite, StoreKind::Postgres],
            other => bail!("unknown store {other:?}; stores: sqlite, postgres, both"),
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres => "PostgreSQL",
        }
    }

    /// A fresh, empty database with satellite's schema for a site on this
    /// store: its `database_url`, or `None` for SQLite (the site's file).
    pub fn new_database(self) -> Result<Option<String>> {
        match self {
            StoreKind::Sqlite => Ok(None),
            StoreKind::Postgres => {
                raise_connection_limit()?;
                let url = pg_harness::new_database();
                PgStore::open_or_create(&url, Duration::from_secs(5))
                    .with_context(|| format!("creating satellite's schema in {url}"))?;
                Ok(Some(url))
            }
        }
    }
}

/// The harness's cluster allows 100 connections; the bench needs more.
/// Done once, before the first database: a restart cuts every connection.
fn raise_connection_limit() -> Result<()> {
    static RAISED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    RAISED
        .get_or_init(|| {
            let cluster = pg_harness::cluster();
            let mut admin = postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls)
                .map_err(|e| format!("connecting to the private cluster: {e}"))?;
            admin
                .batch_execute(&format!(
                    "ALTER SYSTEM SET max_connections = {PG_MAX_CONNECTIONS}"
                ))
                .map_err(|e| format!("raising max_connections: {e}"))?;
            drop(admin);
            cluster.restart_fast()
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// The lines of `satellite.toml` that point the programs at `url`.
pub fn config_lines(url: Option<&str>) -> String {
    url.map(|u| format!("database_url = {u:?}\n"))
        .unwrap_or_default()
}

/// The Defines that make Apache's route lookup read `url` through APR's
/// pgsql driver (none: the site's SQLite file, as shipped).
pub fn apache_defines(url: Option<&str>) -> Vec<(String, String)> {
    url.map(|u| {
        vec![
            ("SATELLITE_DBD_DRIVER".to_owned(), "pgsql".to_owned()),
            ("SATELLITE_DBD_PARAMS".to_owned(), u.to_owned()),
        ]
    })
    .unwrap_or_default()
}

/// The store the configuration names, as the programs open it.
pub fn open(config: &Config) -> Result<Box<dyn Store>> {
    satellite_core::store::open_configured(config)
        .with_context(|| format!("opening the store of {}", config.dbfile.display()))
}

/// Bulk filling: the rows are written through the store's own calls into
/// the site's SQLite file (fsync off: how the rows got there is not what
/// is measured), then, on PostgreSQL, copied into the empty database in
/// one transaction (`migrate --to`'s import): a hundred thousand redeems
/// one round trip at a time would take minutes for nothing measured.
pub fn fill(config: &Config, write: impl FnOnce(&mut SqliteStore) -> Result<()>) -> Result<()> {
    let mut staging = SqliteStore::open(&config.dbfile, Duration::from_secs(5))?;
    staging.without_fsync()?;
    write(&mut staging)?;
    if let Some(url) = &config.database_url {
        let snapshot = staging.snapshot()?;
        let mut pg = PgStore::open(url, Duration::from_secs(30))?;
        pg.import(&snapshot)
            .with_context(|| format!("copying the rows into {url}"))?;
    }
    Ok(())
}

/// CPU used so far by the private cluster's server processes: the
/// postmaster, the backends it has reaped (one per connection, so per CGI
/// process) and the ones still running (Apache's mod_dbd connections).
/// `None` when it cannot be read.
pub fn pg_server_cpu() -> Option<Duration> {
    let url = pg_harness::cluster().url("postgres");
    let dir = url.strip_prefix("host=")?.split(" port=").next()?;
    let pid_file = std::fs::read_to_string(format!("{dir}/data/postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let ticks: u64 = std::iter::once(postmaster)
        .chain(satellite_demo::private_apache::children_of(postmaster))
        .filter_map(process_ticks)
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)? as u64;
    Some(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// utime + stime + cutime + cstime of `pid`, in clock ticks.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses, which may hold spaces:
    // fields 14 to 17 are utime, stime, cutime and cstime.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(
        fields
            .get(11..15)?
            .iter()
            .filter_map(|f| f.parse::<u64>().ok())
            .sum(),
    )
}

/// The PostgreSQL server's CPU per request since `before`, for a row.
pub fn pg_server_cpu_since(before: Option<Duration>, requests: usize) -> String {
    match before.zip(pg_server_cpu()) {
        Some((before, now)) => format!(
            "; server CPU {} ms",
            crate::ms(now.saturating_sub(before) / requests.max(1) as u32)
        ),
        None => String::new(),
    }
}
