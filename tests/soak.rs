//! The soak (issue 18): mixed load through a private Apache with the
//! shipped `httpd-conf/`, `satellite serve` behind it and `cron --watch`,
//! both restarted when they die as systemd restarts them: session cycles
//! (getlink, link, redeem, proxied HTTP to the live route, destroy, the
//! page's poll), waiting-page polls, proxied requests to long-lived
//! routes, unknown token hosts, and websockets kept open and echoing.
//! Every answer is checked (status and body). Every 10 s it samples the
//! memory, open files and threads of serve, the watcher and Apache, the
//! database and WAL sizes, and the latency per kind of request; it ends
//! with a table and a verdict.
//!
//! Faults (`SATELLITE_SOAK_FAULTS=1`): kill -9 of serve, of the watcher
//! and of an Apache child under load, and the database locked by another
//! process for 10 s. Within a fault's window (and 5 s after) a 502 or 503
//! or a refused connection is the expected answer; a wrong body, a
//! `Success!` for a write that did not commit, or a row lost is never.
//!
//! In the suite it runs for 2 minutes and asserts correctness only (no
//! wrong answer, no rows lost, no growth of open files); the figures are
//! printed. The hour: `SATELLITE_SOAK_SECONDS=3600 SATELLITE_SOAK_FAULTS=1
//! cargo test --release --test soak -- --nocapture` (docs/benchmarks.md).

mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::apache::{Apache, Routing};
use support::backend::Backend;
use support::client::Conn;
use support::program;

