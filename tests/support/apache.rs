//! A private Apache httpd for one test group: the product's
//! [`PrivateApache`] in a temporary directory, including the repository's
//! `httpd-conf/` as shipped, on a loopback high port, with the satellite
//! programs installed as in production (`cgi/<name>.cgi`,
//! `etc/satellite.toml`, `var/`, `dynconf/`, `html/`, `logs/`).
//!
//! When the tests run as root (CI), Apache runs its children as
//! nobody/nogroup and the install tree is owned by nobody, so the CGI
//! programs can write the database and the map while root's `cron` can
//! still signal Apache. Apache is stopped when the value is dropped.

#![allow(dead_code)]

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use satellite_demo::private_apache::{
    children_of, copy_tree, give_to_workers, make_certificate, ApacheInstall, Certificate,
    PrivateApache, Site, SiteConf,
};

use super::client::{Client, Response};
use super::repo_root;
use super::store::{Db, StoreKind};

pub const DOMAIN: &str = "example.test";
/// Apache's answer on a host that is neither proxied nor pending.
pub const DEFAULT_ANSWER: &str = "Please see documentation on how to use this service.\n";
/// How long anything that becomes true eventually may take.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How many fresh answers in a row [`Apache::eventually_in_a_row`] wants
/// before it trusts that the previous generation's children are gone.
pub const IN_A_ROW: usize = 3;

/// The endpoint programs, installed as `cgi/<name>.cgi`.
const CGI_PROGRAMS: [(&str, &str); 7] = [
    ("getlink", env!("CARGO_BIN_EXE_getlink")),
    ("redeemtoken", env!("CARGO_BIN_EXE_redeemtoken")),
    ("destroytoken", env!("CARGO_BIN_EXE_destroytoken")),
    ("linktoken", env!("CARGO_BIN_EXE_linktoken")),
    ("tokenjobstate", env!("CARGO_BIN_EXE_tokenjobstate")),
    ("update-jobs", env!("CARGO_BIN_EXE_update-jobs")),
    ("index", env!("CARGO_BIN_EXE_index")),
];
pub const CRON: &str = env!("CARGO_BIN_EXE_cron");
pub const SATELLITE: &str = env!("CARGO_BIN_EXE_satellite");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Routes in the database's `routes` table, read by a `dbd:` RewriteMap.
    Map,
    Vhost,
}

impl Routing {
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Map => "map",
            Routing::Vhost => "vhost",
        }
    }

    /// Routes are live the moment redeem answers.
    pub fn is_map(self) -> bool {
        self == Routing::Map
    }
}

pub struct Apache {
    pub dir: tempfile::TempDir,
    /// The loopback address it listens on (frontends of one site differ).
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The plain-HTTP port (its vhost redirects to https).
    pub http_port: u16,
    pub routing: Routing,
    pub ca_pem: Vec<u8>,
    install: ApacheInstall,
    /// For `DOMAIN` and its subdomains.
    certificate: Certificate,
    httpd: Option<PrivateApache>,
    as_root: bool,
    /// Endpoints go to `satellite serve` on [`Apache::serve_socket`].
    serving: bool,
    /// `Define`s written before satellite.conf.
    defines: Vec<(String, String)>,
    /// satellite.toml settings every [`write_config`](Self::write_config)
    /// keeps (a frontend's `database_url`).
    settings: Vec<(String, String)>,
}

/// The harness' own `Define`s. Tests send many requests to unrouted hosts
/// from one address (routes coming and going under load, path tables): the
/// waiting-page limit (mod_qos) is out of their way unless a test sets it.
/// mod_qos keeps the limit in a signed 16-bit number: 32767 a second is
/// its most.
pub const HARNESS_DEFINES: [(&str, &str); 2] = [
    ("SATELLITE_WAITING_LIMIT", "32767"),
    ("SATELLITE_WAITING_PERIOD", "1"),
];

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A port that was free on `ip` a moment ago.
fn pick_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Hard-links `from` to `to`, or copies it when they are on different
/// file systems.
fn install_program(from: &str, to: &Path) {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap_or_else(|e| panic!("installing {from}: {e}"));
    }
}

impl Apache {
    /// Installs satellite with `routing` and starts Apache; waits until it
    /// answers. Panics (failing the test) if Apache is missing or does not
    /// come up.
    pub fn start(routing: Routing) -> Apache {
        Self::start_with(routing, false, &[])
    }

