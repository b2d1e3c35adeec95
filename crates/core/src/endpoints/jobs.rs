//! `tokenjobstate.cgi` (the waiting page's poll) and `update-jobs.cgi` (the
//! scheduler's push).

use http::{header, HeaderValue, Method, Request, StatusCode};

use super::{
    allowed_client, missing, query_params, require_method, text_response, Body, Context, Outcome,
    ONLY_GET,
};
use crate::query::Params;
use crate::store::{EndCause, ProxyState, TokenJob};

pub(super) fn tokenjobstate(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    require_method(
        request,
        &[Method::GET, Method::OPTIONS],
        "GET, OPTIONS",
        ONLY_GET,
    )?;
    let params = query_params(request);
    // The page sends `window.location.hostname`: keep the first label.
    let raw = params.get("token").ok_or_else(|| missing("token"))?;
    let label = raw.split(|&b| b == b'.').next().unwrap_or_default();
    if label.is_empty() {
        return Err(missing("token"));
    }
    let token = std::str::from_utf8(label)
        .ok()
        .map(str::to_ascii_lowercase)
        .filter(|t| crate::token::is_valid_alias(t));

    let allowed_origin = token.as_deref().and_then(|alias| {
        let origin = request.headers().get(header::ORIGIN)?;
        let expected = ctx.config.alias_origin(alias);
        origin
            .as_bytes()
            .eq_ignore_ascii_case(expected.as_bytes())
            .then(|| origin.clone())
    });

    let mut response = if request.method() == Method::OPTIONS {
        let mut preflight = text_response(StatusCode::NO_CONTENT, "text/plain", Vec::new());
        let headers = preflight.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        preflight
    } else {
        ctx.check_unknown_limit(request)?;
        let (now, ttl) = (ctx.now(), ctx.config.ttl_secs);
        let found = match &token {
            Some(alias) => ctx.store()?.token_job(alias, now, ttl)?,
            None => None,
        };
        // A tombstone or a row past its TTL is a known token: polling it is
        // no guess, so only a token never issued counts.
        if found.is_none() {
            ctx.charge_unknown(request)?;
        }
        let code = found
            .as_ref()
            .filter(|job| !job.expired)
            .map(|job| ctx.classifier.display_code(job, now.timestamp()));
        if params.get("format").is_some_and(|f| f == b"json") {
            let body = job_json(found.as_ref(), code);
            text_response(StatusCode::OK, "application/json", body.into_bytes())
        } else {
            // Unknown tokens get 200 and an empty body: the page keeps
            // polling (the legacy page knows no other answer).
            text_response(
                StatusCode::OK,
                "text/plain",
                code.unwrap_or("").as_bytes().to_vec(),
            )
        }
    };
    let headers = response.headers_mut();
    if let Some(origin) = allowed_origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    Ok(response)
}

pub(super) fn update_jobs(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    require_method(
        request,
        &[Method::POST],
        "POST",
        "Only POST method is supported",
    )?;
    let form = Params::parse(request.body());
    form.get("jobstates").ok_or_else(|| missing("jobstates"))?;
    allowed_client(request, &ctx.config.jobstateipmask, "")?;
    // Old pushes (`<jobid> <state>` lines) and new ones (more fields,
    // `complete=1`, `taken=`) alike; see satellite_sched::wire.
    let snapshot = crate::sessions::Snapshot::from_wire(&satellite_sched::wire::parse_form_body(
        request.body(),
    ));
    let now = ctx.now();
    ctx.store()?;
    let applied = ctx.apply_snapshot(&snapshot, now)?;
    for end in &applied.ended {
        let (alias, cause) = (&end.alias, &end.cause);
        ctx.syslog.info(&format!(
            "satellite session ended token-id: {} cause: {cause}",
            super::short_id(alias)
        ));
    }
    for (alias, mismatch) in &applied.warned {
        ctx.syslog.info(&format!(
            "satellite job binding warning token-id: {} {mismatch}",
            super::short_id(alias)
        ));
    }
    Ok(text_response(
        StatusCode::OK,
        "text/html",
        b"Successfully updated jobs! \n".to_vec(),
    ))
}

/// Job states in which a job that never redeemed its token failed to start.
const FAILED_TO_START: [&str; 8] = [
    "FAILED",
    "F",
    "BOOT_FAIL",
    "BF",
    "NODE_FAIL",
    "NF",
    "OUT_OF_MEMORY",
    "OOM",
];

