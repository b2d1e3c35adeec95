//! Prometheus metrics in the text exposition format (version 0.0.4).
//!
//! Two kinds: gauges the store computes at any moment ([`render_gauges`],
//! printed by `satellite metrics` for node_exporter's textfile collector and
//! by serve at `GET /metrics`), and counters and histograms that only a
//! long-running process can keep ([`Registry`], [`Histogram`]): serve counts
//! its requests and times its redeems, `cron --watch` times route
//! publication, `jobstates poll` counts failed scheduler queries. CGI
//! programs keep nothing: a process per request has nothing to add up, and
//! they must not pay for metrics.
//!
//! Every name starts with `satellite_`; label values are escaped, since a
//! hand-edited database may hold any state text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::{Response, StatusCode};

use crate::endpoints::{Body, Endpoint};
use crate::store::Gauges;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How a request ended, as the `result` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestResult {
    Ok,
    BadInput,
    NotAllowed,
    Unknown,
    Conflict,
    /// Refused: the client's address is over its unknown-token limit.
    RateLimited,
    Busy,
    Internal,
}

impl RequestResult {
    pub const ALL: [RequestResult; 8] = [
        RequestResult::Ok,
        RequestResult::BadInput,
        RequestResult::NotAllowed,
        RequestResult::Unknown,
        RequestResult::Conflict,
        RequestResult::RateLimited,
        RequestResult::Busy,
        RequestResult::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RequestResult::Ok => "ok",
            RequestResult::BadInput => "bad_input",
            RequestResult::NotAllowed => "not_allowed",
            RequestResult::Unknown => "unknown",
            RequestResult::Conflict => "conflict",
            RequestResult::RateLimited => "rate_limited",
            RequestResult::Busy => "busy",
            RequestResult::Internal => "internal",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The one place that decides a request's result: from its answer, so
/// every handler's outcome is counted the same way. The status decides;
/// with `legacy_status_200` every refusal is a 200 `Oops!`, and the
/// original's message decides instead.
pub fn classify(endpoint: Endpoint, response: &Response<Body>) -> RequestResult {
    let body = response.body().as_slice();
    let status = response.status();
    if status == StatusCode::OK && body.starts_with(b"Oops!") {
        return classify_message(body);
    }
    match status {
        s if s.is_success() || s.is_redirection() || s.is_informational() => RequestResult::Ok,
        StatusCode::FORBIDDEN => RequestResult::NotAllowed,
        StatusCode::NOT_FOUND if endpoint == Endpoint::Index => RequestResult::BadInput,
        StatusCode::NOT_FOUND => RequestResult::Unknown,
        StatusCode::CONFLICT => RequestResult::Conflict,
        StatusCode::TOO_MANY_REQUESTS => RequestResult::RateLimited,
        StatusCode::SERVICE_UNAVAILABLE => RequestResult::Busy,
        s if s.is_client_error() => RequestResult::BadInput,
        _ => RequestResult::Internal,
    }
}

fn classify_message(body: &[u8]) -> RequestResult {
    let has = |needle: &str| {
        body.windows(needle.len())
            .any(|window| window == needle.as_bytes())
    };
    if has("not in range") || has("must be destroyed from host") {
        RequestResult::NotAllowed
    } else if has("Unknown nonce") {
        // "already used" is a 409 with real statuses; the message cannot
        // tell the two apart.
        RequestResult::Unknown
    } else if has("Too many requests") {
        RequestResult::RateLimited
    } else if has("already linked") {
        RequestResult::Conflict
    } else if has("busy") || has("Problem generating") {
        RequestResult::Busy
    } else if has("Internal error") || has("not configured correctly") {
        RequestResult::Internal
    } else {
        RequestResult::BadInput
    }
}

/// Upper bounds of the latency buckets, in seconds: a redeem is one SQLite
/// transaction (about a millisecond), a publication up to a config test and
/// a graceful reload (seconds).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency histogram shared by threads without a lock.
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        // Each bucket holds only its own observations; rendering adds them
        // up into Prometheus' cumulative `le` buckets.
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&le| seconds <= le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the family `name` (HELP, TYPE, buckets, sum and count).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        let mut cumulative = 0;
        for (le, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// A counter without labels.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", self.get());
    }
}

/// serve's own numbers: requests by endpoint and result, redeem latency.
pub struct Registry {
    requests: [[AtomicU64; RequestResult::ALL.len()]; Endpoint::ALL.len()],
    redeem: Histogram,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            redeem: Histogram::default(),
        }
    }
}

