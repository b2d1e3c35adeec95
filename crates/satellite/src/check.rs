//! `satellite check`: a doctor for a deployment. Each line is OK, WARN or
//! FAIL, and every WARN or FAIL says how to fix it.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use satellite_core::config::Routing;
use satellite_core::store::SCHEMA_VERSION;
use satellite_core::token::Wordlist;
use satellite_core::Config;

use crate::subprocess::OutputWithin;

/// Apache's config test reads every included file and certificate.
const CONFIGTEST_TIMEOUT: Duration = Duration::from_secs(60);
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(20);
/// `sudo -n -l`: never a prompt, but a slow directory service.
const SUDO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

pub struct Finding {
    pub level: Level,
    pub what: String,
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        write!(f, "{level} {}", self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n     fix: {fix}")?;
        }
        Ok(())
    }
}

impl Level {
    /// The name `--json` gives the level: "ok", "warn" or "fail".
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// `check --json`: an object with `ok` (false when anything failed) and
/// `findings`, each with `level`, `what` and `fix` (null when none).
pub fn to_json(findings: &[Finding]) -> String {
    let list: Vec<serde_json::Value> = findings
        .iter()
        .map(|f| {
            serde_json::json!({
                "level": f.level.name(),
                "what": f.what,
                "fix": f.fix,
            })
        })
        .collect();
    let object = serde_json::json!({
        "ok": !findings.iter().any(|f| f.level == Level::Fail),
        "findings": list,
    });
    serde_json::to_string_pretty(&object).unwrap_or_default() + "\n"
}

pub(crate) fn ok(what: impl Into<String>) -> Finding {
    Finding {
        level: Level::Ok,
        what: what.into(),
        fix: None,
    }
}

pub(crate) fn warn(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Warn,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

pub(crate) fn fail(what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level: Level::Fail,
        what: what.into(),
        fix: Some(fix.into()),
    }
}

/// Every check; `config` is the result of loading the configuration.
pub fn check(
    config: Result<Config, String>,
    cert: Option<&Path>,
    live: Option<&crate::live::LiveOptions>,
) -> Vec<Finding> {
    let config = match config {
        Ok(config) => config,
        Err(err) => {
            // The error names the file ("configuration file X: ...").
            return vec![fail(
                err,
                "correct the file (every key is described in the installed etc/satellite.toml)",
            )];
        }
    };
    let mut findings = vec![ok(format!(
        "configuration {} loads (extbasename {})",
        config
            .source
            .as_ref()
            .map_or("?".into(), |p| p.display().to_string()),
        config.extbasename
    ))];
    findings.push(check_database(&config));
    findings.push(check_wordlist(&config));
    if let Some(finding) = check_token_length(&config) {
        findings.push(finding);
    }
    findings.extend(check_files(&config));
    findings.push(check_configtest(&config));
    if let Some(finding) = check_waiting_limit(&config) {
        findings.push(finding);
    }
    let defines = apache_defines(&config);
    findings.extend(check_apache_run_config(&config, defines.as_ref()));
    findings.push(check_reload(&config));
    findings.extend(check_tunnel_cutting(&config));
    findings.extend(check_watchers(&config));
    findings.push(check_certificate(&config, cert));
    findings.extend(check_serve_listen(&config));
    findings.push(check_log_key(&config));
    findings.push(check_syslog(&config));
    if let Some(finding) = check_apache_workers(&config.apache_status_url) {
        findings.push(finding);
    }
    if let Some(options) = live {
        findings.extend(crate::live::check_live(&config, defines.as_ref(), options));
    }
    findings
}

/// `cron --watch` cuts the open tunnels of Apache's workers (their user)
/// when a route ends, over sock_diag netlink: say whether this host allows
/// it, as this process (root, or the watcher's user with CAP_NET_ADMIN).
fn check_tunnel_cutting(config: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    match config.apache_uid() {
        Ok(uid) => findings.push(ok(format!(
            "cron --watch cuts the tunnels of Apache's workers (uid {uid}) when a route ends"
        ))),
        Err(why) => findings.push(fail(
            format!("{why}; cron --watch will not start"),
            "set apache_user in the configuration to the User of Apache's configuration",
        )),
    }
    match satellite_core::tunnels::probe() {
        Ok(()) => findings.push(ok(
            "open tunnels of ended sessions can be cut here (sock_diag destroy works for this process)",
        )),
        Err(err) => findings.push(warn(
            format!("this process cannot cut open tunnels: {err}; where cron --watch cannot either, an ended session keeps its open websockets until they close"),
            "run cron --watch with CAP_NET_ADMIN (the shipped satellite-cron.service grants it) on a kernel built with CONFIG_INET_DIAG_DESTROY (Debian's, RHEL's), and run this check as root",
        )),
    }
    findings
}

/// A watcher not heard of for this long is reported as down (it beats
/// every 10 s).
const WATCHER_SILENT_SECS: i64 = 60;

/// Every frontend's `cron --watch` records a heartbeat in the store.
fn check_watchers(config: &Config) -> Vec<Finding> {
    let store = match satellite_core::store::open_configured(config) {
        Ok(store) => store,
        // check_database says why.
        Err(_) => return Vec::new(),
    };
    let watchers = match store.watchers() {
        Ok(watchers) => watchers,
        Err(err) => {
            return vec![fail(
                format!("reading the watchers: {err}"),
                "see the database finding",
            )]
        }
    };
    if watchers.is_empty() {
        return vec![warn(
            "no cron --watch has run on this database: ended sessions keep their open websockets, and vhost routes wait for the crontab",
            "systemctl enable --now satellite-cron.service",
        )];
    }
    let now = chrono::Utc::now();
    watchers
        .into_iter()
        .map(|watcher| {
            let age = watcher.heartbeat.map(|beat| (now - beat).num_seconds().max(0));
            match age {
                Some(age) if age <= WATCHER_SILENT_SECS => ok(format!(
                    "watcher {} alive {age} s ago, {} ended route(s) left to cut",
                    watcher.name, watcher.behind
                )),
                _ => warn(
                    format!(
                        "watcher {} last alive {}; tunnels of sessions ending now are not cut on its frontend",
                        watcher.name,
                        age.map_or("never".into(), |a| format!("{a} s ago"))
                    ),
                    "systemctl status satellite-cron.service on that frontend (a frontend taken out of service is forgotten after a day)",
                ),
            }
        })
        .collect()
}

/// Without the key, log lines name no token (a keyless id could be
/// reversed); a key others can read lets them test guesses against ids.
fn check_log_key(config: &Config) -> Finding {
    let path = &config.logkey;
    match satellite_core::logid::read_key(path) {
        Ok(_) => ok(format!("log key {} is private", path.display())),
        Err(err) => fail(
            format!("log key: {err}; log lines name no token"),
            format!(
                "satellite init creates it; by hand: head -c 32 /dev/urandom > {0}; chmod 0640 {0}; chgrp <web server group> {0}",
                path.display()
            ),
        ),
    }
}

/// The audit trail goes to syslog; a missing socket loses it silently
/// (each program notes it on stderr at most once).
fn check_syslog(config: &Config) -> Finding {
    let path = &config.syslog_socket;
    if path.as_os_str().is_empty() {
        return warn(
            "syslog_socket is empty: no audit log of issued, redeemed, linked and destroyed tokens",
            "set syslog_socket = \"/dev/log\" (the default) and run a syslog daemon",
        );
    }
    let reachable = std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(path));
    match reachable {
        Ok(()) => ok(format!("syslog {} accepts messages", path.display())),
        Err(err) => fail(
            format!("syslog {}: {err}; audit lines are lost", path.display()),
            "start a syslog daemon (rsyslog, or systemd-journald's /dev/log socket), or set syslog_socket",
        ),
    }
}

