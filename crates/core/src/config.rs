//! The configuration file (`satellite.toml`) and its container-era
//! environment overrides.
//!
//! Where the file is: `$SATELLITE_CONFIG` if set, else `../etc/satellite.toml`
//! relative to the real path of the running program (the original found
//! `etc/satconfig.pm` the same way). Relative paths inside the file are
//! relative to the file's own directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{CoreError, Result};
use crate::ipmask::IpMaskList;
use crate::token::MAX_LABEL_LEN;

pub const CONFIG_ENV: &str = "SATELLITE_CONFIG";

/// How live routes reach Apache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// A `RewriteMap` read by one wildcard vhost; no reload per route.
    Map,
    /// One `<VirtualHost>` per route, as the original; reload per change.
    Vhost,
}

/// Whether a session must come from its own batch job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobBinding {
    /// Tokens are bound to nothing but their TTL, as the original.
    Off,
    /// Mismatches are logged; nothing is refused or ended.
    Warn,
    /// A redeem that does not come from its linked job's node, or a job run
    /// by a denied user, is refused or its session ended.
    Enforce,
}

/// The resolved configuration every program works from. The file is read
/// straight into it: every key may be left out (its default is in
/// [`Config::file_defaults`]), unknown keys are refused so that a typo is an
/// error instead of a silently ignored setting, and after the environment
/// overrides, relative paths are resolved and every value is checked.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default = "Config::file_defaults")]
pub struct Config {
    /// Where the settings came from (for messages), if from a file.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    pub extbasename: String,
    pub tgtipmask: IpMaskList,
    pub jobstateipmask: IpMaskList,
    pub ttl_secs: i64,
    pub extport: u16,
    pub listenport: u16,
    pub dbfile: PathBuf,
    /// PostgreSQL instead of the SQLite file at `dbfile`, for several
    /// frontends sharing one database: a `postgres://` or `postgresql://`
    /// URL, or a libpq `key=value` string (`host=/run/postgresql
    /// dbname=satellite`). Unset or empty: SQLite. TLS is not supported
    /// (a Unix socket, or a network the site trusts); a password is better
    /// kept in the user's `~/.pgpass` than here.
    pub database_url: Option<String>,
    pub httpdstubfile: PathBuf,
    pub htmldir: PathBuf,
    pub wordlist: PathBuf,
    pub words_per_token: usize,
    pub job_wait_state_codes: Vec<String>,
    pub job_run_state_codes: Vec<String>,
    pub job_gone_state_codes: Vec<String>,
    pub legacy_status_200: bool,
    pub max_body_bytes: usize,
    pub busy_timeout_ms: u64,
    /// Empty path: do not log to syslog.
    pub syslog_socket: PathBuf,
    pub routing: Routing,
    /// Obsolete since map routing reads routes from the database: accepted
    /// and ignored so that an older `satellite.toml` still loads (`check`
    /// says so).
    #[serde(rename = "mapfile")]
    pub obsolete_mapfile: Option<PathBuf>,
    #[serde(rename = "map_format")]
    pub obsolete_map_format: Option<String>,
    pub apache_configtest: Vec<String>,
    pub apache_reload: Option<Vec<String>>,
    pub apache_pidfile: PathBuf,
    /// The log Apache writes a line to for each route lookup that failed
    /// (satellite.conf's `satellite_lookup_failures.log` in
    /// SATELLITE_LOG_DIR). With a database server, `cron --watch` restarts
    /// Apache gracefully when it grows while the database answers: a kept
    /// lookup connection that lost its prepared statement never heals.
    pub apache_lookup_failures_log: PathBuf,
    /// The user Apache's workers run as, whose connections to a backend
    /// `cron --watch` cuts when its route ends (only theirs: not every
    /// connection of the host to that `ip:port`). Empty: the first of
    /// `www-data`, `apache` and `httpd` this host knows.
    pub apache_user: String,
    /// This frontend's name among the watchers sharing one database (each
    /// keeps its own place in the record of ended routes). Empty: the host
    /// name.
    pub watcher_name: String,
    pub preserve_host: bool,
    /// Left out (or empty): `.satellite.lock` beside `httpdstubfile`.
    pub lockfile: PathBuf,
    /// TCP address for serve; `None` (the default): the Unix socket.
    pub serve_listen: Option<String>,
    pub serve_workers: usize,
    pub serve_socket: PathBuf,
    /// Group given the socket (mode 0660): Apache's, when serve runs as
    /// another user.
    pub serve_socket_group: Option<String>,
    /// How long a client may take to send a whole request.
    pub serve_read_timeout_ms: u64,
    /// The secret that keys log ids (HMAC); missing file: no ids logged.
    pub logkey: PathBuf,
    pub trusted_proxies: IpMaskList,
    /// Clients that serve answers `GET /metrics` (empty: nobody). Judged
    /// on the client address, so Apache passing a browser through does
    /// not make it a loopback peer.
    pub metrics_allow: IpMaskList,
    /// Where `cron --watch` and `jobstates poll` write their counters for
    /// node_exporter's textfile collector (unset: they keep them to
    /// themselves).
    pub metrics_textfile_dir: Option<PathBuf>,
    pub client_addr_header: String,
    pub job_binding: JobBinding,
    /// Compute node name → addresses, for sites whose node names do not
    /// resolve on the proxy host (or resolve to another interface).
    pub node_addresses: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Users whose jobs may never be proxied (besides uids below
    /// `job_uid_min`).
    pub job_user_deny: Vec<String>,
    pub job_uid_min: u32,
    /// Apache's mod_status page (`?auto`) that `satellite check` reads for
    /// idle workers; empty: not checked.
    pub apache_status_url: String,
    /// Limit unknown-token answers per client address (see
    /// [`crate::ratelimit`]); false turns the limit off.
    pub unknown_token_limit: bool,
    /// Unknown-token answers an address may get at once.
    pub unknown_token_burst: u32,
    /// Unknown-token answers per second an address gets back after that.
    pub unknown_token_rate: f64,
}

pub const DEFAULT_TTL_SECS: i64 = 176_400;
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

fn words(list: &str) -> Vec<String> {
    list.split_whitespace().map(str::to_owned).collect()
}

/// The original's Slurm code lists (satconfig.pm, master).
pub fn default_wait_codes() -> Vec<String> {
    words("CF PD RF RH RQ CONFIGURING PENDING REQUEUE_FED REQUEUE_HOLD REQUEUED")
}
pub fn default_run_codes() -> Vec<String> {
    words("R RUNNING")
}
pub fn default_gone_codes() -> Vec<String> {
    words(
        "BF CA CG DL F NF OOM PR RD RV SI SE SO ST S TO BOOT_FAIL CANCELLED COMPLETING \
         COMPLETED DEADLINE FAILED NODE_FAIL NODEFAIL OUT_OF_MEMORY OUTOFMEMORY PREEMPTED \
         RESV_DEL_HOLD SIGNALING SPECIAL_EXIT STAGE_OUT STOPPED SUSPENDED TIMEOUT",
    )
}

fn loopback() -> IpMaskList {
    IpMaskList::parse(&["127.0.0.0/8", "::1/128"]).expect("constant CIDR blocks parse")
}

impl Config {
    /// Finds and loads the configuration of the running program.
    ///
    /// # Errors
    /// As [`Config::load_file`], and when the running program cannot be
    /// located.
    pub fn load() -> Result<Self> {
        let path = Self::locate()?;
        Self::load_file(&path)
    }

