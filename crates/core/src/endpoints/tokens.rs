//! `redeemtoken.cgi`, `destroytoken.cgi` and `linktoken.cgi`: the calls that
//! change a token.

use http::{Request, StatusCode};

use super::{
    allowed_client, missing, query_params, require_get, short_id, text_response, token_param, Body,
    Context, Failure, Outcome, FROM_CLUSTER, FROM_COMPUTE_NODE,
};
use crate::config::JobBinding;
use crate::store::{DestroyOutcome, LinkOutcome, RedeemOutcome};

const UNKNOWN_OR_USED: &str = "Unknown nonce or nonce already used";
const UNKNOWN_OR_DESTROYED: &str = "Unknown nonce or nonce already destroyed";

/// The longest job id linktoken accepts, plus one (the original's `< 48`).
const JOBID_LIMIT: usize = 48;

pub(super) fn redeem(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    require_get(request)?;
    let params = query_params(request);
    let token = token_param(&params)?;
    let port = params.get("port").ok_or_else(|| missing("port"))?;
    let port = parse_port(port).ok_or_else(|| {
        Failure::Oops(
            StatusCode::BAD_REQUEST,
            "'port' parameter isn't an integer between 1024 and 65535".into(),
        )
    })?;
    let client = allowed_client(request, &ctx.config.tgtipmask, FROM_COMPUTE_NODE)?;
    ctx.check_unknown_limit(request)?;
    let Some(token) = token else {
        return Err(unknown(ctx, request, UNKNOWN_OR_USED));
    };
    let host = client.to_string();
    if let Some(mismatch) = ctx.redeem_mismatch(token, client)? {
        ctx.syslog.info(&format!(
            "satellite job binding {} token-id: {} {mismatch}",
            if ctx.config.job_binding == JobBinding::Enforce {
                "refused redeem"
            } else {
                "warning"
            },
            short_id(token)
        ));
        if ctx.config.job_binding == JobBinding::Enforce {
            // Answered exactly as an unknown token, and counted as one: a
            // guess from inside tgtipmask must learn nothing cheaper than
            // from any other wrong token. The log above says why.
            return Err(unknown(ctx, request, UNKNOWN_OR_USED));
        }
    }
    match ctx.redeem(token, client, port)? {
        RedeemOutcome::Redeemed => {
            ctx.syslog.info(&format!(
                "satellite redeemed token-id: {} mapped-to: {host}:{port}",
                short_id(token)
            ));
            Ok(text_response(
                StatusCode::OK,
                "text/html",
                b"Success!\n".to_vec(),
            ))
        }
        RedeemOutcome::AlreadyRedeemed => {
            Err(Failure::Oops(StatusCode::CONFLICT, UNKNOWN_OR_USED.into()))
        }
        RedeemOutcome::Unknown => Err(unknown(ctx, request, UNKNOWN_OR_USED)),
    }
}

pub(super) fn destroy(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    require_get(request)?;
    let params = query_params(request);
    let token = token_param(&params)?;
    let client = allowed_client(request, &ctx.config.tgtipmask, FROM_COMPUTE_NODE)?;
    ctx.check_unknown_limit(request)?;
    let Some(token) = token else {
        return Err(unknown(ctx, request, UNKNOWN_OR_DESTROYED));
    };
    let requester = client.to_string();
    let now = ctx.now();
    match ctx.store()?.destroy(token, &requester, now)? {
        DestroyOutcome::Destroyed => {
            ctx.syslog.info(&format!(
                "satellite destroy token-id: {} requested-from: {requester}",
                short_id(token)
            ));
            Ok(text_response(
                StatusCode::OK,
                "text/html",
                b"Success! Token destroyed.\n".to_vec(),
            ))
        }
        DestroyOutcome::WrongHost => Err(Failure::Oops(
            StatusCode::FORBIDDEN,
            "Nonce must be destroyed from host it was redeemed on".into(),
        )),
        DestroyOutcome::Unknown => Err(unknown(ctx, request, UNKNOWN_OR_DESTROYED)),
    }
}

pub(super) fn link(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    require_get(request)?;
    let params = query_params(request);
    let token = token_param(&params)?;
    let jobid = params
        .get("jobid")
        .map(sanitize_jobid)
        .filter(|j| !j.is_empty() && j.len() < JOBID_LIMIT)
        .ok_or_else(|| missing("jobid"))?;
    let client = allowed_client(request, &ctx.config.tgtipmask, FROM_CLUSTER)?;
    ctx.check_unknown_limit(request)?;
    let Some(token) = token else {
        return Err(unknown(ctx, request, UNKNOWN_OR_DESTROYED));
    };
    let (now, ttl) = (ctx.now(), ctx.config.ttl_secs);
    match ctx.store()?.link(token, &jobid, now, ttl)? {
        LinkOutcome::Linked => {
            ctx.syslog.info(&format!(
                "satellite link token-id: {}->{jobid} requested-from: {client}",
                short_id(token)
            ));
            Ok(text_response(
                StatusCode::OK,
                "text/html",
                b"Success! Token linked to jobid.\n".to_vec(),
            ))
        }
        LinkOutcome::AlreadyLinked => Err(Failure::Oops(
            StatusCode::CONFLICT,
            "Nonce already linked to a jobid, you can do this only once!".into(),
        )),
        LinkOutcome::Unknown => Err(unknown(ctx, request, UNKNOWN_OR_DESTROYED)),
    }
}

/// The answer for a token that names no live row, counted against the
/// client's limit of such answers.
fn unknown(ctx: &mut Context, request: &Request<Body>, message: &str) -> Failure {
    match ctx.charge_unknown(request) {
        Ok(()) => Failure::Oops(StatusCode::NOT_FOUND, message.into()),
        Err(refusal) => refusal,
    }
}

/// Four or five ASCII digits, 1024 to 65535; nothing else, not even the
/// trailing newline Perl's `$` let through.
pub fn parse_port(raw: &[u8]) -> Option<u16> {
    if !(4..=5).contains(&raw.len()) || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let port: u32 = std::str::from_utf8(raw).ok()?.parse().ok()?;
    u16::try_from(port).ok().filter(|p| *p >= 1024)
}

/// Whitespace dropped, then everything outside `[-a-zA-Z0-9._]`: Slurm ids,
/// array ids and PBS ids (`12345.tscc-mgr.local`) survive.
pub fn sanitize_jobid(raw: &[u8]) -> String {
    raw.iter()
        .filter(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        .map(|&b| b as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port(b"8888"), Some(8888));
        assert_eq!(parse_port(b"65535"), Some(65535));
        assert_eq!(parse_port(b"1024"), Some(1024));
        for bad in [
            &b"80"[..],
            b"1023",
            b"65536",
            b"123456",
            b"abc",
            b"8888\n",
            b" 8888",
            b"08888x",
        ] {
            assert_eq!(parse_port(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn jobids() {
        assert_eq!(sanitize_jobid(b" 123 45 "), "12345");
        assert_eq!(
            sanitize_jobid(b"12345.tscc-mgr.local"),
            "12345.tscc-mgr.local"
        );
        assert_eq!(sanitize_jobid(b"123[4]"), "1234");
    }
}
