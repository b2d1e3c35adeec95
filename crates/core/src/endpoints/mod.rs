//! The endpoint handlers: one function per endpoint of the original, all of
//! the shape `(context, http::Request) -> http::Response`, so the CGI adapter
//! and the native server run the very same code.
//!
//! Answers keep the original's bytes: success bodies exactly, and every error
//! body is `Oops! <the original's message>\n`. Statuses are proper ones
//! (400, 403, 404, 405, 409, 413, 429, 500, 503) unless `legacy_status_200`
//! asks for the original's 200 everywhere. 429 is satellite's own: a client
//! that got too many unknown-token answers (see [`crate::ratelimit`]).

mod getlink;
mod index;
mod jobs;
mod tokens;

pub use tokens::{parse_port, sanitize_jobid};

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::config::Config;
use crate::error::CoreError;
use crate::ipmask::{canonical_ip, IpMaskList};
use crate::jobstate::JobClassifier;
use crate::query::Params;
use crate::ratelimit::{Limited, Limits, MemoryLimiter};
use crate::store::Store;
use crate::syslog::Syslog;
use crate::token::Wordlist;

pub type Body = Vec<u8>;

/// The endpoints of the original, by the name of their CGI script.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    GetLink,
    RedeemToken,
    DestroyToken,
    LinkToken,
    TokenJobState,
    UpdateJobs,
    Index,
}

impl Endpoint {
    pub const ALL: [Endpoint; 7] = [
        Endpoint::GetLink,
        Endpoint::RedeemToken,
        Endpoint::DestroyToken,
        Endpoint::LinkToken,
        Endpoint::TokenJobState,
        Endpoint::UpdateJobs,
        Endpoint::Index,
    ];

    /// The program name, and the script name without `.cgi`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::GetLink => "getlink",
            Endpoint::RedeemToken => "redeemtoken",
            Endpoint::DestroyToken => "destroytoken",
            Endpoint::LinkToken => "linktoken",
            Endpoint::TokenJobState => "tokenjobstate",
            Endpoint::UpdateJobs => "update-jobs",
            Endpoint::Index => "index",
        }
    }

    /// Which endpoint a URL path names, as Apache's `ScriptAlias "/"` and
    /// `DirectoryIndex index.cgi` route them. Other paths are the waiting
    /// page's business (`index`), which answers every path on a pending host.
    pub fn for_path(path: &str) -> Endpoint {
        let script = path.trim_start_matches('/');
        Endpoint::ALL
            .into_iter()
            .find(|e| script.strip_suffix(".cgi") == Some(e.name()))
            .unwrap_or(Endpoint::Index)
    }
}

/// The address of the client, as the transport saw it (`REMOTE_ADDR` in
/// CGI, the TCP peer or a trusted proxy's header natively). Carried in the
/// request's extensions; absent when unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// What a handler needs besides the request: configuration, a database
/// connection opened on first use, and the audit log.
pub struct Context {
    pub config: Config,
    pub syslog: Syslog,
    store: Option<Box<dyn Store>>,
    wordlist: Option<Wordlist>,
    classifier: JobClassifier,
    clock: fn() -> DateTime<Utc>,
    limiter: Limiter,
}

/// Where the unknown-token counts live: in the database for a CGI program
/// (it lives for one request), in memory shared by serve's workers.
enum Limiter {
    Off,
    Store(Limits),
    Memory(Arc<MemoryLimiter>),
}

impl Context {
    pub fn new(config: Config, syslog: Syslog) -> Self {
        let classifier = JobClassifier::new(
            &config.job_wait_state_codes,
            &config.job_run_state_codes,
            &config.job_gone_state_codes,
        );
        crate::logid::use_key(&config.logkey);
        let limiter = Limits::from_config(&config).map_or(Limiter::Off, Limiter::Store);
        Context {
            config,
            syslog,
            store: None,
            wordlist: None,
            classifier,
            clock: Utc::now,
            limiter,
        }
    }

    /// A limiter kept in memory, for a server whose contexts (one per
    /// worker) live as long as the process: give them all the same one.
    /// `None` when the configuration turns the limit off.
    pub fn memory_limiter(config: &Config) -> Option<Arc<MemoryLimiter>> {
        Limits::from_config(config).map(|limits| Arc::new(MemoryLimiter::new(limits)))
    }

