//! `satellite serve`: the endpoint handlers of the core served natively, so
//! a busy site does not pay a process start and a database open per request.
//!
//! Where: a Unix socket by default (mode 0660: only Apache, through the
//! socket's owner or group, can connect), a socket passed by systemd, or a
//! TCP address when configured explicitly. The client address header is
//! believed only on the Unix socket or from `trusted_proxies` over TCP.
//!
//! Shape: an acceptor thread hands each connection to a short-lived reader
//! thread, which reads one request strictly (see `http1`) under a deadline
//! and queues it for a fixed pool of workers; a full queue gets a quick 503
//! from the reader, so a flood degrades into refusals instead of unbounded
//! memory. Each worker owns one `Context`, hence one database connection,
//! and catches a panicking handler (500; the worker carries on). SIGTERM or
//! SIGINT stops accepting; requests already read, or being read, are still
//! answered before the process exits.
//!
//! Why not tiny_http (used before): it answered twice to ambiguous framing
//! (CL+TE, duplicate Content-Length, `chunked, identity`), had no limit on
//! header size nor on slow senders, listened on TCP only, and its accept
//! thread died for good on the first failed accept. httparse parses; the
//! small connection loop here decides everything else.

mod http1;
mod listen;

use std::net::IpAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use http::StatusCode;
use satellite_core::endpoints::{bug_response, internal_error, oops, text_response, Body};
use satellite_core::ipmask::canonical_ip;
use satellite_core::metrics::{render_gauges, Registry, CONTENT_TYPE};
use satellite_core::ratelimit::MemoryLimiter;
use satellite_core::syslog::Syslog;
use satellite_core::{handle, ClientAddr, Config, Context, Endpoint};

pub use listen::{Bind, Peer};

/// What `satellite serve` writes to stderr once it listens on TCP, followed
/// by the bound address and `/`: a program that starts it on port 0 learns
/// the port from this line.
pub const LISTENING: &str = "satellite serve: listening on http://";
use listen::{Listener, Stream};

/// Requests waiting for a worker, per worker, before new ones get 503.
const QUEUE_PER_WORKER: usize = 64;
/// Connections being read at once; more are refused with 503 at accept.
const MAX_CONNECTIONS: usize = 2048;
/// How often the acceptor looks up from waiting to check for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(200);
/// How long to wait after a failed accept (out of descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Reader threads hold one request; they need little stack.
const READER_STACK: usize = 256 * 1024;

