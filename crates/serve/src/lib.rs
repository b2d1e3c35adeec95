//! `satellite serve`: the endpoint handlers of the core served natively, so
//! a busy site does not pay a process start and a database open per request.
//!
//! Shape: one acceptor thread takes requests from tiny_http and hands them to
//! a fixed pool of workers through a bounded queue; when the queue is full
//! the acceptor answers 503 itself, so a flood degrades into quick refusals
//! instead of unbounded memory. Each worker owns one `Context`, hence one
//! database connection. SIGTERM or SIGINT stops the acceptor; queued and
//! in-flight requests are answered before the process exits.
//!
//! tiny_http's accept thread ends for good on the first failed `accept`,
//! or panics, when descriptors run out under a flood; the acceptor notices
//! either and, once there is room again, starts a new tiny_http server on
//! the same socket; the old one keeps answering the connections it has. tiny_http sets no
//! limits on header size or on slow clients: serve belongs on loopback
//! behind Apache, which enforces both.

use std::io::Read;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use http::StatusCode;
use satellite_core::endpoints::{oops, Body};
use satellite_core::ipmask::canonical_ip;
use satellite_core::syslog::Syslog;
use satellite_core::{handle, ClientAddr, Config, Context, Endpoint};

/// Requests waiting for a worker, per worker, before new ones get 503.
const QUEUE_PER_WORKER: usize = 64;
/// How often the acceptor looks up from `recv` to check for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// How long to wait after a failed accept before listening again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

static SHUTDOWN: AtomicBool = AtomicBool::new(false);
/// Set when a tiny_http thread panics: under descriptor exhaustion its
/// accept thread can die by `unwrap` rather than by a reported error.
static TINY_HTTP_PANICKED: AtomicBool = AtomicBool::new(false);

extern "C" fn request_shutdown(_: nix::libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// What `satellite serve` writes to stderr once it listens, followed by the
/// bound address and `/`: a program that starts it on port 0 learns the
/// port from this line.
pub const LISTENING: &str = "satellite serve: listening on http://";

/// A running server; `run` blocks until SIGTERM/SIGINT (or `stop`).
pub struct Server {
    listener: std::net::TcpListener,
    http: tiny_http::Server,
    config: Config,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Listens on `listen` (`host:port`).
    ///
    /// # Errors
    /// When the address cannot be bound or the server cannot start.
    pub fn bind(config: Config, listen: &str) -> Result<Self> {
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("listening on {listen}"))?;
        Self::on_listener(config, listener)
    }

    /// Serves on a socket the caller has bound already: a caller that binds
    /// port 0 knows the port it got and keeps it, where picking a free port
    /// and binding it again later could lose it to another process.
    ///
    /// # Errors
    /// When the server cannot start on the socket.
    pub fn on_listener(config: Config, listener: std::net::TcpListener) -> Result<Self> {
        raise_descriptor_limit();
        watch_for_tiny_http_panics();
        let http = serve_on(&listener)?;
        Ok(Server {
            listener,
            http,
            config,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The address it listens on: the port the system chose when asked to
    /// listen on port 0.
    ///
    /// # Errors
    /// When the socket cannot be asked (it is always bound by now).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Makes SIGTERM and SIGINT stop the server gracefully.
    pub fn stop_on_signals(&self) -> Result<()> {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let action = SigAction::new(
            SigHandler::Handler(request_shutdown),
            SaFlags::empty(),
            SigSet::empty(),
        );
        for signal in [Signal::SIGTERM, Signal::SIGINT] {
            // SAFETY: the handler only stores to an atomic, which is
            // async-signal-safe.
            unsafe { sigaction(signal, &action) }.context("installing a signal handler")?;
        }
        Ok(())
    }

    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    pub fn run(self) -> Result<()> {
        let workers = self.config.serve_workers;
        let config = self.config.clone();
        let (queue, requests) =
            mpsc::sync_channel::<tiny_http::Request>(workers * QUEUE_PER_WORKER);
        let requests = Arc::new(Mutex::new(requests));
        let pool: Vec<_> = (0..workers)
            .map(|i| {
                let requests = requests.clone();
                let config = config.clone();
                thread::Builder::new()
                    .name(format!("satellite-worker-{i}"))
                    .spawn(move || work(config, requests))
                    .context("starting a worker thread")
            })
            .collect::<Result<_>>()?;
        self.accept(queue);
        // Dropping the sender lets workers drain the queue, then stop.
        for worker in pool {
            let _ = worker.join();
        }
        Ok(())
    }

    fn accept(self, queue: SyncSender<tiny_http::Request>) {
        // The newest server accepts; earlier ones (whose accept thread died)
        // still deliver requests from the connections they hold.
        let mut retired: Vec<tiny_http::Server> = Vec::new();
        let mut current = self.http;
        let mut accepting = true;
        while !SHUTDOWN.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            for old in &retired {
                while let Ok(Some(request)) = old.try_recv() {
                    dispatch(&self.config, &queue, request);
                }
            }
            if TINY_HTTP_PANICKED.swap(false, Ordering::SeqCst) {
                accepting = false;
            }
            if !accepting {
                // Out of descriptors, say. A new accept thread would fail
                // at once (and each new server keeps a descriptor), so wait
                // until there is room again.
                thread::sleep(ACCEPT_BACKOFF);
                if has_headroom(&self.listener) {
                    match serve_on(&self.listener) {
                        Ok(fresh) => {
                            retired.push(std::mem::replace(&mut current, fresh));
                            accepting = true;
                        }
                        Err(err) => eprintln!("satellite serve: listening again: {err:#}"),
                    }
                }
            }
            match current.recv_timeout(ACCEPT_POLL) {
                Ok(Some(request)) => dispatch(&self.config, &queue, request),
                Ok(None) => {}
                Err(err) => {
                    eprintln!("satellite serve: accept failed ({err}); listening again");
                    accepting = false;
                }
            }
        }
    }
}

/// Hands a request to the workers, or answers 503 itself when the queue
/// is full.
fn dispatch(config: &Config, queue: &SyncSender<tiny_http::Request>, request: tiny_http::Request) {
    match queue.try_send(request) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(request)) => {
            let busy = oops(
                config,
                StatusCode::SERVICE_UNAVAILABLE,
                "The service is busy, please try again in a moment.",
            );
            respond(request, busy);
        }
    }
}