    /// Counts unknown-token answers in `limiter` instead of the database.
    pub fn share_limiter(&mut self, limiter: Option<Arc<MemoryLimiter>>) {
        self.limiter = limiter.map_or(Limiter::Off, Limiter::Memory);
    }

    /// Refuses a client that has had its share of unknown-token answers,
    /// before the token is looked up: the refusal is the same whether the
    /// token exists or not.
    fn check_unknown_limit(&mut self, request: &Request<Body>) -> Result<(), Failure> {
        let Some(key) = rate_key(request) else {
            return Ok(());
        };
        let now = crate::ratelimit::epoch_secs(self.now());
        let limited = match &self.limiter {
            Limiter::Off => None,
            Limiter::Memory(limiter) => limiter.check(&key, now),
            Limiter::Store(limits) => {
                let limits = *limits;
                let debt = self.store()?.unknown_debt(&key, &limits, now)?;
                limits.verdict(debt)
            }
        };
        match limited {
            Some(limited) => Err(Failure::RateLimited(limited)),
            None => Ok(()),
        }
    }

    /// Counts one unknown-token answer to the request's client, in one
    /// step with deciding whether it may be given: concurrent guesses from
    /// one address that all passed [`Context::check_unknown_limit`] get
    /// unknown answers only up to the burst, and the rest the refusal. A
    /// count that cannot be written is an error: an unknown answer is
    /// given only when it was counted.
    fn charge_unknown(&mut self, request: &Request<Body>) -> Result<(), Failure> {
        let Some(key) = rate_key(request) else {
            return Ok(());
        };
        let now = crate::ratelimit::epoch_secs(self.now());
        let limited = match &self.limiter {
            Limiter::Off => None,
            Limiter::Memory(limiter) => limiter.charge(&key, now),
            Limiter::Store(limits) => {
                let limits = *limits;
                let debt = self.store()?.charge_unknown(&key, &limits, now)?;
                limits.verdict(debt - 1.0)
            }
        };
        match limited {
            Some(limited) => Err(Failure::RateLimited(limited)),
            None => Ok(()),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// The database, opened (and a legacy schema migrated) on first use;
    /// requests that never reach the database never open it.
    pub fn store(&mut self) -> Result<&mut dyn Store, CoreError> {
        if self.store.is_none() {
            self.store = Some(crate::store::open_configured(&self.config)?);
        }
        Ok(self.store.as_deref_mut().expect("opened above"))
    }

    /// Forgets the store's connection when `err` says it is lost (a
    /// PostgreSQL restart or failover), so that the next request opens a
    /// new one: a long-lived context (a serve worker) would otherwise
    /// answer 503 on the dead connection until its process restarts.
    pub fn store_failed(&mut self, err: &CoreError) {
        if matches!(err, CoreError::Unreachable { .. }) {
            self.store = None;
        }
    }

    /// Redeems `alias` through the route publisher: in map routing the
    /// route is live when this returns `Redeemed`; a route that cannot be
    /// published is an error and changes nothing.
    fn redeem(
        &mut self,
        alias: &str,
        host: IpAddr,
        port: u16,
    ) -> Result<crate::store::RedeemOutcome, CoreError> {
        let now = self.now();
        self.store()?;
        let store = self.store.as_deref_mut().expect("opened above");
        crate::publish::Publisher::new(&self.config).redeem(store, alias, host, port, now)
    }

    /// Why a redeem of `alias` from `host` is not its linked job's, if the
    /// last pushes say so for sure (a linked, running job with known nodes
    /// or a denied user); `None` when nothing is known against it.
    fn redeem_mismatch(&mut self, alias: &str, host: IpAddr) -> Result<Option<String>, CoreError> {
        if self.config.job_binding == crate::config::JobBinding::Off {
            return Ok(None);
        }
        let (now, ttl) = (self.now(), self.config.ttl_secs);
        let Some(token) = self.store()?.token_job(alias, now, ttl)? else {
            return Ok(None);
        };
        let (Some(jobid), Some(job)) = (token.jobid, token.job) else {
            return Ok(None);
        };
        let session = crate::store::LinkedSession {
            alias: alias.to_owned(),
            state: token.proxy_state,
            jobid,
            dsthost: Some(host.to_string()),
            linked_at: None,
            job: None,
        };
        let mut resolver = crate::sessions::NodeResolver::new(&self.config);
        Ok(crate::sessions::binding_violation(
            &self.config,
            &mut resolver,
            &session,
            &job,
        ))
    }

    /// Records a scheduler snapshot and ends the sessions it shows are over.
    fn apply_snapshot(
        &mut self,
        snapshot: &crate::sessions::Snapshot,
        now: DateTime<Utc>,
    ) -> Result<crate::sessions::Applied, CoreError> {
        self.store()?;
        let store = self.store.as_deref_mut().expect("opened above");
        crate::sessions::apply_snapshot(store, &self.config, snapshot, now)
    }

    fn wordlist(&mut self) -> Result<&Wordlist, CoreError> {
        if self.wordlist.is_none() {
            self.wordlist = Some(Wordlist::load(&self.config.wordlist)?);
        }
        Ok(self.wordlist.as_ref().expect("loaded above"))
    }
}

/// Answers one request for one endpoint.
pub fn handle(ctx: &mut Context, endpoint: Endpoint, request: &Request<Body>) -> Response<Body> {
    let result = match endpoint {
        Endpoint::GetLink => getlink::getlink(ctx, request),
        Endpoint::RedeemToken => tokens::redeem(ctx, request),
        Endpoint::DestroyToken => tokens::destroy(ctx, request),
        Endpoint::LinkToken => tokens::link(ctx, request),
        Endpoint::TokenJobState => jobs::tokenjobstate(ctx, request),
        Endpoint::UpdateJobs => jobs::update_jobs(ctx, request),
        Endpoint::Index => index::index(ctx, request),
    };
    if let Err(Failure::Internal(err)) = &result {
        ctx.store_failed(err);
    }
    let mut response = result.unwrap_or_else(|failure| failure.into_response(ctx, endpoint));
    if request.method() == Method::HEAD {
        response.body_mut().clear();
    }
    response
}

/// Why a request was refused: a client mistake with the original's message,
/// or an internal failure whose details go to the error log only.
pub(crate) enum Failure {
    Oops(StatusCode, String),
    RateLimited(Limited),
    MethodNotAllowed(&'static str, &'static str),
    Internal(CoreError),
}

impl From<CoreError> for Failure {
    fn from(err: CoreError) -> Self {
        Failure::Internal(err)
    }
}

pub(crate) type Outcome = Result<Response<Body>, Failure>;

impl Failure {
    fn into_response(self, ctx: &Context, endpoint: Endpoint) -> Response<Body> {
        match self {
            Failure::Oops(status, message) => oops(&ctx.config, status, &message),
            Failure::RateLimited(limited) => {
                let mut response = oops(&ctx.config, StatusCode::TOO_MANY_REQUESTS, TOO_MANY);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, limited.retry_after_secs.into());
                response
            }
            Failure::MethodNotAllowed(allow, message) => {
                let mut response = oops(&ctx.config, StatusCode::METHOD_NOT_ALLOWED, message);
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                response
            }
            Failure::Internal(err) => {
                eprintln!("satellite {}: {err}", endpoint.name());
                internal_error(&ctx.config, &err)
            }
        }
    }
}

const TOO_MANY: &str =
    "Too many requests for unknown tokens from your address, please try again later.";

/// The bucket the request's client is counted in; none when the transport
/// did not say who the client is.
fn rate_key(request: &Request<Body>) -> Option<String> {
    let client = request.extensions().get::<ClientAddr>()?;
    Some(crate::ratelimit::client_key(client.0))
}

/// `Oops! <message>\n` as `text/plain`.
pub fn oops(config: &Config, status: StatusCode, message: &str) -> Response<Body> {
    let status = if config.legacy_status_200 {
        StatusCode::OK
    } else {
        status
    };
    text_response(
        status,
        "text/plain",
        format!("Oops! {message}\n").into_bytes(),
    )
}

/// The answer to a failure inside the service. A busy database or a full
/// disk is temporary (503 and `Retry-After`); anything else is a 500.
pub fn internal_error(config: &Config, err: &CoreError) -> Response<Body> {
    let (status, message, retry_after) = match err {
        // A PostgreSQL server restarting or failing over is as temporary
        // as a held lock.
        CoreError::Busy | CoreError::Unreachable { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The service is busy, please try again in a moment.",
            Some("2"),
        ),
        CoreError::Full => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The service cannot save anything just now, please try again later.",
            Some("30"),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error, please try again later or tell the administrators.",
            None,
        ),
    };
    let mut response = oops(config, status, message);
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    }
    response
}

