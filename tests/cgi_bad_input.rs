//! Nothing a client can send panics a program or changes the database
//! unless the request is valid.

mod support;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use support::*;

const ONLY_GET: &str = "Oops! Only GET method is supported\n";
const ONLY_POST: &str = "Oops! Only POST method is supported\n";
const MISSING_TOKEN: &str = "Oops! Missing 'token' parameter\n";
const MISSING_PORT: &str = "Oops! Missing 'port' parameter\n";
const MISSING_JOBID: &str = "Oops! Missing 'jobid' parameter\n";
const MISSING_JOBSTATES: &str = "Oops! Missing 'jobstates' parameter\n";
const BAD_PORT: &str = "Oops! 'port' parameter isn't an integer between 1024 and 65535\n";
const UNKNOWN_USED: &str = "Oops! Unknown nonce or nonce already used\n";
const UNKNOWN_DESTROYED: &str = "Oops! Unknown nonce or nonce already destroyed\n";
const NOT_FROM_COMPUTE_NODE: &str = "Oops! Client (your) IP not in ranges 10.21.0.0/16 2001:db8:21::/48, please try from the compute node running your service.\n";
const NOT_FROM_CLUSTER: &str = "Oops! Client (your) IP not in ranges 10.21.0.0/16 2001:db8:21::/48, please try from within the cluster.\n";
const NOT_FROM_CONTROLLER: &str = "Oops! Client (your) IP not in range 198.202.100.8/29\n";
const DEFAULT_PAGE: &str = "Please see documentation on how to use this service.\n";
const MALFORMED: &str = "Oops! Malformed request\n";
const INTERNAL: &str = "Oops! Internal error, please try again later or tell the administrators.\n";
const BUSY: &str = "Oops! The service is busy, please try again in a moment.\n";
const NOT_CONFIGURED: &str =
    "Oops! The service is not configured correctly, please tell the administrators.\n";

/// The program answered without panicking (the panic hook of `run_cgi`
/// logs `bug:`) and exited as a CGI program that answered.
#[track_caller]
fn assert_no_panic(answer: &Answer, what: &str) {
    assert!(
        !answer.stderr.contains("panicked") && !answer.stderr.contains("bug:"),
        "{what}: the program panicked: {}",
        answer.stderr
    );
    assert_eq!(answer.exit_code, Some(0), "{what}: {answer:?}");
}

/// The exact status and body, and no panic.
#[track_caller]
fn assert_answer(answer: &Answer, status: u16, body: &str, what: &str) {
    assert_no_panic(answer, what);
    assert_eq!(
        answer.status_and_text(),
        (status, body.to_owned()),
        "{what}: stderr {}",
        answer.stderr
    );
}

fn shown(bytes: &[u8]) -> String {
    let mut text = bytes.escape_ascii().to_string();
    if text.len() > 80 {
        text.truncate(80);
        text.push_str("...");
    }
    text
}

/// `+` and `%XX` decoded, as CGI.pm does (for sorting test inputs only).
fn percent_decoded(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (other, _) => {
                out.push(other);
                i += 1;
            }
        }
    }
    out
}

fn query_with(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A site whose database has something in every table: `pending` is a
/// live pending token, another token is redeemed and linked to job 4242,
/// and job 4242 has a state. "The database is as before" then means
/// something.
fn populated_site(extra_config: &str) -> (Site, String) {
    let site = Site::with_config(extra_config);
    let pending = site.new_token();
    let mapped = site.new_token();
    let redeemed = site
        .cgi("redeemtoken")
        .remote(COMPUTE_NODE)
        .query(format!("token={mapped}&port=8888"))
        .run();
    assert_answer(&redeemed, 200, "Success!\n", "setup redeem");
    let linked = site
        .cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={mapped}&jobid=4242"))
        .run();
    assert_answer(
        &linked,
        200,
        "Success! Token linked to jobid.\n",
        "setup link",
    );
    let pushed = site
        .cgi("update-jobs")
        .remote(SLURM_CONTROLLER)
        .post("jobstates=\n4242 RUNNING\n")
        .run();
    assert_answer(&pushed, 200, "Successfully updated jobs! \n", "setup push");
    assert_eq!(site.snapshot().len(), 3);
    (site, pending)
}

#[test]
fn wrong_methods_are_refused_with_405_and_an_allow_header() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let redeem = format!("token={pending}&port=8888");
    let destroy = format!("token={pending}");
    let link = format!("token={pending}&jobid=77");
    let cases: &[(&str, &str, &str, &str, &str, &str)] = &[
        // program, method, query, client, Allow, body
        (
            "redeemtoken",
            "POST",
            &redeem,
            COMPUTE_NODE,
            "GET",
            ONLY_GET,
        ),
        ("redeemtoken", "PUT", &redeem, COMPUTE_NODE, "GET", ONLY_GET),
        (
            "redeemtoken",
            "DELETE",
            &redeem,
            COMPUTE_NODE,
            "GET",
            ONLY_GET,
        ),
        (
            "redeemtoken",
            "OPTIONS",
            &redeem,
            COMPUTE_NODE,
            "GET",
            ONLY_GET,
        ),
        ("redeemtoken", "get", &redeem, COMPUTE_NODE, "GET", ONLY_GET),
        ("redeemtoken", "FOO", &redeem, COMPUTE_NODE, "GET", ONLY_GET),
        (
            "destroytoken",
            "POST",
            &destroy,
            COMPUTE_NODE,
            "GET",
            ONLY_GET,
        ),
        (
            "destroytoken",
            "DELETE",
            &destroy,
            COMPUTE_NODE,
            "GET",
            ONLY_GET,
        ),
        (
            "destroytoken",
            "PATCH",
            &destroy,
            LOGIN_NODE,
            "GET",
            ONLY_GET,
        ),
        ("linktoken", "POST", &link, LOGIN_NODE, "GET", ONLY_GET),
        ("linktoken", "PUT", &link, LOGIN_NODE, "GET", ONLY_GET),
        (
            "update-jobs",
            "GET",
            "jobstates=77+FAILED",
            SLURM_CONTROLLER,
            "POST",
            ONLY_POST,
        ),
        (
            "update-jobs",
            "PUT",
            "jobstates=77+FAILED",
            SLURM_CONTROLLER,
            "POST",
            ONLY_POST,
        ),
        ("index", "POST", "", LOGIN_NODE, "GET, HEAD", ONLY_GET),
        ("index", "DELETE", "", LOGIN_NODE, "GET, HEAD", ONLY_GET),
        (
            "tokenjobstate",
            "POST",
            &destroy,
            OUTSIDER,
            "GET, OPTIONS",
            ONLY_GET,
        ),
    ];
    for &(program, method, query, client, allow, body) in cases {
        let mut call = site.cgi(program).remote(client).query(query);
        if program == "update-jobs" && method != "GET" {
            call = call.post("jobstates=\n77 FAILED\n");
        }
        let answer = call.method(method).run();
        let what = format!("{method} {program}?{query}");
        assert_answer(&answer, 405, body, &what);
        assert_eq!(answer.header("Allow"), Some(allow), "{what}");
        assert_eq!(site.snapshot(), before, "{what} changed the database");
    }

    // HEAD is not GET either; its answer just has no body.
    let head = site
        .cgi("redeemtoken")
        .method("HEAD")
        .remote(COMPUTE_NODE)
        .query(redeem.clone())
        .run();
    assert_answer(&head, 405, "", "HEAD redeemtoken");
    assert_eq!(head.header("Allow"), Some("GET"));

    // A method that is not an HTTP token at all never reaches the handler.
    for method in ["", "GE T", "GET\r\n", "G(E)T"] {
        let answer = site
            .cgi("redeemtoken")
            .method(method)
            .remote(COMPUTE_NODE)
            .query(redeem.clone())
            .run();
        assert_answer(&answer, 400, MALFORMED, &format!("method {method:?}"));
    }
    assert_eq!(site.snapshot(), before);
    assert_eq!(site.state_of(&pending).as_deref(), Some("pending"));
}