    /// `$SATELLITE_CONFIG`, else `../etc/satellite.toml` beside the binary's
    /// real (symlink-resolved) path.
    ///
    /// # Errors
    /// [`CoreError::Io`] when the running program cannot be located.
    pub fn locate() -> Result<PathBuf> {
        if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        let exe = std::env::current_exe()
            .and_then(|p| p.canonicalize())
            .map_err(|err| CoreError::io("locating the running program", err))?;
        let bin_dir = exe.parent().unwrap_or(Path::new("/"));
        Ok(bin_dir.join("..").join("etc").join("satellite.toml"))
    }

    /// Reads `path` with the process's `SAT_CONFIG_*` overrides.
    ///
    /// # Errors
    /// [`CoreError::Config`], naming `path`, when the file cannot be read or
    /// a value is refused.
    pub fn load_file(path: &Path) -> Result<Self> {
        let refused = |message: String| CoreError::Config {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|err| refused(err.to_string()))?;
        // Relative paths in the file must come out absolute even when the
        // file was named by a relative path: Apache and the programs run
        // from other directories.
        let absolute = std::path::absolute(path).map_err(|err| refused(err.to_string()))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        let overrides = EnvOverrides::from_process();
        let mut config = Self::from_toml(&text, base, &overrides).map_err(|err| match err {
            CoreError::ConfigValue(message) => refused(message),
            other => other,
        })?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Builds a configuration from TOML text; relative paths resolve
    /// against `base`.
    ///
    /// # Errors
    /// [`CoreError::ConfigValue`] for text that is not TOML, an unknown key,
    /// or a value that is refused.
    pub fn from_toml(text: &str, base: &Path, env: &EnvOverrides) -> Result<Self> {
        let mut config: Config =
            toml::from_str(text).map_err(|err| CoreError::ConfigValue(err.to_string()))?;
        env.apply(&mut config)?;
        config.extbasename = config.extbasename.to_ascii_lowercase();
        config.resolve_paths(base);
        config.check_names()?;
        config.check_numbers()?;
        config.check_commands()?;
        config.check_apache_values()?;
        config.check_database_url()?;
        Ok(config)
    }

    /// What a key left out of the file means. Paths are relative to the
    /// file's directory, as in the install tree `satellite init` makes.
    fn file_defaults() -> Self {
        Config {
            source: None,
            extbasename: "localhost".into(),
            tgtipmask: loopback(),
            jobstateipmask: loopback(),
            ttl_secs: DEFAULT_TTL_SECS,
            extport: 443,
            listenport: 443,
            dbfile: "../var/state.sqlite".into(),
            database_url: None,
            httpdstubfile: "../dynconf/proxyconf.conf".into(),
            htmldir: "../html".into(),
            wordlist: "../var/eff_large_wordlist.txt".into(),
            words_per_token: 3,
            job_wait_state_codes: default_wait_codes(),
            job_run_state_codes: default_run_codes(),
            job_gone_state_codes: default_gone_codes(),
            legacy_status_200: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            busy_timeout_ms: 5000,
            syslog_socket: "/dev/log".into(),
            routing: Routing::Map,
            obsolete_mapfile: None,
            obsolete_map_format: None,
            apache_configtest: vec!["/usr/sbin/apachectl".into(), "-t".into()],
            apache_reload: None,
            apache_pidfile: "/var/run/apache2/apache2.pid".into(),
            apache_lookup_failures_log: "/var/log/apache2/satellite_lookup_failures.log".into(),
            apache_user: String::new(),
            watcher_name: String::new(),
            preserve_host: false,
            lockfile: PathBuf::new(),
            serve_listen: None,
            serve_workers: 8,
            serve_socket: "/run/satellite/serve.sock".into(),
            serve_socket_group: None,
            serve_read_timeout_ms: 10_000,
            logkey: "../etc/logkey".into(),
            trusted_proxies: IpMaskList::parse::<&str>(&[]).expect("an empty list parses"),
            metrics_allow: IpMaskList::parse::<&str>(&[]).expect("an empty list parses"),
            metrics_textfile_dir: None,
            client_addr_header: "X-Satellite-Client-Addr".into(),
            job_binding: JobBinding::Warn,
            node_addresses: std::collections::BTreeMap::new(),
            job_user_deny: vec!["root".into()],
            job_uid_min: 1000,
            apache_status_url: "http://127.0.0.1/server-status?auto".into(),
            unknown_token_limit: true,
            unknown_token_burst: 20,
            unknown_token_rate: 2.0,
        }
    }

    /// The uid of Apache's workers ([`Config::apache_user`]), whose
    /// tunnels `cron --watch` cuts.
    pub fn apache_uid(&self) -> std::result::Result<u32, String> {
        let named = self.apache_user.trim();
        if !named.is_empty() {
            if let Ok(uid) = named.parse::<u32>() {
                return Ok(uid);
            }
            return match nix::unistd::User::from_name(named) {
                Ok(Some(user)) => Ok(user.uid.as_raw()),
                Ok(None) => Err(format!(
                    "apache_user `{}` is not a user of this host",
                    named.escape_debug()
                )),
                Err(e) => Err(format!(
                    "looking up apache_user `{}`: {e}",
                    named.escape_debug()
                )),
            };
        }
        ["www-data", "apache", "httpd"]
            .into_iter()
            .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
            .map(|user| user.uid.as_raw())
            .ok_or_else(|| {
                "none of www-data, apache and httpd is a user here: set apache_user to the user Apache's workers run as".into()
            })
    }

    /// This frontend's watcher name ([`Config::watcher_name`], else the
    /// host name).
    pub fn watcher_name(&self) -> String {
        let named = self.watcher_name.trim();
        if !named.is_empty() {
            return named.to_owned();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }

    /// Relative paths against `base`; the lock beside the Apache include
    /// unless named.
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if !path.as_os_str().is_empty() && !path.is_absolute() {
                *path = normalize(&base.join(&path));
            }
        };
        for path in [
            &mut self.dbfile,
            &mut self.httpdstubfile,
            &mut self.htmldir,
            &mut self.wordlist,
            &mut self.syslog_socket,
            &mut self.apache_pidfile,
            &mut self.apache_lookup_failures_log,
            &mut self.lockfile,
            &mut self.serve_socket,
            &mut self.logkey,
        ] {
            resolve(path);
        }
        self.serve_listen = self.serve_listen.take().filter(|l| !l.is_empty());
        self.database_url = self
            .database_url
            .take()
            .filter(|url| !url.trim().is_empty());
        if let Some(dir) = self.metrics_textfile_dir.as_mut() {
            resolve(dir);
        }
        self.serve_read_timeout_ms = self.serve_read_timeout_ms.max(1);
        let dynconf = self
            .httpdstubfile
            .parent()
            .unwrap_or(Path::new("."))
            .to_owned();
        if self.lockfile.as_os_str().is_empty() {
            self.lockfile = dynconf.join(".satellite.lock");
        }
    }