/// tiny_http serves every connection on a thread of its own: give the
/// process all the descriptors it may have, not the soft default of 1024.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Flags panics in tiny_http's threads (after the usual report), so the
/// acceptor can listen again if the one that died was the accept thread.
fn watch_for_tiny_http_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().contains("tiny_http"))
            {
                TINY_HTTP_PANICKED.store(true, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Whether a burst of new connections could be accepted now.
fn has_headroom(listener: &std::net::TcpListener) -> bool {
    const SPARE_DESCRIPTORS: usize = 16;
    let spare: Vec<_> = (0..SPARE_DESCRIPTORS)
        .map(|_| listener.try_clone())
        .collect();
    spare.iter().all(Result::is_ok)
}

/// A tiny_http server accepting on (a clone of) our listening socket.
fn serve_on(listener: &std::net::TcpListener) -> Result<tiny_http::Server> {
    let socket = listener
        .try_clone()
        .context("sharing the listening socket")?;
    tiny_http::Server::from_listener(socket, None).map_err(|err| anyhow!("serving: {err}"))
}

fn work(config: Config, requests: Arc<Mutex<Receiver<tiny_http::Request>>>) {
    let syslog = Syslog::new(&config.syslog_socket, "satellite");
    let mut ctx = Context::new(config, syslog);
    loop {
        let next = requests.lock().map(|r| r.recv());
        let Ok(Ok(mut request)) = next else { return };
        let parts = request_parts(&ctx.config, &mut request);
        let response = answer(&mut ctx, parts);
        respond(request, response);
    }
}

/// The request as the handlers see it, or the answer refusing it.
fn request_parts(
    config: &Config,
    request: &mut tiny_http::Request,
) -> Result<http::Request<Body>, Box<http::Response<Body>>> {
    let bad = |status: StatusCode, message: &str| Box::new(oops(config, status, message));
    let (path, query) = request.url().split_once('?').unwrap_or((request.url(), ""));
    let uri = satellite_cgi::request_uri(path.as_bytes(), query.as_bytes())
        .ok_or_else(|| bad(StatusCode::URI_TOO_LONG, "Request URI too long"))?;
    let mut builder = http::Request::builder()
        .method(request.method().as_str())
        .uri(uri);
    let mut proxied_client = None;
    let mut forwarded_host = None;
    for header in request.headers() {
        let name = header.field.as_str().as_str();
        let value = header.value.as_str().as_bytes();
        if name.eq_ignore_ascii_case(&config.client_addr_header) {
            proxied_client = Some(value.to_vec());
            // Consumed here; handlers never see a client-settable address.
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-host") {
            forwarded_host = Some(value.to_vec());
        }
        // As in CGI: a header that is not valid HTTP is dropped, not fatal.
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            builder = builder.header(name, value);
        }
    }
    let peer = request.remote_addr().map(|a| a.ip());
    let behind_trusted_proxy = peer.is_some_and(|p| config.trusted_proxies.contains(p));
    if let Some(addr) = client_addr(config, peer, proxied_client.as_deref()) {
        builder = builder.extension(ClientAddr(addr));
    }
    // Behind Apache the Host is Apache's view of us; the host the user
    // asked for (which names the alias) is the last X-Forwarded-Host entry,
    // the one Apache appended.
    if behind_trusted_proxy {
        let last = forwarded_host
            .as_deref()
            .and_then(|v| v.rsplit(|&b| b == b',').next())
            .map(|v| v.trim_ascii());
        if let Some(Ok(host)) = last.map(http::HeaderValue::from_bytes) {
            if let Some(headers) = builder.headers_mut() {
                headers.insert(http::header::HOST, host);
            }
        }
    }
    let declared = request.body_length().unwrap_or(0);
    if declared > config.max_body_bytes {
        return Err(bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "Request body too large (at most {} bytes)",
                config.max_body_bytes
            ),
        ));
    }
    let mut body = Vec::new();
    let limit = config.max_body_bytes as u64 + 1;
    if let Err(err) = request.as_reader().take(limit).read_to_end(&mut body) {
        eprintln!("satellite serve: reading a request body: {err}");
        return Err(bad(StatusCode::BAD_REQUEST, "Malformed request"));
    }
    if body.len() > config.max_body_bytes {
        return Err(bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "Request body too large (at most {} bytes)",
                config.max_body_bytes
            ),
        ));
    }
    builder
        .body(body)
        .map_err(|_| bad(StatusCode::BAD_REQUEST, "Malformed request"))
}

