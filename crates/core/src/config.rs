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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapFormat {
    Txt,
    Dbm,
}

/// The file as written: every key optional, unknown keys refused so that a
/// typo is an error instead of a silently ignored setting.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    extbasename: Option<String>,
    tgtipmask: Option<Vec<String>>,
    jobstateipmask: Option<Vec<String>>,
    ttl_secs: Option<i64>,
    extport: Option<u16>,
    listenport: Option<u16>,
    dbfile: Option<PathBuf>,
    httpdstubfile: Option<PathBuf>,
    htmldir: Option<PathBuf>,
    wordlist: Option<PathBuf>,
    words_per_token: Option<usize>,
    job_wait_state_codes: Option<Vec<String>>,
    job_run_state_codes: Option<Vec<String>>,
    job_gone_state_codes: Option<Vec<String>>,
    legacy_status_200: Option<bool>,
    max_body_bytes: Option<usize>,
    busy_timeout_ms: Option<u64>,
    syslog_socket: Option<PathBuf>,
    routing: Option<Routing>,
    mapfile: Option<PathBuf>,
    map_format: Option<MapFormat>,
    apache_configtest: Option<Vec<String>>,
    apache_reload: Option<Vec<String>>,
    apache_pidfile: Option<PathBuf>,
    preserve_host: Option<bool>,
    lockfile: Option<PathBuf>,
    serve_listen: Option<String>,
    serve_workers: Option<usize>,
    serve_socket: Option<PathBuf>,
    serve_socket_group: Option<String>,
    serve_read_timeout_ms: Option<u64>,
    logkey: Option<PathBuf>,
    trusted_proxies: Option<Vec<String>>,
    client_addr_header: Option<String>,
}

/// The resolved configuration every program works from.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the settings came from (for messages), if from a file.
    pub source: Option<PathBuf>,
    pub extbasename: String,
    pub tgtipmask: IpMaskList,
    pub jobstateipmask: IpMaskList,
    pub ttl_secs: i64,
    pub extport: u16,
    pub listenport: u16,
    pub dbfile: PathBuf,
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
    pub mapfile: PathBuf,
    pub map_format: MapFormat,
    pub apache_configtest: Vec<String>,
    pub apache_reload: Option<Vec<String>>,
    pub apache_pidfile: PathBuf,
    pub preserve_host: bool,
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
    pub client_addr_header: String,
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

impl Config {
    /// Finds and loads the configuration of the running program.
    pub fn load() -> Result<Self> {
        let path = Self::locate()?;
        Self::load_file(&path)
    }

    /// `$SATELLITE_CONFIG`, else `../etc/satellite.toml` beside the binary's
    /// real (symlink-resolved) path.
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

    pub fn load_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| CoreError::Config {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let overrides = EnvOverrides::from_process();
        Self::from_toml(&text, base, &overrides)
            .map(|mut config| {
                config.source = Some(path.to_owned());
                config
            })
            .map_err(|err| match err {
                CoreError::ConfigValue(message) => CoreError::Config {
                    path: path.to_owned(),
                    message,
                },
                other => other,
            })
    }

    /// Builds a configuration from TOML text; relative paths resolve
    /// against `base`.
    pub fn from_toml(text: &str, base: &Path, env: &EnvOverrides) -> Result<Self> {
        let mut raw: RawConfig =
            toml::from_str(text).map_err(|err| CoreError::ConfigValue(err.to_string()))?;
        env.apply(&mut raw)?;
        Self::resolve(raw, base)
    }

