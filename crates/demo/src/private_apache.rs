//! A private, unprivileged-port Apache httpd instance running the project's
//! own `httpd-conf/satellite.conf`: its own ServerRoot in a directory of
//! ours, loopback only, and a throwaway CA and wildcard certificate. Used by
//! `satellite demo` and by the integration tests' harness, so that both
//! exercise the same Apache setup.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use satellite_core::config::Routing;

use satellite_core::subprocess::OutputWithin;

/// The site config shipped with the binary, so the demo runs from anywhere.
pub const SATELLITE_CONF: &str = include_str!("../../../httpd-conf/satellite.conf");

/// How long Apache may take to answer after it is started, and to exit
/// after SIGTERM.
const DEADLINE: Duration = Duration::from_secs(30);

const MODULES: [(&str, &str); 14] = [
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("mime_module", "mod_mime.so"),
    ("alias_module", "mod_alias.so"),
    ("ssl_module", "mod_ssl.so"),
    ("socache_shmcb_module", "mod_socache_shmcb.so"),
    ("rewrite_module", "mod_rewrite.so"),
    ("headers_module", "mod_headers.so"),
    ("proxy_module", "mod_proxy.so"),
    ("proxy_http_module", "mod_proxy_http.so"),
    ("proxy_wstunnel_module", "mod_proxy_wstunnel.so"),
    ("cgid_module", "mod_cgid.so"),
    ("dbd_module", "mod_dbd.so"),
    ("http2_module", "mod_http2.so"),
];

/// Where PCRE 1 may be, for a mod_qos built against it (Debian 12).
const PCRE1_PATHS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/libpcre.so.3",
    "/usr/lib/aarch64-linux-gnu/libpcre.so.3",
    "/usr/lib64/libpcre.so.1",
];

/// Where Apache is on this machine.
#[derive(Clone, Debug)]
pub struct ApacheInstall {
    pub binary: PathBuf,
    pub modules_dir: PathBuf,
    /// The httpd-conf file that loads satellite's modules here, when it
    /// names them by absolute paths (RHEL's names them relative to a
    /// ServerRoot that is not ours).
    pub modules_conf: Option<&'static str>,
}

impl ApacheInstall {
    /// Debian's apache2 or RHEL's httpd, or a message saying how to get one.
    pub fn find() -> Result<Self> {
        let candidates = [
            (
                "/usr/sbin/apache2",
                "/usr/lib/apache2/modules",
                Some("modules-debian.conf"),
            ),
            ("/usr/sbin/httpd", "/usr/lib64/httpd/modules", None),
            ("/usr/sbin/httpd", "/usr/lib/httpd/modules", None),
        ];
        for (binary, modules, modules_conf) in candidates {
            if Path::new(binary).exists() && Path::new(modules).join("mod_ssl.so").exists() {
                return Ok(ApacheInstall {
                    binary: binary.into(),
                    modules_dir: modules.into(),
                    modules_conf,
                });
            }
        }
        bail!(
            "Apache httpd with mod_ssl was not found. Install it first:\n  \
             Debian/Ubuntu: sudo apt-get install apache2\n  \
             RHEL/Rocky/Alma: sudo dnf install httpd mod_ssl\n\
             (from a source checkout, scripts/setup.sh demo installs all the demo needs)"
        )
    }

    /// Apache's config test of `<dir>/httpd.conf`, with `extra` directives
    /// (`-C`) read before it, as a command line.
    pub fn configtest_command(&self, dir: &Path, extra: &[String]) -> Vec<String> {
        let mut cmd = vec![
            self.binary.display().to_string(),
            "-f".to_owned(),
            PrivateApache::config_path(dir).display().to_string(),
        ];
        for directive in extra {
            cmd.push("-C".to_owned());
            cmd.push(directive.clone());
        }
        cmd.push("-t".to_owned());
        cmd
    }
}

/// Where the satellite site config comes from.
#[derive(Clone, Debug)]
pub enum SiteConf {
    /// [`SATELLITE_CONF`], written next to httpd.conf.
    Embedded,
    /// An `httpd-conf` directory, included in place (with its modules file
    /// where it applies), so that the files as shipped are what runs.
    Directory(PathBuf),
}