impl Registry {
    /// Counts one answered request; a redeem's handling time goes into the
    /// redeem histogram, whatever its result.
    pub fn record(&self, endpoint: Endpoint, response: &Response<Body>, took: Duration) {
        let result = classify(endpoint, response);
        self.requests[endpoint_index(endpoint)][result.index()].fetch_add(1, Ordering::Relaxed);
        if endpoint == Endpoint::RedeemToken {
            self.redeem.observe(took);
        }
    }

    pub fn requests(&self, endpoint: Endpoint, result: RequestResult) -> u64 {
        self.requests[endpoint_index(endpoint)][result.index()].load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String) {
        let name = "satellite_requests_total";
        header(
            out,
            name,
            "counter",
            "Requests answered by this serve process, by endpoint and result.",
        );
        for endpoint in Endpoint::ALL {
            for result in RequestResult::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{endpoint=\"{}\",result=\"{}\"}} {}",
                    endpoint.name(),
                    result.label(),
                    self.requests(endpoint, result)
                );
            }
        }
        self.redeem.render(
            out,
            "satellite_redeem_duration_seconds",
            "Time serve took to answer redeemtoken, whatever the result.",
        );
    }
}

fn endpoint_index(endpoint: Endpoint) -> usize {
    Endpoint::ALL
        .iter()
        .position(|&e| e == endpoint)
        .expect("ALL lists every endpoint")
}

/// What `cron --watch` keeps: how long route publication takes (expiry
/// and the publisher's pass, including a config test and reload in vhost
/// routing), tokens it expired, and runs that failed.
#[derive(Default)]
pub struct CronMetrics {
    pub publication: Histogram,
    pub expired: Counter,
    pub failures: Counter,
    pub tunnels_cut: Counter,
    pub cut_failures: Counter,
}

impl CronMetrics {
    pub fn render(&self, out: &mut String) {
        self.publication.render(
            out,
            "satellite_route_publication_duration_seconds",
            "Time a cron run took to expire tokens and publish routes.",
        );
        self.expired.render(
            out,
            "satellite_tokens_expired_total",
            "Tokens cron deleted because their TTL was over.",
        );
        self.failures.render(
            out,
            "satellite_cron_failures_total",
            "Cron runs that failed (see its log).",
        );
        self.tunnels_cut.render(
            out,
            "satellite_tunnels_cut_total",
            "Apache connections to a backend whose route ended that cron --watch closed.",
        );
        self.cut_failures.render(
            out,
            "satellite_tunnel_cut_failures_total",
            "Ended routes whose open connections could not be closed (see its log).",
        );
    }
}

/// What `jobstates poll` keeps: scheduler queries, and those that failed
/// (a failed query ends nothing, so a silent scheduler shows only here).
#[derive(Default)]
pub struct PollMetrics {
    pub queries: Counter,
    pub errors: Counter,
}

impl PollMetrics {
    pub fn render(&self, out: &mut String) {
        self.queries.render(
            out,
            "satellite_scheduler_queries_total",
            "Scheduler queries made by jobstates poll.",
        );
        self.errors.render(
            out,
            "satellite_scheduler_query_errors_total",
            "Scheduler queries that failed or timed out (no session was ended).",
        );
    }
}

/// Replaces `dir/name` with `text` at once, so the textfile collector
/// never reads half a file (it reads only `*.prom`, and the temporary
/// file is not one).
///
/// # Errors
/// When the directory cannot be written.
pub fn write_textfile(dir: &std::path::Path, name: &str, text: &str) -> crate::Result<()> {
    crate::files::write_atomically(&dir.join(name), text.as_bytes())
}

/// The states every exposition lists, even at zero, so that a query for
/// one of them never finds the series missing.
const KNOWN_STATES: [&str; 4] = ["pending", "mapped", "proxied", "ended"];