    fn check_names(&self) -> Result<()> {
        let extbasename = &self.extbasename;
        if !is_valid_hostname(extbasename) {
            return Err(refused(format!(
                "extbasename `{}` is not a host name (letters, digits, `-`, dots)",
                extbasename.escape_debug()
            )));
        }
        let header = &self.client_addr_header;
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err(refused(format!(
                "client_addr_header `{}` is not a header name",
                header.escape_debug()
            )));
        }
        Ok(())
    }

    fn check_numbers(&self) -> Result<()> {
        if self.ttl_secs <= 0 {
            return Err(refused(format!(
                "ttl_secs must be positive, not {}",
                self.ttl_secs
            )));
        }
        if self.extport == 0 || self.listenport == 0 {
            return Err(refused("extport and listenport must be 1-65535".into()));
        }
        if !(2..=6).contains(&self.words_per_token) {
            return Err(refused(format!(
                "words_per_token must be 2 to 6 (a token must fit a {MAX_LABEL_LEN}-character DNS label), not {}",
                self.words_per_token
            )));
        }
        if self.unknown_token_burst == 0 {
            return Err(refused(
                "unknown_token_burst must be at least 1 (turn the limit off with unknown_token_limit = false)".into(),
            ));
        }
        if !(self.unknown_token_rate.is_finite() && self.unknown_token_rate >= 0.0) {
            return Err(refused(format!(
                "unknown_token_rate must be a number of answers per second, 0 or more, not {}",
                self.unknown_token_rate
            )));
        }
        if !(1..=1024).contains(&self.serve_workers) {
            return Err(refused("serve_workers must be 1 to 1024".into()));
        }
        Ok(())
    }

