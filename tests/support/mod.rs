//! A private satellite install for one test: its own config, database, word
//! list and syslog socket in a temporary directory, and a way to run the
//! real CGI programs against it with the environment Apache would give them.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const EXT: &str = "example.org";
/// Every site's `etc/logkey`: log ids are HMACs under it.
pub const LOG_KEY: [u8; 32] = [0x5a; 32];
/// Login and compute nodes live here (`tgtipmask`).
pub const LOGIN_NODE: &str = "10.21.0.10";
pub const COMPUTE_NODE: &str = "10.21.3.4";
pub const OTHER_COMPUTE_NODE: &str = "10.21.5.6";
pub const OUTSIDER: &str = "192.0.2.1";
/// The Slurm controllers that push job states (`jobstateipmask`).
pub const SLURM_CONTROLLER: &str = "198.202.100.9";

/// The seven endpoint programs, by their CGI names.
pub const ENDPOINT_PROGRAMS: [&str; 7] = [
    "getlink",
    "redeemtoken",
    "destroytoken",
    "linktoken",
    "tokenjobstate",
    "update-jobs",
    "index",
];

pub fn program(name: &str) -> &'static str {
    match name {
        "getlink" => env!("CARGO_BIN_EXE_getlink"),
        "redeemtoken" => env!("CARGO_BIN_EXE_redeemtoken"),
        "destroytoken" => env!("CARGO_BIN_EXE_destroytoken"),
        "linktoken" => env!("CARGO_BIN_EXE_linktoken"),
        "tokenjobstate" => env!("CARGO_BIN_EXE_tokenjobstate"),
        "update-jobs" => env!("CARGO_BIN_EXE_update-jobs"),
        "index" => env!("CARGO_BIN_EXE_index"),
        "satellite" => env!("CARGO_BIN_EXE_satellite"),
        "cron" => env!("CARGO_BIN_EXE_cron"),
        other => panic!("no program {other}"),
    }
}

/// `alias_compare_hash` as the Perl service computed it (Digest::SHA's
/// `sha256_base64`), independently of the product's code.
pub fn legacy_hash(alias: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(alias.as_bytes()))
}