    fn resolve(raw: RawConfig, base: &Path) -> Result<Self> {
        let bad = |msg: String| CoreError::ConfigValue(msg);
        let path = |p: Option<PathBuf>, default: &str| -> PathBuf {
            let p = p.unwrap_or_else(|| PathBuf::from(default));
            if p.as_os_str().is_empty() || p.is_absolute() {
                p
            } else {
                normalize(&base.join(p))
            }
        };

        let extbasename = raw
            .extbasename
            .unwrap_or_else(|| "localhost".to_owned())
            .to_ascii_lowercase();
        if !is_valid_hostname(&extbasename) {
            return Err(bad(format!(
                "extbasename `{extbasename}` is not a host name (letters, digits, `-`, dots)"
            )));
        }
        let masks = |key: &str, list: Option<Vec<String>>| -> Result<IpMaskList> {
            let list = list.unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]);
            IpMaskList::parse(&list).map_err(|msg| bad(format!("{key}: {msg}")))
        };
        let tgtipmask = masks("tgtipmask", raw.tgtipmask)?;
        let jobstateipmask = masks("jobstateipmask", raw.jobstateipmask)?;
        let trusted_proxies = IpMaskList::parse(&raw.trusted_proxies.unwrap_or_default())
            .map_err(|msg| bad(format!("trusted_proxies: {msg}")))?;

        let ttl_secs = raw.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
        if ttl_secs <= 0 {
            return Err(bad(format!("ttl_secs must be positive, not {ttl_secs}")));
        }
        let extport = raw.extport.unwrap_or(443);
        let listenport = raw.listenport.unwrap_or(443);
        if extport == 0 || listenport == 0 {
            return Err(bad("extport and listenport must be 1-65535".into()));
        }
        let words_per_token = raw.words_per_token.unwrap_or(3);
        if !(2..=6).contains(&words_per_token) {
            return Err(bad(format!(
                "words_per_token must be 2 to 6 (a token must fit a {MAX_LABEL_LEN}-character DNS label), not {words_per_token}"
            )));
        }
        let httpdstubfile = path(raw.httpdstubfile, "../dynconf/proxyconf.conf");
        let mapfile = match raw.mapfile {
            Some(p) => path(Some(p), ""),
            None => httpdstubfile
                .parent()
                .unwrap_or(Path::new("."))
                .join("routes.map"),
        };
        let lockfile = match raw.lockfile {
            Some(p) => path(Some(p), ""),
            None => httpdstubfile
                .parent()
                .unwrap_or(Path::new("."))
                .join(".satellite.lock"),
        };
        let apache_configtest = raw
            .apache_configtest
            .unwrap_or_else(|| vec!["/usr/sbin/apachectl".into(), "-t".into()]);
        if apache_configtest.is_empty() {
            return Err(bad("apache_configtest must name a command".into()));
        }
        if raw.apache_reload.as_ref().is_some_and(Vec::is_empty) {
            return Err(bad(
                "apache_reload must name a command (or be left out)".into()
            ));
        }
        let client_addr_header = raw
            .client_addr_header
            .unwrap_or_else(|| "X-Satellite-Client-Addr".into());
        if http::HeaderName::from_bytes(client_addr_header.as_bytes()).is_err() {
            return Err(bad(format!(
                "client_addr_header `{client_addr_header}` is not a header name"
            )));
        }
        let serve_workers = raw.serve_workers.unwrap_or(8);
        if !(1..=1024).contains(&serve_workers) {
            return Err(bad("serve_workers must be 1 to 1024".into()));
        }

        Ok(Config {
            source: None,
            extbasename,
            tgtipmask,
            jobstateipmask,
            ttl_secs,
            extport,
            listenport,
            dbfile: path(raw.dbfile, "../var/state.sqlite"),
            httpdstubfile,
            htmldir: path(raw.htmldir, "../html"),
            wordlist: path(raw.wordlist, "../var/eff_large_wordlist.txt"),
            words_per_token,
            job_wait_state_codes: raw.job_wait_state_codes.unwrap_or_else(default_wait_codes),
            job_run_state_codes: raw.job_run_state_codes.unwrap_or_else(default_run_codes),
            job_gone_state_codes: raw.job_gone_state_codes.unwrap_or_else(default_gone_codes),
            legacy_status_200: raw.legacy_status_200.unwrap_or(false),
            max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            busy_timeout_ms: raw.busy_timeout_ms.unwrap_or(5000),
            syslog_socket: path(raw.syslog_socket, "/dev/log"),
            routing: raw.routing.unwrap_or(Routing::Map),
            mapfile,
            map_format: raw.map_format.unwrap_or(MapFormat::Txt),
            apache_configtest,
            apache_reload: raw.apache_reload,
            apache_pidfile: path(raw.apache_pidfile, "/var/run/apache2/apache2.pid"),
            preserve_host: raw.preserve_host.unwrap_or(false),
            lockfile,
            serve_listen: raw.serve_listen.filter(|l| !l.is_empty()),
            serve_workers,
            serve_socket: path(raw.serve_socket, "/run/satellite/serve.sock"),
            serve_socket_group: raw.serve_socket_group,
            serve_read_timeout_ms: raw.serve_read_timeout_ms.unwrap_or(10_000).max(1),
            logkey: path(raw.logkey, "../etc/logkey"),
            trusted_proxies,
            client_addr_header,
        })
    }

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

    fn apply(&self, raw: &mut RawConfig) -> Result<()> {
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
            match *name {
                "SAT_CONFIG_EXTBASENAME" => raw.extbasename = Some(text.trim().to_owned()),
                "SAT_CONFIG_TGTIPMASK" => raw.tgtipmask = Some(words(text)),
                "SAT_CONFIG_JOBSTATEIPMASK" => raw.jobstateipmask = Some(words(text)),
                "SAT_CONFIG_EXTPORT" => raw.extport = Some(port()?),
                "SAT_CONFIG_LISTENPORT" => raw.listenport = Some(port()?),
                "SAT_CONFIG_TTL_SECS" => raw.ttl_secs = Some(number("a number of seconds")?),
                "SAT_CONFIG_DBFILE" => raw.dbfile = Some(PathBuf::from(text)),
                "SAT_CONFIG_HTTPDSTUBFILE" => raw.httpdstubfile = Some(PathBuf::from(text)),
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
        assert_eq!(
            config.mapfile,
            Path::new("/srv/satellite/dynconf/routes.map")
        );
        assert_eq!(config.routing, Routing::Map);
        assert!(config
            .job_gone_state_codes
            .contains(&"OUT_OF_MEMORY".to_string()));
    }

    #[test]
    fn cidr_with_host_bits_is_a_clear_error() {
        let err = load(r#"tgtipmask = ["10.1.1.1/24"]"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "configuration: tgtipmask: `10.1.1.1/24` has host bits set; did you mean `10.1.1.0/24`?"
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
    fn extbasename_must_be_a_host_name() {
        assert!(load(r#"extbasename = "evil.org\nInclude /etc/shadow""#).is_err());
        assert!(load(r#"extbasename = "*.org""#).is_err());
    }
}