    fn check_commands(&self) -> Result<()> {
        if self.apache_configtest.is_empty() {
            return Err(refused("apache_configtest must name a command".into()));
        }
        if self.apache_reload.as_ref().is_some_and(Vec::is_empty) {
            return Err(refused(
                "apache_reload must name a command (or be left out)".into(),
            ));
        }
        Ok(())
    }

    /// The values cron and the admin command write into Apache's
    /// configuration (the vhost renderer: `extbasename`, `listenport`,
    /// `htmldir`) must not be able to end the quoted argument they are
    /// written in, start a new line (a new directive), or mean something
    /// else to Apache than to us. `extbasename` is a host name and the port
    /// a number by now; the directory is checked here.
    fn check_apache_values(&self) -> Result<()> {
        apache_path("htmldir", &self.htmldir)
    }

    /// A `database_url` must be one PostgreSQL reads: a URL of its schemes
    /// or a `key=value` string, with the keys and values the client knows.
    /// The error never repeats the value (it may hold a password).
    fn check_database_url(&self) -> Result<()> {
        let Some(url) = self.database_url.as_deref() else {
            return Ok(());
        };
        let url = url.trim();
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !is_url && !url.contains('=') {
            return Err(refused(
                "database_url must be a postgres:// or postgresql:// URL or a `key=value` string (host=... dbname=...)".into(),
            ));
        }
        if let Err(err) = url.parse::<postgres::Config>() {
            return Err(refused(format!("database_url cannot be used: {err}")));
        }
        Ok(())
    }
}

