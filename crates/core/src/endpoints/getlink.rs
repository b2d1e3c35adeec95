//! `getlink.cgi`: issue a new pending token.

use http::{Request, StatusCode};

use super::{
    allowed_client, short_id, text_response, Body, Context, Failure, Outcome, FROM_CLUSTER,
};

/// Fresh draws before giving up; with 7772³ aliases a collision with a live
/// one is rare enough that a second draw already means something is wrong.
const MAX_DRAWS: usize = 16;

pub(super) fn getlink(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    let client = allowed_client(request, &ctx.config.tgtipmask, FROM_CLUSTER)?;
    let words = ctx.config.words_per_token;
    let now = ctx.now();
    for _ in 0..MAX_DRAWS {
        let alias = ctx.wordlist()?.draw_alias(words);
        if ctx.store()?.insert_pending(&alias, now)? {
            ctx.syslog.info(&format!(
                "satellite issued token-id: {} requested-from: {client}",
                short_id(&alias)
            ));
            return Ok(text_response(
                StatusCode::OK,
                "text/plain",
                format!("Your token is \n{alias}\n").into_bytes(),
            ));
        }
    }
    Err(Failure::Oops(
        StatusCode::SERVICE_UNAVAILABLE,
        "Problem generating unique URL. Sorry!".into(),
    ))
}
