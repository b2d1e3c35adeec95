//! `satellite demo`: the whole stack on loopback for a newcomer: an install
//! tree in a temporary directory, a private Apache with the real
//! httpd-conf and a throwaway wildcard certificate, `serve`, `cron --watch`
//! and a small backend standing in for a notebook. It prints the steps;
//! `--walkthrough` performs them and exits.

/// `println!` that drops write errors: `scripts/demo | head` must not panic
/// the demo when the reader goes.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use satellite_core::Config;

use crate::private_apache::{
    make_certificate, output_of, ApacheInstall, PrivateApache, Site, SiteConf,
};
use satellite_core::subprocess::OutputWithin;

pub const DOMAIN: &str = "demo.localhost";
/// Where the sample backend ("the compute node") listens.
pub const BACKEND_IP: &str = "127.0.0.3";

pub struct DemoOptions {
    pub port: u16,
    pub walkthrough: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Runs the demo until Ctrl-C (or through the walkthrough). `install`
/// makes an install tree (`satellite init`) at the given prefix for the
/// given domain.
pub fn demo(options: &DemoOptions, install: impl FnOnce(&Path, &str) -> Result<()>) -> Result<()> {
    let apache = ApacheInstall::find()?;
    let work = tempfile::Builder::new()
        .prefix("satellite-demo-")
        .tempdir()?;
    let dir = work.path();
    let root = dir.join("site");
    say!("satellite demo in {}", dir.display());
    install(&root, DOMAIN)?;
    let certificate = make_certificate(dir, DOMAIN)?;
    let serve_socket = dir.join("serve.sock");
    // Apache's workers run as nobody:nogroup under root: the socket's group.
    let socket_group = if nix::unistd::Uid::effective().is_root() {
        "serve_socket_group = \"nogroup\"\n"
    } else {
        ""
    };
    // Bound now and handed over, so no other process can take the port
    // between choosing and using it.
    let backend = TcpListener::bind((BACKEND_IP, 0))
        .with_context(|| format!("starting the sample backend on {BACKEND_IP}"))?;
    let backend_port = backend.local_addr()?.port();
    let config_path = root.join("etc/satellite.toml");
    std::fs::write(
        &config_path,
        format!(
            "extbasename = \"{DOMAIN}\"\n\
             tgtipmask = [\"127.0.0.0/8\"]\n\
             jobstateipmask = [\"127.0.0.0/8\"]\n\
             extport = {port}\nlistenport = {port}\n\
             routing = \"map\"\n\
             syslog_socket = \"\"\n\
             serve_socket = \"{socket}\"\n{socket_group}\
             serve_workers = 4\n\
             apache_user = \"{worker}\"\n",
            port = options.port,
            socket = serve_socket.display(),
            worker = PrivateApache::worker_user(),
        ),
    )?;
    if nix::unistd::Uid::effective().is_root() {
        // Apache's workers run as nobody; let them read the tree.
        open_up(dir)?;
    }
    let config = Config::load_file(&config_path)?;

    let server = satellite_serve::Server::bind(
        config.clone(),
        &satellite_serve::Bind::Unix(serve_socket.clone()),
    )?;
    let stop_serving = server.stopper();
    let serving = thread::spawn(move || server.run());
    let watch_config = config.clone();
    thread::spawn(move || {
        let _ = satellite_cron::watch(&watch_config, |report| {
            if let Err(err) = report {
                eprintln!("satellite cron: {err:#}");
            }
        });
    });
    thread::spawn(move || sample_backend(backend));

    let apache_dir = dir.join("apache");
    std::fs::create_dir_all(&apache_dir)?;
    if nix::unistd::Uid::effective().is_root() {
        open_up(&apache_dir)?;
    }
    let mut httpd = PrivateApache::start(
        &apache,
        &apache_dir,
        &Site {
            root: root.clone(),
            domain: DOMAIN.into(),
            listen_ip: std::net::Ipv4Addr::LOCALHOST,
            port: options.port,
            http_port: None,
            cert: certificate.cert,
            key: certificate.key,
            serve_url: Some(format!("unix:{}|http://localhost", serve_socket.display())),
            routing: satellite_core::config::Routing::Map,
            conf: SiteConf::Embedded,
            defines: Vec::new(),
        },
    )?;

    let steps = Steps {
        port: options.port,
        ca: certificate.ca,
        backend_port,
    };
    say!("{}", steps.describe());
    let result = if options.walkthrough {
        steps.walk()
    } else {
        wait_for_interrupt()
    };
    httpd.stop();
    stop_serving.store(true, Ordering::SeqCst);
    let _ = serving.join();
    drop(work);
    result
}

fn open_up(path: &Path) -> Result<()> {
    let status = Command::new("chmod")
        .arg("-R")
        .arg("a+rwX")
        .arg(path)
        .output_within(Duration::from_secs(60))?
        .status;
    if !status.success() {
        bail!("chmod -R a+rwX {} failed", path.display());
    }
    Ok(())
}

fn wait_for_interrupt() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }?;
    }
    say!("The demo runs until Ctrl-C.");
    while !INTERRUPTED.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(200));
    }
    say!("\nstopping and cleaning up");
    Ok(())
}