const JUPYTER_WS: &str = "v1.kernel.websocket.jupyter.org";
const BACKEND_IPS: [&str; 4] = ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"];
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// After a fault ends, answers may still fail for this long (a restart).
const RECOVERY: Duration = Duration::from_secs(5);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process restarted one second after it dies, as `Restart=always`
/// (`RestartSec=1`) does; its current pid for the sampler and the faults.
struct Supervised {
    pid: Arc<AtomicU32>,
    restarts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Supervised {
    fn start(make: impl Fn() -> Command + Send + 'static) -> Supervised {
        let pid = Arc::new(AtomicU32::new(0));
        let restarts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, r, s) = (pid.clone(), restarts.clone(), stop.clone());
        let thread = thread::spawn(move || loop {
            let mut child: Child = make().spawn().expect("starting a supervised program");
            p.store(child.id(), Ordering::SeqCst);
            loop {
                if s.load(Ordering::SeqCst) {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            r.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_secs(1));
        });
        Supervised {
            pid,
            restarts,
            stop,
            thread: Some(thread),
        }
    }

    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the load saw, shared by its threads.
#[derive(Default)]
struct Tally {
    /// When the load started: wrong answers say when they came.
    epoch: Mutex<Option<Instant>>,
    answers: AtomicU64,
    tolerated: AtomicU64,
    wrong: Mutex<Vec<String>>,
    /// (kind, when, how long), for the latency per sample window.
    latencies: Mutex<Vec<(&'static str, Instant, Duration)>>,
    /// Fault windows: answers that fail within one are expected.
    faults: Mutex<Vec<(Instant, Instant)>>,
    /// Tokens by what the last successful write made of them.
    tokens: Mutex<HashMap<String, &'static str>>,
}

impl Tally {
    fn in_fault(&self, at: Instant) -> bool {
        self.faults
            .lock()
            .unwrap()
            .iter()
            .any(|(from, to)| at >= *from && at <= *to + RECOVERY)
    }

    /// Records one answer: `Ok` when it is the expected one; an unexpected
    /// one is tolerated inside a fault window only when it is a refusal
    /// to work (502, 503, a dropped connection), never a wrong success.
    fn check(&self, kind: &'static str, started: Instant, result: Result<(), Failure>) -> bool {
        let took = started.elapsed();
        self.answers.fetch_add(1, Ordering::Relaxed);
        self.latencies.lock().unwrap().push((kind, started, took));
        match result {
            Ok(()) => true,
            Err(Failure::Unavailable(why)) if self.in_fault(started) => {
                let _ = why;
                self.tolerated.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(Failure::Unavailable(why) | Failure::Wrong(why)) => {
                let at = self
                    .epoch
                    .lock()
                    .unwrap()
                    .map(|e| started.saturating_duration_since(e).as_secs_f64())
                    .unwrap_or_default();
                let mut wrong = self.wrong.lock().unwrap();
                if wrong.len() < 50 {
                    let why: String = why.chars().take(300).collect();
                    wrong.push(format!("at {at:.1} s, {kind} (took {took:?}): {why}"));
                }
                false
            }
        }
    }
}

enum Failure {
    /// A 502/503 or a connection that failed: the service was not there.
    Unavailable(String),
    /// Anything else unexpected.
    Wrong(String),
}

fn expect(
    answer: std::io::Result<support::client::Response>,
    status: u16,
    body: impl Fn(&str) -> bool,
) -> Result<String, Failure> {
    let r = answer.map_err(|e| Failure::Unavailable(e.to_string()))?;
    let text = r.text();
    if r.status == status && body(&text) {
        return Ok(text);
    }
    // The service may say it is busy, or Apache that serve is not there (a
    // restart): refusals to work, never lies, and they say when to come
    // back.
    if r.status == 503 && r.header("Retry-After").is_none() {
        return Err(Failure::Wrong(format!("503 without Retry-After: {text}")));
    }
    if r.status == 502 || r.status == 503 {
        return Err(Failure::Unavailable(format!("{} {text}", r.status)));
    }
    Err(Failure::Wrong(format!("{} {text:?}", r.status)))
}

struct Soak {
    apache: Apache,
    backends: Vec<Backend>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
}

impl Soak {
    fn manage(&self) -> String {
        self.apache.host_port("manage")
    }

    /// A request on a kept-alive connection (see `Client::ask`).
    fn ask(
        &self,
        conn: &mut Option<Conn>,
        host: &str,
        target: &str,
    ) -> std::io::Result<support::client::Response> {
        self.apache.client().ask(conn, host, target)
    }

    /// One session's life as galyleo and its job live it.
    fn cycle(&self, conn: &mut Option<Conn>, n: u64, backend: &Backend) {
        let manage = self.manage();
        let started = Instant::now();
        let got = expect(self.ask(conn, &manage, "/getlink.cgi"), 200, |t| {
            t.starts_with("Your token is \n")
        });
        let token = match got {
            Ok(text) => text
                .trim_start_matches("Your token is \n")
                .trim()
                .to_owned(),
            Err(e) => {
                self.tally.check("getlink", started, Err(e));
                return;
            }
        };
        self.tally.check("getlink", started, Ok(()));
        self.tally
            .tokens
            .lock()
            .unwrap()
            .insert(token.clone(), "pending");

        let started = Instant::now();
        let linked = expect(
            self.ask(
                conn,
                &manage,
                &format!("/linktoken.cgi?token={token}&jobid={}", 900_000 + n),
            ),
            200,
            |t| t == "Success! Token linked to jobid.\n",
        );
        if !self.tally.check("linktoken", started, linked.map(drop)) {
            return;
        }

        // The compute node redeems from its own address.
        let node = self.apache.client().bind(&backend.ip());
        let started = Instant::now();
        let redeemed = expect(
            node.get(
                &manage,
                &format!("/redeemtoken.cgi?token={token}&port={}", backend.port()),
            ),
            200,
            |t| t == "Success!\n",
        );
        if !self.tally.check("redeemtoken", started, redeemed.map(drop)) {
            return;
        }
        self.tally
            .tokens
            .lock()
            .unwrap()
            .insert(token.clone(), "proxied");

        let host = self.apache.host_port(&token);
        let started = Instant::now();
        let proxied = match self.apache.client().get(&host, "/api/status") {
            Ok(r) if r.status == 200 && r.header("X-Backend") == Some(backend.name.as_str()) => {
                Ok(())
            }
            Ok(r) if r.status == 502 || r.status == 503 => {
                Err(Failure::Unavailable(r.status.to_string()))
            }
            Ok(r) => Err(Failure::Wrong(format!(
                "{} from {:?} after {:?} for {token}: {:?}",
                r.status,
                r.header("X-Backend"),
                started.elapsed(),
                r.text().chars().take(120).collect::<String>()
            ))),
            Err(e) => Err(Failure::Unavailable(e.to_string())),
        };
        self.tally.check("proxied", started, proxied);

        let started = Instant::now();
        let destroyed = expect(
            node.get(&manage, &format!("/destroytoken.cgi?token={token}")),
            200,
            |t| t == "Success! Token destroyed.\n",
        );
        if !self
            .tally
            .check("destroytoken", started, destroyed.map(drop))
        {
            return;
        }
        self.tally
            .tokens
            .lock()
            .unwrap()
            .insert(token.clone(), "ended");

        let started = Instant::now();
        let polled = expect(
            self.ask(
                conn,
                &manage,
                &format!("/tokenjobstate.cgi?token={token}&format=json"),
            ),
            200,
            |t| t.contains("\"cause\":\"shutdown\"") && t.contains("\"state\":\"D\""),
        );
        self.tally.check("tokenjobstate", started, polled.map(drop));
    }
}

/// Memory (kB), open files and threads of `pid`, from /proc.
fn usage(pid: u32) -> Option<(u64, u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("VmRSS:")?, fds, field("Threads:")?))
}

fn size(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[derive(Clone, Debug, Default)]
struct Sample {
    at_secs: u64,
    serve: (u64, u64, u64),
    watcher: (u64, u64, u64),
    /// Apache's parent and children together.
    apache: (u64, u64, u64),
    db_kb: u64,
    wal_kb: u64,
    answers: u64,
    p50_ms: HashMap<&'static str, f64>,
    p99_ms: HashMap<&'static str, f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

#[test]
fn soak_mixed_load_with_checked_answers() {
    let seconds = env_number("SATELLITE_SOAK_SECONDS", 120);
    let websockets = env_number("SATELLITE_SOAK_WEBSOCKETS", 200) as usize;
    let faults = env_number("SATELLITE_SOAK_FAULTS", 0) == 1;
    // The load generator holds hundreds of connections: its own limit,
    // not the service's, must not be what fails.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        hard.min(65_536),
        hard,
    )
    .unwrap();
    // The CGI-only variant: every endpoint request is a process, as on a
    // site without serve.
    let cgi = env_number("SATELLITE_SOAK_CGI", 0) == 1;
    let apache = if cgi {
        Apache::start(Routing::Map)
    } else {
        Apache::start_serving(Routing::Map)
    };
    if nix::unistd::geteuid().is_root() && !cgi {
        apache.write_config(&[("serve_socket_group", "\"nogroup\"".to_owned())]);
    }
    let config = apache.config_file();
    let socket = apache.serve_socket();
    let serve = (!cgi).then(|| {
        let (config, socket) = (config.clone(), socket.clone());
        Supervised::start(move || {
            let mut cmd = Command::new(program("satellite"));
            cmd.args(["serve", "--socket"])
                .arg(&socket)
                .env("SATELLITE_CONFIG", &config)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd
        })
    });
    let watcher = {
        let config = config.clone();
        Supervised::start(move || {
            let mut cmd = Command::new(program("cron"));
            cmd.arg("--watch")
                .env("SATELLITE_CONFIG", &config)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cgi && !socket.exists() {
        assert!(Instant::now() < deadline, "serve never listened");
        thread::sleep(Duration::from_millis(50));
    }
    let backends: Vec<Backend> = BACKEND_IPS
        .iter()
        .enumerate()
        .map(|(i, ip)| Backend::start(&format!("backend{i}"), ip))
        .collect();
    let soak = Arc::new(Soak {
        apache,
        backends,
        tally: Arc::new(Tally::default()),
        stop: Arc::new(AtomicBool::new(false)),
    });

    // Long-lived sessions: their routes carry the proxied load and the
    // websockets; one per backend and a few more.
    let long_lived: Vec<(String, usize)> = (0..8)
        .map(|i| {
            let alias = soak.apache.getlink();
            let backend = &soak.backends[i % soak.backends.len()];
            soak.apache.redeem_ok(&alias, &backend.ip(), backend.port());
            soak.tally
                .tokens
                .lock()
                .unwrap()
                .insert(alias.clone(), "proxied");
            (alias, i % soak.backends.len())
        })
        .collect();
    let pending: Vec<String> = (0..4)
        .map(|_| {
            let alias = soak.apache.getlink();
            soak.tally
                .tokens
                .lock()
                .unwrap()
                .insert(alias.clone(), "pending");
            alias
        })
        .collect();

    let started = Instant::now();
    *soak.tally.epoch.lock().unwrap() = Some(started);
    let end = started + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for w in 0..2u64 {
        let soak = soak.clone();
        workers.push(thread::spawn(move || {
            let mut conn = None;
            let mut n = w * 1_000_000;
            while !soak.stop.load(Ordering::Relaxed) {
                let backend = &soak.backends[(n % soak.backends.len() as u64) as usize];
                soak.cycle(&mut conn, n, backend);
                n += 1;
            }
        }));
    }
    // Waiting-page polls of pending tokens, and proxied requests.
    for w in 0..2usize {
        let (soak, pending, long_lived) = (soak.clone(), pending.clone(), long_lived.clone());
        workers.push(thread::spawn(move || {
            let manage = soak.manage();
            let mut conn: Option<Conn> = None;
            let mut i = w;
            while !soak.stop.load(Ordering::Relaxed) {
                i += 1;
                let token = &pending[i % pending.len()];
                let started = Instant::now();
                let polled = expect(
                    soak.ask(
                        &mut conn,
                        &manage,
                        &format!("/tokenjobstate.cgi?token={token}"),
                    ),
                    200,
                    |t| t == "PE",
                );
                soak.tally.check("tokenjobstate", started, polled.map(drop));
                let (alias, b) = &long_lived[i % long_lived.len()];
                let name = soak.backends[*b].name.clone();
                let started = Instant::now();
                let proxied = match soak
                    .apache
                    .client()
                    .get(&soak.apache.host_port(alias), "/lab")
                {
                    Ok(r) if r.status == 200 && r.header("X-Backend") == Some(name.as_str()) => {
                        Ok(())
                    }
                    Ok(r) if r.status == 502 || r.status == 503 => {
                        Err(Failure::Unavailable(r.status.to_string()))
                    }
                    Ok(r) => Err(Failure::Wrong(format!(
                        "{} {:?}",
                        r.status,
                        r.header("X-Backend")
                    ))),
                    Err(e) => Err(Failure::Unavailable(e.to_string())),
                };
                soak.tally.check("proxied", started, proxied);
                let started = Instant::now();
                let unknown = match soak
                    .apache
                    .client()
                    .get(&soak.apache.host_port("never-issued-guess-here"), "/")
                {
                    Ok(r) if r.status == 200 && r.text().contains("satellite") => Ok(()),
                    Ok(r) => Err(Failure::Wrong(format!("{} for an unknown host", r.status))),
                    Err(e) => Err(Failure::Unavailable(e.to_string())),
                };
                soak.tally.check("unknown_host", started, unknown);
            }
        }));
    }
    // Websockets kept open and echoing.
    {
        let (soak, long_lived) = (soak.clone(), long_lived.clone());
        workers.push(thread::spawn(move || {
            let open = |alias: &str| -> Option<Conn> {
                let mut ws = soak
                    .apache
                    .client()
                    .connect(&soak.apache.host(alias))
                    .ok()?;
                let r = ws
                    .websocket(
                        &soak.apache.host_port(alias),
                        "/api/kernels/k/channels",
                        JUPYTER_WS,
                    )
                    .ok()?;
                (r.status == 101).then_some(ws)
            };
            let mut sockets: Vec<(usize, Option<Conn>)> = (0..websockets)
                .map(|i| (i, open(&long_lived[i % long_lived.len()].0)))
                .collect();
            while !soak.stop.load(Ordering::Relaxed) {
                for (i, ws) in sockets.iter_mut() {
                    if soak.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let started = Instant::now();
                    let text = format!("ping {i}");
                    let echoed = match ws.as_mut() {
                        Some(c) => match c.send_text(&text).and_then(|()| c.recv_text()) {
                            Ok(back) if back == text => Ok(()),
                            Ok(back) => Err(Failure::Wrong(format!("echo {back:?} for {text:?}"))),
                            Err(e) => Err(Failure::Unavailable(e.to_string())),
                        },
                        None => Err(Failure::Unavailable("not open".into())),
                    };
                    if !soak.tally.check("websocket", started, echoed) {
                        // An Apache child killed takes its websockets
                        // along: the client opens a new one, as a
                        // browser does.
                        *ws = open(&long_lived[*i % long_lived.len()].0);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }));
    }

    // Faults, spread over the run.
    let fault_thread = faults.then(|| {
        let soak = soak.clone();
        let serve_pid = serve.as_ref().map(|s| s.pid.clone());
        let watcher_pid = watcher.pid.clone();
        let db = soak.apache.db_file();
        thread::spawn(move || {
            let at = |fraction: f64| started + Duration::from_secs_f64(seconds as f64 * fraction);
            let plan: [(f64, &str); 4] = [
                (0.2, "serve"),
                (0.4, "watcher"),
                (0.6, "apache-child"),
                (0.8, "db-lock"),
            ];
            for (when, what) in plan {
                while Instant::now() < at(when) {
                    if soak.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                let from = Instant::now();
                let at_secs = (from - started).as_secs_f64();
                // The window opens a second before the fault: a request
                // already on its way meets it too.
                let lasts = if what == "db-lock" { 10 } else { 2 };
                soak.tally.faults.lock().unwrap().push((
                    from - Duration::from_secs(1),
                    from + Duration::from_secs(lasts),
                ));
                match what {
                    "serve" => {
                        // CGI-only: no serve to kill; a CGI process killed
                        // is one request, which the others cover.
                        if let Some(pid) = &serve_pid {
                            kill9(pid.load(Ordering::SeqCst));
                        }
                    }
                    "watcher" => kill9(watcher_pid.load(Ordering::SeqCst)),
                    "apache-child" => {
                        if let Some(child) = soak.apache.children().first() {
                            kill9(*child as u32);
                        }
                    }
                    _ => {
                        let mut conn = rusqlite::Connection::open(&db).unwrap();
                        conn.busy_timeout(Duration::from_secs(30)).unwrap();
                        let tx = conn
                            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
                            .unwrap();
                        thread::sleep(Duration::from_secs(10));
                        tx.commit().unwrap();
                    }
                }
                eprintln!("fault at {at_secs:.1} s: {what}");
            }
        })
    });

    // Sampling.
    let mut samples: Vec<Sample> = Vec::new();
    let apache_pids = || {
        let mut pids = vec![soak.apache.parent_pid() as u32];
        pids.extend(soak.apache.children().into_iter().map(|p| p as u32));
        pids
    };
    let db = soak.apache.db_file();
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let mut last_latency_at = Instant::now();
    while Instant::now() < end {
        thread::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now())));
        let sum = |pids: &[u32]| {
            pids.iter()
                .filter_map(|p| usage(*p))
                .fold((0, 0, 0), |a, u| (a.0 + u.0, a.1 + u.1, a.2 + u.2))
        };
        let mut by_kind: HashMap<&'static str, Vec<Duration>> = HashMap::new();
        {
            let mut all = soak.tally.latencies.lock().unwrap();
            for (kind, at, took) in all.drain(..) {
                if at >= last_latency_at {
                    by_kind.entry(kind).or_default().push(took);
                }
            }
        }
        last_latency_at = Instant::now();
        let mut sample = Sample {
            at_secs: started.elapsed().as_secs(),
            serve: serve
                .as_ref()
                .and_then(|s| usage(s.pid()))
                .unwrap_or_default(),
            watcher: usage(watcher.pid()).unwrap_or_default(),
            apache: sum(&apache_pids()),
            db_kb: size(&db) / 1024,
            wal_kb: size(&wal) / 1024,
            answers: soak.tally.answers.load(Ordering::Relaxed),
            ..Sample::default()
        };
        for (kind, mut took) in by_kind {
            took.sort();
            sample.p50_ms.insert(kind, percentile(&took, 0.5));
            sample.p99_ms.insert(kind, percentile(&took, 0.99));
        }
        if std::env::var_os("SATELLITE_SOAK_VERBOSE").is_some() {
            eprintln!(
                "t={} answers={} load fds={:?} serve={:?} apache={:?}",
                sample.at_secs,
                sample.answers,
                usage(std::process::id()).map(|u| u.1),
                sample.serve,
                sample.apache
            );
        }
        samples.push(sample);
    }
    soak.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.join().unwrap();
    }
    if let Some(faults) = fault_thread {
        faults.join().unwrap();
    }
    let elapsed = started.elapsed();

    // The table.
    let mut table = String::new();
    let _ = writeln!(
        table,
        "  t(s)  answers  serve rss/fds/thr   watcher rss/fds/thr  apache rss/fds/thr     db kB  wal kB  p50/p99 ms: getlink redeem proxied poll websocket"
    );
    for s in &samples {
        let lat = |k: &str| {
            format!(
                "{:.1}/{:.1}",
                s.p50_ms.get(k).copied().unwrap_or(0.0),
                s.p99_ms.get(k).copied().unwrap_or(0.0)
            )
        };
        let _ = writeln!(
            table,
            "{:>6} {:>8}  {:>6}/{:>3}/{:>3}        {:>6}/{:>3}/{:>3}         {:>7}/{:>4}/{:>4}  {:>8} {:>7}  {} {} {} {} {}",
            s.at_secs, s.answers, s.serve.0, s.serve.1, s.serve.2, s.watcher.0, s.watcher.1,
            s.watcher.2, s.apache.0, s.apache.1, s.apache.2, s.db_kb, s.wal_kb,
            lat("getlink"), lat("redeemtoken"), lat("proxied"), lat("tokenjobstate"), lat("websocket")
        );
    }
    let answers = soak.tally.answers.load(Ordering::Relaxed);
    let wrong = soak.tally.wrong.lock().unwrap().clone();
    let _ = writeln!(
        table,
        "{answers} answers in {:.0} s ({:.0}/s), {} wrong, {} tolerated in fault windows; serve restarted {} times, the watcher {} times",
        elapsed.as_secs_f64(),
        answers as f64 / elapsed.as_secs_f64(),
        wrong.len(),
        soak.tally.tolerated.load(Ordering::Relaxed),
        serve.as_ref().map_or(0, |s| s.restarts.load(Ordering::SeqCst)),
        watcher.restarts.load(Ordering::SeqCst),
    );

    // Nothing lost or half-written: every token is as its last successful
    // write left it, and the file is sound.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    // One read of every row (a lookup by alias per token would scan the
    // table each time: `alias` alone has no index, the hash does).
    let states: HashMap<String, String> = {
        let mut stmt = conn.prepare("SELECT alias, state FROM proxy").unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let mut lost = Vec::new();
    for (alias, expected) in soak.tally.tokens.lock().unwrap().iter() {
        let state = states.get(alias).cloned();
        // A write whose answer was lost in a fault may have committed:
        // the state is then one step further, never behind.
        let order = |s: &str| {
            ["pending", "mapped", "proxied", "ended"]
                .iter()
                .position(|x| *x == s)
        };
        let ok = state
            .as_deref()
            .is_some_and(|s| order(s) >= order(expected));
        if !ok {
            lost.push(format!("{alias}: expected {expected}, found {state:?}"));
        }
    }
    let _ = writeln!(
        table,
        "integrity_check: {integrity}; tokens checked: {}; lost: {}",
        soak.tally.tokens.lock().unwrap().len(),
        lost.len()
    );
    eprintln!("{table}");
    if let Ok(path) = std::env::var("SATELLITE_SOAK_REPORT") {
        let _ = fs::write(path, &table);
    }

    if !wrong.is_empty() {
        let log = soak.apache.error_log();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| {
                !l.contains("AH01882") && !l.contains("mod_qos(009)") && !l.contains(":notice]")
            })
            .take(40)
            .collect();
        eprintln!("Apache's error log:\n{}", notable.join("\n"));
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    assert!(lost.is_empty(), "rows lost:\n{}", lost.join("\n"));
    assert_eq!(integrity, "ok");
    assert!(answers > 0);
    // Open files do not grow: serve's and the watcher's at the end are at
    // most a few more than after warm-up (a sample from the second third).
    if samples.len() >= 3 && !faults {
        let warm = &samples[samples.len() / 3];
        let last = samples.last().unwrap();
        for (what, at_warm, at_end) in [
            ("serve", warm.serve.1, last.serve.1),
            ("the watcher", warm.watcher.1, last.watcher.1),
        ] {
            assert!(
                at_end <= at_warm + 8,
                "{what}'s open files grew from {at_warm} to {at_end}\n{table}"
            );
        }
    }
    drop(watcher);
    drop(serve);
}

fn kill9(pid: u32) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
