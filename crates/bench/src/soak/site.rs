//! The soak's frontend: satellite installed as in production (the CGI
//! programs, `etc/satellite.toml`, `var/`, `html/`) behind a private Apache
//! running the repository's `httpd-conf/` as shipped, in map routing, with
//! the endpoints sent to `satellite serve` or run as CGI programs, on a
//! SQLite file or a database of the private PostgreSQL cluster (read by
//! Apache through APR's pgsql driver, as several frontends would).

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use satellite_core::config::Routing;
use satellite_core::store::pg_harness;
use satellite_core::{PgStore, SqliteStore, Store};
use satellite_demo::client::{Client, Response};
use satellite_demo::private_apache::{
    children_of, give_to_workers, make_certificate, ApacheInstall, PrivateApache,
    Site as ApacheSite, SiteConf,
};

pub const DOMAIN: &str = "example.test";

/// Where the soak's rows live (`--store`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    pub fn parse(text: &str) -> Result<StoreKind> {
        match text {
            "sqlite" => Ok(StoreKind::Sqlite),
            "postgres" | "pg" => Ok(StoreKind::Postgres),
            other => bail!("unknown store {other:?}; stores: sqlite, postgres"),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres => "PostgreSQL",
        }
    }
}

/// The connections a PostgreSQL soak may hold at once: Apache's children
/// (mod_dbd keeps up to `DBDMax` 64 each, `DBDKeep` 4 idle), serve, the
/// watcher, CGI processes in flight, the sampler; beyond the harness's 100.
const PG_MAX_CONNECTIONS: u32 = 400;

pub struct SoakSite {
    dir: tempfile::TempDir,
    pub port: u16,
    /// `Some` on PostgreSQL: libpq's key=value form.
    pub database_url: Option<String>,
    pub serving: bool,
    ca_pem: Vec<u8>,
    apache: Option<PrivateApache>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl SoakSite {
    /// Installs satellite into a new directory, creates its database and
    /// starts Apache; returns once Apache answers.
    pub fn start(programs: &Path, store: StoreKind, serving: bool) -> Result<SoakSite> {
        let install = ApacheInstall::find()?;
        let dir = tempfile::Builder::new()
            .prefix("satellite-soak-")
            .tempdir()?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let cert = make_certificate(dir.path(), DOMAIN)?;
        let ca_pem = fs::read(&cert.ca)?;
        let database_url = match store {
            StoreKind::Sqlite => None,
            StoreKind::Postgres => Some(new_pg_database()?),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut site = SoakSite {
            dir,
            port,
            database_url,
            serving,
            ca_pem,
            apache: None,
        };
        site.install(programs)?;
        let mut defines = vec![
            // The load comes from one address: mod_qos' waiting-page limit
            // (at most 32767 a second) is out of its way.
            ("SATELLITE_WAITING_LIMIT".to_owned(), "32767".to_owned()),
            ("SATELLITE_WAITING_PERIOD".to_owned(), "1".to_owned()),
        ];
        if let Some(url) = &site.database_url {
            defines.push(("SATELLITE_DBD_DRIVER".into(), "pgsql".into()));
            defines.push(("SATELLITE_DBD_PARAMS".into(), url.clone()));
        }
        let apache_site = ApacheSite {
            root: site.root(),
            domain: DOMAIN.into(),
            listen_ip: std::net::Ipv4Addr::LOCALHOST,
            port,
            http_port: None,
            cert: cert.cert.clone(),
            key: cert.key.clone(),
            serve_url: serving
                .then(|| format!("unix:{}|http://localhost", site.serve_socket().display())),
            routing: Routing::Map,
            conf: SiteConf::Directory(repo().join("httpd-conf").canonicalize()?),
            defines,
        };
        let client = site.client();
        let host = site.host_port("nothing-here");
        let apache = PrivateApache::start_when(&install, site.dir.path(), &apache_site, || {
            client
                .get(&host, "/")
                .is_ok_and(|r| r.status == 200 || r.status == 503)
        })?;
        site.apache = Some(apache);
        Ok(site)
    }

    fn install(&self, programs: &Path) -> Result<()> {
        let root = self.root();
        crate::web::install_tree(programs, &root, &[])?;
        // cron's lock file (an install creates it).
        fs::write(root.join("dynconf/.satellite.lock"), "")?;
        let quote = |s: &str| format!("{s:?}");
        let mut config = String::new();
        let mut set = |key: &str, value: String| {
            let _ = writeln!(config, "{key} = {value}");
        };
        set("extbasename", quote(DOMAIN));
        set("tgtipmask", "[\"127.0.0.0/8\"]".into());
        set("jobstateipmask", "[\"127.0.0.0/8\"]".into());
        set("extport", self.port.to_string());
        set("listenport", self.port.to_string());
        set("syslog_socket", quote(""));
        set("routing", quote("map"));
        // The watcher signals this Apache (a graceful restart after the
        // database server restarted), never the machine's.
        set(
            "apache_pidfile",
            quote(
                &PrivateApache::pid_path(self.dir.path())
                    .display()
                    .to_string(),
            ),
        );
        set("apache_user", quote(&PrivateApache::worker_user()));
        set("apache_status_url", quote(""));
        if self.serving {
            set(
                "serve_socket",
                quote(&self.serve_socket().display().to_string()),
            );
            if nix::unistd::geteuid().is_root() {
                // Apache's workers (nobody) connect to serve's socket.
                set("serve_socket_group", quote("nogroup"));
            }
        }
        if let Some(url) = &self.database_url {
            set("database_url", quote(url));
        }
        let path = self.config_file();
        fs::write(&path, config)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
        if self.database_url.is_none() {
            SqliteStore::open_or_create(&self.db_file(), Duration::from_secs(5))?;
        }
        give_to_workers(&root)?;
        Ok(())
    }

    /// The install tree (SATELLITE_ROOT).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn config_file(&self) -> PathBuf {
        self.root().join("etc/satellite.toml")
    }

    /// The SQLite file (unused on PostgreSQL).
    pub fn db_file(&self) -> PathBuf {
        self.root().join("var/state.sqlite")
    }

    pub fn serve_socket(&self) -> PathBuf {
        self.dir.path().join("serve.sock")
    }

    /// The store the programs use, opened by the bench.
    pub fn open_store(&self) -> Result<Box<dyn Store>> {
        let timeout = Duration::from_secs(30);
        Ok(match &self.database_url {
            Some(url) => Box::new(PgStore::open(url, timeout)?),
            None => Box::new(SqliteStore::open(&self.db_file(), timeout)?),
        })
    }

    /// The Host header value a browser sends for `alias`.
    pub fn host_port(&self, alias: &str) -> String {
        format!("{alias}.{DOMAIN}:{}", self.port)
    }

    /// The management host (the endpoints).
    pub fn manage(&self) -> String {
        self.host_port("manage")
    }

    /// A client that trusts this instance's certificate.
    pub fn client(&self) -> Client {
        Client::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            &self.ca_pem,
        )
    }

