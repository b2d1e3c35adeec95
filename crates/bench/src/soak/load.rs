//! The soak's load and the check of every answer: session cycles (getlink,
//! linktoken, redeemtoken from the backend's address, a proxied request to
//! the new route, destroytoken, the page's poll expecting `D` with cause
//! `shutdown`), waiting-page polls of pending tokens, proxied requests to
//! long-lived routes, unknown token hosts, and websockets kept open and
//! echoing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use satellite_demo::backend::Backend;
use satellite_demo::client::{Conn, Response};

use super::site::SoakSite;

const JUPYTER_WS: &str = "v1.kernel.websocket.jupyter.org";
/// After a fault ends, answers may still fail for this long (a restart).
pub const RECOVERY: Duration = Duration::from_secs(5);

/// The states a token goes through, in order: a write whose answer was
/// lost in a fault may have committed, so a row may be one step further
/// than the last answer said, never behind.
const STATE_ORDER: [&str; 4] = ["pending", "mapped", "proxied", "ended"];

/// What the load saw, shared by its threads.
pub struct Tally {
    /// When the load started: wrong answers say when they came.
    pub epoch: Instant,
    pub answers: AtomicU64,
    pub tolerated: AtomicU64,
    wrong: Mutex<Vec<String>>,
    wrong_count: AtomicU64,
    /// (kind, when, how long), for the latency per sample window.
    latencies: Mutex<Vec<(&'static str, Instant, Duration)>>,
    /// Fault windows: answers that fail within one are expected.
    faults: Mutex<Vec<(Instant, Instant)>>,
    /// Tokens by what the last successful write made of them.
    tokens: Mutex<HashMap<String, &'static str>>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            epoch: Instant::now(),
            answers: AtomicU64::new(0),
            tolerated: AtomicU64::new(0),
            wrong: Mutex::new(Vec::new()),
            wrong_count: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a fault window: a second before `from` (a request already on
    /// its way meets the fault too) to `to` plus [`RECOVERY`].
    pub fn fault_window(&self, from: Instant, to: Instant) {
        lock(&self.faults).push((from - Duration::from_secs(1), to + RECOVERY));
    }

    /// Closes the last window at `to` (plus [`RECOVERY`]), once the fault
    /// is over: a fault's length is known only at its end.
    pub fn end_fault_window(&self, to: Instant) {
        if let Some(last) = lock(&self.faults).last_mut() {
            last.1 = to + RECOVERY;
        }
    }

    fn in_fault(&self, at: Instant) -> bool {
        lock(&self.faults)
            .iter()
            .any(|(from, to)| at >= *from && at <= *to)
    }

    pub fn remember(&self, token: &str, state: &'static str) {
        lock(&self.tokens).insert(token.to_owned(), state);
    }

    /// The tokens and what their last successful write made of them.
    pub fn tokens(&self) -> HashMap<String, &'static str> {
        lock(&self.tokens).clone()
    }

    /// The first wrong answers (at most 50) and how many there were.
    pub fn wrong(&self) -> (Vec<String>, u64) {
        (
            lock(&self.wrong).clone(),
            self.wrong_count.load(Ordering::Relaxed),
        )
    }

    /// The latencies recorded since the last call, by kind.
    pub fn drain_latencies(&self) -> HashMap<&'static str, Vec<Duration>> {
        let mut by_kind: HashMap<&'static str, Vec<Duration>> = HashMap::new();
        for (kind, _, took) in lock(&self.latencies).drain(..) {
            by_kind.entry(kind).or_default().push(took);
        }
        by_kind
    }

    /// Records one answer: `Ok` when it is the expected one; an unexpected
    /// one is tolerated inside a fault window only when it is a refusal
    /// to work (502, 503 with Retry-After, a dropped connection), never a
    /// wrong success. True when the answer was the expected one.
    pub fn check(&self, kind: &'static str, started: Instant, result: Result<(), Failure>) -> bool {
        let took = started.elapsed();
        self.answers.fetch_add(1, Ordering::Relaxed);
        lock(&self.latencies).push((kind, started, took));
        match result {
            Ok(()) => true,
            Err(Failure::Unavailable(_)) if self.in_fault(started) => {
                self.tolerated.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(Failure::Unavailable(why) | Failure::Wrong(why)) => {
                let at = started.saturating_duration_since(self.epoch).as_secs_f64();
                self.wrong_count.fetch_add(1, Ordering::Relaxed);
                let mut wrong = lock(&self.wrong);
                if wrong.len() < 50 {
                    let why: String = why.chars().take(300).collect();
                    wrong.push(format!("at {at:.1} s, {kind} (took {took:?}): {why}"));
                }
                false
            }
        }
    }
}

/// A poisoned lock only means another load thread panicked: its data is
/// still what was recorded.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// True when `found` is `expected` or later in a token's life.
pub fn not_behind(found: &str, expected: &str) -> bool {
    let order = |s: &str| STATE_ORDER.iter().position(|x| *x == s);
    order(found).is_some() && order(found) >= order(expected)
}

pub enum Failure {
    /// A 502, a 503 with Retry-After, or a connection that failed: the
    /// service was not there.
    Unavailable(String),
    /// Anything else unexpected.
    Wrong(String),
}

/// The answer's body when it has `status` and `body` accepts it.
pub fn expect(
    answer: std::io::Result<Response>,
    status: u16,
    body: impl Fn(&str) -> bool,
) -> Result<String, Failure> {
    let r = answer.map_err(|e| Failure::Unavailable(e.to_string()))?;
    let text = r.text();
    if r.status == status && body(&text) {
        return Ok(text);
    }
    Err(refusal_or_wrong(&r, text))
}

/// An unexpected answer: the service may say it is busy, or Apache that
/// serve is not there (a restart): refusals to work, never lies, and they
/// say when to come back.
fn refusal_or_wrong(r: &Response, text: String) -> Failure {
    if r.status == 503 && r.header("Retry-After").is_none() {
        return Failure::Wrong(format!("503 without Retry-After: {text}"));
    }
    if r.status == 502 || r.status == 503 {
        return Failure::Unavailable(format!("{} {text}", r.status));
    }
    Failure::Wrong(format!("{} {text:?}", r.status))
}

/// A request to a live route must be answered by its own backend.
fn proxied_by(answer: std::io::Result<Response>, backend: &str) -> Result<(), Failure> {
    match answer {
        Ok(r) if r.status == 200 && r.header("X-Backend") == Some(backend) => Ok(()),
        Ok(r) => {
            let text = format!(
                "from {:?}: {}",
                r.header("X-Backend"),
                r.text().chars().take(120).collect::<String>()
            );
            Err(refusal_or_wrong(&r, text))
        }
        Err(e) => Err(Failure::Unavailable(e.to_string())),
    }
}

pub struct Load {
    pub site: Arc<SoakSite>,
    pub backends: Vec<Backend>,
    pub tally: Arc<Tally>,
    pub stop: Arc<AtomicBool>,
    /// Routes redeemed before the load, (alias, backend index): they carry
    /// the proxied requests and the websockets.
    pub long_lived: Vec<(String, usize)>,
    /// Tokens that stay pending: the waiting page's polls.
    pub pending: Vec<String>,
}

impl Load {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// A request on a kept-alive connection (see `Client::ask`).
    fn ask(&self, conn: &mut Option<Conn>, host: &str, target: &str) -> std::io::Result<Response> {
        self.site.client().ask(conn, host, target)
    }