/// Why a session is over, as the waiting page tells it: the `cause` of
/// tokenjobstate's JSON answer. Each names news a user reads differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndingShown {
    /// The job destroyed its token (JupyterLab's File > Shut Down).
    ShutDown,
    /// An administrator's `satellite revoke`.
    Revoked,
    /// The job reached its walltime (Slurm's TIMEOUT, DEADLINE).
    TimeLimit,
    /// scancel, while queued or running.
    Cancelled,
    /// The node failed under the job.
    NodeFailure,
    Preempted,
    /// The job stopped before its application registered.
    FailedToStart,
    /// The job failed (or ran out of memory) after it started.
    Failed,
    /// Redeemed from outside its job, or run by a denied user.
    Binding,
    /// Completed, or no longer known to the scheduler.
    JobEnded,
    /// Past its TTL.
    Expired,
}

impl EndingShown {
    pub fn label(self) -> &'static str {
        match self {
            EndingShown::ShutDown => "shutdown",
            EndingShown::Revoked => "revoked",
            EndingShown::TimeLimit => "time_limit",
            EndingShown::Cancelled => "cancelled",
            EndingShown::NodeFailure => "node_failure",
            EndingShown::Preempted => "preempted",
            EndingShown::FailedToStart => "failed_to_start",
            EndingShown::Failed => "failed",
            EndingShown::Binding => "binding",
            EndingShown::JobEnded => "job_ended",
            EndingShown::Expired => "expired",
        }
    }

    /// The ending of a token the page shows as over (code `D`, or expired);
    /// `None` while it is not.
    pub fn of(token: &TokenJob, code: Option<&str>) -> Option<EndingShown> {
        if token.expired {
            return Some(EndingShown::Expired);
        }
        let over = token.proxy_state == ProxyState::Ended || code == Some("D");
        if !over {
            return None;
        }
        let state = token.job_state.as_deref().unwrap_or_default();
        let state = satellite_sched::JobState::new(state);
        let base = state.base().to_ascii_uppercase();
        // A job killed at its walltime, cancelled or failed runs its trap,
        // which destroys the token (galyleo does): the job's end is then
        // the news, whichever of the two arrived first.
        let job_over_badly = state.is_ended() && !matches!(base.as_str(), "COMPLETED" | "CD");
        match token.end_kind {
            Some(EndCause::Destroy) if !job_over_badly => return Some(EndingShown::ShutDown),
            Some(EndCause::Revoke) => return Some(EndingShown::Revoked),
            Some(EndCause::BindingMismatch) => return Some(EndingShown::Binding),
            Some(EndCause::Ttl) => return Some(EndingShown::Expired),
            Some(EndCause::JobEnd | EndCause::Destroy) | None => {}
        }
        Some(match base.as_str() {
            "TIMEOUT" | "TO" | "DEADLINE" | "DL" => EndingShown::TimeLimit,
            "CANCELLED" | "CA" => EndingShown::Cancelled,
            "PREEMPTED" | "PR" => EndingShown::Preempted,
            _ if !token.redeemed && FAILED_TO_START.contains(&base.as_str()) => {
                EndingShown::FailedToStart
            }
            "NODE_FAIL" | "NF" => EndingShown::NodeFailure,
            "FAILED" | "F" | "BOOT_FAIL" | "BF" | "OUT_OF_MEMORY" | "OOM" => EndingShown::Failed,
            _ => EndingShown::JobEnded,
        })
    }
}

/// tokenjobstate's `format=json` answer, for the waiting page: the legacy
/// code plus `X` (unknown or expired token, final) and `E` (the job failed
/// before it redeemed, final), why it is over (`cause`, see
/// [`EndingShown`]), and what is known of the job.
fn job_json(found: Option<&TokenJob>, code: Option<&str>) -> String {
    let Some(token) = found else {
        return serde_json::json!({ "state": "X", "cause": "unknown", "job": null }).to_string();
    };
    let ending = EndingShown::of(token, code);
    let state = match ending {
        Some(EndingShown::Expired) => "X",
        Some(EndingShown::FailedToStart) => "E",
        _ => code.unwrap_or("U"),
    };
    let ended_at = token
        .ended_at
        .as_deref()
        .and_then(crate::store::parse_sql_timestamp)
        .map(|t| t.timestamp());
    let job = token.jobid.as_ref().map(|id| {
        let detail = token.job.as_ref();
        serde_json::json!({
            "id": id,
            "state": token.job_state,
            "reason": detail.and_then(|j| j.reason.clone()),
            "start": detail.and_then(|j| j.start_time),
            "time_limit_secs": detail.and_then(|j| j.time_limit_secs),
            "ended_at": ended_at,
        })
    });
    serde_json::json!({
        "state": state,
        "cause": ending.map(EndingShown::label),
        "job": job,
        "ended_at": ended_at,
    })
    .to_string()
}