    /// getlink from 127.0.0.1; the new token.
    pub fn getlink(&self) -> Result<String> {
        let r = self.client().get(&self.manage(), "/getlink.cgi")?;
        match r.text().strip_prefix("Your token is \n") {
            Some(token) if r.status == 200 => Ok(token.trim().to_owned()),
            _ => bail!("getlink: {r}"),
        }
    }

    /// redeemtoken from `ip` (the backend's own address) for `port`, which
    /// must succeed.
    pub fn redeem(&self, token: &str, ip: &str, port: u16) -> Result<()> {
        let r = self.redeem_answer(token, ip, port)?;
        if (r.status, r.text().as_str()) != (200, "Success!\n") {
            bail!("redeem: {r}");
        }
        Ok(())
    }

    pub fn redeem_answer(&self, token: &str, ip: &str, port: u16) -> std::io::Result<Response> {
        self.client().bind(ip).get(
            &self.manage(),
            &format!("/redeemtoken.cgi?token={token}&port={port}"),
        )
    }

    /// The parent httpd's pid.
    pub fn apache_pid(&self) -> Option<u32> {
        self.apache.as_ref().and_then(PrivateApache::pid)
    }

    /// Apache's parent and its children.
    pub fn apache_pids(&self) -> Vec<u32> {
        let Some(parent) = self.apache_pid() else {
            return Vec::new();
        };
        let mut pids = vec![parent];
        pids.extend(children_of(parent));
        pids
    }

    /// A log file of the soak's own (serve's or the watcher's stderr).
    pub fn log_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The last `count` lines of [`log_file`](Self::log_file) `name`.
    pub fn last_lines(&self, name: &str, count: usize) -> String {
        let text = fs::read_to_string(self.log_file(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(count)..].join("\n")
    }

    /// What Apache logged that is worth a look (not the notices, nor the
    /// guesses mod_qos counts).
    pub fn notable_errors(&self, at_most: usize) -> String {
        let log = self
            .apache
            .as_ref()
            .map(|a| fs::read_to_string(a.error_log()).unwrap_or_default())
            .unwrap_or_default();
        log.lines()
            .filter(|l| {
                // Nor serve's socket refusing while serve restarts.
                ["AH01882", "mod_qos(009)", ":notice]", "AH02454", "AH01114"]
                    .iter()
                    .all(|known| !l.contains(known))
            })
            .take(at_most)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for SoakSite {
    fn drop(&mut self) {
        if let Some(mut apache) = self.apache.take() {
            apache.stop();
        }
    }
}

/// A new database in the private cluster with satellite's schema, the
/// cluster allowing [`PG_MAX_CONNECTIONS`] first (a restart, once).
fn new_pg_database() -> Result<String> {
    let cluster = pg_harness::cluster();
    let mut admin = postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls)
        .context("connecting to the private PostgreSQL cluster")?;
    let current: String = admin
        .query_one("SHOW max_connections", &[])?
        .get::<_, String>(0);
    if current.parse::<u32>().unwrap_or(0) < PG_MAX_CONNECTIONS {
        admin.batch_execute(&format!(
            "ALTER SYSTEM SET max_connections = {PG_MAX_CONNECTIONS}"
        ))?;
        drop(admin);
        cluster
            .restart_fast()
            .map_err(anyhow::Error::msg)
            .context("restarting the cluster with more connections")?;
    }
    let url = pg_harness::new_database();
    PgStore::open_or_create(&url, Duration::from_secs(5))
        .with_context(|| format!("creating satellite's schema in {url}"))?;
    Ok(url)
}