fn check_database(config: &Config) -> Finding {
    if config.database_url.is_some() {
        // PgStore::open reads the schema version and refuses any other.
        return match satellite_core::store::open_configured(config) {
            Ok(_) => ok(format!(
                "PostgreSQL database (database_url) has the current schema ({SCHEMA_VERSION})"
            )),
            Err(err) => fail(
                format!("PostgreSQL database (database_url): {err}"),
                "check database_url, the server, and that `satellite migrate` created the schema",
            ),
        };
    }
    let db = &config.dbfile;
    if !db.exists() {
        return fail(
            format!("database {} does not exist", db.display()),
            "satellite migrate (or satellite init)",
        );
    }
    match satellite_core::SqliteStore::inspect(db).map(|found| found.version) {
        Ok(SCHEMA_VERSION) => ok(format!(
            "database {} has the current schema ({SCHEMA_VERSION})",
            db.display()
        )),
        Ok(v) if v < SCHEMA_VERSION => warn(
            format!(
                "database {} has an older schema ({v}); the first request will migrate it",
                db.display()
            ),
            format!(
                "satellite migrate --db {} --dry-run, then without --dry-run",
                db.display()
            ),
        ),
        Ok(v) => fail(
            format!(
                "database {} has schema {v}, newer than this build ({SCHEMA_VERSION})",
                db.display()
            ),
            "install the satellite release that wrote it",
        ),
        Err(err) => fail(
            format!("database {}: {err}", db.display()),
            "check its path and permissions; is it a SQLite file?",
        ),
    }
}

