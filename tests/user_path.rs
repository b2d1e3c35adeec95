//! The user's path through the shipped `httpd-conf/` in a real private
//! Apache (issue 9): the waiting and retry pages' security policy, the
//! headers on everything satellite serves, backend cookies kept to their
//! own host, the plain-HTTP redirect, and every request target reaching
//! the application byte for byte in both routing modes.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;
use sha2::Digest as _;

use support::apache::{Apache, Routing};
use support::backend::Backend;
use support::client::{Request, Response};
use support::repo_root;

const BACKEND: &str = "127.0.0.3";
const HSTS: &str = "max-age=63072000";

/// The CSP source `'sha256-…'` of an inline element's text.
fn csp_hash(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The text between `<tag>` and `</tag>` (the page has one of each).
fn inline(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = page.find(&open).map(|i| i + open.len());
    let end = page.find(&close);
    match (start, end) {
        (Some(start), Some(end)) if start <= end => page[start..end].to_owned(),
        _ => panic!("no <{tag}> in the page"),
    }
}

#[test]
fn the_pages_content_security_policy_allows_exactly_their_own_script_and_style() {
    for name in ["waiting.html", "retry.html", "unavailable.html"] {
        let page = std::fs::read_to_string(repo_root().join("html/satellite").join(name)).unwrap();
        let meta = page
            .lines()
            .find(|l| l.contains("http-equiv=\"Content-Security-Policy\""))
            .unwrap_or_else(|| panic!("{name} has no CSP <meta>"));
        for (tag, directive) in [("script", "script-src"), ("style", "style-src")] {
            let expected = format!("{directive} {}", csp_hash(&inline(&page, tag)));
            assert!(
                meta.contains(&expected),
                "{name}: its CSP must say `{expected}` (update the hash after editing the \
                 <{tag}>):\n{meta}"
            );
        }
        assert!(meta.contains("default-src 'none'"), "{name}: {meta}");
        assert!(!meta.contains("unsafe-"), "{name}: {meta}");
        let handler = page.split(" on").skip(1).any(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(
            !page.contains(" style=") && !handler,
            "{name}: inline style attributes or event handlers would be blocked"
        );
    }
}

fn headers_named<'a>(r: &'a Response, name: &str) -> Vec<&'a str> {
    r.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn assert_hardened(r: &Response, what: &str) {
    assert_eq!(
        headers_named(r, "X-Content-Type-Options"),
        ["nosniff"],
        "{what}: {r}"
    );
    assert_eq!(
        headers_named(r, "Strict-Transport-Security"),
        [HSTS],
        "{what}: {r}"
    );
}

#[test]
fn satellite_pages_endpoints_and_proxied_applications_carry_nosniff_and_hsts() {
    let apache = Apache::start(Routing::Map);
    let token = apache.getlink();
    let waiting = apache.get(&token, "/lab?token=abc");
    assert_eq!(waiting.status, 200, "{waiting}");
    assert_hardened(&waiting, "the waiting page");
    let page = apache.get(&token, "/.satellite/waiting.html");
    assert_hardened(&page, "the static waiting page");
    let csp = page.header("Content-Security-Policy").unwrap_or_default();
    assert!(
        csp.contains(&format!(
            "connect-src 'self' https://{}:*",
            support::apache::DOMAIN
        )) && csp.contains("frame-ancestors 'none'"),
        "{page}"
    );
    // Both policies apply: a script-src or default-src here would block the
    // inline script the page's <meta> allows by its hash.
    assert!(
        !csp.contains("default-src") && !csp.contains("script-src"),
        "{page}"
    );
    let state = apache.get("manage", &format!("/tokenjobstate.cgi?token={token}"));
    assert_hardened(&state, "tokenjobstate.cgi");
    let junk = apache.get("not_an-alias", "/");
    assert_hardened(&junk, "the default message");

    let backend = Backend::start("cookies", BACKEND);
    apache.redeem_ok(&token, BACKEND, backend.port());
    let proxied = apache.get(&token, "/set-cookie");
    assert_eq!(proxied.status, 200, "{proxied}");
    assert_hardened(&proxied, "a proxied application");
}

#[test]
fn a_backends_cookies_lose_their_domain_so_they_stay_on_its_own_host() {
    for routing in [Routing::Map, Routing::Vhost] {
        let apache = Apache::start(routing);
        let backend = Backend::start("cookies", BACKEND);
        let token = apache.getlink();
        apache.redeem_ok(&token, BACKEND, backend.port());
        if routing == Routing::Vhost {
            apache.cron_ok();
        }
        let r = apache.eventually("the cookie backend answering", || {
            let r = apache
                .client()
                .get(&apache.host_port(&token), "/set-cookie")
                .map_err(|e| e.to_string())?;
            if r.header("X-Backend") == Some("cookies") {
                Ok(r)
            } else {
                Err(r.to_string())
            }
        });
        assert_eq!(
            headers_named(&r, "Set-Cookie"),
            [
                "tossed=1; Path=/",
                "dotted=2; Path=/; Secure; HttpOnly",
                "plain=3; Path=/"
            ],
            "{routing:?}: {r}"
        );
    }
}

/// One plain-HTTP request to Apache's redirect port; the raw answer head.
fn plain_http(apache: &Apache, host: &str, target: &str) -> String {
    let mut tcp = TcpStream::connect(("127.0.0.1", apache.http_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn location(head: &str) -> Option<&str> {
    head.lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .map(str::trim)
}

#[test]
fn plain_http_redirects_to_the_same_host_and_target_on_https() {
    let apache = Apache::start(Routing::Map);
    let token = apache.getlink();
    let host = format!("{token}.{}:{}", support::apache::DOMAIN, apache.http_port);
    let target = "/lab/tree/a%20b%3F.ipynb?token=abc&x=%2F";
    let head = plain_http(&apache, &host, target);
    assert!(head.starts_with("HTTP/1.1 301 "), "{head}");
    assert_eq!(
        location(&head),
        Some(format!("{}{target}", apache.origin(&token)).as_str()),
        "{head}"
    );
    let apex = plain_http(&apache, &format!("{}.", support::apache::DOMAIN), "/");
    assert_eq!(
        location(&apex),
        Some(format!("https://{}:{}/", support::apache::DOMAIN, apache.port).as_str()),
        "{apex}"
    );
    let elsewhere = plain_http(&apache, "evil.example.org", "/");
    assert!(elsewhere.starts_with("HTTP/1.1 400 "), "{elsewhere}");
    assert_eq!(location(&elsewhere), None, "{elsewhere}");

    // Behind a port forward from 443, the URL names no port at all.
    apache.graceful_with("Define SATELLITE_PUBLIC_PORT \"443\"");
    let expected = format!("https://{token}.{}{target}", support::apache::DOMAIN);
    apache.eventually_in_a_row("the redirect to the public port", || {
        let head = plain_http(&apache, &host, target);
        (location(&head) == Some(expected.as_str()))
            .then_some(())
            .ok_or(head)
    });
}

/// Request targets a browser sends for files and API calls whose names
/// hold characters with a meaning in URLs; each must reach the
/// application exactly as sent.
fn path_table() -> Vec<(&'static str, String)> {
    vec![
        ("%3F", "/files/what%3F.txt?token=abc".into()),
        ("%2F", "/api/contents/a%2Fb".into()),
        ("%23", "/files/issue%231.txt".into()),
        ("%25", "/files/100%25.txt".into()),
        ("%20", "/lab/tree/my%20notebook.ipynb".into()),
        ("+", "/files/a+b.txt?q=a+b".into()),
        (";", "/files/a;b=c.txt".into()),
        ("%3B", "/files/a%3Bb.txt".into()),
        ("//", "/files//double//slash".into()),
        ("UTF-8", "/files/%C3%A9t%C3%A9.txt".into()),
        ("query %26 %3D", "/api/x?path=a%26b%3Dc&y=%3F".into()),
        ("long", format!("/files/{}", "x".repeat(6000))),
    ]
}

/// Sends every row through Apache to a recording backend; returns the rows
/// whose target did not arrive intact, as `(row, sent, status, received)`.
fn mismatches(apache: &Apache, token: &str, backend: &Backend) -> Vec<String> {
    let mut wrong = Vec::new();
    let client = apache.client();
    let host = apache.host_port(token);
    for (name, target) in path_table() {
        let before = backend.seen().len();
        let r = client.request(&Request::get(&host, &target));
        let seen = backend.seen();
        let got = seen.get(before).map(|s| s.target.clone());
        if got.as_deref() != Some(target.as_str()) {
            let status = r
                .map(|r| r.status.to_string())
                .unwrap_or_else(|e| e.to_string());
            wrong.push(format!("{name}: status {status}, received {got:?}"));
        }
        // The same target as a websocket upgrade.
        let ws_target = format!("/api/kernels/k{target}");
        let before = backend.seen().len();
        let answer = client.connect(&host).and_then(|mut conn| {
            conn.websocket(&host, &ws_target, "v1.kernel.websocket.jupyter.org")
        });
        let seen = backend.seen();
        let got = seen.get(before).map(|s| s.target.clone());
        if got.as_deref() != Some(ws_target.as_str()) {
            let status = answer
                .map(|r| r.status.to_string())
                .unwrap_or_else(|e| e.to_string());
            wrong.push(format!(
                "websocket {name}: status {status}, received {got:?}"
            ));
        }
    }
    wrong
}

#[test]
fn every_request_target_reaches_the_application_exactly_as_sent_in_both_routing_modes() {
    let mut report = Vec::new();
    for routing in [Routing::Map, Routing::Vhost] {
        let apache = Apache::start(routing);
        let backend = Backend::start("paths", BACKEND);
        let token = apache.getlink();
        apache.redeem_ok(&token, BACKEND, backend.port());
        if routing == Routing::Vhost {
            apache.cron_ok();
            // Every row below assumes the new generation answers.
            apache.eventually_in_a_row("the route", || {
                let r = apache
                    .client()
                    .get(&apache.host_port(&token), "/probe")
                    .map_err(|e| e.to_string())?;
                if r.header("X-Backend") == Some("paths") {
                    Ok(())
                } else {
                    Err(r.to_string())
                }
            });
        }
        for row in mismatches(&apache, &token, &backend) {
            report.push(format!("{routing:?} {row}"));
        }
    }
    assert!(
        report.is_empty(),
        "targets changed on the way:\n{}",
        report.join("\n")
    );
}

/// testssl.sh findings allowed above LOW, each for a stated reason.
const ACCEPTED_FINDINGS: [(&str, &str); 2] = [
    // A message about the scanner's own openssl, not about the server.
    ("engine_problem", "testssl's openssl has no GOST engine"),
    // Mozilla's intermediate profile sets `SSLHonorCipherOrder off` on
    // purpose: every suite offered is AEAD with forward secrecy, so the
    // client may pick (ChaCha20 on phones without AES hardware).
    // testssl 3.0 rates any missing server order HIGH regardless.
    (
        "cipher_order",
        "Mozilla intermediate leaves the order to the client",
    ),
];

#[test]
fn testssl_finds_nothing_above_low_on_the_shipped_tls_configuration() {
    let apache = Apache::start(Routing::Map);
    let out_dir = tempfile::tempdir().unwrap();
    let json = out_dir.path().join("testssl.json");
    // The test CA is the one trust anchor, as a public CA is for a site.
    let ca = out_dir.path().join("ca.pem");
    std::fs::write(&ca, &apache.ca_pem).unwrap();
    let uri = format!("https://{}:{}/", apache.host("manage"), apache.port);
    // A check testssl could not complete (a connection refused or timed out
    // on a loaded 2-core machine) says nothing about the server: run again,
    // at most twice more, rather than pass or fail on it.
    let mut attempts = 0;
    let (above_low, report) = loop {
        attempts += 1;
        let _ = std::fs::remove_file(&json);
        let run = std::process::Command::new("testssl")
            .args([
                "--quiet",
                "--color",
                "0",
                "--warnings",
                "batch",
                "--ip",
                "127.0.0.1",
                "--sneaky",
                "--add-ca",
            ])
            .arg(&ca)
            .arg("--jsonfile")
            .arg(&json)
            .arg(&uri)
            .env("TERM", "dumb")
            .output()
            .expect("running testssl (Debian package testssl.sh)");
        let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
            panic!(
                "testssl wrote no JSON ({e}): {}{}",
                String::from_utf8_lossy(&run.stdout),
                String::from_utf8_lossy(&run.stderr)
            )
        });
        let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let mut above_low = Vec::new();
        let mut report = Vec::new();
        let mut inconclusive = false;
        for f in &findings {
            let id = f["id"].as_str().unwrap_or_default();
            let severity = f["severity"].as_str().unwrap_or_default();
            let finding = f["finding"].as_str().unwrap_or_default();
            let accepted = ACCEPTED_FINDINGS.iter().find(|(a, _)| *a == id);
            if !matches!(severity, "OK" | "INFO") {
                let why = accepted.map(|(_, why)| format!(" (accepted: {why})"));
                report.push(format!(
                    "{severity:8} {id}: {finding}{}",
                    why.unwrap_or_default()
                ));
            }
            inconclusive |= severity == "WARN" && finding.contains("connect problem");
            if matches!(severity, "MEDIUM" | "HIGH" | "CRITICAL" | "WARN") && accepted.is_none() {
                above_low.push(format!("{severity} {id}: {finding}"));
            }
        }
        if !inconclusive || attempts == 3 {
            break (above_low, report);
        }
    };
    // Kept for the CI log and the README's grade line.
    std::fs::create_dir_all(repo_root().join("target")).unwrap();
    let _ = std::fs::copy(&json, repo_root().join("target/testssl.json"));
    std::fs::write(
        repo_root().join("target/testssl-findings.txt"),
        report.join("\n") + "\n",
    )
    .unwrap();
    assert!(
        above_low.is_empty(),
        "testssl findings above LOW:\n{}\nall findings:\n{}",
        above_low.join("\n"),
        report.join("\n")
    );
}

#[test]
fn a_site_can_leave_hsts_off_the_applications_but_not_off_its_own_pages() {
    let apache = Apache::start(Routing::Map);
    apache.graceful_with("Define SATELLITE_NO_APP_HSTS");

    let backend = Backend::start("no-hsts", BACKEND);
    let token = apache.getlink();
    let waiting = apache.get(&token, "/");
    assert_eq!(
        headers_named(&waiting, "Strict-Transport-Security"),
        [HSTS],
        "{waiting}"
    );
    apache.redeem_ok(&token, BACKEND, backend.port());
    // satellite adds none; an application that sends its own keeps it.
    // Both checked on each probe: a child of the previous generation (HSTS
    // on everything) may still answer either request.
    let (proxied, own) = apache.eventually_in_a_row("the new generation proxying", || {
        let get = |path: &str| {
            apache
                .client()
                .get(&apache.host_port(&token), path)
                .map_err(|e| format!("{path}: {e}"))
        };
        let proxied = get("/plain")?;
        if proxied.header("X-Backend") != Some("no-hsts")
            || proxied.header("Strict-Transport-Security").is_some()
        {
            return Err(format!("/plain: {proxied}"));
        }
        let own = get("/set-cookie")?;
        if own.header("X-Backend") != Some("no-hsts")
            || headers_named(&own, "Strict-Transport-Security") != ["max-age=5"]
        {
            return Err(format!("/set-cookie: {own}"));
        }
        Ok((proxied, own))
    });
    assert_eq!(
        headers_named(&proxied, "X-Content-Type-Options"),
        ["nosniff"],
        "{proxied}"
    );
    assert_eq!(
        headers_named(&own, "Strict-Transport-Security"),
        ["max-age=5"],
        "{own}"
    );
    let endpoint = apache.get("manage", &format!("/tokenjobstate.cgi?token={token}"));
    assert_eq!(
        headers_named(&endpoint, "Strict-Transport-Security"),
        [HSTS],
        "{endpoint}"
    );
}
