//! `satellite check --live`: the installed site proven end to end through
//! the real Apache, as a user and a job would use it. A token from
//! getlink, its waiting page, a redeem from a node address to a temporary
//! backend this process starts there, the token's URL reaching that
//! backend, a websocket opened through Apache to it, destroy, the
//! websocket closed by the watcher, and the URL no longer reaching it.
//! Every step is a
//! finding that says what it tried (with the curl command to try it again)
//! and what to fix; the token is destroyed however the steps end.
//!
//! The requests go through curl, the tool an admin would reach for, with
//! `--resolve` so that no DNS is needed: the names are the site's, the
//! address is Apache's listener.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use satellite_core::Config;

use crate::check::{fail, ok, warn, ApacheDefines, Finding};
use crate::subprocess::OutputWithin;

const CURL_TIMEOUT: Duration = Duration::from_secs(20);
/// The watcher cuts an ended session's tunnels within 2 s (issue 15);
/// the check gives it more, so that a slow host does not fail it.
const WEBSOCKET_CUT_WITHIN: Duration = Duration::from_secs(5);
/// The backend's answer to a websocket upgrade: the start of a tunnel.
const SWITCHING: &str = "HTTP/1.1 101 Switching Protocols";

/// Where to reach Apache and which address plays the node.
pub struct LiveOptions {
    /// Apache's TLS listener (default 127.0.0.1 and its SATELLITE_PORT).
    pub connect: Option<SocketAddr>,
    /// The address getlink and redeem come from, and the temporary backend
    /// listens on: it must be in `tgtipmask` and be this host's (default:
    /// the source address the kernel picks for `connect`).
    pub from: Option<IpAddr>,
    /// The CA certificate to trust (default: the system's).
    pub cacert: Option<PathBuf>,
}

/// The live steps, after the static checks.
pub(crate) fn check_live(
    config: &Config,
    defines: Option<&ApacheDefines>,
    options: &LiveOptions,
) -> Vec<Finding> {
    let port: u16 = defines
        .and_then(|d| d.get("SATELLITE_PORT"))
        .and_then(|p| p.parse().ok())
        .unwrap_or(443);
    let connect = options
        .connect
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)));
    let from = match options.from {
        Some(from) => from,
        None => match source_address_for(connect) {
            Ok(ip) => ip,
            Err(err) => {
                return vec![fail(
                    format!("live: cannot reach {connect}: {err}"),
                    "give Apache's TLS listener with --connect ADDRESS:PORT",
                )]
            }
        },
    };
    let mut live = Live {
        ext: config.extbasename.clone(),
        connect,
        from,
        cacert: options.cacert.clone(),
        insecure: false,
        findings: Vec::new(),
    };
    live.run();
    live.findings
}

struct Live {
    ext: String,
    connect: SocketAddr,
    from: IpAddr,
    cacert: Option<PathBuf>,
    /// Set once the served certificate failed verification: the later steps
    /// still say what they find.
    insecure: bool,
    findings: Vec<Finding>,
}

/// One answer as curl saw it.
struct Answer {
    status: u16,
    body: String,
}