/// Three words (the original's length, and the default for a file that
/// does not say) are 38.8 bits: few enough that guessing, even rate
/// limited, finds live tokens on a busy site from enough addresses.
fn check_token_length(config: &Config) -> Option<Finding> {
    let words = config.words_per_token;
    if words >= 4 {
        return None;
    }
    // The installed list's own size; the EFF list's 7772 usable words when
    // it cannot be read (check_wordlist says why).
    let bits = Wordlist::load(&config.wordlist)
        .map(|list| list.entropy_bits(words))
        .unwrap_or(words as f64 * 7772f64.log2());
    Some(warn(
        format!("words_per_token = {words}: tokens carry {bits:.1} bits, which guessing from many addresses can find"),
        "set words_per_token = 4 (51.7 bits) in the configuration; tokens already issued keep working",
    ))
}

fn check_wordlist(config: &Config) -> Finding {
    match Wordlist::load(&config.wordlist) {
        Ok(list) if list.len() >= 7000 => ok(format!(
            "word list {}: {} words, {:.1} bits per {}-word token",
            config.wordlist.display(),
            list.len(),
            list.entropy_bits(config.words_per_token),
            config.words_per_token
        )),
        Ok(list) => warn(
            format!(
                "word list {}: only {} words ({:.1} bits per token)",
                config.wordlist.display(),
                list.len(),
                list.entropy_bits(config.words_per_token)
            ),
            "use the EFF large word list (7776 words) or raise words_per_token",
        ),
        Err(err) => fail(
            err.to_string(),
            "satellite init installs the EFF large word list into var/",
        ),
    }
}

fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Apache reads the vhost include as configuration, as root: whoever can
/// write it (or replace it in its directory) can run commands as root at
/// the next reload.
fn not_writable_by_others(path: &Path) -> Finding {
    match mode_of(path) {
        Some(mode) if mode & 0o022 != 0 => fail(
            format!(
                "{} is writable by its group or others ({mode:o}): Apache reads it as configuration",
                path.display()
            ),
            format!("chmod go-w {} (only cron's user writes it)", path.display()),
        ),
        Some(mode) => ok(format!(
            "{} is writable by its owner only ({mode:o})",
            path.display()
        )),
        None => warn(
            format!("{} does not exist yet", path.display()),
            "satellite init, then satellite cron",
        ),
    }
}

fn check_files(config: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    let writable_by_group = |dir: &Path, why: &str| -> Finding {
        match mode_of(dir) {
            None => fail(
                format!("{} does not exist", dir.display()),
                "satellite init --prefix <install root>",
            ),
            Some(mode) if mode & 0o020 != 0 => ok(format!(
                "{} is group-writable ({mode:o}): {why}",
                dir.display()
            )),
            Some(mode) => warn(
                format!(
                    "{} is not group-writable ({mode:o}), but {why}",
                    dir.display()
                ),
                format!(
                    "chgrp <web server group> {0} && chmod 2770 {0}",
                    dir.display()
                ),
            ),
        }
    };
    if let Some(var) = config.dbfile.parent() {
        findings.push(writable_by_group(
            var,
            "the web server writes the database and its WAL files there",
        ));
    }
    match config.routing {
        Routing::Map => {
            findings.push(check_dbd_driver(config));
            if config.obsolete_mapfile.is_some() || config.obsolete_map_format.is_some() {
                findings.push(warn(
                    "mapfile and map_format are obsolete: map routing reads routes from the database",
                    "remove them from satellite.toml (they are ignored)",
                ));
            }
        }
        Routing::Vhost => {
            findings.push(not_writable_by_others(&config.httpdstubfile));
            if let Some(dynconf) = config.httpdstubfile.parent() {
                findings.push(not_writable_by_others(dynconf));
            }
            if !config.httpdstubfile.exists() {
                findings.push(warn(
                    format!("{} does not exist yet", config.httpdstubfile.display()),
                    "satellite cron (creates it)",
                ));
            }
        }
    }
    let retry = config.htmldir.join("satellite/retry.html");
    findings.push(if retry.exists() {
        ok(format!("retry page {} is there", retry.display()))
    } else {
        warn(
            format!(
                "{} is missing: a backend that is not up yet shows Apache's bare 503",
                retry.display()
            ),
            "satellite init installs it",
        )
    });
    findings
}