    /// [`start`](Self::start) with more `Define`s before satellite.conf
    /// (they replace the harness' own, see [`HARNESS_DEFINES`]).
    pub fn start_defining(routing: Routing, defines: &[(&str, &str)]) -> Apache {
        Self::start_with(routing, false, defines)
    }

    /// [`start`](Self::start) with Apache sending the endpoints to
    /// `satellite serve` on [`serve_socket`](Self::serve_socket), which the
    /// test starts (Apache connects only when a request comes).
    pub fn start_serving(routing: Routing) -> Apache {
        Self::start_with(routing, true, &[])
    }

    /// Starts `satellite serve` on [`serve_socket`](Self::serve_socket)
    /// with this site's config, which names that socket (stopped when
    /// dropped), and waits until it listens. As root, Apache's workers
    /// (nobody) get the socket's group.
    pub fn run_serve(&self) -> Running {
        let socket = self.serve_socket();
        let mut settings = vec![(
            "serve_socket",
            format!("{:?}", socket.display().to_string()),
        )];
        if is_root() {
            settings.push(("serve_socket_group", "\"nogroup\"".to_owned()));
        }
        self.write_config(&settings);
        let serve = Running(
            Command::new(SATELLITE)
                .args(["serve", "--socket"])
                .arg(&socket)
                .env("SATELLITE_CONFIG", self.config_file())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("starting satellite serve"),
        );
        self.eventually("serve listening", || {
            socket.exists().then_some(()).ok_or("not yet".to_owned())
        });
        serve
    }

    /// Where serve listens when Apache is [`start_serving`](Self::start_serving).
    pub fn serve_socket(&self) -> PathBuf {
        self.dir.path().join("serve.sock")
    }

    /// A frontend on a shared PostgreSQL database (`url`, libpq's
    /// key=value form): satellite's programs use it (`database_url`) and
    /// Apache's map lookup reads it through APR's pgsql driver.
    pub fn start_on_postgres(url: &str, serving: bool) -> Apache {
        Self::start_on_postgres_at(url, serving, Ipv4Addr::LOCALHOST)
    }

    /// [`start_on_postgres`](Self::start_on_postgres) listening on `ip`
    /// (another loopback address: another host, as far as clients see).
    pub fn start_on_postgres_at(url: &str, serving: bool, ip: Ipv4Addr) -> Apache {
        Self::start_frontend(url, serving, ip, &[])
    }

    /// A frontend on `url` at `ip`, with more satellite.toml `settings`
    /// kept across every [`write_config`](Self::write_config) (its
    /// `watcher_name`, which serve's health check and its watcher share).
    pub fn start_frontend(
        url: &str,
        serving: bool,
        ip: Ipv4Addr,
        settings: &[(&str, String)],
    ) -> Apache {
        Self::start_on_database(url, Routing::Map, serving, ip, settings)
    }

    fn start_on_database(
        url: &str,
        routing: Routing,
        serving: bool,
        ip: Ipv4Addr,
        settings: &[(&str, String)],
    ) -> Apache {
        let mut all_settings = vec![("database_url", format!("{url:?}"))];
        all_settings.extend(settings.iter().cloned());
        Self::start_full(
            ip,
            routing,
            serving,
            &[
                ("SATELLITE_DBD_DRIVER", "pgsql"),
                ("SATELLITE_DBD_PARAMS", url),
            ],
            &all_settings,
        )
    }

    /// [`start`](Self::start) on `store`: for PostgreSQL a fresh database,
    /// its schema made by `satellite migrate` at install.
    pub fn start_on(store: StoreKind, routing: Routing) -> Apache {
        Self::start_on_with(store, routing, false)
    }

    /// [`start_serving`](Self::start_serving) on `store`.
    pub fn start_serving_on(store: StoreKind, routing: Routing) -> Apache {
        Self::start_on_with(store, routing, true)
    }

    fn start_on_with(store: StoreKind, routing: Routing, serving: bool) -> Apache {
        match store.new_database_url() {
            Some(url) => Self::start_on_database(&url, routing, serving, Ipv4Addr::LOCALHOST, &[]),
            None => Self::start_with(routing, serving, &[]),
        }
    }