/// A database as the Perl original made it (its base schema, nothing of
/// satellite's) at `path`, with a pending, a mapped and a proxied token.
pub fn write_perl_era_database(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let schema =
        std::fs::read_to_string(repo_root().join("tests/fixtures/legacy-schemas.sql")).unwrap();
    let base = schema
        .split("-- variant: ")
        .find(|b| b.starts_with("base\n"))
        .unwrap()
        .trim_start_matches("base\n");
    conn.execute_batch(base).unwrap();
    for (alias, state, host, port) in [
        ("abacus-zoom-apple", "pending", None, None),
        ("able-acorn-zoo", "mapped", Some("10.21.3.4"), Some(8888)),
        ("zen-yak-bat", "proxied", Some("10.21.5.6"), Some(50123)),
    ] {
        conn.execute(
            "insert into proxy (alias, alias_compare_hash, state, dsthost, dstport) values(?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![alias, legacy_hash(alias), state, host, port],
        )
        .unwrap();
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub struct Site {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The SQLite file (unused on PostgreSQL).
    pub db: PathBuf,
    pub store: StoreKind,
    /// The PostgreSQL database's connection string.
    database_url: Option<String>,
    syslog: UnixDatagram,
}

impl Site {
    /// A site with a created, empty database.
    pub fn new() -> Site {
        Self::with_config("")
    }

    pub fn with_config(extra: &str) -> Site {
        Self::with_config_on(StoreKind::Sqlite, extra)
    }

    /// A site with a created, empty database in `store`.
    pub fn on(store: StoreKind) -> Site {
        Self::with_config_on(store, "")
    }

    /// [`with_config`](Self::with_config) on `store`: for PostgreSQL a
    /// fresh database named by `database_url`, its schema made by
    /// `satellite migrate` as an admin makes it.
    pub fn with_config_on(store: StoreKind, extra: &str) -> Site {
        Self::with_database(store, store.new_database_url(), extra)
    }

    /// A site on the existing, empty PostgreSQL database `url` (in a
    /// cluster of the test's own), its schema made by `satellite migrate`.
    pub fn on_postgres_url(url: &str) -> Site {
        Self::with_database(StoreKind::Postgres, Some(url.to_owned()), "")
    }

    fn with_database(store: StoreKind, database_url: Option<String>, extra: &str) -> Site {
        let extra = match &database_url {
            Some(url) => format!("database_url = {url:?}\n{extra}"),
            None => extra.to_owned(),
        };
        let mut site = Self::without_database(&extra);
        site.store = store;
        site.database_url = database_url;
        let out = Command::new(program("satellite"))
            .args(["migrate", "--config"])
            .arg(&site.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(site.db.exists(), store == StoreKind::Sqlite, "{store:?}");
        site
    }

    /// The tree and config, no database file.
    pub fn without_database(extra: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["etc", "var", "dynconf", "html"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::copy(
            repo_root().join("wordlist/eff_large_wordlist.txt"),
            dir.path().join("var/eff_large_wordlist.txt"),
        )
        .unwrap();
        let logkey = dir.path().join("etc/logkey");
        std::fs::write(&logkey, LOG_KEY).unwrap();
        std::fs::set_permissions(&logkey, std::fs::Permissions::from_mode(0o600)).unwrap();
        let syslog_path = dir.path().join("syslog.sock");
        let syslog = UnixDatagram::bind(&syslog_path).unwrap();
        syslog.set_nonblocking(true).unwrap();
        let config = dir.path().join("etc/satellite.toml");
        // `extra` may override any of these base settings.
        let base = [
            format!("extbasename = \"{EXT}\""),
            "tgtipmask = [\"10.21.0.0/16\", \"2001:db8:21::/48\"]".to_owned(),
            "jobstateipmask = [\"198.202.100.8/29\"]".to_owned(),
            "syslog_socket = \"../syslog.sock\"".to_owned(),
            // Whatever Apache the machine runs is not the test's.
            "apache_status_url = \"\"".to_owned(),
        ];
        let overridden = |line: &str| {
            let key = line.split('=').next().unwrap_or("").trim();
            extra
                .lines()
                .any(|l| l.split('=').next().unwrap_or("").trim() == key)
        };
        let mut text: Vec<String> = base.into_iter().filter(|l| !overridden(l)).collect();
        text.push(extra.to_owned());
        std::fs::write(&config, text.join("\n") + "\n").unwrap();
        let db = dir.path().join("var/state.sqlite");
        Site {
            dir,
            config,
            db,
            store: StoreKind::Sqlite,
            database_url: None,
            syslog,
        }
    }

    /// The PostgreSQL database's connection string (None on SQLite).
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A CGI call of `program`, as Apache would make it.
    pub fn cgi(&self, program: &str) -> Call {
        Call {
            program: program.to_owned(),
            env: vec![
                (
                    "SATELLITE_CONFIG".into(),
                    self.config.clone().into_os_string(),
                ),
                ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
                ("SERVER_PROTOCOL".into(), "HTTP/1.1".into()),
                ("REQUEST_METHOD".into(), "GET".into()),
                ("SCRIPT_NAME".into(), format!("/{program}.cgi").into()),
                ("HTTP_HOST".into(), format!("manage.{EXT}").into()),
                ("HTTP_USER_AGENT".into(), "curl/7.76.1".into()),
            ],
            stdin: Vec::new(),
        }
    }

    /// `satellite revoke <alias>`, as an admin runs it; it must succeed.
    pub fn revoke_ok(&self, alias: &str) {
        let out = Command::new(program("satellite"))
            .args(["revoke", alias])
            .env("SATELLITE_CONFIG", &self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// getlink from the login node; returns the token.
    pub fn new_token(&self) -> String {
        let answer = self.cgi("getlink").remote(LOGIN_NODE).run();
        assert_eq!(answer.status, 200, "{answer:?}");
        let body = answer.text();
        body.strip_prefix("Your token is \n")
            .and_then(|rest| rest.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("unexpected getlink body {body:?}"))
            .to_owned()
    }

    /// getlink, then redeem from `host` with `port`; returns the token.
    pub fn redeemed_token(&self, host: &str, port: u16) -> String {
        let token = self.new_token();
        let answer = self
            .cgi("redeemtoken")
            .remote(host)
            .query(format!("token={token}&port={port}"))
            .run();
        assert_eq!(answer.status, 200, "{answer:?}");
        token
    }

    /// The SQLite file itself, for what only SQLite has.
    pub fn db(&self) -> rusqlite::Connection {
        assert_eq!(self.store, StoreKind::Sqlite, "a SQLite-only step");
        rusqlite::Connection::open(&self.db).unwrap()
    }

    /// The site's database, whichever store it is.
    pub fn sql(&self) -> Db {
        Db::connect(&self.db, self.database_url.as_deref())
    }

    /// Every row of both tables, for "the database is as before" checks.
    pub fn snapshot(&self) -> Vec<String> {
        let mut db = self.sql();
        let mut rows = Vec::new();
        for table in ["proxy", "jobstates"] {
            for row in db.rows(&format!("SELECT * FROM {table} ORDER BY 1"), &[]) {
                let cols: Vec<String> = row.iter().map(|v| format!("{v:?}")).collect();
                rows.push(format!("{table}: {}", cols.join("|")));
            }
        }
        rows
    }

    pub fn state_of(&self, token: &str) -> Option<String> {
        self.sql()
            .value("SELECT state FROM proxy WHERE alias = $1", &[token])
            .map(|state| state.text())
    }

    /// The syslog lines sent since the last call.
    pub fn syslog_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.syslog.recv(&mut buf) {
            lines.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        lines
    }
}

/// A site on PostgreSQL ends with no SQLite file: no program fell back to
/// one.
impl Drop for Site {
    fn drop(&mut self) {
        if self.store == StoreKind::Postgres && !std::thread::panicking() {
            assert!(!self.db.exists(), "a PostgreSQL site has a SQLite file");
        }
    }
}

#[derive(Clone)]
pub struct Call {
    program: String,
    env: Vec<(OsString, OsString)>,
    stdin: Vec<u8>,
}

impl Call {
    pub fn env(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env
            .push((name.into(), OsString::from_vec(value.into())));
        self
    }

    pub fn unset(mut self, name: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self
    }

    pub fn method(self, method: &str) -> Self {
        self.env("REQUEST_METHOD", method)
    }

    pub fn query(self, query: impl Into<Vec<u8>>) -> Self {
        self.env("QUERY_STRING", query)
    }

    pub fn remote(self, addr: &str) -> Self {
        self.env("REMOTE_ADDR", addr)
    }

    pub fn header(self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        let var = format!("HTTP_{}", name.to_ascii_uppercase().replace('-', "_"));
        self.env(&var, value)
    }

    pub fn post(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.stdin = body.into();
        let len = self.stdin.len().to_string();
        self.method("POST")
            .env("CONTENT_LENGTH", len)
            .env("CONTENT_TYPE", "application/x-www-form-urlencoded")
    }

    pub fn stdin(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.stdin = body.into();
        self
    }

    pub fn spawn(&self) -> std::process::Child {
        let mut child = Command::new(program(&self.program))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // The program may not read a body it refuses; that is fine.
        let _ = stdin.write_all(&self.stdin);
        drop(stdin);
        child
    }

    pub fn run(&self) -> Answer {
        Answer::from_output(self.spawn().wait_with_output().unwrap())
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stderr: String,
    pub exit_code: Option<i32>,
}

impl Answer {
    pub fn from_output(out: std::process::Output) -> Answer {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let split = out
            .stdout
            .windows(2)
            .position(|w| w == b"\n\n")
            .unwrap_or_else(|| {
                panic!(
                    "no CGI header block in {:?}; stderr {stderr}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
        let head = String::from_utf8(out.stdout[..split].to_vec()).unwrap();
        let body = out.stdout[split + 2..].to_vec();
        let mut lines = head.lines();
        let status_line = lines.next().unwrap();
        let status = status_line
            .strip_prefix("Status: ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("first line is not a Status: {status_line:?}"));
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        Answer {
            status,
            headers,
            body,
            stderr,
            exit_code: out.status.code(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    /// Status and body in one value, for tables of expectations.
    pub fn status_and_text(&self) -> (u16, String) {
        (
            self.status,
            String::from_utf8_lossy(&self.body).into_owned(),
        )
    }
}

pub mod apache;
pub mod backend;
pub mod client;
pub mod slurm;
pub mod store;
pub mod webdriver;

// Not every test binary uses all of them.
#[allow(unused_imports)]
pub(crate) use store::on_both_stores;
#[allow(unused_imports)]
pub use store::{epoch_now, utc_text, Db, StoreKind};
