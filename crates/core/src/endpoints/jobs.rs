//! `tokenjobstate.cgi` (the waiting page's poll) and `update-jobs.cgi` (the
//! scheduler's push).

use http::{header, HeaderValue, Method, Request, StatusCode};

use super::{
    allowed_client, missing, query_params, require_method, text_response, Body, Context, Outcome,
    ONLY_GET,
};
use crate::query::Params;

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
        if found.is_none() {
            ctx.charge_unknown(request)?;
        }
        let code = found
            .as_ref()
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
    for (alias, cause) in &applied.ended {
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

/// tokenjobstate's `format=json` answer, for the waiting page: the legacy
/// code plus `X` (unknown or expired token, final) and `E` (the job failed
/// before it redeemed, final), and what is known of the job.
fn job_json(found: Option<&crate::store::TokenJob>, code: Option<&str>) -> String {
    let Some(token) = found else {
        return serde_json::json!({ "state": "X", "job": null }).to_string();
    };
    let job_state = token.job_state.as_deref().unwrap_or("");
    let failed_to_start = token.proxy_state == crate::store::ProxyState::Ended
        && !token.redeemed
        && FAILED_TO_START.contains(&job_state.to_ascii_uppercase().as_str());
    let state = if failed_to_start {
        "E"
    } else {
        code.unwrap_or("U")
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
    serde_json::json!({ "state": state, "job": job, "ended_at": ended_at }).to_string()
}