impl Live {
    fn run(&mut self) {
        let manage = format!("manage.{}", self.ext);
        let Some(token) = self.getlink(&manage) else {
            return;
        };
        let host = format!("{token}.{}", self.ext);
        match self.get(&host, "/", None) {
            Ok(page) if page.status == 200 => self.findings.push(ok(format!(
                "live: https://{host}/ answers the waiting page (200) before the redeem"
            ))),
            Ok(page) => self.findings.push(fail(
                format!("live: https://{host}/ answers {} before the redeem, not the waiting page", page.status),
                "check SATELLITE_DOMAIN and that satellite's vhost answers the domain (apachectl -S)",
            )),
            Err(err) => self.findings.push(fail(format!("live: {err}"), "see the TLS finding above")),
        }
        let backend = match Backend::start(self.from) {
            Ok(backend) => backend,
            Err(err) => {
                self.findings.push(fail(
                    format!(
                        "live: cannot listen on {} for a temporary backend: {err}",
                        self.from
                    ),
                    "give --from an address of this host that is in tgtipmask",
                ));
                self.destroy(&manage, &token, false);
                return;
            }
        };
        let mut tunnel = None;
        if self.redeem(&manage, &token, backend.port) {
            self.proxied(&host, &backend);
            tunnel = self.open_websocket(&host);
        }
        self.destroy(&manage, &token, true);
        if let Some(tunnel) = tunnel {
            self.websocket_cut(&host, tunnel);
        }
        match self.get(&host, "/satellite-check", None) {
            Ok(after) if !after.body.contains(&backend.nonce) => self.findings.push(ok(format!(
                "live: after destroy, https://{host}/ no longer reaches the backend ({})",
                after.status
            ))),
            Ok(_) => self.findings.push(fail(
                format!("live: after destroy, https://{host}/ still reaches the backend"),
                "is another satellite (or a stale route) answering? see the watcher finding",
            )),
            Err(err) => self.findings.push(warn(
                format!("live: after destroy: {err}"),
                "try the command by hand",
            )),
        }
    }

    fn getlink(&mut self, manage: &str) -> Option<String> {
        let answer = match self.get(manage, "/getlink.cgi", Some(self.from)) {
            Ok(answer) => answer,
            Err(err) => {
                self.findings.push(fail(
                    format!("live: getlink: {err}"),
                    "Apache must answer TLS there (see the TLS findings); --connect names another listener",
                ));
                return None;
            }
        };
        match answer.body.strip_prefix("Your token is \n").map(str::trim) {
            Some(token) if answer.status == 200 && !token.is_empty() => {
                self.findings.push(ok(format!(
                    "live: getlink from {} gave a token (`{}`)",
                    self.from,
                    self.curl_line(manage, "/getlink.cgi", Some(self.from))
                )));
                Some(token.to_owned())
            }
            _ => {
                self.findings.push(fail(
                    format!(
                        "live: getlink from {} answered {} {:?}",
                        self.from,
                        answer.status,
                        answer.body.trim()
                    ),
                    "run it from an address in tgtipmask (--from), and see the serve and database findings",
                ));
                None
            }
        }
    }

    fn redeem(&mut self, manage: &str, token: &str, port: u16) -> bool {
        let path = format!("/redeemtoken.cgi?token={token}&port={port}");
        match self.get(manage, &path, Some(self.from)) {
            Ok(answer) if answer.status == 200 && answer.body == "Success!\n" => {
                self.findings.push(ok(format!(
                    "live: redeem from {} to a temporary backend on port {port}: Success!",
                    self.from
                )));
                true
            }
            Ok(answer) => {
                self.findings.push(fail(
                    format!("live: redeem from {} answered {} {:?}", self.from, answer.status, answer.body.trim()),
                    "the address must be in tgtipmask; with job_binding = \"enforce\" an unlinked token is refused: use warn, or a node's address",
                ));
                false
            }
            Err(err) => {
                self.findings.push(fail(
                    format!("live: redeem: {err}"),
                    "try the command by hand",
                ));
                false
            }
        }
    }

    fn proxied(&mut self, host: &str, backend: &Backend) {
        match self.get(host, "/satellite-check", None) {
            Ok(answer) if answer.status == 200 && answer.body.contains(&backend.nonce) => {
                self.findings.push(ok(format!(
                    "live: https://{host}/ reached the temporary backend at {}:{} through Apache, at once after the redeem",
                    self.from, backend.port
                )))
            }
            Ok(answer) => self.findings.push(fail(
                format!(
                    "live: after the redeem, https://{host}/ answered {} without reaching the backend",
                    answer.status
                ),
                "map routing: SATELLITE_DB must be the database satellite writes; vhost routing: is cron --watch running?",
            )),
            Err(err) => self.findings.push(fail(format!("live: the token's URL: {err}"), "try the command by hand")),
        }
    }