/// The answer when no configuration could be loaded: nothing is known, not
/// even whether the site wants legacy statuses.
pub fn config_error_response() -> Response<Body> {
    text_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        b"Oops! The service is not configured correctly, please tell the administrators.\n"
            .to_vec(),
    )
}

/// The answer when the program itself failed (a bug): no configuration
/// may be at hand, so the status is always a real 500.
pub fn bug_response() -> Response<Body> {
    text_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        b"Oops! Internal error, please try again later or tell the administrators.\n".to_vec(),
    )
}

pub fn text_response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Answers name live tokens and change with every poll.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn require_method(
    request: &Request<Body>,
    allowed: &[Method],
    allow: &'static str,
    message: &'static str,
) -> Result<(), Failure> {
    if allowed.contains(request.method()) {
        Ok(())
    } else {
        Err(Failure::MethodNotAllowed(allow, message))
    }
}

const ONLY_GET: &str = "Only GET method is supported";

fn require_get(request: &Request<Body>) -> Result<(), Failure> {
    require_method(request, &[Method::GET], "GET", ONLY_GET)
}

fn query_params(request: &Request<Body>) -> Params {
    Params::parse(request.uri().query().unwrap_or("").as_bytes())
}

fn missing(name: &str) -> Failure {
    Failure::Oops(
        StatusCode::BAD_REQUEST,
        format!("Missing '{name}' parameter"),
    )
}