fn check_configtest(config: &Config) -> Finding {
    let argv = &config.apache_configtest;
    match Command::new(&argv[0])
        .args(&argv[1..])
        .output_within(CONFIGTEST_TIMEOUT)
    {
        Ok(out) if out.status.success() => {
            ok(format!("Apache config test `{}` passes", argv.join(" ")))
        }
        Ok(out) => fail(
            format!(
                "Apache config test `{}` fails: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            "correct the Apache configuration (httpd-conf/satellite.conf and its Defines)",
        ),
        Err(err) => fail(
            format!("Apache config test `{}` cannot run: {err}", argv.join(" ")),
            "set apache_configtest to the full path, e.g. [\"/usr/sbin/apachectl\", \"-t\"]",
        ),
    }
}

/// Apache answers a token's host that is not routed with the waiting page
/// on its own, and only mod_qos limits how many of those answers (guesses)
/// one address gets (httpd-conf/satellite.conf). Asked of Apache itself
/// (`-M` in place of the config test's `-t`); no finding when the config
/// test command has no `-t` or does not run (its own finding says why).
fn check_waiting_limit(config: &Config) -> Option<Finding> {
    let mut argv = config.apache_configtest.clone();
    let flag = argv.iter().position(|arg| arg == "-t")?;
    argv[flag] = "-M".to_owned();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output_within(CONFIGTEST_TIMEOUT)
        .ok()
        .filter(|out| out.status.success())?;
    let modules = String::from_utf8_lossy(&out.stdout);
    let loaded = modules
        .lines()
        .any(|line| line.trim_start().starts_with("qos_module "));
    Some(if loaded {
        ok("mod_qos is loaded: answers for unrouted token hosts are limited per client address")
    } else {
        warn(
            "mod_qos is not loaded: Apache answers guesses at token hosts (the waiting page) without a limit",
            "install libapache2-mod-qos (Debian) or mod_qos (EPEL), load it as httpd-conf/modules-debian.conf or modules-rhel.conf does, and restart Apache",
        )
    })
}

/// What Apache itself was told (`-D DUMP_RUN_CFG`: its Defines), compared
/// with satellite's configuration, and what Apache really does on the
/// addresses it was told: every value a site types twice is checked here,
/// and nothing is reported OK that was not tried.
fn check_apache_run_config(config: &Config, defines: Option<&ApacheDefines>) -> Vec<Finding> {
    // check_configtest says why there are none.
    let Some(defines) = defines else {
        return Vec::new();
    };
    if defines.get("SATELLITE_ROOT").is_none() {
        return vec![warn(
            "Apache's configuration defines no SATELLITE_ROOT: is httpd-conf/satellite.conf included?",
            "include httpd-conf/satellite.conf (see docs/admin-guide.md)",
        )];
    }
    let mut findings = vec![check_apache_domain(config, defines)];
    if config.routing == Routing::Map {
        findings.push(check_apache_database(config, defines));
    }
    findings.push(check_apache_serve(config, defines));
    findings.push(check_https_listener(config, defines));
    findings.push(check_http_redirect(config, defines));
    findings
}

/// Apache's Defines as its configuration test sees them (`-D
/// DUMP_RUN_CFG`); `None` when there is no config test to ask or it fails.
pub(crate) fn apache_defines(config: &Config) -> Option<ApacheDefines> {
    let argv = &config.apache_configtest;
    if !argv.iter().any(|arg| arg == "-t") {
        return None;
    }
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .args(["-D", "DUMP_RUN_CFG"])
        .output_within(CONFIGTEST_TIMEOUT)
        .ok()
        .filter(|out| out.status.success())?;
    Some(ApacheDefines::parse(&String::from_utf8_lossy(&out.stdout)))
}

/// `Define: NAME=value` lines of `-D DUMP_RUN_CFG`.
pub(crate) struct ApacheDefines(Vec<(String, String)>);

impl ApacheDefines {
    fn parse(dump: &str) -> Self {
        ApacheDefines(
            dump.lines()
                .filter_map(|line| line.trim().strip_prefix("Define: "))
                .map(|define| match define.split_once('=') {
                    Some((name, value)) => (name.to_owned(), value.to_owned()),
                    None => (define.to_owned(), String::new()),
                })
                .collect(),
        )
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// SATELLITE_DOMAIN and its regular expression must both name
/// `extbasename`: a mismatch sends every user URL to the default page.
fn check_apache_domain(config: &Config, defines: &ApacheDefines) -> Finding {
    let ext = &config.extbasename;
    let escaped = ext.replace('.', "\\.");
    let domain = defines.get("SATELLITE_DOMAIN").unwrap_or("");
    let domain_re = defines.get("SATELLITE_DOMAIN_RE").unwrap_or("");
    if !domain.eq_ignore_ascii_case(ext) {
        return fail(
            format!("Apache's SATELLITE_DOMAIN is {domain:?} but extbasename is {ext:?}: users' URLs would not reach satellite"),
            format!("Define SATELLITE_DOMAIN {ext} before satellite.conf is read"),
        );
    }
    let literal = format!("\\Q{domain}\\E");
    if !domain_re.eq_ignore_ascii_case(&escaped) && !domain_re.eq_ignore_ascii_case(&literal) {
        return fail(
            format!("Apache's SATELLITE_DOMAIN_RE is {domain_re:?}, not {escaped:?} (extbasename with its dots escaped): token hosts would get the default page"),
            "remove your Define SATELLITE_DOMAIN_RE: satellite.conf derives it from SATELLITE_DOMAIN",
        );
    }
    ok(format!(
        "Apache's SATELLITE_DOMAIN and SATELLITE_DOMAIN_RE name extbasename ({ext})"
    ))
}

fn check_apache_database(config: &Config, defines: &ApacheDefines) -> Finding {
    let driver = defines.get("SATELLITE_DBD_DRIVER").unwrap_or("sqlite3");
    if let Some(url) = &config.database_url {
        let params = defines.get("SATELLITE_DBD_PARAMS").unwrap_or("");
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        return if driver != "pgsql" {
            fail(
                format!("satellite uses PostgreSQL (database_url) but Apache reads routes with the {driver} driver: token hosts never reach their sessions"),
                "Define SATELLITE_DBD_DRIVER pgsql and SATELLITE_DBD_PARAMS (database_url's parameters) before satellite.conf",
            )
        } else if words(params) != words(url) {
            // Not printed: either may carry a password.
            fail(
                "Apache's SATELLITE_DBD_PARAMS are not satellite's database_url: Apache may read routes from another database",
                "make SATELLITE_DBD_PARAMS the same libpq key=value string as database_url",
            )
        } else {
            ok("Apache reads its routes from the PostgreSQL database satellite writes (SATELLITE_DBD_PARAMS = database_url)")
        };
    }
    if driver != "sqlite3" {
        return fail(
            format!("Apache reads routes with the {driver} driver, but satellite writes the SQLite file {}", config.dbfile.display()),
            "leave SATELLITE_DBD_DRIVER undefined (sqlite3), or set database_url",
        );
    }
    let ours = &config.dbfile;
    let same = |theirs: &str| {
        let theirs = Path::new(theirs);
        theirs == ours
            || matches!(
                (theirs.canonicalize(), ours.canonicalize()),
                (Ok(a), Ok(b)) if a == b
            )
    };
    match defines.get("SATELLITE_DB") {
        Some(theirs) if same(theirs) => ok(format!(
            "Apache reads its routes from the database satellite writes ({})",
            ours.display()
        )),
        Some(theirs) => fail(
            format!(
                "Apache reads routes from {theirs} but satellite writes {}: token hosts never reach their sessions",
                ours.display()
            ),
            format!("Define SATELLITE_DB {} before Apache includes satellite.conf, or set dbfile to {theirs}", ours.display()),
        ),
        None => warn(
            "Apache's configuration defines no SATELLITE_DB: is httpd-conf/satellite.conf included?",
            "include httpd-conf/satellite.conf (see docs/admin-guide.md)",
        ),
    }
}

/// With SATELLITE_SERVE, Apache sends every endpoint request to serve: it
/// must be the socket serve is configured for, and serve must answer there.
fn check_apache_serve(config: &Config, defines: &ApacheDefines) -> Finding {
    let Some(url) = defines.get("SATELLITE_SERVE") else {
        return ok("Apache runs the endpoints as CGI programs (no SATELLITE_SERVE)");
    };
    let Some(socket) = url
        .strip_prefix("unix:")
        .and_then(|rest| rest.split('|').next())
    else {
        return ok(format!(
            "Apache sends the endpoints to serve at {url} (not a Unix socket: not probed)"
        ));
    };
    if config.serve_listen.is_none() && Path::new(socket) != config.serve_socket {
        return fail(
            format!(
                "Apache sends the endpoints to {socket}, but serve listens on {}",
                config.serve_socket.display()
            ),
            format!(
                "make SATELLITE_SERVE \"unix:{}|http://localhost\" or set serve_socket",
                config.serve_socket.display()
            ),
        );
    }
    match probe_http(
        || {
            let stream = std::os::unix::net::UnixStream::connect(socket)?;
            stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
            Ok(stream)
        },
        "GET /index.cgi HTTP/1.0\r\nHost: localhost\r\n\r\n",
    ) {
        Ok(status) => ok(format!(
            "serve answers on {socket} (HTTP {status}), where Apache sends the endpoints"
        )),
        Err(err) => fail(
            format!("Apache sends the endpoints to serve at {socket}, but nothing answers there ({err}): every endpoint request gets 503"),
            "systemctl start satellite-serve.service, or run `satellite serve` (docs/admin-guide.md)",
        ),
    }
}

/// The certificate Apache really serves on its TLS port for a token host
/// (`openssl s_client`), not only the file the config names.
fn check_https_listener(config: &Config, defines: &ApacheDefines) -> Finding {
    let port = defines.get("SATELLITE_PORT").unwrap_or("443");
    let address = format!("127.0.0.1:{port}");
    let server_name = format!("check-satellite.{}", config.extbasename);
    let served = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &address,
            "-servername",
            &server_name,
            "-showcerts",
        ])
        .output_within(OPENSSL_TIMEOUT);
    let text = match served {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(err) => return warn(format!("cannot run openssl: {err}"), "install openssl"),
    };
    let Some(pem) = text.find("-----BEGIN CERTIFICATE-----").and_then(|start| {
        let end = text[start..].find("-----END CERTIFICATE-----")? + start;
        Some(&text[start..end + "-----END CERTIFICATE-----".len()])
    }) else {
        return fail(
            format!("nothing answers TLS on {address} (SATELLITE_PORT): users' https URLs are refused"),
            "enable mod_ssl and make Apache listen there (Debian: a2enmod ssl, which adds Listen 443; docs/admin-guide.md)",
        );
    };
    let names = match certificate_names(pem) {
        Ok(names) => names,
        Err(err) => {
            return warn(
                format!("reading the certificate served on {address}: {err}"),
                "run openssl x509 on it",
            )
        }
    };
    let ext = &config.extbasename;
    let covers = |name: &str| names.iter().any(|have| have.eq_ignore_ascii_case(name));
    if covers(&format!("*.{ext}")) && covers(ext) {
        ok(format!(
            "Apache serves a certificate for *.{ext} and {ext} on {address}"
        ))
    } else {
        fail(
            format!(
                "the certificate Apache serves on {address} for {server_name} names {}, not *.{ext} and {ext}",
                names.join(", ")
            ),
            "point SATELLITE_CERT and SATELLITE_KEY at the wildcard certificate, and make satellite's vhost the one for the domain",
        )
    }
}

/// The DNS names of a PEM certificate.
fn certificate_names(pem: &str) -> Result<Vec<String>, String> {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin.write_all(pem.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split([',', '\n'])
        .filter_map(|part| part.trim().strip_prefix("DNS:"))
        .map(str::to_owned)
        .collect())
}

/// Plain HTTP on SATELLITE_HTTP_PORT must redirect a token host to https
/// (a default site enabled on port 80 answers "It works!" instead).
fn check_http_redirect(config: &Config, defines: &ApacheDefines) -> Finding {
    let port = defines.get("SATELLITE_HTTP_PORT").unwrap_or("80");
    let address = format!("127.0.0.1:{port}");
    let host = format!("check-satellite.{}", config.extbasename);
    let request = format!("GET /lab HTTP/1.0\r\nHost: {host}\r\n\r\n");
    let answer = probe_http_head(
        || {
            let stream = std::net::TcpStream::connect_timeout(
                &address.parse().map_err(std::io::Error::other)?,
                PROBE_TIMEOUT,
            )?;
            stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
            Ok(stream)
        },
        &request,
    );
    match answer {
        Ok(head) if head.starts_with("HTTP/1.1 301") || head.starts_with("HTTP/1.0 301") => {
            let location = head
                .lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                        .map(|(_, v)| v.trim().to_owned())
                })
                .unwrap_or_default();
            if location.starts_with(&format!("https://{host}")) {
                ok(format!("http://{host}/ on {address} redirects to {location}"))
            } else {
                fail(
                    format!("http://{host}/ on {address} redirects to {location:?}, not to https://{host}"),
                    "let satellite's port-80 vhost (SATELLITE_HTTP_PORT) answer the domain",
                )
            }
        }
        Ok(head) => fail(
            format!(
                "http://{host}/ on {address} answers {:?}, not satellite's redirect to https",
                head.lines().next().unwrap_or("")
            ),
            "another site takes port 80 for the domain (Debian: a2dissite 000-default, or keep it and let satellite's vhost be first)",
        ),
        Err(err) => warn(
            format!("nothing answers plain HTTP on {address} ({err}): http:// URLs are not redirected"),
            "Listen 80 (or SATELLITE_HTTP_PORT) in Apache, if users may type http://",
        ),
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `request` on a new connection and returns the answer's status.
fn probe_http<S: std::io::Read + std::io::Write>(
    connect: impl FnOnce() -> std::io::Result<S>,
    request: &str,
) -> std::io::Result<u16> {
    let head = probe_http_head(connect, request)?;
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {head:?}")))
}

/// Sends `request` and reads the answer's head (up to the blank line, at
/// most 16 kB, within [`PROBE_TIMEOUT`]).
fn probe_http_head<S: std::io::Read + std::io::Write>(
    connect: impl FnOnce() -> std::io::Result<S>,
    request: &str,
) -> std::io::Result<String> {
    let mut stream = connect()?;
    stream.write_all(request.as_bytes())?;
    let started = std::time::Instant::now();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        if started.elapsed() > PROBE_TIMEOUT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            ));
        }
        match stream.read(&mut buf)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    if head.is_empty() {
        return Err(std::io::Error::other("closed without an answer"));
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn check_reload(config: &Config) -> Finding {
    if let Some(argv) = &config.apache_reload {
        if argv.first().map(String::as_str) == Some("sudo") {
            let rest: Vec<&String> = argv
                .iter()
                .skip(1)
                .filter(|a| !a.starts_with('-'))
                .collect();
            let out = Command::new("sudo")
                .arg("-n")
                .arg("-l")
                .args(&rest)
                .output_within(SUDO_TIMEOUT);
            return match out {
                Ok(out) if out.status.success() => {
                    ok(format!("sudo allows the reload `{}`", argv.join(" ")))
                }
                _ => fail(
                    format!(
                        "sudo does not allow the reload `{}` without a password",
                        argv.join(" ")
                    ),
                    "install cron/sudoers with the same command, word for word",
                ),
            };
        }
        return ok(format!("reload command `{}` is configured", argv.join(" ")));
    }
    let pidfile = &config.apache_pidfile;
    let pid = match std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    {
        Some(pid) => pid,
        None => {
            return warn(
                format!(
                    "no Apache pid in {} (is Apache running?)",
                    pidfile.display()
                ),
                "set apache_pidfile to Apache's PidFile, or apache_reload to a command",
            )
        }
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => ok(format!("Apache (pid {pid}) can be signalled for a graceful reload")),
        Err(nix::errno::Errno::EPERM) => fail(
            format!("this user may not signal Apache (pid {pid})"),
            "run cron as Apache's user or root, or set apache_reload to a sudo command (cron/sudoers)",
        ),
        Err(err) => warn(format!("Apache pid {pid} from {}: {err}", pidfile.display()), "is Apache running?"),
    }
}

/// Any local process can connect to a TCP port, and on TCP serve believes
/// the client address only from `trusted_proxies`: the Unix socket (whose
/// mode admits only Apache) is the safe default.
/// serve on TCP (`serve_listen`) must be reachable only from this host;
/// on its Unix socket (the default) the Apache checks probe it.
fn check_serve_listen(config: &Config) -> Option<Finding> {
    let listen = config.serve_listen.as_ref()?;
    let loopback = listen
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or_else(|_| listen.starts_with("localhost:"));
    Some(if loopback {
        ok(format!("serve_listen {listen} is on loopback"))
    } else {
        warn(
            format!("serve_listen {listen} is not on loopback"),
            "let only Apache reach serve: leave serve_listen out (Unix socket) and define SATELLITE_SERVE in satellite.conf",
        )
    })
}

fn check_certificate(config: &Config, cert: Option<&Path>) -> Finding {
    let Some(cert) = cert else {
        return warn(
            "certificate not checked",
            "satellite check --cert <the SSLCertificateFile Apache uses>",
        );
    };
    let out = match Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-enddate",
            "-ext",
            "subjectAltName",
            "-in",
        ])
        .arg(cert)
        .output_within(OPENSSL_TIMEOUT)
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => {
            return fail(
                format!(
                    "{}: {}",
                    cert.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                "is it a PEM certificate?",
            )
        }
        Err(err) => return warn(format!("cannot run openssl: {err}"), "install openssl"),
    };
    let names: Vec<&str> = out
        .split([',', '\n'])
        .filter_map(|part| part.trim().strip_prefix("DNS:"))
        .collect();
    let ext = &config.extbasename;
    let missing: Vec<String> = [format!("*.{ext}"), ext.clone()]
        .into_iter()
        .filter(|n| !names.iter().any(|have| have.eq_ignore_ascii_case(n)))
        .collect();
    if !missing.is_empty() {
        return fail(
            format!("{} does not cover {}", cert.display(), missing.join(" and ")),
            format!("a certificate for both *.{ext} (users' URLs) and {ext} (the waiting page polls it)"),
        );
    }
    let expires_soon = Command::new("openssl")
        .args(["x509", "-noout", "-checkend", "2592000", "-in"])
        .arg(cert)
        .output_within(OPENSSL_TIMEOUT)
        .map(|out| !out.status.success())
        .unwrap_or(false);
    let end = out
        .lines()
        .find_map(|l| l.strip_prefix("notAfter="))
        .unwrap_or("?");
    if expires_soon {
        warn(
            format!("{} expires within 30 days ({end})", cert.display()),
            "renew it",
        )
    } else {
        ok(format!(
            "{} covers *.{ext} and {ext}, valid until {end}",
            cert.display()
        ))
    }
}

