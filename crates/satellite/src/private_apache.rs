//! A private, unprivileged-port Apache httpd instance running the project's
//! own `httpd-conf/satellite.conf`: its own ServerRoot in a directory of
//! ours, loopback only. Used by `satellite demo`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// The site config shipped with the binary, so the demo runs from anywhere.
pub const SATELLITE_CONF: &str = include_str!("../../../httpd-conf/satellite.conf");

const MODULES: [(&str, &str); 12] = [
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
];

/// Where Apache is on this machine.
pub struct ApacheInstall {
    pub binary: PathBuf,
    pub modules_dir: PathBuf,
}

impl ApacheInstall {
    /// Debian's apache2 or RHEL's httpd, or a message saying how to get one.
    pub fn find() -> Result<Self> {
        let candidates = [
            ("/usr/sbin/apache2", "/usr/lib/apache2/modules"),
            ("/usr/sbin/httpd", "/usr/lib64/httpd/modules"),
            ("/usr/sbin/httpd", "/usr/lib/httpd/modules"),
        ];
        for (binary, modules) in candidates {
            if Path::new(binary).exists() && Path::new(modules).join("mod_ssl.so").exists() {
                return Ok(ApacheInstall {
                    binary: binary.into(),
                    modules_dir: modules.into(),
                });
            }
        }
        bail!(
            "Apache httpd with mod_ssl was not found. Install it first:\n  \
             Debian/Ubuntu: sudo apt-get install apache2\n  \
             RHEL/Rocky/Alma: sudo dnf install httpd mod_ssl"
        )
    }
}

pub struct Site {
    /// The install tree (cgi/, etc/, var/, dynconf/, html/).
    pub root: PathBuf,
    pub domain: String,
    pub port: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `Some(url)`: endpoints go to `satellite serve` at that URL.
    pub serve_url: Option<String>,
    pub vhost_routing: bool,
}

pub struct PrivateApache {
    child: Child,
    pub dir: PathBuf,
    pub error_log: PathBuf,
}

impl PrivateApache {
    /// Writes `<dir>/httpd.conf` and starts Apache in the foreground as our
    /// child; returns once it answers on its port.
    pub fn start(install: &ApacheInstall, dir: &Path, site: &Site) -> Result<Self> {
        let conf = Self::write_config(install, dir, site)?;
        let test = Command::new(&install.binary)
            .arg("-f")
            .arg(&conf)
            .arg("-t")
            .output()?;
        if !test.status.success() {
            bail!(
                "Apache's config test failed: {}",
                String::from_utf8_lossy(&test.stderr).trim()
            );
        }
        let child = Command::new(&install.binary)
            .arg("-f")
            .arg(&conf)
            .arg("-DFOREGROUND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", install.binary.display()))?;
        let mut apache = PrivateApache {
            child,
            dir: dir.to_owned(),
            error_log: dir.join("error.log"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", site.port)).is_err() {
            if let Some(status) = apache.child.try_wait()? {
                bail!(
                    "Apache exited ({status}) at start: {}",
                    fs::read_to_string(&apache.error_log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("Apache did not start listening on port {}", site.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(apache)
    }

    pub fn config_path(dir: &Path) -> PathBuf {
        dir.join("httpd.conf")
    }

    fn write_config(install: &ApacheInstall, dir: &Path, site: &Site) -> Result<PathBuf> {
        let satellite_conf = dir.join("satellite.conf");
        fs::write(&satellite_conf, SATELLITE_CONF)?;
        let mut conf = String::new();
        let _ = writeln!(conf, "ServerRoot \"{}\"", dir.display());
        let _ = writeln!(conf, "PidFile \"{}\"", dir.join("httpd.pid").display());
        let _ = writeln!(conf, "ErrorLog \"{}\"", dir.join("error.log").display());
        conf.push_str("LogLevel warn\n");
        for (name, file) in MODULES {
            let _ = writeln!(
                conf,
                "<IfModule !{name}>\n    LoadModule {name} \"{}\"\n</IfModule>",
                install.modules_dir.join(file).display()
            );
        }
        let log_config = install.modules_dir.join("mod_log_config.so");
        if log_config.exists() {
            let _ = writeln!(conf, "<IfModule !log_config_module>\n    LoadModule log_config_module \"{}\"\n</IfModule>", log_config.display());
        }
        conf.push_str("TypesConfig /etc/mime.types\n");
        let _ = writeln!(conf, "ScriptSock \"{}\"", dir.join("cgisock").display());
        let _ = writeln!(conf, "Listen 127.0.0.1:{} https", site.port);
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
        let domain_re = site.domain.replace('.', "\\.");
        let defines = [
            ("SATELLITE_ROOT", site.root.display().to_string()),
            ("SATELLITE_DOMAIN", site.domain.clone()),
            ("SATELLITE_DOMAIN_RE", domain_re),
            ("SATELLITE_PORT", site.port.to_string()),
            ("SATELLITE_CERT", site.cert.display().to_string()),
            ("SATELLITE_KEY", site.key.display().to_string()),
            ("SATELLITE_LOG_DIR", dir.display().to_string()),
        ];
        for (name, value) in defines {
            let _ = writeln!(conf, "Define {name} \"{value}\"");
        }
        if let Some(url) = &site.serve_url {
            let _ = writeln!(conf, "Define SATELLITE_SERVE \"{url}\"");
        }
        if site.vhost_routing {
            conf.push_str("Define SATELLITE_VHOST_ROUTING\n");
        }
        let _ = writeln!(conf, "Include \"{}\"", satellite_conf.display());
        let path = Self::config_path(dir);
        fs::write(&path, conf)?;
        Ok(path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateApache {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A throwaway CA and a leaf certificate for `*.<domain>` and `<domain>`,
/// made with the openssl command. Returns (ca, leaf certificate, leaf key).
pub fn make_certificate(dir: &Path, domain: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (install the openssl package)")?;
        if !out.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=satellite demo CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "site.key",
        "-out",
        "site.csr",
        "-subj",
        &format!("/CN={domain}"),
    ])?;
    fs::write(
        dir.join("site.ext"),
        format!("subjectAltName=DNS:{domain},DNS:*.{domain}\nbasicConstraints=CA:FALSE\n"),
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
        "2",
        "-extfile",
        "site.ext",
    ])?;
    Ok((
        dir.join("ca.pem"),
        dir.join("site.pem"),
        dir.join("site.key"),
    ))
}