    /// A websocket through Apache to the temporary backend, as JupyterLab
    /// keeps its kernels' (openssl s_client carries it: curl cannot keep
    /// one open). `None` (and a warning) when it cannot be opened.
    fn open_websocket(&mut self, host: &str) -> Option<Tunnel> {
        match Tunnel::open(self.connect, host, self.cacert.as_deref()) {
            Ok(tunnel) => {
                self.findings.push(ok(format!(
                    "live: a websocket to https://{host}/ reached the temporary backend through Apache"
                )));
                Some(tunnel)
            }
            Err(err) => {
                self.findings.push(warn(
                    format!("live: could not open a websocket through Apache: {err}"),
                    "check that mod_proxy_wstunnel (or mod_proxy_http's upgrade) is loaded; the watcher was not tried",
                ));
                None
            }
        }
    }

    /// The ended session's websocket must close: the watcher cuts Apache's
    /// tunnels to a backend whose route ended.
    fn websocket_cut(&mut self, host: &str, mut tunnel: Tunnel) {
        match tunnel.closed_within(WEBSOCKET_CUT_WITHIN) {
            Some(took) => self.findings.push(ok(format!(
                "live: after destroy, the websocket to https://{host}/ was closed {} ms later (cron --watch cut it)",
                took.as_millis()
            ))),
            None => self.findings.push(fail(
                format!(
                    "live: after destroy, the websocket to https://{host}/ was still open {} s later: ended sessions keep their open connections",
                    WEBSOCKET_CUT_WITHIN.as_secs()
                ),
                "run the watcher (systemctl enable --now satellite-cron, or cron --watch under your supervisor) with CAP_NET_ADMIN; see the watcher findings",
            )),
        }
    }

    fn destroy(&mut self, manage: &str, token: &str, report: bool) {
        let path = format!("/destroytoken.cgi?token={token}");
        let answer = self.get(manage, &path, Some(self.from));
        if !report {
            return;
        }
        match answer {
            Ok(answer) if answer.body == "Success! Token destroyed.\n" => self
                .findings
                .push(ok("live: destroy: Success! Token destroyed.")),
            Ok(answer) => self.findings.push(fail(
                format!(
                    "live: destroy answered {} {:?}",
                    answer.status,
                    answer.body.trim()
                ),
                "satellite revoke <token> ends it by hand",
            )),
            Err(err) => self.findings.push(fail(
                format!("live: destroy: {err}"),
                "satellite revoke <token> ends it by hand",
            )),
        }
    }

    fn curl_args(&self, host: &str, path: &str, from: Option<IpAddr>) -> Vec<String> {
        let mut args = vec![
            "--silent".to_owned(),
            "--show-error".into(),
            "--max-time".into(),
            "10".into(),
            "--resolve".into(),
            format!("{host}:{}:{}", self.connect.port(), self.connect.ip()),
        ];
        if let Some(from) = from {
            args.extend(["--interface".into(), from.to_string()]);
        }
        if let Some(ca) = &self.cacert {
            args.extend(["--cacert".into(), ca.display().to_string()]);
        }
        if self.insecure {
            args.push("--insecure".into());
        }
        args.push(format!("https://{host}:{}{path}", self.connect.port()));
        args
    }

    fn curl_line(&self, host: &str, path: &str, from: Option<IpAddr>) -> String {
        format!("curl {}", self.curl_args(host, path, from).join(" "))
    }