fn answer(
    ctx: &mut Context,
    parts: Result<http::Request<Body>, Box<http::Response<Body>>>,
) -> http::Response<Body> {
    match parts {
        Ok(request) => {
            let endpoint = Endpoint::for_path(request.uri().path());
            handle(ctx, endpoint, &request)
        }
        Err(refusal) => *refusal,
    }
}

fn respond(request: tiny_http::Request, response: http::Response<Body>) {
    let status = response.status().as_u16();
    let headers: Vec<tiny_http::Header> = response
        .headers()
        .iter()
        .filter_map(|(name, value)| {
            tiny_http::Header::from_bytes(
                satellite_cgi::title_case(name.as_str()),
                value.as_bytes(),
            )
            .ok()
        })
        .collect();
    let body = response.into_body();
    let length = body.len();
    let reply = tiny_http::Response::new(
        tiny_http::StatusCode(status),
        headers,
        std::io::Cursor::new(body),
        Some(length),
        None,
    );
    // A client that went away mid-answer costs nothing but this line.
    if let Err(err) = request.respond(reply) {
        if err.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("satellite serve: answering: {err}");
        }
    }
}

/// The client's address: the TCP peer, or the fronting proxy's header when
/// (and only when) the peer is a trusted proxy. `X-Forwarded-For` is never
/// believed: any client can send it.
pub fn client_addr(config: &Config, peer: Option<IpAddr>, header: Option<&[u8]>) -> Option<IpAddr> {
    let peer = canonical_ip(peer?);
    if !config.trusted_proxies.contains(peer) {
        return Some(peer);
    }
    let claimed = std::str::from_utf8(header?)
        .ok()?
        .trim()
        .parse::<IpAddr>()
        .ok()?;
    Some(canonical_ip(claimed))
}