/// Map routing needs APR's driver for mod_dbd (SQLite's, or PostgreSQL's
/// with `database_url`): without it Apache refuses the `DBDriver` line and
/// no route is ever found.
fn check_dbd_driver(config: &Config) -> Finding {
    let (driver, what, packages) = if config.database_url.is_some() {
        (
            "apr_dbd_pgsql",
            "PostgreSQL",
            "apt-get install libaprutil1-dbd-pgsql (Debian), dnf install apr-util-pgsql (RHEL)",
        )
    } else {
        (
            "apr_dbd_sqlite3",
            "SQLite",
            "apt-get install libaprutil1-dbd-sqlite3 (Debian), dnf install apr-util-sqlite (RHEL)",
        )
    };
    let mut dirs = vec![
        std::path::PathBuf::from("/usr/lib64/apr-util-1"),
        std::path::PathBuf::from("/usr/lib/apr-util-1"),
    ];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path().join("apr-util-1")));
    }
    let found = dirs.iter().find_map(|dir| {
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with(driver) && name.ends_with(".so")).then(|| e.path())
        })
    });
    match found {
        Some(path) => ok(format!(
            "APR's {what} driver for mod_dbd: {}",
            path.display()
        )),
        None => fail(
            format!(
                "APR's {what} driver for mod_dbd is not installed: map routing cannot read routes"
            ),
            packages,
        ),
    }
}

/// No finding when nothing answers at `apache_status_url` (mod_status off,
/// or not on loopback) or when it is empty.
fn check_apache_workers(url: &str) -> Option<Finding> {
    if url.is_empty() {
        return None;
    }
    let body = crate::apache_status::fetch(url, Duration::from_secs(3)).ok()?;
    let workers = crate::apache_status::parse_auto(&body)?;
    Some(if workers.short() {
        warn(
            format!(
                "Apache has {} idle of {} workers and no room to start more: every open notebook websocket holds one",
                workers.idle,
                workers.busy + workers.idle
            ),
            "raise MaxRequestWorkers (and ServerLimit/ThreadsPerChild) in Apache's MPM configuration",
        )
    } else {
        ok(format!(
            "Apache has {} idle workers ({} busy)",
            workers.idle, workers.busy
        ))
    })
}