#[test]
fn missing_and_empty_parameters_are_named_in_the_answer_and_nothing_changes() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let t = pending.as_str();
    let long_jobid = "7".repeat(48);
    let cases: Vec<(&str, &str, String, &str)> = vec![
        // program, client, query, body
        ("redeemtoken", COMPUTE_NODE, String::new(), MISSING_TOKEN),
        (
            "redeemtoken",
            COMPUTE_NODE,
            "port=8888".into(),
            MISSING_TOKEN,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            "token=&port=8888".into(),
            MISSING_TOKEN,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            "token&port=8888".into(),
            MISSING_TOKEN,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            "&&;;=&port=8888".into(),
            MISSING_TOKEN,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            "TOKEN={t}&port=8888".replace("{t}", t),
            MISSING_TOKEN,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            format!("token={t}"),
            MISSING_PORT,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            format!("token={t}&port="),
            MISSING_PORT,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            format!("token={t}&port"),
            MISSING_PORT,
        ),
        (
            "redeemtoken",
            COMPUTE_NODE,
            format!("token={t}&Port=8888"),
            MISSING_PORT,
        ),
        // Parameters are checked before the client address.
        ("redeemtoken", OUTSIDER, format!("token={t}"), MISSING_PORT),
        ("destroytoken", COMPUTE_NODE, String::new(), MISSING_TOKEN),
        ("destroytoken", COMPUTE_NODE, "token=".into(), MISSING_TOKEN),
        ("destroytoken", COMPUTE_NODE, "token".into(), MISSING_TOKEN),
        ("linktoken", LOGIN_NODE, String::new(), MISSING_TOKEN),
        (
            "linktoken",
            LOGIN_NODE,
            "token=&jobid=77".into(),
            MISSING_TOKEN,
        ),
        ("linktoken", LOGIN_NODE, format!("token={t}"), MISSING_JOBID),
        (
            "linktoken",
            LOGIN_NODE,
            format!("token={t}&jobid="),
            MISSING_JOBID,
        ),
        // Nothing is left once whitespace and odd characters are dropped.
        (
            "linktoken",
            LOGIN_NODE,
            format!("token={t}&jobid=+%20%09"),
            MISSING_JOBID,
        ),
        (
            "linktoken",
            LOGIN_NODE,
            format!("token={t}&jobid=%5B%5D%24%2A"),
            MISSING_JOBID,
        ),
        // 48 characters is one too many (the original's `< 48`).
        (
            "linktoken",
            LOGIN_NODE,
            format!("token={t}&jobid={long_jobid}"),
            MISSING_JOBID,
        ),
        (
            "linktoken",
            OUTSIDER,
            format!("token={t}&jobid="),
            MISSING_JOBID,
        ),
        ("tokenjobstate", OUTSIDER, String::new(), MISSING_TOKEN),
        ("tokenjobstate", OUTSIDER, "token=".into(), MISSING_TOKEN),
        // The page sends the hostname; an empty first label is no token.
        (
            "tokenjobstate",
            OUTSIDER,
            format!("token=.{EXT}"),
            MISSING_TOKEN,
        ),
    ];
    for (program, client, query, body) in cases {
        let answer = site.cgi(program).remote(client).query(query.clone()).run();
        let what = format!("{program}?{query} from {client}");
        assert_answer(&answer, 400, body, &what);
        assert_eq!(site.snapshot(), before, "{what} changed the database");
    }

    for body in [
        "",
        "jobstates=",
        "jobstates",
        "jobstate=4242+FAILED",
        "=4242+FAILED",
    ] {
        let answer = site
            .cgi("update-jobs")
            .remote(SLURM_CONTROLLER)
            .post(body)
            .run();
        assert_answer(&answer, 400, MISSING_JOBSTATES, &format!("body {body:?}"));
    }
    assert_eq!(site.snapshot(), before);

    // The limit is exact: 47 characters link.
    let answer = site
        .cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={t}&jobid={}", "7".repeat(47)))
        .run();
    assert_answer(
        &answer,
        200,
        "Success! Token linked to jobid.\n",
        "47-char jobid",
    );
}