    /// The PostgreSQL database this frontend uses, if it uses one.
    fn database_url(&self) -> Option<String> {
        self.settings
            .iter()
            .find(|(key, _)| key == "database_url")
            .map(|(_, quoted)| {
                serde_json::from_str(quoted).expect("database_url as the harness quoted it")
            })
    }

    /// This frontend's database, whichever store it is.
    pub fn sql(&self) -> Db {
        Db::connect(&self.db_file(), self.database_url().as_deref())
    }

    fn start_with(routing: Routing, serving: bool, defines: &[(&str, &str)]) -> Apache {
        Self::start_full(Ipv4Addr::LOCALHOST, routing, serving, defines, &[])
    }

    fn start_full(
        ip: Ipv4Addr,
        routing: Routing,
        serving: bool,
        defines: &[(&str, &str)],
        settings: &[(&str, String)],
    ) -> Apache {
        let mut all_defines: Vec<(String, String)> = HARNESS_DEFINES
            .iter()
            .filter(|(name, _)| !defines.iter().any(|(n, _)| n == name))
            .chain(defines)
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        all_defines.sort();
        let install = ApacheInstall::find()
            .unwrap_or_else(|e| panic!("{e:#}\n(the Apache tests need a real httpd)"));
        let dir = tempfile::Builder::new()
            .prefix("satellite-apache-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let certificate = make_certificate(dir.path(), DOMAIN).unwrap();
        let ca_pem = fs::read(&certificate.ca).unwrap();
        let mut apache = Apache {
            dir,
            ip,
            port: 0,
            http_port: 0,
            routing,
            ca_pem,
            install,
            certificate,
            httpd: None,
            as_root: is_root(),
            serving,
            defines: all_defines,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        };
        apache.install();
        // The port was free when picked, but another test may take it
        // before Apache binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            apache.port = pick_port(ip);
            apache.http_port = pick_port(ip);
            apache.write_config(&[]);
            match apache.launch() {
                Ok(httpd) => {
                    apache.httpd = Some(httpd);
                    return apache;
                }
                Err(why) => last_error = format!("{why:#}"),
            }
        }
        panic!("Apache did not start: {last_error}");
    }

