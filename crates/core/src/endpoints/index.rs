//! `index.cgi`: what a host that is not (yet) proxied shows. Every
//! token-shaped host gets the waiting page on every path, so a deep link
//! such as Jupyter's `/lab?token=…` waits instead of answering 404; the
//! page asks tokenjobstate what to say. The answer is the same bytes
//! whether the token is pending, unknown or gone, so it tells a guesser
//! nothing, and no database is opened. Everything else gets the original's
//! plain default message. Apache serves the same two answers as static
//! files (`html/satellite/`); this program answers legacy callers.

use http::{header, Method, Request, StatusCode};

use super::{require_method, text_response, Body, Context, Outcome, ONLY_GET};

pub const DEFAULT_MESSAGE: &str = "Please see documentation on how to use this service.\n";

/// Shipped in the binary so that a missing html directory cannot take the
/// waiting page down; `<htmldir>/waiting.html` replaces it when present.
const WAITING_PAGE: &str = include_str!("../../../../html/satellite/waiting.html");

/// Host headers longer than a DNS name cannot name an alias.
const MAX_HOST_LEN: usize = 255;

pub(super) fn index(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    require_method(request, &[Method::GET, Method::HEAD], "GET, HEAD", ONLY_GET)?;
    let alias = request
        .headers()
        .get(header::HOST)
        .and_then(|host| alias_of_host(host.as_bytes(), &ctx.config.extbasename));
    // A token has at least two words: `manage`, `www` and the like are not
    // tokens.
    let waiting = alias.is_some_and(|alias| alias.contains('-'));
    if !waiting {
        return Ok(text_response(
            StatusCode::OK,
            "text/plain",
            DEFAULT_MESSAGE.as_bytes().to_vec(),
        ));
    }
    let page = std::fs::read(ctx.config.htmldir.join("waiting.html"))
        .unwrap_or_else(|_| WAITING_PAGE.as_bytes().to_vec());
    Ok(text_response(StatusCode::OK, "text/html", page))
}

/// The alias a Host header names: `<alias>.<extbasename>`, any case, with an
/// optional `:port`. Anything else names none.
pub fn alias_of_host(host: &[u8], extbasename: &str) -> Option<String> {
    if host.len() > MAX_HOST_LEN {
        return None;
    }
    let host = std::str::from_utf8(host).ok()?.to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host.as_str(),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let (label, rest) = host.split_once('.')?;
    (rest == extbasename && crate::token::is_valid_alias(label)).then(|| label.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let ext = "expanse-user-content.sdsc.edu";
        let alias = |h: &str| alias_of_host(h.as_bytes(), ext);
        assert_eq!(
            alias("a-b-c.expanse-user-content.sdsc.edu").as_deref(),
            Some("a-b-c")
        );
        assert_eq!(
            alias("A-B-C.Expanse-User-Content.SDSC.edu:443").as_deref(),
            Some("a-b-c")
        );
        assert_eq!(alias("a-b-c.expanse-user-content.sdsc.edu.evil.org"), None);
        assert_eq!(alias("expanse-user-content.sdsc.edu"), None);
        assert_eq!(alias("[::1]:443"), None);
        assert_eq!(alias("a_b.expanse-user-content.sdsc.edu"), None);
        assert_eq!(alias("a-b-c.expanse-user-content.sdsc.edu:x"), None);
    }
}