fn refused(message: String) -> CoreError {
    CoreError::ConfigValue(message)
}

/// A directory Apache is given in a quoted argument: absolute (Apache would
/// take a relative one against its ServerRoot), valid UTF-8 (the rendered
/// text must be the path), and without what a quoted argument cannot hold
/// or Apache would read specially: `"` and `\` end or escape the quoting,
/// control characters (newlines above all) end the directive, and `${`
/// starts one of Apache's variables.
fn apache_path(key: &str, path: &Path) -> Result<()> {
    let shown = path.display().to_string().escape_debug().to_string();
    let Some(text) = path.to_str() else {
        return Err(refused(format!("{key} `{shown}` is not valid UTF-8")));
    };
    if !path.is_absolute() {
        return Err(refused(format!(
            "{key} `{shown}` must be an absolute path (Apache would take it relative to its ServerRoot)"
        )));
    }
    let what = if text.chars().any(char::is_control) {
        Some("a control character (a newline ends an Apache directive)")
    } else if text.contains('"') {
        Some("`\"`")
    } else if text.contains('\\') {
        Some("`\\`")
    } else if text.contains("${") {
        Some("`${` (Apache would expand it as a variable)")
    } else {
        None
    };
    match what {
        Some(what) => Err(refused(format!(
            "{key} `{shown}` holds {what}, which cannot be written into Apache's configuration"
        ))),
        None => Ok(()),
    }
}

impl Config {
    /// The origin a browser reports for pages of `alias`:
    /// `https://<alias>.<extbasename>` plus `:<extport>` when not 443.
    pub fn alias_origin(&self, alias: &str) -> String {
        let mut origin = format!("https://{alias}.{}", self.extbasename);
        if self.extport != 443 {
            origin.push_str(&format!(":{}", self.extport));
        }
        origin
    }
}

/// `/srv/satellite/etc/../var` → `/srv/satellite/var`, without touching the
/// file system (the path may not exist yet), so messages and the Apache
/// config name paths as people write them.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A DNS name Apache may safely be given: dot-separated labels of
/// `[a-z0-9-]`, none starting or ending with `-`.
pub fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// The `SAT_CONFIG_*` variables of the container build, which win over the
/// file.
#[derive(Clone, Debug, Default)]
pub struct EnvOverrides {
    vars: Vec<(&'static str, OsString)>,
}

const OVERRIDE_NAMES: [&str; 8] = [
    "SAT_CONFIG_EXTBASENAME",
    "SAT_CONFIG_TGTIPMASK",
    "SAT_CONFIG_JOBSTATEIPMASK",
    "SAT_CONFIG_EXTPORT",
    "SAT_CONFIG_LISTENPORT",
    "SAT_CONFIG_TTL_SECS",
    "SAT_CONFIG_DBFILE",
    "SAT_CONFIG_HTTPDSTUBFILE",
];

impl EnvOverrides {
    pub fn from_process() -> Self {
        let vars = OVERRIDE_NAMES
            .iter()
            .filter_map(|name| std::env::var_os(name).map(|value| (*name, value)))
            .collect();
        EnvOverrides { vars }
    }

    pub fn none() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &'static str, value: &str) -> Self {
        self.vars.push((name, value.into()));
        self
    }