/// A token parameter that could name a row. Anything else (not UTF-8, NUL,
/// regex characters, 10 KB of junk) names none, so it is answered as an
/// unknown token without a database round trip.
fn token_param(params: &Params) -> Result<Option<&str>, Failure> {
    let raw = params.get("token").ok_or_else(|| missing("token"))?;
    Ok(std::str::from_utf8(raw)
        .ok()
        .filter(|t| crate::token::is_valid_alias(t)))
}

/// The client's address if it falls inside `masks`, else the original's
/// refusal. `hint` is the advice after the mask list, if any.
fn allowed_client(
    request: &Request<Body>,
    masks: &IpMaskList,
    hint: &str,
) -> Result<IpAddr, Failure> {
    let client = request
        .extensions()
        .get::<ClientAddr>()
        .map(|c| canonical_ip(c.0));
    match client {
        Some(addr) if masks.contains(addr) => Ok(addr),
        _ => {
            let range = if masks.len() == 1 { "range" } else { "ranges" };
            Err(Failure::Oops(
                StatusCode::FORBIDDEN,
                format!("Client (your) IP not in {range} {masks}{hint}"),
            ))
        }
    }
}

const FROM_CLUSTER: &str = ", please try from within the cluster.";
const FROM_COMPUTE_NODE: &str = ", please try from the compute node running your service.";

fn short_id(alias: &str) -> String {
    let hash = crate::token::alias_compare_hash(alias.as_bytes());
    crate::token::log_id(&hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_lost_connection_is_dropped_and_any_other_store_error_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        crate::SqliteStore::open_or_create(
            &dir.path().join("state.sqlite"),
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let config = Config::from_toml(
            "dbfile = \"state.sqlite\"\nsyslog_socket = \"\"\n",
            dir.path(),
            &crate::config::EnvOverrides::none(),
        )
        .unwrap();
        let mut ctx = Context::new(config, Syslog::new(Path::new(""), "test"));
        ctx.store().unwrap();
        ctx.store_failed(&CoreError::Busy);
        assert!(ctx.store.is_some(), "a busy database keeps its connection");
        ctx.store_failed(&CoreError::Unreachable {
            database: "PostgreSQL".into(),
            why: "connection closed".into(),
        });
        assert!(ctx.store.is_none(), "a lost connection is not used again");
        ctx.store().unwrap();
    }
}