    /// The install tree (SATELLITE_ROOT).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub fn httpd_conf(&self) -> PathBuf {
        PrivateApache::config_path(self.dir.path())
    }

    pub fn config_file(&self) -> PathBuf {
        self.path("etc/satellite.toml")
    }

    pub fn db_file(&self) -> PathBuf {
        self.path("var/state.sqlite")
    }

    pub fn pidfile(&self) -> PathBuf {
        PrivateApache::pid_path(self.dir.path())
    }

    /// dynconf/proxyconf.conf (vhost routing).
    pub fn vhost_file(&self) -> PathBuf {
        self.path("dynconf/proxyconf.conf")
    }

    fn install(&self) {
        let root = self.root();
        for sub in ["cgi", "etc", "var", "dynconf", "html", "logs"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        for (name, exe) in CGI_PROGRAMS {
            install_program(exe, &root.join(format!("cgi/{name}.cgi")));
        }
        fs::copy(
            repo_root().join("wordlist/eff_large_wordlist.txt"),
            root.join("var/eff_large_wordlist.txt"),
        )
        .unwrap();
        copy_tree(&repo_root().join("html"), &root.join("html")).unwrap();
        self.write_config(&[]);
        run(Command::new(SATELLITE)
            .args(["migrate", "--config"])
            .arg(self.config_file()));
        // cron's lock file (an install creates it).
        fs::write(root.join("dynconf/.satellite.lock"), "").unwrap();
        if self.as_root {
            give_to_workers(&root).unwrap();
        }
    }

    /// Writes etc/satellite.toml: the test values, with `overrides`
    /// (`key`, TOML value) replacing or adding keys.
    pub fn write_config(&self, overrides: &[(&str, String)]) {
        let quote = |s: &str| format!("{s:?}");
        let list = |items: &[String]| {
            format!(
                "[{}]",
                items
                    .iter()
                    .map(|s| quote(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let mut entries: Vec<(String, String)> = vec![
            ("extbasename".into(), quote(DOMAIN)),
            ("tgtipmask".into(), list(&["127.0.0.0/8".into()])),
            ("jobstateipmask".into(), list(&["127.0.0.0/8".into()])),
            ("extport".into(), self.port.max(1).to_string()),
            ("listenport".into(), self.port.max(1).to_string()),
            ("syslog_socket".into(), quote("")),
            ("routing".into(), quote(self.routing.as_str())),
            (
                "apache_configtest".into(),
                list(&self.configtest_command(None)),
            ),
            (
                "apache_pidfile".into(),
                quote(&self.pidfile().display().to_string()),
            ),
            ("apache_user".into(), quote(&PrivateApache::worker_user())),
            (
                "apache_lookup_failures_log".into(),
                quote(
                    &self
                        .dir
                        .path()
                        .join("satellite_lookup_failures.log")
                        .display()
                        .to_string(),
                ),
            ),
        ];
        let kept = self.settings.iter().map(|(k, v)| (k.as_str(), v));
        let given = overrides.iter().map(|(k, v)| (*k, v));
        for (key, value) in kept.chain(given) {
            entries.retain(|(k, _)| k != key);
            entries.push((key.to_owned(), value.clone()));
        }
        let text: String = entries
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        let path = self.config_file();
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// Apache's own config test for this instance, optionally with one more
    /// file included (to make it fail on purpose).
    pub fn configtest_command(&self, extra_include: Option<&Path>) -> Vec<String> {
        let extra: Vec<String> = extra_include
            .map(|include| format!("Include {}", include.display()))
            .into_iter()
            .collect();
        self.install.configtest_command(self.dir.path(), &extra)
    }

    /// Starts Apache on `self.port`; ready once the management vhost
    /// answers through TLS with our CA.
    fn launch(&self) -> anyhow::Result<PrivateApache> {
        let site = Site {
            root: self.root(),
            domain: DOMAIN.into(),
            listen_ip: self.ip,
            port: self.port,
            http_port: Some(self.http_port),
            cert: self.certificate.cert.clone(),
            key: self.certificate.key.clone(),
            serve_url: self
                .serving
                .then(|| format!("unix:{}|http://localhost", self.serve_socket().display())),
            routing: if self.routing.is_map() {
                satellite_core::config::Routing::Map
            } else {
                satellite_core::config::Routing::Vhost
            },
            conf: SiteConf::Directory(repo_root().join("httpd-conf")),
            defines: self.defines.clone(),
        };
        let client = self.client();
        let host = self.host("nothing-here");
        PrivateApache::start_when(&self.install, self.dir.path(), &site, || {
            // 503: Apache answers but cannot read its routes (a test of a
            // wrong SATELLITE_DB); the test itself says what it expects.
            client
                .get(&host, "/")
                .is_ok_and(|r| r.status == 200 || r.status == 503)
        })
    }

    /// Stops Apache (SIGTERM to the parent, SIGKILL after a while).
    pub fn stop(&mut self) {
        if let Some(mut httpd) = self.httpd.take() {
            httpd.stop();
        }
    }

    /// The public host name of `alias`.
    pub fn host(&self, alias: &str) -> String {
        format!("{alias}.{DOMAIN}")
    }

    /// The Host header value a browser sends: host and port.
    pub fn host_port(&self, alias: &str) -> String {
        format!("{alias}.{DOMAIN}:{}", self.port)
    }

    /// The public origin of `alias` (what Location headers should say).
    pub fn origin(&self, alias: &str) -> String {
        format!("https://{alias}.{DOMAIN}:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    /// A client that trusts this instance's certificate.
    pub fn client(&self) -> Client {
        Client::new(self.addr(), &self.ca_pem)
    }

    /// A GET through Apache from 127.0.0.1, `Host: <alias>.<domain>:<port>`.
    pub fn get(&self, alias: &str, path: &str) -> Response {
        self.client()
            .get(&self.host_port(alias), path)
            .unwrap_or_else(|e| panic!("GET {path} on {alias}: {e}\n{}", self.error_log()))
    }

    fn manage(&self, from: &str, path: &str) -> Response {
        self.client()
            .bind(from)
            .get(&self.host_port("manage"), path)
            .unwrap_or_else(|e| panic!("GET {path} from {from}: {e}\n{}", self.error_log()))
    }

    /// getlink.cgi through Apache; the new token.
    pub fn getlink(&self) -> String {
        let r = self.manage("127.0.0.1", "/getlink.cgi");
        assert_eq!(r.status, 200, "getlink: {r}\n{}", self.error_log());
        let body = r.text();
        body.strip_prefix("Your token is \n")
            .and_then(|rest| rest.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("unexpected getlink body {body:?}"))
            .to_owned()
    }

    /// redeemtoken.cgi from `ip` (the backend's own address) for `port`.
    pub fn redeem(&self, token: &str, ip: &str, port: u16) -> Response {
        self.manage(ip, &format!("/redeemtoken.cgi?token={token}&port={port}"))
    }

    /// redeem that must succeed.
    pub fn redeem_ok(&self, token: &str, ip: &str, port: u16) {
        let r = self.redeem(token, ip, port);
        assert_eq!(
            (r.status, r.text()),
            (200, "Success!\n".to_owned()),
            "redeem: {r}\n{}",
            self.error_log()
        );
    }

    /// destroytoken.cgi from `ip`.
    pub fn destroy(&self, token: &str, ip: &str) -> Response {
        self.manage(ip, &format!("/destroytoken.cgi?token={token}"))
    }

    pub fn destroy_ok(&self, token: &str, ip: &str) {
        let r = self.destroy(token, ip);
        assert_eq!(
            (r.status, r.text()),
            (200, "Success! Token destroyed.\n".to_owned()),
            "destroy: {r}\n{}",
            self.error_log()
        );
    }

    /// linktoken.cgi from the login node (loopback here), which must succeed.
    pub fn link_ok(&self, token: &str, jobid: &str) {
        let r = self.manage(
            "127.0.0.1",
            &format!("/linktoken.cgi?token={token}&jobid={jobid}"),
        );
        assert_eq!(
            (r.status, r.text()),
            (200, "Success! Token linked to jobid.\n".to_owned()),
            "link: {r}\n{}",
            self.error_log()
        );
    }

    /// `satellite revoke <alias>` against this install; it must succeed.
    pub fn revoke_ok(&self, alias: &str) {
        let out = Command::new(SATELLITE)
            .args(["revoke", alias, "--config"])
            .arg(self.config_file())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// update-jobs.cgi with a legacy job table (`<jobid> <state>` lines), as
    /// the scheduler host pushes it; must succeed.
    pub fn push_jobs_ok(&self, table: &str) {
        let mut request = super::client::Request::post(
            &self.host_port("manage"),
            "/update-jobs.cgi",
            format!("jobstates={table}").into_bytes(),
        );
        request.headers = vec![(
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into(),
        )];
        let r = self
            .client()
            .bind("127.0.0.1")
            .request(&request)
            .unwrap_or_else(|e| panic!("update-jobs: {e}\n{}", self.error_log()));
        assert_eq!(
            (r.status, r.text()),
            (200, "Successfully updated jobs! \n".to_owned()),
            "update-jobs: {r}\n{}",
            self.error_log()
        );
    }

    /// The report of `satellite check --live` on this install.
    pub fn check_live(&self, extra: &[&str]) -> String {
        let out = Command::new(SATELLITE)
            .args(["check", "--live", "--config"])
            .arg(self.config_file())
            .args(extra)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `cron --watch` for this install (stopped when dropped), its
    /// output in [`watcher_said`](Self::watcher_said).
    pub fn run_watcher(&self) -> Running {
        let log = fs::File::create(self.path("watcher.log")).unwrap();
        let mut cmd = self.cron_command();
        cmd.arg("--watch")
            .stdout(log)
            .stderr(std::process::Stdio::null());
        Running(cmd.spawn().expect("starting cron --watch"))
    }

    /// What the watcher of [`run_watcher`](Self::run_watcher) said so far.
    pub fn watcher_said(&self) -> String {
        fs::read_to_string(self.path("watcher.log")).unwrap_or_default()
    }

    /// Waits until the watcher has said `what`.
    pub fn await_watcher_saying(&self, what: &str) {
        self.eventually(what, || {
            self.watcher_said()
                .contains(what)
                .then_some(())
                .ok_or("not yet".to_owned())
        });
    }

    /// A `cron` command for this install (not started).
    pub fn cron_command(&self) -> Command {
        let mut cmd = Command::new(CRON);
        cmd.env("SATELLITE_CONFIG", self.config_file());
        cmd
    }

    /// Runs `cron` once and returns its output (whatever its status).
    pub fn cron(&self) -> Output {
        self.cron_command().output().expect("running cron")
    }

    /// Runs `cron` once and insists it succeeds.
    pub fn cron_ok(&self) -> Output {
        let out = self.cron();
        assert!(
            out.status.success(),
            "cron failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.error_log()
        );
        out
    }

    /// The state column of `alias`'s row, if it has one.
    pub fn state_of(&self, alias: &str) -> Option<String> {
        self.sql()
            .value("SELECT state FROM proxy WHERE alias = $1", &[alias])
            .map(|state| state.text())
    }

    pub fn error_log_path(&self) -> PathBuf {
        PrivateApache::error_log_path(self.dir.path())
    }

    pub fn error_log(&self) -> String {
        let log = fs::read_to_string(self.error_log_path()).unwrap_or_default();
        format!("--- Apache error log ---\n{log}--- end of error log ---")
    }

    /// The parent httpd's pid, from the pidfile.
    pub fn parent_pid(&self) -> i32 {
        fs::read_to_string(self.pidfile())
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// How many times Apache (re)read its configuration: one at start, one
    /// more per graceful or full restart.
    pub fn generations(&self) -> usize {
        fs::read_to_string(self.error_log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("resuming normal operations"))
            .count()
    }

    /// How many restart signals Apache has received.
    pub fn restarts(&self) -> usize {
        fs::read_to_string(self.error_log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("AH00493") || l.contains("AH00492") || l.contains("SIGHUP"))
            .count()
    }

    /// The pids of the parent's children.
    pub fn children(&self) -> Vec<i32> {
        let Ok(parent) = fs::read_to_string(self.pidfile()) else {
            return Vec::new();
        };
        let Ok(parent) = parent.trim().parse() else {
            return Vec::new();
        };
        children_of(parent)
            .into_iter()
            .map(|pid| pid as i32)
            .collect()
    }

    /// Polls `f` until it gives `Ok`, for up to `DEADLINE`; panics with
    /// `what`, the last observation and the error log otherwise.
    #[track_caller]
    pub fn eventually<T>(&self, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
        let start = Instant::now();
        loop {
            match f() {
                Ok(value) => return value,
                Err(last) if start.elapsed() > DEADLINE => {
                    panic!(
                        "{what}: not within {DEADLINE:?}; last: {last}\n{}",
                        self.error_log()
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Puts `defines` (lines such as `Define SATELLITE_NO_APP_HSTS`) before
    /// satellite.conf is read, as a site does, and restarts Apache
    /// gracefully, as an admin would; returns once the new generation
    /// runs (children of the old one may still answer for a while: see
    /// [`eventually_in_a_row`](Self::eventually_in_a_row)).
    pub fn graceful_with(&self, defines: &str) {
        let conf = fs::read_to_string(self.httpd_conf()).unwrap();
        fs::write(self.httpd_conf(), format!("{defines}\n{conf}")).unwrap();
        let generations = self.generations();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.parent_pid()),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
        self.eventually("the graceful restart", || {
            if self.generations() > generations {
                Ok(())
            } else {
                Err("not yet".into())
            }
        });
    }

    /// [`eventually`](Self::eventually) for what a graceful restart
    /// changes: `probe` (a request on a fresh connection) must give `Ok`
    /// [`IN_A_ROW`] times in a row, because a child of the previous
    /// generation may still take a connection and answer with the old
    /// configuration after a new child has answered with the new one.
    /// Returns the last probe's value.
    #[track_caller]
    pub fn eventually_in_a_row<T>(
        &self,
        what: &str,
        mut probe: impl FnMut() -> Result<T, String>,
    ) -> T {
        self.eventually(&format!("{what} ({IN_A_ROW} times in a row)"), || {
            for _ in 1..IN_A_ROW {
                probe()?;
            }
            probe()
        })
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        self.stop();
        // On PostgreSQL no program fell back to a SQLite file.
        if self.database_url().is_some() && !thread::panicking() {
            assert!(
                !self.db_file().exists(),
                "a PostgreSQL frontend has a SQLite file"
            );
        }
    }
}

/// A process stopped (SIGTERM, then SIGKILL) when dropped, e.g. `cron --watch`,
/// also when the test fails before it would have stopped it.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        // Already reaped (the test waited for it): its pid may be another
        // process's by now.
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