pub struct Site {
    /// The install tree (cgi/, etc/, var/, dynconf/, html/).
    pub root: PathBuf,
    pub domain: String,
    /// The loopback address Apache listens on: frontends of one site sit
    /// on different addresses, as they would on different hosts.
    pub listen_ip: std::net::Ipv4Addr,
    pub port: u16,
    /// A plain-HTTP port to listen on as well (the redirect to https).
    pub http_port: Option<u16>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `Some(url)`: endpoints go to `satellite serve` at that URL.
    pub serve_url: Option<String>,
    /// Which routing Apache is set up for (the config's `routing` must
    /// agree).
    pub routing: Routing,
    pub conf: SiteConf,
    /// More `Define name "value"` lines, before satellite.conf is read
    /// (a site's settings, such as SATELLITE_WAITING_LIMIT).
    pub defines: Vec<(String, String)>,
}

/// A running Apache, stopped when dropped. Its ServerRoot `dir` holds
/// httpd.conf, the pidfile, the logs and Apache's own stderr.
pub struct PrivateApache {
    child: Option<Child>,
    pub dir: PathBuf,
}

impl PrivateApache {
    /// Writes `<dir>/httpd.conf` and starts Apache in the foreground as our
    /// child; returns once it answers on its port.
    pub fn start(install: &ApacheInstall, dir: &Path, site: &Site) -> Result<Self> {
        let listening = std::net::SocketAddr::from((site.listen_ip, site.port));
        Self::start_when(install, dir, site, || {
            std::net::TcpStream::connect(listening).is_ok()
        })
    }