    /// One GET; a certificate curl cannot verify is reported once, and the
    /// steps go on without verification so that they still say something.
    fn get(&mut self, host: &str, path: &str, from: Option<IpAddr>) -> Result<Answer, String> {
        loop {
            let mut args = self.curl_args(host, path, from);
            let url = args.pop().unwrap_or_default();
            args.extend(["--write-out".into(), "\n%{http_code}".into(), url]);
            let out = Command::new("curl")
                .args(&args)
                .output_within(CURL_TIMEOUT)
                .map_err(|e| format!("cannot run curl: {e} (install curl)"))?;
            // 60: the peer's certificate cannot be verified.
            if out.status.code() == Some(60) && !self.insecure {
                self.findings.push(fail(
                    format!(
                        "live: the certificate Apache serves for {host} is not trusted here: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    "serve the wildcard certificate with its chain (SATELLITE_CERT), or give --cacert for a private CA",
                ));
                self.insecure = true;
                continue;
            }
            if !out.status.success() {
                return Err(format!(
                    "`{}`: {}",
                    self.curl_line(host, path, from),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
            return Ok(Answer {
                status: code.trim().parse().unwrap_or(0),
                body: body.to_owned(),
            });
        }
    }
}

/// The address this host sends from to reach `to`.
fn source_address_for(to: SocketAddr) -> std::io::Result<IpAddr> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(
        if to.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    ))?;
    socket.connect(to)?;
    Ok(socket.local_addr()?.ip())
}

/// A websocket through Apache, carried by `openssl s_client`: open until
/// Apache closes it (or the value is dropped).
struct Tunnel {
    client: std::process::Child,
    /// Kept open: a closed stdin would end the connection from our side.
    _stdin: std::process::ChildStdin,
    /// What the client printed, line by line (its reader thread).
    lines: std::sync::mpsc::Receiver<String>,
}

impl Tunnel {
    fn open(
        connect: SocketAddr,
        host: &str,
        cacert: Option<&std::path::Path>,
    ) -> Result<Tunnel, String> {
        let mut command = Command::new("openssl");
        command
            .args(["s_client", "-quiet", "-connect"])
            .arg(connect.to_string())
            .args(["-servername", host]);
        if let Some(ca) = cacert {
            command.arg("-CAfile").arg(ca);
        }
        let mut client = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        let request = format!(
            "GET /satellite-check/ws HTTP/1.1\r\nHost: {host}:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2F0ZWxsaXRlLWNoZWNrLQ==\r\n\r\n",
            connect.port()
        );
        let mut stdin = client.stdin.take().ok_or("no pipe to openssl")?;
        let stdout = client.stdout.take().ok_or("no pipe from openssl")?;
        stdin
            .write_all(request.as_bytes())
            .map_err(|e| format!("writing the upgrade request: {e}"))?;
        let (send, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tunnel = Tunnel {
            client,
            _stdin: stdin,
            lines,
        };
        match tunnel.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(status) if status.trim_end() == SWITCHING => Ok(tunnel),
            Ok(status) => {
                tunnel.close();
                Err(format!("Apache answered {:?}", status.trim_end()))
            }
            Err(_) => {
                tunnel.close();
                Err("no answer within 10 s".to_owned())
            }
        }
    }

    /// How long until Apache closed it, if within `limit`.
    fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if matches!(self.client.try_wait(), Ok(Some(_))) {
                return Some(started.elapsed());
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn close(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.close();
    }
}

/// A backend for the check: answers every request with a nonce, and a
/// websocket upgrade with a tunnel it keeps open, until dropped.
struct Backend {
    port: u16,
    nonce: String,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Backend {
    fn start(ip: IpAddr) -> std::io::Result<Backend> {
        let listener = TcpListener::bind((ip, 0))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let nonce = format!("satellite-check-{:016x}", rand::random::<u64>());
        let stop = Arc::new(AtomicBool::new(false));
        let (body, done) = (format!("{nonce}\n"), stop.clone());
        let thread = thread::spawn(move || {
            // Open until the backend stops (or the watcher cuts them).
            let mut tunnels = Vec::new();
            while !done.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut request = [0u8; 8192];
                        let read = stream.read(&mut request).unwrap_or(0);
                        let head = String::from_utf8_lossy(&request[..read]).to_ascii_lowercase();
                        if head.contains("\r\nupgrade: websocket") {
                            let _ = stream.write_all(
                                format!("{SWITCHING}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").as_bytes(),
                            );
                            tunnels.push(stream);
                            continue;
                        }
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(answer.as_bytes());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Backend {
            port,
            nonce,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