/// A stand-in for a notebook on a compute node: answers every request with
/// a line naming itself and the path it was asked for.
fn sample_backend(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        thread::spawn(move || {
            let _ = answer_backend(stream);
        });
    }
}

fn answer_backend(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let body = format!("Hello from the demo notebook! You asked for {target}\n");
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes())
}

struct Steps {
    port: u16,
    ca: PathBuf,
    backend_port: u16,
}

impl Steps {
    fn curl_base(&self, host: &str) -> Vec<String> {
        vec![
            "curl".into(),
            "--silent".into(),
            "--show-error".into(),
            "--cacert".into(),
            self.ca.display().to_string(),
            "--resolve".into(),
            format!("{host}:{}:127.0.0.1", self.port),
        ]
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    fn describe(&self) -> String {
        let manage = format!("manage.{DOMAIN}");
        let show = |args: Vec<String>| args.join(" ");
        let mut getlink = self.curl_base(&manage);
        getlink.push(self.url(&manage, "/getlink.cgi"));
        let mut redeem = self.curl_base(&manage);
        redeem.extend(["--interface".into(), BACKEND_IP.into()]);
        redeem.push(format!(
            "\"{}\"",
            self.url(
                &manage,
                &format!("/redeemtoken.cgi?token=$TOKEN&port={}", self.backend_port)
            )
        ));
        let mut open = self.curl_base(&format!("$TOKEN.{DOMAIN}"));
        open.push(format!(
            "\"{}\"",
            self.url(&format!("$TOKEN.{DOMAIN}"), "/?token=abc")
        ));
        format!(
            "\nThe stack is up: Apache on https://*.{DOMAIN}:{port}/ (private instance, throwaway CA {ca}),\n\
             satellite serve behind it, cron --watch, and a sample notebook on {BACKEND_IP}:{backend}.\n\n\
             1. Get a token (what galyleo does on the login node):\n   {getlink}\n   \
             TOKEN=<the last word it printed>\n\
             2. Open the user's URL: while the job is pending it is the waiting page:\n   {open}\n\
             3. Redeem the token from the \"compute node\" ({BACKEND_IP}), port {backend}:\n   {redeem}\n\
             4. Open the URL again: it now reaches the notebook, no reload, no wait:\n   {open}\n",
            port = self.port,
            ca = self.ca.display(),
            backend = self.backend_port,
            getlink = show(getlink),
            open = show(open),
            redeem = show(redeem),
        )
    }

    fn curl(&self, host: &str, path: &str, extra: &[&str]) -> Result<String> {
        let mut args = self.curl_base(host);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.url(host, path));
        let out = output_of(Command::new(&args[0]).args(&args[1..]), "(install curl)")?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Performs the steps, checking each answer.
    fn walk(&self) -> Result<()> {
        let manage = format!("manage.{DOMAIN}");
        let answer = self.curl(&manage, "/getlink.cgi", &[])?;
        let token = answer
            .strip_prefix("Your token is \n")
            .and_then(|t| t.strip_suffix('\n'))
            .with_context(|| format!("getlink answered {answer:?}"))?
            .to_owned();
        say!("walkthrough: 1. got token {token}");
        let host = format!("{token}.{DOMAIN}");
        let page = self.curl(&host, "/?token=abc", &[])?;
        if !page.contains("tokenjobstate.cgi") {
            bail!("the pending URL did not show the waiting page: {page:.200}");
        }
        say!(
            "walkthrough: 2. https://{host}:{}/ shows the waiting page",
            self.port
        );
        let redeem = self.curl(
            &manage,
            &format!("/redeemtoken.cgi?token={token}&port={}", self.backend_port),
            &["--interface", BACKEND_IP],
        )?;
        if redeem != "Success!\n" {
            bail!("redeem answered {redeem:?}");
        }
        say!(
            "walkthrough: 3. redeemed from {BACKEND_IP}:{}",
            self.backend_port
        );
        let notebook = self.curl(&host, "/lab?token=abc", &[])?;
        if !notebook.starts_with("Hello from the demo notebook! You asked for /lab?token=abc") {
            bail!("the URL did not reach the notebook: {notebook:?}");
        }
        say!(
            "walkthrough: 4. the URL reaches the notebook: {}",
            notebook.trim()
        );
        let destroy = self.curl(
            &manage,
            &format!("/destroytoken.cgi?token={token}"),
            &["--interface", BACKEND_IP],
        )?;
        if destroy != "Success! Token destroyed.\n" {
            bail!("destroy answered {destroy:?}");
        }
        let after = self.curl(&host, "/", &[])?;
        if !after.contains("tokenjobstate.cgi") {
            bail!("after destroy the URL answered {after:?}");
        }
        say!("walkthrough: 5. destroyed; the URL is back to the waiting page, which tells the session is over");
        say!("walkthrough: all steps passed");
        Ok(())
    }
}
