//! A private Apache running the repository's `httpd-conf/` as shipped,
//! installed as in production (CGI programs, config, database, html), plus
//! one extra file of the bench's own: a vhost with a static `ProxyPass` to
//! the same backend (the ceiling the dynamic routes are compared with) and
//! optionally worker definitions under test. The extra file is added by
//! handing the launcher a directory whose `satellite.conf` includes the
//! repository's file and then ours, so nothing shipped is edited.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use satellite_core::config::Routing;
use satellite_demo::private_apache::{
    make_certificate, ApacheInstall, PrivateApache, Site as ApacheSite, SiteConf,
};

use crate::load::Tls;

pub const DOMAIN: &str = "example.test";
/// The host of the vhost with a static ProxyPass.
pub const STATIC_HOST: &str = "static.example.test";

pub struct WebSite {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub tls: Tls,
    apache: Option<PrivateApache>,
    install: ApacheInstall,
    cert: satellite_demo::private_apache::Certificate,
    /// The Defines naming the store Apache reads routes from.
    store_defines: Vec<(String, String)>,
    /// `Some(url)`: the endpoints go to `satellite serve` there.
    pub serve_url: Option<String>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The install tree of a site at `root`, as in production: the endpoint
/// programs as `cgi/<name>.cgi`, the word list, the shipped `html/`, and
/// empty `etc/`, `var/`, `dynconf/`, `logs/` and `more` directories.
pub fn install_tree(programs: &Path, root: &Path, more: &[&str]) -> Result<()> {
    for sub in ["cgi", "etc", "var", "dynconf", "html", "logs"]
        .iter()
        .chain(more)
    {
        fs::create_dir_all(root.join(sub))?;
    }
    for name in satellite_core::Endpoint::ALL.map(satellite_core::Endpoint::name) {
        // Copies, not links: the tree is given to nobody afterwards.
        fs::copy(programs.join(name), root.join(format!("cgi/{name}.cgi")))
            .with_context(|| format!("installing {name}"))?;
    }
    fs::copy(
        repo().join("wordlist/eff_large_wordlist.txt"),
        root.join("var/eff_large_wordlist.txt"),
    )?;
    satellite_demo::private_apache::copy_tree(&repo().join("html"), &root.join("html"))?;
    Ok(())
}

impl WebSite {
    /// Installs satellite (map routing) into a new directory, on the
    /// PostgreSQL database `database_url` or else a new SQLite file; the
    /// database is left for the caller to fill before [`start`].
    pub fn install(programs: &Path, database_url: Option<&str>) -> Result<WebSite> {
        let install = ApacheInstall::find()?;
        let dir = tempfile::Builder::new()
            .prefix("satellite-bench-")
            .tempdir()?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let cert = make_certificate(dir.path(), DOMAIN)?;
        let root = dir.path().join("root");
        install_tree(programs, &root, &["conf", "apache"])?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        // trusted_proxies: Apache tells `satellite serve` (over TCP on
        // loopback, see frontends.rs) who the client is.
        fs::write(
            root.join("etc/satellite.toml"),
            format!(
                "extbasename = \"{DOMAIN}\"\ntgtipmask = [\"127.0.0.0/8\"]\n\
                 extport = {port}\nlistenport = {port}\nsyslog_socket = \"\"\nrouting = \"map\"\n\
                 trusted_proxies = [\"127.0.0.1/32\"]\n{}",
                crate::stores::config_lines(database_url)
            ),
        )?;
        satellite_core::SqliteStore::open_or_create(
            &root.join("var/state.sqlite"),
            std::time::Duration::from_secs(5),
        )?;
        let ca = fs::read(&cert.ca)?;
        let tls = Tls::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &ca)?;
        Ok(WebSite {
            dir,
            port,
            tls,
            apache: None,
            install,
            cert,
            store_defines: crate::stores::apache_defines(database_url),
            serve_url: None,
        })
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn config_file(&self) -> PathBuf {
        self.root().join("etc/satellite.toml")
    }

    /// (Re)starts Apache with the static vhost proxying to `backend` and
    /// `extra` lines at server level.
    pub fn start(&mut self, backend: std::net::SocketAddr, extra: &str) -> Result<()> {
        self.stop();
        satellite_demo::private_apache::give_to_workers(&self.root())?;
        let conf_dir = self.root().join("conf");
        let shipped = repo().join("httpd-conf").canonicalize()?;
        let mut conf = String::new();
        let _ = writeln!(
            conf,
            "Include \"{}\"",
            shipped.join("satellite.conf").display()
        );
        let _ = writeln!(
            conf,
            "<VirtualHost *:${{SATELLITE_PORT}}>\n    ServerName {STATIC_HOST}\n    SSLEngine on\n    \
             ProxyPass \"/\" \"http://{backend}/\"\n</VirtualHost>\n{extra}"
        );
        fs::write(conf_dir.join("satellite.conf"), conf)?;
        if let Some(modules) = self.install.modules_conf {
            fs::write(
                conf_dir.join(modules),
                format!("Include \"{}\"\n", shipped.join(modules).display()),
            )?;
        }
        let site = ApacheSite {
            root: self.root(),
            domain: DOMAIN.into(),
            listen_ip: std::net::Ipv4Addr::LOCALHOST,
            port: self.port,
            cert: self.cert.cert.clone(),
            key: self.cert.key.clone(),
            serve_url: self.serve_url.clone(),
            http_port: None,
            routing: Routing::Map,
            conf: SiteConf::Directory(conf_dir),
            // The floods come from one address: measured here is what a
            // junk host costs Apache, not mod_qos' refusal once the address is
            // over the waiting-page limit.
            // mod_qos keeps the limit in a signed 16-bit number: 32767 a
            // second is its most.
            defines: [
                ("SATELLITE_WAITING_LIMIT".to_owned(), "32767".to_owned()),
                ("SATELLITE_WAITING_PERIOD".to_owned(), "1".to_owned()),
            ]
            .into_iter()
            .chain(self.store_defines.iter().cloned())
            .collect(),
        };
        let tls = self.tls.clone();
        let apache_dir = self.root().join("apache");
        let apache = PrivateApache::start_when(&self.install, &apache_dir, &site, || {
            tls.get_once("nothing-here.example.test", "/")
                .is_ok_and(|a| a.status == 200)
        })?;
        self.apache = Some(apache);
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut apache) = self.apache.take() {
            apache.stop();
        }
    }

    pub fn error_log(&self) -> String {
        self.apache
            .as_ref()
            .map(|a| fs::read_to_string(a.error_log()).unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for WebSite {
    fn drop(&mut self) {
        self.stop();
    }
}
