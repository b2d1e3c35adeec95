//! `index.cgi`: what a host that is not (yet) proxied shows. A pending or
//! mapped alias gets the waiting page on every path, so a deep link such as
//! Jupyter's `/lab?token=…` waits instead of answering 404; everything else
//! gets the original's plain default message.

use http::{header, Method, Request, StatusCode};

use super::{require_method, text_response, Body, Context, Outcome, ONLY_GET};
use crate::store::ProxyState;

pub const DEFAULT_MESSAGE: &str = "Please see documentation on how to use this service.\n";

/// Shipped in the binary so that a missing html directory cannot take the
/// waiting page down; `<htmldir>/waiting.html` replaces it when present.
const WAITING_PAGE: &str = include_str!("../../assets/waiting.html");

/// Host headers longer than a DNS name cannot name an alias.
const MAX_HOST_LEN: usize = 255;

pub(super) fn index(ctx: &mut Context, request: &Request<Body>) -> Outcome {
    require_method(request, &[Method::GET, Method::HEAD], "GET, HEAD", ONLY_GET)?;
    let alias = request
        .headers()
        .get(header::HOST)
        .and_then(|host| alias_of_host(host.as_bytes(), &ctx.config.extbasename));
    let waiting = match alias {
        Some(alias) => {
            let (now, ttl) = (ctx.now(), ctx.config.ttl_secs);
            matches!(
                ctx.store()?.proxy_state(&alias, now, ttl)?,
                Some(ProxyState::Pending | ProxyState::Mapped | ProxyState::Proxied)
            )
        }
        None => false,
    };
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
