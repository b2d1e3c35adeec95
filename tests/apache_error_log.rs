//! No token in Apache's error log (issue 10, item 5). A token travels in
//! the TLS SNI name and the Host of every request, and Jupyter puts its own
//! `?token=` in URLs that browsers send on as Referer; Apache's default
//! error log lines carry the Referer, and AH02031 names the SNI host. The
//! shipped httpd-conf must keep both out: checked against a real Apache.

mod support;

use support::apache::{Apache, Routing};
use support::backend::ReservedPort;
use support::client::Request;

const DEAD_BACKEND: &str = "127.0.0.6";
const JUPYTER_TOKEN: &str = "c0ffee5ecret0f7h3n0t3b00k";

fn no_token_in_the_error_log(routing: Routing) {
    let apache = Apache::start(routing);
    // A route to a backend that is not listening: the proxy fails and
    // Apache logs why (AH00957, AH01114), with the request's Referer by
    // default.
    let routed = apache.getlink();
    // Bound, never listening: connections are refused for the whole test.
    let dead = ReservedPort::on(DEAD_BACKEND);
    apache.redeem_ok(&routed, DEAD_BACKEND, dead.port);
    if routing == Routing::Vhost {
        apache.cron_ok();
    }
    let referer = format!("https://{}/lab?token={JUPYTER_TOKEN}", apache.host(&routed));
    let proxied =
        Request::get(&apache.host_port(&routed), "/api/kernels").header("Referer", &referer);
    // In vhost routing the route is live after cron's graceful reload.
    apache.eventually("the proxy to the dead backend failing", || {
        let r = apache
            .client()
            .request(&proxied)
            .map_err(|e| e.to_string())?;
        if r.status == 503 {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    });

    // The SNI name is a token, the request has no Host: Apache refuses it
    // (AH02031 names the SNI host by default).
    let pending = apache.getlink();
    for request in ["GET / HTTP/1.0\r\n\r\n", "GET / HTTP/1.1\r\n\r\n"] {
        let mut conn = apache.client().connect(&apache.host(&pending)).unwrap();
        let answer =
            String::from_utf8_lossy(&conn.send_raw(request.as_bytes()).unwrap()).into_owned();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    }
    // And an SNI token with a Host of another token.
    let mut conn = apache.client().connect(&apache.host(&pending)).unwrap();
    let other = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nReferer: {referer}\r\nConnection: close\r\n\r\n",
        apache.host_port(&routed)
    );
    let _ = conn.send_raw(other.as_bytes()).unwrap();

    let log = std::fs::read_to_string(apache.error_log_path()).unwrap();
    // The failures were logged (so this looks at the right file) ...
    assert!(log.contains("AH01114"), "{log}");
    // ... without a secret.
    for secret in [routed.as_str(), pending.as_str(), JUPYTER_TOKEN] {
        assert!(!log.contains(secret), "{secret} in the error log:\n{log}");
    }
}

#[test]
fn map_mode_tokens_in_sni_host_and_referer_never_reach_the_error_log() {
    no_token_in_the_error_log(Routing::Map);
}

#[test]
fn vhost_mode_tokens_in_sni_host_and_referer_never_reach_the_error_log() {
    no_token_in_the_error_log(Routing::Vhost);
}