static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn request_shutdown(_: nix::libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// A request read in full, waiting for a worker.
struct Job {
    stream: Stream,
    request: http::Request<Body>,
}

/// A running server; `run` blocks until SIGTERM/SIGINT (or `stop`).
pub struct Server {
    listener: Listener,
    config: Config,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Listens where `how` says; a Unix socket gets mode 0660 and, if
    /// configured, `serve_socket_group`.
    pub fn bind(config: Config, how: &Bind) -> Result<Self> {
        raise_descriptor_limit();
        let listener = Listener::bind(how, config.serve_socket_group.as_deref())?;
        Ok(Server {
            listener,
            config,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Where the configuration says to listen: a socket from systemd if
    /// one was passed, else `serve_listen` (TCP) if set, else `serve_socket`.
    pub fn default_bind(config: &Config) -> Bind {
        if std::env::var_os("LISTEN_FDS").is_some() {
            Bind::Inherited
        } else if let Some(listen) = &config.serve_listen {
            Bind::Tcp(listen.clone())
        } else {
            Bind::Unix(config.serve_socket.clone())
        }
    }

    /// `unix:/run/satellite/serve.sock` or `http://127.0.0.1:8080/`.
    pub fn describe(&self) -> String {
        self.listener.describe()
    }

    /// Makes SIGTERM and SIGINT stop the server gracefully.
    pub fn stop_on_signals(&self) -> Result<()> {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let action = SigAction::new(
            SigHandler::Handler(request_shutdown),
            SaFlags::SA_RESTART,
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
        let metrics = Arc::new(Registry::default());
        let (queue, jobs) = mpsc::sync_channel::<Job>(workers * QUEUE_PER_WORKER);
        let jobs = Arc::new(Mutex::new(jobs));
        // One count of unknown-token answers per client for the whole
        // process, whichever worker answers.
        let limiter = Context::memory_limiter(&self.config);
        let pool: Vec<_> = (0..workers)
            .map(|i| {
                let jobs = jobs.clone();
                let config = self.config.clone();
                let metrics = metrics.clone();
                let limiter = limiter.clone();
                thread::Builder::new()
                    .name(format!("satellite-worker-{i}"))
                    .spawn(move || work(config, limiter, jobs, &metrics))
                    .context("starting a worker thread")
            })
            .collect::<Result<_>>()?;
        self.accept(queue);
        // Readers still reading hold senders: workers answer what they
        // queue, and stop once every sender is gone and the queue is empty.
        for worker in pool {
            let _ = worker.join();
        }
        Ok(())
    }

    fn accept(self, queue: SyncSender<Job>) {
        let stopping = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let config = Arc::new(self.config.clone());
        let mut failing = false;
        while !SHUTDOWN.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            if !readable(&self.listener, ACCEPT_POLL) {
                continue;
            }
            let (mut stream, peer) = match self.listener.accept() {
                Ok(accepted) => {
                    failing = false;
                    accepted
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => {
                    // Out of descriptors, say: the connection waits in the
                    // backlog until there is room again.
                    if !failing {
                        eprintln!("satellite serve: accept failed ({err}); retrying");
                        failing = true;
                    }
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                // The acceptor must not wait on this client: a short write,
                // no lingering.
                let _ = stream.set_write_timeout(Duration::from_millis(100));
                let _ = http1::write_response(&mut stream, &busy_answer(&config), false);
                continue;
            }
            let (config, queue, stopping, open_here) = (
                config.clone(),
                queue.clone(),
                stopping.clone(),
                open.clone(),
            );
            let reader = thread::Builder::new()
                .name("satellite-reader".into())
                .stack_size(READER_STACK)
                .spawn(move || {
                    read_and_queue(&config, stream, peer, &queue, &stopping);
                    open_here.fetch_sub(1, Ordering::SeqCst);
                });
            if reader.is_err() {
                // No thread to read it: the connection (moved into the
                // failed closure) is closed; the client may retry.
                open.fetch_sub(1, Ordering::SeqCst);
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
        // Stop listening first (the socket file goes away), then let the
        // readers finish what they have started.
        stopping.store(true, Ordering::SeqCst);
        drop(self.listener);
    }
}

/// Whether the listener has a connection waiting, within `timeout`.
fn readable(listener: &Listener, timeout: Duration) -> bool {
    let mut fds = [nix::libc::pollfd {
        fd: listener.raw_fd(),
        events: nix::libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, for a descriptor the listener owns.
    let ready = unsafe { nix::libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
    ready > 0
}

fn busy_answer(config: &Config) -> http::Response<Body> {
    oops(
        config,
        StatusCode::SERVICE_UNAVAILABLE,
        "The service is busy, please try again in a moment.",
    )
}

/// A reader thread: one request off `stream`, refused here or queued for
/// the workers (503 here when their queue is full).
fn read_and_queue(
    config: &Config,
    mut stream: Stream,
    peer: Peer,
    queue: &SyncSender<Job>,
    stopping: &AtomicBool,
) {
    if stream.set_write_timeout(http1::WRITE_TIMEOUT).is_err() {
        return;
    }
    let timeout = Duration::from_millis(config.serve_read_timeout_ms);
    let incoming = match http1::read_request(&mut stream, timeout, config.max_body_bytes, stopping)
    {
        Ok(incoming) => incoming,
        Err(http1::Refusal::Silent) => return,
        Err(http1::Refusal::Answer(status, message)) => {
            if http1::write_response(&mut stream, &oops(config, status, &message), false).is_ok() {
                http1::linger(&mut stream);
            }
            return;
        }
    };
    let request = match to_request(config, peer, incoming) {
        Ok(request) => request,
        Err(refusal) => {
            let _ = http1::write_response(&mut stream, &refusal, false);
            return;
        }
    };
    match queue.try_send(Job { stream, request }) {
        Ok(()) | Err(TrySendError::Disconnected(_)) => {}
        Err(TrySendError::Full(mut job)) => {
            let _ = http1::write_response(&mut job.stream, &busy_answer(config), false);
        }
    }
}

/// tiny_http served every connection on a thread of its own, and so do our
/// readers: give the process all the descriptors it may have, not the soft
/// default of 1024.
fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn work(
    config: Config,
    limiter: Option<Arc<MemoryLimiter>>,
    jobs: Arc<Mutex<Receiver<Job>>>,
    metrics: &Registry,
) {
    let new_context = || {
        let syslog = Syslog::new(&config.syslog_socket, "satellite");
        let mut ctx = Context::new(config.clone(), syslog);
        ctx.share_limiter(limiter.clone());
        ctx
    };
    let mut ctx = new_context();
    loop {
        let next = jobs.lock().map(|r| r.recv());
        let Ok(Ok(mut job)) = next else { return };
        let started = Instant::now();
        let answered =
            panic::catch_unwind(AssertUnwindSafe(|| answer(&mut ctx, &job.request, metrics)));
        let (endpoint, response) = answered.unwrap_or_else(|_| {
            // Whatever the handler was doing (a transaction, say) is not
            // to be trusted: start over with a fresh connection.
            ctx = new_context();
            (
                Some(Endpoint::for_path(job.request.uri().path())),
                bug_response(),
            )
        });
        if let Some(endpoint) = endpoint {
            metrics.record(endpoint, &response, started.elapsed());
        }
        let head_only = job.request.method() == http::Method::HEAD;
        if let Err(err) = http1::write_response(&mut job.stream, &response, head_only) {
            // A client that went away mid-answer costs nothing but this line.
            if err.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("satellite serve: answering: {err}");
            }
        }
    }
}

/// The answer, and the endpoint it counts for (`None`: a metrics scrape,
/// which is not one of the endpoints' requests).
fn answer(
    ctx: &mut Context,
    request: &http::Request<Body>,
    metrics: &Registry,
) -> (Option<Endpoint>, http::Response<Body>) {
    #[cfg(debug_assertions)]
    panic_on_request_in_tests(request);
    if request.uri().path() == METRICS_PATH {
        return (None, scrape(ctx, request, metrics));
    }
    if request.uri().path() == HEALTH_PATH {
        return (None, health(ctx));
    }
    let endpoint = Endpoint::for_path(request.uri().path());
    (Some(endpoint), handle(ctx, endpoint, request))
}

/// Where serve answers Prometheus. No endpoint of the original lives there,
/// and on a token's host it would otherwise be the waiting page's.
pub const METRICS_PATH: &str = "/metrics";

/// `GET /metrics`: the store's gauges and this process's counters, for
/// clients in `metrics_allow` only. Anyone else gets a 404, not a 403: a
/// refusal would tell a prober there is something here to be let into.
fn scrape(
    ctx: &mut Context,
    request: &http::Request<Body>,
    metrics: &Registry,
) -> http::Response<Body> {
    let allowed = request
        .extensions()
        .get::<ClientAddr>()
        .is_some_and(|c| ctx.config.metrics_allow.contains(canonical_ip(c.0)));
    if !allowed {
        // A real 404 even under legacy_status_200: no legacy client reads
        // this path, and a scraper must not take the refusal for metrics.
        return text_response(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"Oops! Not found\n".to_vec(),
        );
    }
    if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
        let mut refusal = oops(
            &ctx.config,
            StatusCode::METHOD_NOT_ALLOWED,
            "Only GET method is supported",
        );
        refusal.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return refusal;
    }
    let mut out = String::new();
    let (now, ttl) = (ctx.now(), ctx.config.ttl_secs);
    let gauges = ctx.store().and_then(|store| store.gauges(now, ttl));
    match gauges {
        Ok(gauges) => render_gauges(&mut out, &gauges, now),
        Err(err) => {
            ctx.store_failed(&err);
            eprintln!("satellite serve: metrics: {err}");
            return internal_error(&ctx.config, &err);
        }
    }
    metrics.render(&mut out);
    text_response(StatusCode::OK, CONTENT_TYPE, out.into_bytes())
}

/// Where a load balancer asks whether this frontend can serve.
pub const HEALTH_PATH: &str = "/healthz";

/// A watcher silent for longer than this is taken for dead: it beats every
/// 10 s, so this is several missed beats, not one slow step.
pub const WATCHER_ALIVE_SECS: i64 = 60;

/// `GET /healthz`: 200 only when the store answers and this frontend's
/// watcher (`watcher_name`) has beaten within [`WATCHER_ALIVE_SECS`];
/// otherwise 503 with `Retry-After` and the reason. Without its watcher a
/// frontend would keep the tunnels of ended sessions open, so a load
/// balancer should send users elsewhere. Open to every client: it says
/// only up or down, and why.
fn health(ctx: &mut Context) -> http::Response<Body> {
    let name = ctx.config.watcher_name();
    let now = ctx.now();
    let watchers = ctx.store().and_then(|store| store.watchers());
    if let Err(err) = &watchers {
        ctx.store_failed(err);
    }
    let verdict = match watchers {
        Err(err) => Err(format!("the store does not answer: {err}")),
        Ok(watchers) => match watchers.iter().find(|w| w.name == name) {
            None => Err(format!("no watcher named {name} has run on this store")),
            Some(watcher) => {
                let age = watcher
                    .heartbeat
                    .map(|beat| (now - beat).num_seconds().max(0));
                match age {
                    Some(age) if age <= WATCHER_ALIVE_SECS => {
                        Ok(format!("store answers, watcher {name} alive {age} s ago"))
                    }
                    Some(age) => Err(format!("watcher {name} silent for {age} s")),
                    None => Err(format!("watcher {name} has no heartbeat")),
                }
            }
        },
    };
    match verdict {
        Ok(why) => text_response(
            StatusCode::OK,
            "text/plain",
            format!("ok: {why}\n").into_bytes(),
        ),
        Err(why) => {
            let mut response = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("unavailable: {why}\n").into_bytes(),
            );
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("5"),
            );
            response
        }
    }
}

/// Debug builds only: with `SATELLITE_SERVE_TEST_PANIC=1`, a request for
/// `/.satellite-test/panic` panics inside the worker, so tests can check
/// that a panicking handler is answered with a 500 and the worker lives.
#[cfg(debug_assertions)]
fn panic_on_request_in_tests(request: &http::Request<Body>) {
    if request.uri().path() == "/.satellite-test/panic"
        && std::env::var_os("SATELLITE_SERVE_TEST_PANIC").is_some_and(|v| v == "1")
    {
        panic!("a test asked this handler to panic");
    }
}

/// The request as the handlers see it, or the answer refusing it.
fn to_request(
    config: &Config,
    peer: Peer,
    incoming: http1::Incoming,
) -> Result<http::Request<Body>, Box<http::Response<Body>>> {
    let bad = |status: StatusCode, message: &str| Box::new(oops(config, status, message));
    let target = &incoming.target;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let uri = satellite_cgi::request_uri(path.as_bytes(), query.as_bytes())
        .ok_or_else(|| bad(StatusCode::URI_TOO_LONG, "Request URI too long"))?;
    let mut builder = http::Request::builder()
        .method(incoming.method.as_str())
        .uri(uri);
    let mut proxied_client = None;
    let mut forwarded_host = None;
    for (name, value) in &incoming.headers {
        if name.eq_ignore_ascii_case(&config.client_addr_header) {
            proxied_client = Some(value.clone());
            // Consumed here; handlers never see a client-settable address.
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-host") {
            forwarded_host = Some(value.clone());
        }
        // As in CGI: a header that is not valid HTTP is dropped, not fatal.
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            builder = builder.header(name, value);
        }
    }
    if let Some(addr) = client_addr(config, peer, proxied_client.as_deref()) {
        builder = builder.extension(ClientAddr(addr));
    }
    // Behind Apache the Host is Apache's view of us; the host the user
    // asked for (which names the alias) is the last X-Forwarded-Host entry,
    // the one Apache appended.
    if behind_proxy(config, peer) {
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
    builder
        .body(incoming.body)
        .map_err(|_| bad(StatusCode::BAD_REQUEST, "Malformed request"))
}

/// Whether the peer is the fronting proxy, whose headers describe the
/// client: anyone on the Unix socket (its mode admits only Apache), or a
/// TCP peer in `trusted_proxies`.
fn behind_proxy(config: &Config, peer: Peer) -> bool {
    match peer {
        Peer::Unix => true,
        Peer::Tcp(ip) => config.trusted_proxies.contains(canonical_ip(ip)),
    }
}

/// The client's address: the TCP peer, or the fronting proxy's header when
/// (and only when) the peer is the proxy. `X-Forwarded-For` is never
/// believed: any client can send it.
pub fn client_addr(config: &Config, peer: Peer, header: Option<&[u8]>) -> Option<IpAddr> {
    if let Peer::Tcp(ip) = peer {
        if !behind_proxy(config, peer) {
            return Some(canonical_ip(ip));
        }
    }
    let claimed = std::str::from_utf8(header?)
        .ok()?
        .trim()
        .parse::<IpAddr>()
        .ok()?;
    Some(canonical_ip(claimed))
}