    /// One session's life as galyleo and its job live it.
    fn cycle(&self, conn: &mut Option<Conn>, n: u64, backend: &Backend) {
        let manage = self.site.manage();
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
        self.tally.remember(&token, "pending");

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
        let started = Instant::now();
        let redeemed = expect(
            self.site
                .redeem_answer(&token, &backend.ip(), backend.port()),
            200,
            |t| t == "Success!\n",
        );
        if !self.tally.check("redeemtoken", started, redeemed.map(drop)) {
            return;
        }
        self.tally.remember(&token, "proxied");

        let started = Instant::now();
        let proxied = proxied_by(
            self.site
                .client()
                .get(&self.site.host_port(&token), "/api/status"),
            &backend.name,
        );
        self.tally.check("proxied", started, proxied);

        let node = self.site.client().bind(&backend.ip());
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
        self.tally.remember(&token, "ended");

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

    /// Session cycles until stopped, on the backends in turn.
    pub fn cycles(&self, worker: u64) {
        let mut conn = None;
        let mut n = worker * 1_000_000;
        while !self.stopped() {
            let backend = &self.backends[(n % self.backends.len() as u64) as usize];
            self.cycle(&mut conn, n, backend);
            n += 1;
        }
    }

    /// Waiting-page polls of pending tokens, proxied requests to the
    /// long-lived routes and unknown token hosts, in turn until stopped.
    pub fn browsing(&self, worker: usize) {
        let manage = self.site.manage();
        let mut conn: Option<Conn> = None;
        let mut i = worker;
        while !self.stopped() {
            i += 1;
            let token = &self.pending[i % self.pending.len()];
            let started = Instant::now();
            let polled = expect(
                self.ask(
                    &mut conn,
                    &manage,
                    &format!("/tokenjobstate.cgi?token={token}"),
                ),
                200,
                |t| t == "PE",
            );
            self.tally.check("tokenjobstate", started, polled.map(drop));

            let (alias, b) = &self.long_lived[i % self.long_lived.len()];
            let started = Instant::now();
            let proxied = proxied_by(
                self.site.client().get(&self.site.host_port(alias), "/lab"),
                &self.backends[*b].name,
            );
            self.tally.check("proxied", started, proxied);

            // The waiting page, the same bytes for every token-shaped host.
            let started = Instant::now();
            let unknown = expect(
                self.site
                    .client()
                    .get(&self.site.host_port("never-issued-guess-here"), "/"),
                200,
                |t| t.contains("satellite"),
            );
            self.tally.check("unknown_host", started, unknown.map(drop));
        }
    }

    fn open_websocket(&self, alias: &str) -> Option<Conn> {
        let mut ws = self
            .site
            .client()
            .connect(&format!("{alias}.{}", super::site::DOMAIN))
            .ok()?;
        let r = ws
            .websocket(
                &self.site.host_port(alias),
                "/api/kernels/k/channels",
                JUPYTER_WS,
            )
            .ok()?;
        (r.status == 101).then_some(ws)
    }

    /// `count` websockets kept open, each echoing in turn until stopped.
    pub fn websockets(&self, count: usize) {
        let alias_of = |i: usize| self.long_lived[i % self.long_lived.len()].0.clone();
        let mut sockets: Vec<(usize, Option<Conn>)> = (0..count)
            .map(|i| (i, self.open_websocket(&alias_of(i))))
            .collect();
        while !self.stopped() {
            if sockets.is_empty() {
                thread::sleep(Duration::from_millis(200));
                continue;
            }
            for (i, ws) in sockets.iter_mut() {
                if self.stopped() {
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
                if !self.tally.check("websocket", started, echoed) {
                    // An Apache child killed takes its websockets along:
                    // the client opens a new one, as a browser does.
                    *ws = self.open_websocket(&alias_of(*i));
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