#[test]
fn a_repeated_parameter_takes_its_first_value_as_cgi_pm_did() {
    let site = Site::new();
    let redeem = |query: String| {
        site.cgi("redeemtoken")
            .remote(COMPUTE_NODE)
            .query(query)
            .run()
    };

    let first = site.new_token();
    let before = site.snapshot();
    for (query, status, body) in [
        // An empty first value is a missing one, whatever follows.
        (
            format!("token=&token={first}&port=8888"),
            400,
            MISSING_TOKEN,
        ),
        (format!("token={first}&port=&port=8888"), 400, MISSING_PORT),
        (
            format!("token=junk&token={first}&port=8888"),
            404,
            UNKNOWN_USED,
        ),
        (format!("token={first}&port=abc&port=8888"), 400, BAD_PORT),
        (format!("token={first}&port=80;port=8888"), 400, BAD_PORT),
    ] {
        assert_answer(&redeem(query.clone()), status, body, &query);
    }
    assert_eq!(site.snapshot(), before);

    // The first value wins, so junk after a good value does not matter.
    let answer = redeem(format!("token={first};token=junk&port=50001&port=abc"));
    assert_answer(&answer, 200, "Success!\n", "first values are good");
    let port: i64 = site
        .db()
        .query_row(
            "SELECT dstport FROM proxy WHERE alias = ?1",
            [&first],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(port, 50001);

    let second = site.new_token();
    let answer = site
        .cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={second}&jobid=11&jobid=22&token=junk"))
        .run();
    assert_answer(&answer, 200, "Success! Token linked to jobid.\n", "link");
    let jobid: String = site
        .db()
        .query_row("SELECT jobid FROM proxy WHERE alias = ?1", [&second], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(jobid, "11");
}

#[test]
fn ports_outside_1024_to_65535_are_refused_and_nothing_changes() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    for port in [
        "80",
        "1023",
        "65536",
        "123456",
        "abc",
        "8888%0A",
        "+8888",
        "%2B8888",
        "-8888",
        "8888+",
        "%208888",
        "8888%00",
        "8888.0",
        "0x22b8",
        "1e4",
        "0",
        "00000",
        "99999",
        "%FF%FE",
        "\u{0668}\u{0668}\u{0668}\u{0668}",
        "18446744073709551616",
    ] {
        let query = format!("token={pending}&port={port}");
        let answer = site
            .cgi("redeemtoken")
            .remote(COMPUTE_NODE)
            .query(query)
            .run();
        assert_answer(&answer, 400, BAD_PORT, &format!("port={port}"));
        assert_eq!(site.snapshot(), before, "port={port} changed the database");
    }
    // A raw newline (not %0A), as Perl's `$` would have let through.
    let answer = site
        .cgi("redeemtoken")
        .remote(COMPUTE_NODE)
        .query(format!("token={pending}&port=8888\n"))
        .run();
    assert_answer(&answer, 400, BAD_PORT, "raw newline");
    assert_eq!(site.snapshot(), before);

    // The bounds themselves are fine.
    for port in [1024, 65535] {
        let token = site.new_token();
        let answer = site
            .cgi("redeemtoken")
            .remote(COMPUTE_NODE)
            .query(format!("token={token}&port={port}"))
            .run();
        assert_answer(&answer, 200, "Success!\n", &format!("port={port}"));
    }
}

/// Query fragments for `token=` that name no token: regex characters, a
/// trailing backslash, 10 KB, bytes that are not UTF-8, NUL, SQL, and
/// near misses of `pending`, a live token.
fn junk_tokens(pending: &str) -> Vec<Vec<u8>> {
    let mut junk: Vec<Vec<u8>> = [
        ".*",
        "%2E%2A",
        "^.*$",
        "[a-z]+",
        "(a|b)*",
        "a-b-c|.*",
        "\\",
        "x\\",
        "%5C",
        "%FF%FE",
        "%00",
        "%",
        "%%",
        "%2",
        "*",
        "'+OR+1=1+--",
        "%27%29%3B+DROP+TABLE+proxy%3B+--",
        "a-b-c%00",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    junk.push(b"\xff\xfe".to_vec());
    junk.push(b"able-\xc3\x28-zoo".to_vec());
    junk.push("a".repeat(10 * 1024).into_bytes());
    junk.push("able-".repeat(2 * 1024).into_bytes());
    for near in [
        pending.to_uppercase(),
        format!("{pending}%00"),
        format!("%00{pending}"),
        format!("{pending}%0A"),
        format!("{pending}+"),
        format!("+{pending}"),
        format!("{pending}.*"),
        format!("{pending}\\"),
        format!("{pending}%FF"),
        format!("{pending}-"),
        pending.replace('-', "."),
        pending[..pending.len() - 1].to_owned(),
        format!("{pending}{}", "a".repeat(10 * 1024)),
    ] {
        junk.push(near.into_bytes());
    }
    junk
}

#[test]
fn junk_tokens_name_no_token_and_change_nothing() {
    // Hundreds of unknown answers to one address: the rate limit (tested
    // in cgi_flow) would refuse most of them.
    let (site, pending) = populated_site("unknown_token_limit = false");
    let before = site.snapshot();
    for token in junk_tokens(&pending) {
        let what = shown(&token);
        let cases: [(&str, &str, Vec<u8>, u16, &str); 3] = [
            (
                "redeemtoken",
                COMPUTE_NODE,
                query_with(&[b"token=", &token, b"&port=8888"]),
                404,
                UNKNOWN_USED,
            ),
            (
                "destroytoken",
                COMPUTE_NODE,
                query_with(&[b"token=", &token]),
                404,
                UNKNOWN_DESTROYED,
            ),
            (
                "linktoken",
                LOGIN_NODE,
                query_with(&[b"token=", &token, b"&jobid=1"]),
                404,
                UNKNOWN_DESTROYED,
            ),
        ];
        for (program, client, query, status, body) in cases {
            let answer = site.cgi(program).remote(client).query(query).run();
            assert_answer(&answer, status, body, &format!("{program} token={what}"));
            assert_eq!(site.snapshot(), before, "{program} token={what}");
        }
    }
    // The brief's raw query, to the letter.
    let answer = site
        .cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(b"token=x\\&jobid=1".to_vec())
        .run();
    assert_answer(&answer, 404, UNKNOWN_DESTROYED, "token=x\\&jobid=1");
    assert_eq!(site.snapshot(), before);
    assert_eq!(site.state_of(&pending).as_deref(), Some("pending"));
}

#[test]
fn tokenjobstate_answers_junk_tokens_with_an_empty_body() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    for token in junk_tokens(&pending) {
        // tokenjobstate keeps the first label and lowercases it (the page
        // sends `window.location.hostname`), so some near misses are the
        // token itself, and some have no first label: not junk here.
        let decoded = percent_decoded(&token);
        let label = decoded.split(|&b| b == b'.').next().unwrap_or_default();
        if label.is_empty() || label.eq_ignore_ascii_case(pending.as_bytes()) {
            continue;
        }
        let what = shown(&token);
        let answer = site
            .cgi("tokenjobstate")
            .header("Origin", b"https://\xff.example.org".to_vec())
            .query(query_with(&[b"token=", &token]))
            .run();
        assert_answer(&answer, 200, "", &format!("token={what}"));
        assert_eq!(answer.header("Access-Control-Allow-Origin"), None, "{what}");
    }
    assert_eq!(site.snapshot(), before);
    // The control: the same call with the token itself finds it.
    let answer = site
        .cgi("tokenjobstate")
        .query(format!("token={pending}"))
        .run();
    assert_answer(&answer, 200, "PE", "the pending token");
}

#[test]
fn junk_and_oversized_host_headers_get_the_default_page() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let good = format!("{pending}.{EXT}");
    let hosts: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b" ".to_vec(),
        b":".to_vec(),
        b".".to_vec(),
        b"..".to_vec(),
        b"[::1]:443".to_vec(),
        b"10.21.0.10".to_vec(),
        b"\xff\xfe".to_vec(),
        format!("\u{e9}.{EXT}").into_bytes(),
        [b"\xff\xfe.", EXT.as_bytes()].concat(),
        format!("{pending}\x01.{EXT}").into_bytes(),
        format!("{good}\r\nX-Evil: 1").into_bytes(),
        format!("{good}:https").into_bytes(),
        format!("{good}:-1").into_bytes(),
        format!("{pending}..{EXT}").into_bytes(),
        format!(".{EXT}").into_bytes(),
        format!("*.{EXT}").into_bytes(),
        format!("{pending}.*").into_bytes(),
        format!("{pending}%2E{EXT}").into_bytes(),
        format!("{pending}.{EXT}.evil.org").into_bytes(),
        format!("x.{pending}.{EXT}").into_bytes(),
        pending.clone().into_bytes(),
        // Longer than any DNS name, though it ends like a good one.
        format!("{good}:{}", "0".repeat(300)).into_bytes(),
        format!("{}.{EXT}", "a".repeat(10 * 1024)).into_bytes(),
        "h".repeat(100_000).into_bytes(),
    ];
    for host in hosts {
        let what = shown(&host);
        let answer = site.cgi("index").header("Host", host.clone()).run();
        assert_answer(&answer, 200, DEFAULT_PAGE, &format!("Host: {what}"));
        // Any other endpoint does not care about the Host.
        let answer = site
            .cgi("tokenjobstate")
            .header("Host", host.clone())
            .query(format!("token={pending}"))
            .run();
        assert_answer(&answer, 200, "PE", &format!("tokenjobstate Host: {what}"));
    }
    let answer = site.cgi("index").unset("HTTP_HOST").run();
    assert_answer(&answer, 200, DEFAULT_PAGE, "no Host");
    assert_eq!(site.snapshot(), before);

    // The control: the good host gets the waiting page.
    let answer = site.cgi("index").header("Host", good).run();
    assert_no_panic(&answer, "good host");
    assert_eq!(
        (answer.status, answer.header("Content-Type")),
        (200, Some("text/html"))
    );
}