/// Appends the store's gauges as of `now`.
pub fn render_gauges(out: &mut String, gauges: &Gauges, now: DateTime<Utc>) {
    header(
        out,
        "satellite_tokens",
        "gauge",
        "Tokens in the store by state (expired rows not yet deleted included).",
    );
    let mut states: Vec<(&str, i64)> = KNOWN_STATES.iter().map(|&s| (s, 0)).collect();
    for (state, count) in &gauges.by_state {
        match states.iter_mut().find(|(s, _)| s == state) {
            Some(known) => known.1 += count,
            None => states.push((state, *count)),
        }
    }
    for (state, count) in states {
        let _ = writeln!(
            out,
            "satellite_tokens{{state=\"{}\"}} {count}",
            escape_label(state)
        );
    }
    gauge(
        out,
        "satellite_routes_live",
        "Routes Apache serves now (map routing's routes table, unexpired).",
        gauges.live_routes,
    );
    gauge(
        out,
        "satellite_tokens_unbound",
        "Live tokens never linked to a batch job.",
        gauges.unbound,
    );
    header(
        out,
        "satellite_sessions_ended",
        "gauge",
        "Ended sessions still in the store (until their TTL), by cause.",
    );
    for (cause, count) in &gauges.ended {
        let _ = writeln!(
            out,
            "satellite_sessions_ended{{cause=\"{}\"}} {count}",
            cause.label()
        );
    }
    header(
        out,
        "satellite_session_ends_total",
        "counter",
        "Sessions ended since the database was made, by cause (destroy, revoke, ttl, job_end, binding_mismatch).",
    );
    for (cause, count) in &gauges.ends_total {
        let _ = writeln!(
            out,
            "satellite_session_ends_total{{cause=\"{}\"}} {count}",
            cause.label()
        );
    }
    header(
        out,
        "satellite_jobstate_push_age_seconds",
        "gauge",
        "Seconds since the newest job state arrived (absent: none ever did).",
    );
    if let Some(newest) = gauges.newest_jobstate {
        let age = (now.timestamp() - newest).max(0);
        let _ = writeln!(out, "satellite_jobstate_push_age_seconds {age}");
    }
    header(
        out,
        "satellite_watcher_heartbeat_age_seconds",
        "gauge",
        "Seconds since each frontend's cron --watch last said it is alive (every 10 s while running).",
    );
    for watcher in &gauges.watchers {
        if let Some(beat) = watcher.heartbeat {
            let _ = writeln!(
                out,
                "satellite_watcher_heartbeat_age_seconds{{watcher=\"{}\"}} {}",
                escape_label(&watcher.name),
                (now - beat).num_seconds().max(0)
            );
        }
    }
    header(
        out,
        "satellite_watcher_route_ends_pending",
        "gauge",
        "Ended routes each frontend's watcher has not yet cut the tunnels of.",
    );
    for watcher in &gauges.watchers {
        let _ = writeln!(
            out,
            "satellite_watcher_route_ends_pending{{watcher=\"{}\"}} {}",
            escape_label(&watcher.name),
            watcher.behind
        );
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the exposition format wants it: backslash, double
/// quote and line feed escaped.
pub fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: StatusCode, body: &str) -> Response<Body> {
        let mut response = Response::new(body.as_bytes().to_vec());
        *response.status_mut() = status;
        response
    }

    #[test]
    fn results_follow_the_status_and_the_legacy_message() {
        let cases = [
            (StatusCode::OK, "Success!\n", RequestResult::Ok),
            (
                StatusCode::BAD_REQUEST,
                "Oops! Missing 'port' parameter\n",
                RequestResult::BadInput,
            ),
            (
                StatusCode::FORBIDDEN,
                "Oops! Client (your) IP not in range 10.0.0.0/8\n",
                RequestResult::NotAllowed,
            ),
            (
                StatusCode::NOT_FOUND,
                "Oops! Unknown nonce or nonce already used\n",
                RequestResult::Unknown,
            ),
            (
                StatusCode::CONFLICT,
                "Oops! Unknown nonce or nonce already used\n",
                RequestResult::Conflict,
            ),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "Oops! The service is busy, please try again in a moment.\n",
                RequestResult::Busy,
            ),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Oops! Internal error\n",
                RequestResult::Internal,
            ),
            (
                StatusCode::OK,
                "Oops! Client (your) IP not in ranges a b\n",
                RequestResult::NotAllowed,
            ),
            (
                StatusCode::OK,
                "Oops! Nonce already linked to a jobid, you can do this only once!\n",
                RequestResult::Conflict,
            ),
            (
                StatusCode::OK,
                "Oops! 'port' parameter isn't an integer between 1024 and 65535\n",
                RequestResult::BadInput,
            ),
            (
                StatusCode::OK,
                "Oops! The service is busy, please try again in a moment.\n",
                RequestResult::Busy,
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                classify(Endpoint::RedeemToken, &answer(status, body)),
                want,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(30));
        histogram.observe(Duration::from_secs(10));
        let mut out = String::new();
        histogram.render(&mut out, "satellite_x_seconds", "x.");
        assert!(
            out.contains("satellite_x_seconds_bucket{le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("satellite_x_seconds_bucket{le=\"0.05\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("satellite_x_seconds_bucket{le=\"5\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("satellite_x_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("satellite_x_seconds_count 3\n"), "{out}");
    }
}