    /// [`start`](Self::start), returning once Apache has written its
    /// pidfile and `ready` says yes: a port that accepts connections may
    /// still answer with errors, and who signals Apache needs the pidfile.
    pub fn start_when(
        install: &ApacheInstall,
        dir: &Path,
        site: &Site,
        mut ready: impl FnMut() -> bool,
    ) -> Result<Self> {
        let conf = Self::write_config(install, dir, site)?;
        let test = Command::new(&install.binary)
            .arg("-f")
            .arg(&conf)
            .arg("-t")
            .output_within(Duration::from_secs(60))
            .with_context(|| format!("running {}", install.binary.display()))?;
        if !test.status.success() {
            bail!(
                "Apache's config test failed: {}",
                String::from_utf8_lossy(&test.stderr).trim()
            );
        }
        // Before its ErrorLog is open, Apache can only complain on stderr.
        let stderr = fs::File::create(Self::stderr_path(dir))?;
        let child = Command::new(&install.binary)
            .arg("-f")
            .arg(&conf)
            .arg("-DFOREGROUND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", install.binary.display()))?;
        let mut apache = PrivateApache {
            child: Some(child),
            dir: dir.to_owned(),
        };
        let started = Instant::now();
        loop {
            if let Some(status) = apache.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                apache.child = None;
                bail!("Apache exited ({status}) at start: {}", apache.logs());
            }
            if Self::pid_path(dir).exists() && ready() {
                return Ok(apache);
            }
            if started.elapsed() > DEADLINE {
                apache.stop();
                bail!(
                    "Apache did not answer on port {} within {DEADLINE:?}: {}",
                    site.port,
                    apache.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join("httpd.conf")
    }

    /// The user this private Apache's workers run as: `nobody` when
    /// started by root (Apache will not run workers as root), else the
    /// user who started it. What `apache_user` names for `cron --watch`.
    pub fn worker_user() -> String {
        if nix::unistd::Uid::effective().is_root() {
            return "nobody".into();
        }
        let uid = nix::unistd::Uid::effective();
        nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map_or_else(|| uid.as_raw().to_string(), |user| user.name)
    }

    pub fn pid_path(dir: &Path) -> PathBuf {
        dir.join("httpd.pid")
    }

    pub fn error_log_path(dir: &Path) -> PathBuf {
        dir.join("error.log")
    }

    fn stderr_path(dir: &Path) -> PathBuf {
        dir.join("httpd.stderr")
    }

    pub fn error_log(&self) -> PathBuf {
        Self::error_log_path(&self.dir)
    }

    /// What Apache said on stderr and in its error log, for a message.
    fn logs(&self) -> String {
        let read = |path: PathBuf| fs::read_to_string(path).unwrap_or_default();
        format!(
            "{}{}",
            read(Self::stderr_path(&self.dir)),
            read(self.error_log())
        )
    }

    fn write_config(install: &ApacheInstall, dir: &Path, site: &Site) -> Result<PathBuf> {
        let mut conf = String::new();
        let _ = writeln!(conf, "ServerRoot \"{}\"", dir.display());
        let _ = writeln!(conf, "PidFile \"{}\"", Self::pid_path(dir).display());
        // Apache's default is <ServerRoot>/logs, which we do not make.
        let _ = writeln!(conf, "DefaultRuntimeDir \"{}\"", dir.display());
        let _ = writeln!(conf, "ErrorLog \"{}\"", Self::error_log_path(dir).display());
        conf.push_str("LogLevel warn\n");
        let satellite_conf = match &site.conf {
            SiteConf::Embedded => {
                let path = dir.join("satellite.conf");
                fs::write(&path, SATELLITE_CONF)?;
                path
            }
            SiteConf::Directory(httpd_conf) => {
                if let Some(modules) = install.modules_conf {
                    // First, so that its LoadModules are the ones that count.
                    let _ = writeln!(conf, "Include \"{}\"", httpd_conf.join(modules).display());
                }
                httpd_conf.join("satellite.conf")
            }
        };
        for (name, file) in MODULES {
            let _ = writeln!(
                conf,
                "<IfModule !{name}>\n    LoadModule {name} \"{}\"\n</IfModule>",
                install.modules_dir.join(file).display()
            );
        }
        // Optional: the waiting-page limit (see satellite.conf), when
        // mod_qos is installed. Debian 12's build wants the PCRE 1 that its
        // httpd, linked with PCRE2, no longer brings: load it first.
        let qos = install.modules_dir.join("mod_qos.so");
        if qos.exists() {
            conf.push_str("<IfModule !qos_module>\n");
            if let Some(pcre) = PCRE1_PATHS.iter().map(Path::new).find(|p| p.exists()) {
                let _ = writeln!(conf, "    LoadFile \"{}\"", pcre.display());
            }
            let _ = writeln!(
                conf,
                "    LoadModule qos_module \"{}\"\n</IfModule>",
                qos.display()
            );
        }
        let log_config = install.modules_dir.join("mod_log_config.so");
        if log_config.exists() {
            let _ = writeln!(conf, "<IfModule !log_config_module>\n    LoadModule log_config_module \"{}\"\n</IfModule>", log_config.display());
        }
        conf.push_str("TypesConfig /etc/mime.types\n");
        let _ = writeln!(conf, "ScriptSock \"{}\"", dir.join("cgisock").display());
        let _ = writeln!(conf, "Listen {}:{} https", site.listen_ip, site.port);
        if let Some(http_port) = site.http_port {
            let _ = writeln!(conf, "Listen {}:{http_port} http", site.listen_ip);
        }
        conf.push_str("ServerName localhost\n");
        let _ = writeln!(
            conf,
            "SSLSessionCache \"shmcb:{}(512000)\"",
            dir.join("ssl_scache").display()
        );
        if nix::unistd::Uid::effective().is_root() {
            // Apache will not run its workers as root.
            conf.push_str("User nobody\nGroup nogroup\n");
        }
        // SATELLITE_DOMAIN_RE is left to satellite.conf, which derives it
        // from SATELLITE_DOMAIN as a site's configuration does.
        let defines = [
            ("SATELLITE_ROOT", site.root.display().to_string()),
            ("SATELLITE_DOMAIN", site.domain.clone()),
            ("SATELLITE_PORT", site.port.to_string()),
            ("SATELLITE_CERT", site.cert.display().to_string()),
            ("SATELLITE_KEY", site.key.display().to_string()),
            ("SATELLITE_LOG_DIR", dir.display().to_string()),
        ];
        for (name, value) in defines {
            let _ = writeln!(conf, "Define {name} \"{value}\"");
        }
        if let Some(http_port) = site.http_port {
            let _ = writeln!(conf, "Define SATELLITE_HTTP_PORT \"{http_port}\"");
        }
        if let Some(url) = &site.serve_url {
            let _ = writeln!(conf, "Define SATELLITE_SERVE \"{url}\"");
        }
        if site.routing == Routing::Vhost {
            conf.push_str("Define SATELLITE_VHOST_ROUTING\n");
        }
        for (name, value) in &site.defines {
            let _ = writeln!(conf, "Define {name} \"{value}\"");
        }
        let _ = writeln!(conf, "Include \"{}\"", satellite_conf.display());
        let path = Self::config_path(dir);
        fs::write(&path, conf)?;
        Ok(path)
    }

    /// The parent httpd's pid (Apache runs in the foreground, as our child).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then SIGKILL to the parent and the children it had if it
    /// does not exit in time: an orphaned worker would keep the port.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let children = children_of(child.id());
        let signal = |pid: u32, signal| {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        };
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        for pid in children {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for PrivateApache {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pids of `parent`'s children, from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let parent = parent.to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after
        // its closing parenthesis.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if rest.split_whitespace().nth(1) == Some(parent.as_str()) {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

/// A throwaway CA and, signed by it, a certificate and key for the server.
#[derive(Clone, Debug)]
pub struct Certificate {
    /// What a client trusts.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a [`Certificate`] for `*.<domain>` and `<domain>` in `dir` with the
/// openssl command. Both carry the extensions strict verifiers (rustls)
/// insist on: a CA with keyUsage, a leaf that is no CA and is for serverAuth.
/// The leaf looks like a public CA's to a TLS grader (a year's validity, a
/// CRL distribution point), so that grading the test server grades the
/// configuration rather than a throwaway certificate.
pub fn make_certificate(dir: &Path, domain: &str) -> Result<Certificate> {
    let run = |args: &[&str]| -> Result<()> {
        let mut command = Command::new("openssl");
        command.args(args).current_dir(dir);
        output_of(&mut command, "(install the openssl package)").map(drop)
    };
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &new_key,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "365",
            "-subj",
            "/CN=satellite throwaway CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat())?;
    run(&[
        &["req"][..],
        &new_key,
        &[
            "-keyout",
            "site.key",
            "-out",
            "site.csr",
            "-subj",
            &format!("/CN={domain}"),
        ],
    ]
    .concat())?;
    fs::write(
        dir.join("site.ext"),
        format!(
            "subjectAltName=DNS:{domain},DNS:*.{domain}\n\
             basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             crlDistributionPoints=URI:http://ca.{domain}/satellite-test-ca.crl\n"
        ),
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "site.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "site.pem",
        "-days",
        "365",
        "-extfile",
        "site.ext",
    ])?;
    Ok(Certificate {
        ca: dir.join("ca.pem"),
        cert: dir.join("site.pem"),
        key: dir.join("site.key"),
    })
}

/// What `command` printed, or an error naming the command line and saying
/// what it printed on stderr. `hint` follows "running <program>" when the
/// program cannot be started.
pub(crate) fn output_of(command: &mut Command, hint: &str) -> Result<Vec<u8>> {
    let program = command.get_program().to_string_lossy().into_owned();
    let out = command
        .output()
        .with_context(|| format!("running {program} {hint}"))?;
    if !out.status.success() {
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Copies the directory `from` into `to`, recursively (the shipped
/// `html/` and `httpd-conf/` into a private site).
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Gives `path` and everything under it to the user Apache's workers run
/// as when root starts it (nobody, and nogroup where it exists): they read
/// the database and its -shm, and the CGI programs write it. Files in a
/// directory named `cgi` are left alone (hard links to the build's
/// programs). Nothing to do when not root.
pub fn give_to_workers(path: &Path) -> std::io::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .map_err(std::io::Error::from)?
        .ok_or_else(|| std::io::Error::other("this host has no user nobody"))?;
    let group = nix::unistd::Group::from_name("nogroup")
        .ok()
        .flatten()
        .map_or(nobody.gid, |g| g.gid);
    fn walk(path: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> std::io::Result<()> {
        nix::unistd::chown(path, Some(uid), Some(gid)).map_err(std::io::Error::from)?;
        if path.is_dir() {
            for entry in fs::read_dir(path)? {
                let entry = entry?;
                if path.ends_with("cgi") && !entry.file_type()?.is_dir() {
                    continue;
                }
                walk(&entry.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    walk(path, nobody.uid, group)
}