#[test]
fn a_query_too_long_for_a_uri_is_refused_without_changing_anything() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    // Past http::Uri's 64 KB limit, plain or once %-escaped (raw bytes
    // triple). Apache's LimitRequestLine (8190) stops these first.
    let long_queries = [
        format!("token={pending}&port=8888&junk={}", "a".repeat(70_000)).into_bytes(),
        [
            format!("token={pending}&port=8888&junk=").as_bytes(),
            &[0xff; 30_000][..],
        ]
        .concat(),
    ];
    for query in long_queries {
        let answer = site
            .cgi("redeemtoken")
            .remote(COMPUTE_NODE)
            .query(query)
            .run();
        assert_answer(
            &answer,
            414,
            "Oops! Request URI too long\n",
            "a query over 64 KB",
        );
        assert_eq!(site.snapshot(), before);
    }
    // The control: 20 KB of junk beside a valid request is fine.
    let answer = site
        .cgi("redeemtoken")
        .remote(COMPUTE_NODE)
        .query(format!(
            "token={pending}&port=8888&junk={}",
            "a".repeat(20_000)
        ))
        .run();
    assert_answer(&answer, 200, "Success!\n", "20 KB of junk");
}

#[test]
fn a_non_utf8_environment_does_not_stop_a_valid_request() {
    let (site, pending) = populated_site("");
    let answer = site
        .cgi("redeemtoken")
        .remote(COMPUTE_NODE)
        .query(format!("token={pending}&port=8888"))
        .env("NON_UTF8", b"\xff\xfe".to_vec())
        .env("LANG", b"\xc3\x28".to_vec())
        .env("PATH_INFO", b"/\xff\xfe".to_vec())
        .env("SCRIPT_NAME", b"/redeemtoken.cgi\xff".to_vec())
        .env("CONTENT_TYPE", b"text/\xff".to_vec())
        .env("SERVER_NAME", b"\xff".to_vec())
        .header("Cookie", b"a=\xff\xfe".to_vec())
        .header("User-Agent", b"\x01\x02\xff".to_vec())
        .header("X-Junk", b"\xc0\xaf".to_vec())
        .run();
    assert_answer(&answer, 200, "Success!\n", "non-UTF-8 environment");
    // Redeemed: `mapped`, or already `proxied` where routes are published
    // at once.
    assert!(
        matches!(
            site.state_of(&pending).as_deref(),
            Some("mapped" | "proxied")
        ),
        "{:?}",
        site.state_of(&pending)
    );

    let before = site.snapshot();
    // Where a non-UTF-8 value matters, it is refused cleanly.
    let other = site.new_token();
    let before_other = site.snapshot();
    let junk_client = site
        .cgi("destroytoken")
        .env("REMOTE_ADDR", b"10.21.3.4\xff".to_vec())
        .query(format!("token={other}"))
        .run();
    assert_answer(&junk_client, 403, NOT_FROM_COMPUTE_NODE, "REMOTE_ADDR junk");
    let junk_query = site
        .cgi("destroytoken")
        .remote(COMPUTE_NODE)
        .query([format!("token={other}").as_bytes(), b"\xff"].concat())
        .run();
    assert_answer(&junk_query, 404, UNKNOWN_DESTROYED, "QUERY_STRING junk");
    assert_eq!(site.snapshot(), before_other);
    assert!(before_other.len() > before.len());

    let junk_override = site
        .cgi("destroytoken")
        .remote(COMPUTE_NODE)
        .env("SAT_CONFIG_DBFILE", b"/tmp/\xff.sqlite".to_vec())
        .query(format!("token={other}"))
        .run();
    assert_answer(
        &junk_override,
        500,
        NOT_CONFIGURED,
        "SAT_CONFIG_DBFILE junk",
    );
    assert!(
        junk_override
            .stderr
            .contains("SAT_CONFIG_DBFILE is not valid UTF-8"),
        "{}",
        junk_override.stderr
    );
    let junk_config = site
        .cgi("destroytoken")
        .remote(COMPUTE_NODE)
        .env("SATELLITE_CONFIG", b"/nonexistent/\xff.toml".to_vec())
        .query(format!("token={other}"))
        .run();
    assert_answer(&junk_config, 500, NOT_CONFIGURED, "SATELLITE_CONFIG junk");
    assert_eq!(site.snapshot(), before_other);
}