    fn apply(&self, config: &mut Config) -> Result<()> {
        for (name, value) in &self.vars {
            let text = value
                .to_str()
                .ok_or_else(|| CoreError::ConfigValue(format!("{name} is not valid UTF-8")))?;
            let number = |what: &str| -> Result<i64> {
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| CoreError::ConfigValue(format!("{name}=`{text}` is not {what}")))
            };
            let port = || -> Result<u16> {
                u16::try_from(number("a port")?)
                    .map_err(|_| CoreError::ConfigValue(format!("{name}=`{text}` is not a port")))
            };
            let masks = |key: &str| -> Result<IpMaskList> {
                IpMaskList::parse_words(text)
                    .map_err(|msg| CoreError::ConfigValue(format!("{key} ({name}): {msg}")))
            };
            match *name {
                "SAT_CONFIG_EXTBASENAME" => config.extbasename = text.trim().to_owned(),
                "SAT_CONFIG_TGTIPMASK" => config.tgtipmask = masks("tgtipmask")?,
                "SAT_CONFIG_JOBSTATEIPMASK" => config.jobstateipmask = masks("jobstateipmask")?,
                "SAT_CONFIG_EXTPORT" => config.extport = port()?,
                "SAT_CONFIG_LISTENPORT" => config.listenport = port()?,
                "SAT_CONFIG_TTL_SECS" => config.ttl_secs = number("a number of seconds")?,
                "SAT_CONFIG_DBFILE" => config.dbfile = PathBuf::from(text),
                "SAT_CONFIG_HTTPDSTUBFILE" => config.httpdstubfile = PathBuf::from(text),
                _ => unreachable!("only names from OVERRIDE_NAMES are collected"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config> {
        Config::from_toml(text, Path::new("/srv/satellite/etc"), &EnvOverrides::none())
    }

    #[test]
    fn defaults_resolve_beside_the_file() {
        let config = load("").unwrap();
        assert_eq!(config.ttl_secs, 176_400);
        assert_eq!(config.dbfile, Path::new("/srv/satellite/var/state.sqlite"));
        assert_eq!(config.routing, Routing::Map);
        assert_eq!(config.job_binding, JobBinding::Warn);
        assert!(config
            .job_gone_state_codes
            .contains(&"OUT_OF_MEMORY".to_string()));
    }

    #[test]
    fn the_unknown_token_limit_is_on_by_default_and_checked() {
        let config = load("").unwrap();
        assert_eq!(
            (
                config.words_per_token,
                config.unknown_token_limit,
                config.unknown_token_burst,
                config.unknown_token_rate
            ),
            (3, true, 20, 2.0)
        );
        assert_eq!(
            load("unknown_token_rate = 1").unwrap().unknown_token_rate,
            1.0
        );
        assert_eq!(
            load("unknown_token_rate = 0").unwrap().unknown_token_rate,
            0.0
        );
        for (text, message) in [
            (
                "unknown_token_burst = 0",
                "configuration: unknown_token_burst must be at least 1 (turn the limit off with unknown_token_limit = false)",
            ),
            (
                "unknown_token_rate = -1.5",
                "configuration: unknown_token_rate must be a number of answers per second, 0 or more, not -1.5",
            ),
            (
                "unknown_token_rate = nan",
                "configuration: unknown_token_rate must be a number of answers per second, 0 or more, not NaN",
            ),
            (
                "unknown_token_rate = inf",
                "configuration: unknown_token_rate must be a number of answers per second, 0 or more, not inf",
            ),
        ] {
            assert_eq!(load(text).unwrap_err().to_string(), message, "{text}");
        }
    }

    #[test]
    fn cidr_with_host_bits_is_a_clear_error() {
        let err = load(r#"tgtipmask = ["10.1.1.1/24"]"#)
            .unwrap_err()
            .to_string();
        // toml shows the line, so the key is named where it is written.
        assert_eq!(
            err,
            "configuration: TOML parse error at line 1, column 13\n  |\n\
             1 | tgtipmask = [\"10.1.1.1/24\"]\n  |             ^^^^^^^^^^^^^^^\n\
             `10.1.1.1/24` has host bits set; did you mean `10.1.1.0/24`?\n"
        );
        let env = EnvOverrides::none().with("SAT_CONFIG_TGTIPMASK", "10.1.1.1/24");
        let err = Config::from_toml("", Path::new("/etc"), &env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration: tgtipmask (SAT_CONFIG_TGTIPMASK): `10.1.1.1/24` has host bits set; did you mean `10.1.1.0/24`?"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = load("ttl = 5").unwrap_err().to_string();
        assert!(err.contains("unknown field `ttl`"), "{err}");
    }

    #[test]
    fn environment_wins_over_the_file() {
        let env = EnvOverrides::none()
            .with("SAT_CONFIG_TGTIPMASK", "10.0.0.0/8 192.168.1.7/32")
            .with("SAT_CONFIG_EXTPORT", "8443")
            .with("SAT_CONFIG_EXTBASENAME", "Apples.SDSC.edu");
        let config = Config::from_toml("extport = 443", Path::new("/etc"), &env).unwrap();
        assert_eq!(config.tgtipmask.to_string(), "10.0.0.0/8 192.168.1.7/32");
        assert_eq!(config.extport, 8443);
        assert_eq!(
            config.alias_origin("a-b-c"),
            "https://a-b-c.apples.sdsc.edu:8443"
        );
        let env = EnvOverrides::none().with("SAT_CONFIG_EXTPORT", "http");
        assert!(Config::from_toml("", Path::new("/etc"), &env).is_err());
    }

    #[test]
    fn database_url_is_postgres_or_left_out() {
        assert_eq!(load("").unwrap().database_url, None);
        assert_eq!(load(r#"database_url = " ""#).unwrap().database_url, None);
        for good in [
            "postgresql://satellite@db.example.org/satellite",
            "postgres://%2Frun%2Fpostgresql/satellite",
            "host=/run/postgresql dbname=satellite user=satellite",
        ] {
            let config = load(&format!("database_url = \"{good}\"")).unwrap();
            assert_eq!(config.database_url.as_deref(), Some(good));
        }
        for bad in [
            "mysql://db/satellite",
            "/var/lib/satellite/state.sqlite",
            "host=/run/postgresql nonsense_key=1",
        ] {
            let err = load(&format!("database_url = \"{bad}\"")).unwrap_err();
            assert!(err.to_string().contains("database_url"), "{err}");
        }
        // The value is never repeated: it may hold a password.
        let err = load(r#"database_url = "postgresql://u:sekrit@h/d?bogus=1""#).unwrap_err();
        assert!(!err.to_string().contains("sekrit"), "{err}");
    }

    #[test]
    fn extbasename_must_be_a_host_name() {
        assert!(load(r#"extbasename = "evil.org\nInclude /etc/shadow""#).is_err());
        assert!(load(r#"extbasename = "*.org""#).is_err());
    }

    #[test]
    fn values_written_into_apache_cannot_end_their_quotes_or_start_a_directive() {
        let htmldir_holds = |value: &str, what: &str| {
            format!(
                "configuration: htmldir `{value}` holds {what}, which cannot be written into Apache's configuration"
            )
        };
        let control = "a control character (a newline ends an Apache directive)";
        // (the TOML text, the base it resolves against, the error or None)
        let table: Vec<(&str, &str, Option<String>)> = vec![
            (r#"htmldir = "/srv/html""#, "/etc", None),
            (r#"htmldir = "/srv/my html""#, "/etc", None),
            (r#"htmldir = "../html""#, "/srv/satellite/etc", None),
            (
                r#"htmldir = "/srv/html\"\nInclude /etc/shadow\n#""#,
                "/etc",
                Some(htmldir_holds(r#"/srv/html\"\nInclude /etc/shadow\n#"#, control)),
            ),
            (
                r#"htmldir = "/srv/html\nInclude /etc/shadow""#,
                "/etc",
                Some(htmldir_holds(r"/srv/html\nInclude /etc/shadow", control)),
            ),
            (
                r#"htmldir = "/srv/html\r</VirtualHost>""#,
                "/etc",
                Some(htmldir_holds(r"/srv/html\r</VirtualHost>", control)),
            ),
            (
                r#"htmldir = "/srv/ht\tml""#,
                "/etc",
                Some(htmldir_holds(r"/srv/ht\tml", control)),
            ),
            (
                r#"htmldir = "/srv/html\u0000""#,
                "/etc",
                Some(htmldir_holds(r"/srv/html\0", control)),
            ),
            (
                r#"htmldir = "/srv/html\" \"/etc""#,
                "/etc",
                Some(htmldir_holds(r#"/srv/html\" \"/etc"#, "`\"`")),
            ),
            (
                r#"htmldir = "/srv/html\\""#,
                "/etc",
                Some(htmldir_holds(r"/srv/html\\", "`\\`")),
            ),
            (
                r#"htmldir = "/srv/${APACHE_RUN_DIR}/html""#,
                "/etc",
                Some(htmldir_holds(
                    "/srv/${APACHE_RUN_DIR}/html",
                    "`${` (Apache would expand it as a variable)",
                )),
            ),
            (
                r#"htmldir = "html""#,
                "etc",
                Some(
                    "configuration: htmldir `etc/html` must be an absolute path (Apache would take it relative to its ServerRoot)"
                        .to_owned(),
                ),
            ),
            (
                r#"extbasename = "evil.org\"\nInclude /etc/shadow\n#""#,
                "/etc",
                Some(
                    r#"configuration: extbasename `evil.org\"\ninclude /etc/shadow\n#` is not a host name (letters, digits, `-`, dots)"#
                        .to_owned(),
                ),
            ),
            (
                r#"extbasename = "evil.org example.org""#,
                "/etc",
                Some(
                    "configuration: extbasename `evil.org example.org` is not a host name (letters, digits, `-`, dots)"
                        .to_owned(),
                ),
            ),
            (
                "listenport = 0",
                "/etc",
                Some("configuration: extport and listenport must be 1-65535".to_owned()),
            ),
        ];
        for (text, base, expected) in table {
            let result = Config::from_toml(text, Path::new(base), &EnvOverrides::none());
            match (result, expected) {
                (Ok(_), None) => {}
                (Err(err), Some(expected)) => assert_eq!(err.to_string(), expected, "{text}"),
                (result, expected) => panic!("{text}: got {result:?}, expected {expected:?}"),
            }
        }
        // A quoted port or a directive in a port is not a number at all.
        assert!(load("listenport = \"443\\nInclude /etc/shadow\"").is_err());
        let env = EnvOverrides::none().with("SAT_CONFIG_EXTBASENAME", "evil.org\nInclude x");
        assert!(Config::from_toml("", Path::new("/etc"), &env).is_err());
    }

    #[test]
    fn a_file_named_by_a_relative_path_still_gives_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/satellite.toml"), "").unwrap();
        let cwd = std::env::current_dir().unwrap();
        let relative = pathdiff(dir.path(), &cwd).join("etc/satellite.toml");
        assert!(relative.is_relative());
        let config = Config::load_file(&relative).unwrap();
        assert_eq!(config.htmldir, dir.path().join("html"));
        assert_eq!(config.dbfile, dir.path().join("var/state.sqlite"));
        assert_eq!(config.lockfile, dir.path().join("dynconf/.satellite.lock"));
    }

    /// `to` relative to `from` (both absolute), by `..` steps.
    fn pathdiff(to: &Path, from: &Path) -> PathBuf {
        let to: Vec<_> = to.components().collect();
        let from: Vec<_> = from.components().collect();
        let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
        let mut out = PathBuf::new();
        for _ in common..from.len() {
            out.push("..");
        }
        for part in &to[common..] {
            out.push(part);
        }
        out
    }

    #[test]
    fn the_lock_defaults_to_beside_the_apache_include() {
        let config = load(r#"httpdstubfile = "/srv/dyn/proxyconf.conf""#).unwrap();
        assert_eq!(config.lockfile, Path::new("/srv/dyn/.satellite.lock"));
    }

    #[test]
    fn the_keys_of_map_files_still_load_and_node_addresses_must_be_addresses() {
        let config = load("mapfile = \"routes.txt\"\nmap_format = \"dbm\"").unwrap();
        assert_eq!(config.obsolete_map_format.as_deref(), Some("dbm"));
        let config =
            load("job_binding = \"enforce\"\n[node_addresses]\nn1 = [\"10.0.0.1\"]").unwrap();
        assert_eq!(config.job_binding, JobBinding::Enforce);
        assert_eq!(
            config.node_addresses["n1"],
            vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(load("[node_addresses]\nn1 = [\"node-one\"]").is_err());
    }
}