#[test]
fn an_unknown_server_protocol_is_answered_as_http_1_1() {
    let site = Site::new();
    for protocol in [
        &b"INCLUDED"[..],
        b"HTTP/9.9",
        b"",
        b"junk",
        b"HTTP/1.1\r\n",
        b"\xff\xfe",
    ] {
        let what = shown(protocol);
        let getlink = site
            .cgi("getlink")
            .remote(LOGIN_NODE)
            .env("SERVER_PROTOCOL", protocol)
            .run();
        assert_no_panic(&getlink, &what);
        assert_eq!(getlink.status, 200, "{what}: {getlink:?}");
        let token = getlink
            .text()
            .strip_prefix("Your token is \n")
            .and_then(|t| t.strip_suffix('\n'))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{what}: {getlink:?}"));

        let before = site.snapshot();
        let refused = site
            .cgi("redeemtoken")
            .remote(COMPUTE_NODE)
            .env("SERVER_PROTOCOL", protocol)
            .query(format!("token={token}&port=80"))
            .run();
        assert_answer(&refused, 400, BAD_PORT, &what);
        assert_eq!(site.snapshot(), before, "{what}");

        let state = site
            .cgi("tokenjobstate")
            .env("SERVER_PROTOCOL", protocol)
            .query(format!("token={token}"))
            .run();
        assert_answer(&state, 200, "PE", &what);
    }
    let answer = site
        .cgi("tokenjobstate")
        .unset("SERVER_PROTOCOL")
        .query("token=no-such-token")
        .run();
    assert_answer(&answer, 200, "", "no SERVER_PROTOCOL");
}

#[test]
fn a_body_over_max_body_bytes_is_refused_with_413_before_it_is_read() {
    // The default cap is 1 MiB.
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let table = |len: usize| {
        let mut body = b"jobstates=\n9999 RUNNING\n".to_vec();
        body.resize(len, b'\n');
        body
    };
    let too_large = site
        .cgi("update-jobs")
        .remote(SLURM_CONTROLLER)
        .post(table((1 << 20) + 1))
        .run();
    assert_answer(
        &too_large,
        413,
        "Oops! Request body too large (at most 1048576 bytes)\n",
        "1 MiB + 1",
    );
    assert_eq!(site.snapshot(), before);
    // A GET endpoint is capped the same way, and does nothing.
    let redeem = site
        .cgi("redeemtoken")
        .remote(COMPUTE_NODE)
        .query(format!("token={pending}&port=8888"))
        .stdin(vec![b'x'; 10])
        .env("CONTENT_LENGTH", "2000000")
        .run();
    assert_answer(
        &redeem,
        413,
        "Oops! Request body too large (at most 1048576 bytes)\n",
        "redeem with a body",
    );
    assert_eq!(site.snapshot(), before);
    let exactly = site
        .cgi("update-jobs")
        .remote(SLURM_CONTROLLER)
        .post(table(1 << 20))
        .run();
    assert_answer(&exactly, 200, "Successfully updated jobs! \n", "1 MiB");
    assert!(site.snapshot().iter().any(|r| r.contains("\"9999\"")));

    // A site's own cap, and Content-Length that lies or is junk.
    let (site, _) = populated_site("max_body_bytes = 64");
    let before = site.snapshot();
    let push = |body: Vec<u8>, length: Option<&str>| {
        let mut call = site.cgi("update-jobs").remote(SLURM_CONTROLLER).post(body);
        if let Some(length) = length {
            call = call.env("CONTENT_LENGTH", length);
        }
        call.run()
    };
    let too_large_64 = "Oops! Request body too large (at most 64 bytes)\n";
    for (body, length, status, answer_body) in [
        (table(65), None, 413, too_large_64),
        (table(10_000), None, 413, too_large_64),
        (Vec::new(), Some("100000000000"), 413, too_large_64),
        (table(40), Some("65"), 413, too_large_64),
        (table(40), Some("abc"), 400, MALFORMED),
        (table(40), Some("-1"), 400, MALFORMED),
        (table(40), Some("4e1"), 400, MALFORMED),
        (table(40), Some("0x28"), 400, MALFORMED),
        (table(40), Some("\u{0664}\u{0660}"), 400, MALFORMED),
        (table(40), Some("99999999999999999999999"), 400, MALFORMED),
        // Announced more than was sent.
        (table(10), Some("50"), 400, MALFORMED),
    ] {
        let what = format!("{} bytes, Content-Length {length:?}", body.len());
        let answer = push(body, length);
        assert_answer(&answer, status, answer_body, &what);
        assert_eq!(site.snapshot(), before, "{what}");
    }
    let answer = push(table(64), None);
    assert_answer(&answer, 200, "Successfully updated jobs! \n", "64 bytes");
    assert_ne!(site.snapshot(), before);
}

#[test]
fn clients_outside_the_masks_are_refused_and_nothing_changes() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let outside: Vec<Option<&[u8]>> = vec![
        None,
        Some(b""),
        Some(OUTSIDER.as_bytes()),
        Some(b"10.22.0.1"),
        Some(b"10.20.255.255"),
        Some(b"198.202.100.16"),
        Some(b"2001:db8:22::1"),
        Some(b"2001:db8::1"),
        Some(b"::ffff:192.0.2.1"),
        Some(b"::ffff:10.22.0.1"),
        // IPv4-compatible (deprecated) is not mapped: not 10.21.3.4.
        Some(b"::10.21.3.4"),
        Some(b"::1"),
        Some(b"127.0.0.1"),
        Some(b"0.0.0.0"),
        Some(b"::"),
        Some(b"junk"),
        Some(b"10.21.3"),
        Some(b"10.21.3.4.5"),
        Some(b"010.021.003.004"),
        Some(b"10.21.3.4, 192.0.2.1"),
        Some(b"[10.21.3.4]"),
        Some(b"10.21.3.4:443"),
        Some(b"2001:db8:21::1%eth0"),
        Some(b"\xff\xfe"),
    ];
    let cases: [(&str, String, &str); 5] = [
        (
            "redeemtoken",
            format!("token={pending}&port=8888"),
            NOT_FROM_COMPUTE_NODE,
        ),
        (
            "destroytoken",
            format!("token={pending}"),
            NOT_FROM_COMPUTE_NODE,
        ),
        (
            "linktoken",
            format!("token={pending}&jobid=77"),
            NOT_FROM_CLUSTER,
        ),
        ("getlink", String::new(), NOT_FROM_CLUSTER),
        ("update-jobs", String::new(), NOT_FROM_CONTROLLER),
    ];
    for client in &outside {
        let who = client.map_or("no REMOTE_ADDR".to_owned(), shown);
        for (program, query, body) in &cases {
            let mut call = site.cgi(program).query(query.clone());
            call = match client {
                Some(addr) => call.env("REMOTE_ADDR", *addr),
                None => call.unset("REMOTE_ADDR"),
            };
            if *program == "update-jobs" {
                call = call.post("jobstates=\n4242 FAILED\n77 RUNNING\n");
            }
            let answer = call.run();
            assert_answer(&answer, 403, body, &format!("{program} from {who}"));
            assert_eq!(site.snapshot(), before, "{program} from {who}");
        }
    }
    // The compute nodes are no Slurm controllers, and the other way round.
    let answer = site
        .cgi("update-jobs")
        .remote(COMPUTE_NODE)
        .post("jobstates=\n4242 FAILED\n")
        .run();
    assert_answer(&answer, 403, NOT_FROM_CONTROLLER, "update-jobs from a node");
    let answer = site.cgi("getlink").remote(SLURM_CONTROLLER).run();
    assert_answer(
        &answer,
        403,
        NOT_FROM_CLUSTER,
        "getlink from the controller",
    );
    assert_eq!(site.snapshot(), before);
}

#[test]
fn ipv6_and_mapped_ipv4_clients_inside_the_masks_are_served() {
    let site = Site::new();
    let dsthost = |token: &str| -> String {
        site.db()
            .query_row("SELECT dsthost FROM proxy WHERE alias = ?1", [token], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let v6 = site.new_token();
    let answer = site
        .cgi("redeemtoken")
        .remote("2001:db8:21::5")
        .query(format!("token={v6}&port=8888"))
        .run();
    assert_answer(&answer, 200, "Success!\n", "redeem from IPv6");
    assert_eq!(dsthost(&v6), "2001:db8:21::5");
    let before = site.snapshot();
    let answer = site
        .cgi("destroytoken")
        .remote("2001:db8:21::6")
        .query(format!("token={v6}"))
        .run();
    assert_answer(
        &answer,
        403,
        "Oops! Nonce must be destroyed from host it was redeemed on\n",
        "destroy from another IPv6 host",
    );
    assert_eq!(site.snapshot(), before);
    // The same address written differently is the same host.
    let answer = site
        .cgi("destroytoken")
        .remote("2001:DB8:21:0:0:0:0:5")
        .query(format!("token={v6}"))
        .run();
    assert_answer(
        &answer,
        200,
        "Success! Token destroyed.\n",
        "destroy from IPv6",
    );

    let mapped = site.new_token();
    let answer = site
        .cgi("redeemtoken")
        .remote(&format!("::ffff:{COMPUTE_NODE}"))
        .query(format!("token={mapped}&port=8888"))
        .run();
    assert_answer(&answer, 200, "Success!\n", "redeem from mapped IPv4");
    assert_eq!(dsthost(&mapped), COMPUTE_NODE);
    let answer = site
        .cgi("destroytoken")
        .remote(COMPUTE_NODE)
        .query(format!("token={mapped}"))
        .run();
    assert_answer(
        &answer,
        200,
        "Success! Token destroyed.\n",
        "destroy from IPv4",
    );

    let answer = site
        .cgi("getlink")
        .remote(&format!("::ffff:{LOGIN_NODE}"))
        .run();
    assert_no_panic(&answer, "getlink from mapped IPv4");
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = site
        .cgi("update-jobs")
        .remote(&format!("::ffff:{SLURM_CONTROLLER}"))
        .post("jobstates=\n4242 RUNNING\n")
        .run();
    assert_answer(
        &answer,
        200,
        "Successfully updated jobs! \n",
        "mapped controller",
    );
    // REMOTE_ADDR with stray blanks is still the address.
    let padded = site.new_token();
    let answer = site
        .cgi("linktoken")
        .remote(&format!(" {LOGIN_NODE} "))
        .query(format!("token={padded}&jobid=5"))
        .run();
    assert_answer(
        &answer,
        200,
        "Success! Token linked to jobid.\n",
        "padded address",
    );
}

/// One valid request per program, for the database failure tests.
fn valid_requests(site: &Site, token: &str) -> Vec<(&'static str, Call)> {
    vec![
        ("getlink", site.cgi("getlink").remote(LOGIN_NODE)),
        (
            "redeemtoken",
            site.cgi("redeemtoken")
                .remote(COMPUTE_NODE)
                .query(format!("token={token}&port=8888")),
        ),
        (
            "destroytoken",
            site.cgi("destroytoken")
                .remote(LOGIN_NODE)
                .query(format!("token={token}")),
        ),
        (
            "linktoken",
            site.cgi("linktoken")
                .remote(LOGIN_NODE)
                .query(format!("token={token}&jobid=99")),
        ),
        (
            "update-jobs",
            site.cgi("update-jobs")
                .remote(SLURM_CONTROLLER)
                .post("jobstates=\n99 RUNNING\n"),
        ),
        (
            "tokenjobstate",
            site.cgi("tokenjobstate").query(format!("token={token}")),
        ),
    ]
}

fn dir_listing(site: &Site, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(site.path(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_missing_database_is_a_500_and_is_not_created() {
    let site = Site::without_database("");
    let var_before = dir_listing(&site, "var");
    // index never opens the database: every token's host gets the same page.
    let page = site
        .cgi("index")
        .header("Host", format!("able-acorn-zoo.{EXT}"))
        .run();
    assert_eq!(page.status, 200, "{}", page.stderr);
    assert!(page.text().contains("tokenjobstate.cgi"));
    assert_eq!(dir_listing(&site, "var"), var_before);
    for (program, call) in valid_requests(&site, "able-acorn-zoo") {
        let answer = call.run();
        assert_answer(&answer, 500, INTERNAL, program);
        assert!(
            answer.stderr.contains("does not exist"),
            "{program}: {}",
            answer.stderr
        );
        assert!(!site.db.exists(), "{program} created the database");
        assert_eq!(dir_listing(&site, "var"), var_before, "{program}");
    }
}

#[test]
fn a_database_without_tables_is_a_500_and_is_left_empty() {
    let site = Site::without_database("");
    std::fs::write(&site.db, b"").unwrap();
    let var_before = dir_listing(&site, "var");
    for (program, call) in valid_requests(&site, "able-acorn-zoo") {
        let answer = call.run();
        assert_answer(&answer, 500, INTERNAL, program);
        assert!(
            answer.stderr.contains("has no satellite tables"),
            "{program}: {}",
            answer.stderr
        );
        assert_eq!(std::fs::metadata(&site.db).unwrap().len(), 0, "{program}");
        assert_eq!(dir_listing(&site, "var"), var_before, "{program}");
    }
}

#[test]
fn a_database_locked_past_the_busy_timeout_is_a_503_with_retry_after() {
    let (site, pending) = populated_site("busy_timeout_ms = 200");
    let before = site.snapshot();
    let writer = site.db();
    writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    for (program, call) in valid_requests(&site, &pending) {
        let started = std::time::Instant::now();
        let answer = call.run();
        if matches!(program, "tokenjobstate" | "index") {
            // Readers are not blocked by a writer (WAL).
            assert_no_panic(&answer, program);
            assert_eq!(answer.status, 200, "{program}: {answer:?}");
            continue;
        }
        assert_answer(&answer, 503, BUSY, program);
        assert_eq!(answer.header("Retry-After"), Some("2"), "{program}");
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(200)
                // Generous: the wait includes starting a debug build on a
                // loaded machine; what matters is that it ends.
                && waited < std::time::Duration::from_secs(30),
            "{program} waited {waited:?}, not about busy_timeout_ms"
        );
    }
    writer.execute_batch("ROLLBACK").unwrap();
    drop(writer);
    assert_eq!(site.snapshot(), before);
    // Once the writer is gone the same request goes through.
    let answer = site
        .cgi("redeemtoken")
        .remote(COMPUTE_NODE)
        .query(format!("token={pending}&port=8888"))
        .run();
    assert_answer(&answer, 200, "Success!\n", "after the lock");
}

/// Runs `program_name` as a CGI program of `site` with `read_only` (the
/// database file, or its directory) mounted read-only in a private mount
/// namespace. Root ignores file modes, so `chmod 0444` alone would not make
/// the database read-only for a test running as root; a read-only mount
/// does. Returns None where mount namespaces are not available.
fn run_with_read_only(
    site: &Site,
    read_only: &Path,
    program_name: &str,
    env: &[(&str, &str)],
) -> Option<Answer> {
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind -o ro \"$1\" \"$1\" || exit 99; shift; exec \"$@\"")
        .arg("sh")
        .arg(read_only)
        .arg(program(program_name))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("SATELLITE_CONFIG", &site.config)
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", "GET")
        .env("SCRIPT_NAME", format!("/{program_name}.cgi"))
        .env("HTTP_HOST", format!("manage.{EXT}"))
        .envs(env.iter().copied())
        .output()
        .ok()?;
    if output.status.code() == Some(99) || output.stdout.is_empty() {
        eprintln!(
            "read-only mount unavailable: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    Some(Answer::from_output(output))
}

/// As `run_with_read_only`, by file modes when not root (they bind then).
fn run_read_only(
    site: &Site,
    read_only: &Path,
    program_name: &str,
    env: &[(&str, &str)],
) -> Option<Answer> {
    use std::os::unix::fs::PermissionsExt;
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if is_root {
        return run_with_read_only(site, read_only, program_name, env);
    }
    let set_mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let old_mode = std::fs::metadata(read_only).unwrap().mode();
    set_mode(read_only, if read_only.is_dir() { 0o555 } else { 0o444 });
    let mut call = site.cgi(program_name);
    for (name, value) in env {
        call = call.env(name, *value);
    }
    let answer = call.run();
    set_mode(read_only, old_mode);
    Some(answer)
}

#[test]
fn a_read_only_database_is_a_500_and_is_left_as_it_was() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let db_bytes = std::fs::read(&site.db).unwrap();
    let redeem = format!("token={pending}&port=8888");
    let destroy = format!("token={pending}");
    let link = format!("token={pending}&jobid=99");
    let writes: [(&str, Vec<(&str, &str)>); 4] = [
        ("getlink", vec![("REMOTE_ADDR", LOGIN_NODE)]),
        (
            "redeemtoken",
            vec![("REMOTE_ADDR", COMPUTE_NODE), ("QUERY_STRING", &redeem)],
        ),
        (
            "destroytoken",
            vec![("REMOTE_ADDR", LOGIN_NODE), ("QUERY_STRING", &destroy)],
        ),
        (
            "linktoken",
            vec![("REMOTE_ADDR", LOGIN_NODE), ("QUERY_STRING", &link)],
        ),
    ];
    // The file alone (SQLite opens it read-only and refuses to write), and
    // its directory too (SQLite cannot even create the WAL index).
    for (read_only, log) in [
        (site.db.clone(), "database is read-only"),
        (site.path("var"), "unable to open database file"),
    ] {
        for (program, env) in &writes {
            let Some(answer) = run_read_only(&site, &read_only, program, env) else {
                eprintln!("skipped: as root, a read-only database needs a mount namespace");
                return;
            };
            let what = format!("{program} with {} read-only", read_only.display());
            assert_answer(&answer, 500, INTERNAL, &what);
            assert!(answer.stderr.contains(log), "{what}: {}", answer.stderr);
            assert_eq!(site.snapshot(), before, "{what}");
        }
    }
    assert_eq!(std::fs::read(&site.db).unwrap(), db_bytes);
}

#[test]
fn a_missing_or_invalid_configuration_is_a_500_with_a_clear_log_line() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let good_config = std::fs::read_to_string(&site.config).unwrap();
    let nowhere = site.path("etc/nowhere.toml");

    // SATELLITE_CONFIG pointing nowhere, or at a directory: every program.
    for config in [nowhere.clone(), site.path("etc")] {
        for (program, call) in valid_requests(&site, &pending) {
            let answer = call
                .env("SATELLITE_CONFIG", config.as_os_str().as_bytes())
                .run();
            let what = format!("{program} with {}", config.display());
            assert_answer(&answer, 500, NOT_CONFIGURED, &what);
            assert!(
                answer.stderr.contains(&format!(
                    "satellite {program}: configuration file {}",
                    config.display()
                )),
                "{what}: {}",
                answer.stderr
            );
        }
    }
    assert_eq!(site.snapshot(), before);

    let bad_configs: [(String, &str); 5] = [
        (
            good_config.replace("\"10.21.0.0/16\"", "\"10.1.1.1/24\""),
            "`10.1.1.1/24` has host bits set",
        ),
        (format!("{good_config}ttl = 5\n"), "unknown field `ttl`"),
        (
            format!("{good_config}busy_timeout_ms = -1\n"),
            "busy_timeout_ms",
        ),
        (format!("{good_config}[[[\n"), "configuration file"),
        (
            good_config.replace(EXT, "evil.org\\nInclude /etc/shadow"),
            "extbasename",
        ),
    ];
    for (text, message) in bad_configs {
        std::fs::write(&site.config, &text).unwrap();
        for (program, call) in valid_requests(&site, &pending) {
            let answer = call.run();
            assert_answer(
                &answer,
                500,
                NOT_CONFIGURED,
                &format!("{program}: {message}"),
            );
            assert!(
                answer.stderr.contains(&format!("satellite {program}: "))
                    && answer.stderr.contains(message),
                "{program}: {message}: {}",
                answer.stderr
            );
        }
    }
    std::fs::write(&site.config, b"extbasename = \"\xff\"\n").unwrap();
    let answer = site.cgi("getlink").remote(LOGIN_NODE).run();
    assert_answer(&answer, 500, NOT_CONFIGURED, "non-UTF-8 config");
    assert_eq!(site.snapshot(), before);

    // The control: the good file works again.
    std::fs::write(&site.config, good_config).unwrap();
    let answer = site
        .cgi("tokenjobstate")
        .query(format!("token={pending}"))
        .run();
    assert_answer(&answer, 200, "PE", "good config");
}

#[test]
fn no_program_panics_on_junk_requests_and_none_changes_the_database() {
    let (site, pending) = populated_site("");
    let before = site.snapshot();
    let queries: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"%".to_vec(),
        b"%%%%".to_vec(),
        b"=".to_vec(),
        b"==&==;;&&".to_vec(),
        b"token".to_vec(),
        b"token=%FF%FE&port=%FF&jobid=%FF".to_vec(),
        b"token=\xff\xfe&port=\xff&jobid=\xff&jobstates=\xff".to_vec(),
        b"token=%00&port=%00&jobid=%00".to_vec(),
        format!("port=80&jobid=&token=&token={pending}").into_bytes(),
        format!("token={pending}.*&port=8888&jobid=1").into_bytes(),
        b"token=x\\&jobid=1&port=65536".to_vec(),
        format!("{}=1", "k".repeat(10 * 1024)).into_bytes(),
        format!("token={}", "%".repeat(10 * 1024)).into_bytes(),
    ];
    let programs = ENDPOINT_PROGRAMS;
    for program in programs {
        for client in [OUTSIDER, COMPUTE_NODE] {
            // getlink from inside the cluster is valid whatever it is sent.
            if program == "getlink" && client == COMPUTE_NODE {
                continue;
            }
            for method in ["GET", "POST", "HEAD", "OPTIONS", "get"] {
                for query in &queries {
                    let mut call = site
                        .cgi(program)
                        .remote(client)
                        .query(query.clone())
                        .header("Host", query.clone());
                    if method == "POST" {
                        call = call.post(query.clone());
                    }
                    let answer = call.method(method).run();
                    let what = format!("{method} {program}?{} from {client}", shown(query));
                    assert_no_panic(&answer, &what);
                    assert!(
                        [200, 204, 400, 403, 404, 405].contains(&answer.status),
                        "{what}: {answer:?}"
                    );
                    if answer.status != 200 && answer.status != 204 && method != "HEAD" {
                        assert!(answer.text().starts_with("Oops! "), "{what}: {answer:?}");
                    }
                    assert_eq!(site.snapshot(), before, "{what}");
                }
            }
        }
    }
}

#[test]
fn a_cgi_program_run_by_hand_says_what_it_is_before_looking_for_a_configuration() {
    for name in ["getlink", "index"] {
        // No configuration anywhere: the hint must not depend on one.
        let out = Command::new(program(name))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{name}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "{name}: this is a CGI program: install it as {name}.cgi and let the web server \
                 run it (GATEWAY_INTERFACE is not set)\n"
            )
        );
    }
}

#[test]
fn a_web_server_that_sets_no_request_method_gets_malformed_request() {
    let site = Site::new();
    let answer = site.cgi("getlink").unset("REQUEST_METHOD").run();
    assert_answer(&answer, 400, MALFORMED, "no REQUEST_METHOD");
    assert!(
        answer.stderr.contains("REQUEST_METHOD is not set"),
        "{}",
        answer.stderr
    );
}
