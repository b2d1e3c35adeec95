//! Metrics: `satellite metrics` and serve's `GET /metrics` print what
//! Prometheus accepts (`promtool check metrics`), with the store's numbers
//! and serve's own counts of real requests; serve answers them only to
//! clients in `metrics_allow`, also when the request comes through Apache.
//! And `--json` on `check`, `stats` and `show`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::apache;
use support::*;

/// A `satellite serve` child, killed when dropped.
struct Serve {
    child: Child,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts serve with `args` and waits for its "listening on" line; returns
/// what follows it (`http://127.0.0.1:PORT/` or `unix:PATH`).
fn start_serve(site: &Site, args: &[&str]) -> (Serve, String) {
    start_serve_with(&site.config, args)
}

fn start_serve_with(config: &Path, args: &[&str]) -> (Serve, String) {
    let mut child = Command::new(program("satellite"))
        .arg("serve")
        .args(args)
        .env("SATELLITE_CONFIG", config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let serve = Serve { child };
    let mut said = String::new();
    loop {
        let mut line = String::new();
        assert_ne!(
            stderr.read_line(&mut line).unwrap(),
            0,
            "serve did not start: {said}"
        );
        if let Some(rest) = line.strip_prefix("satellite serve: listening on ") {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return (serve, rest.trim_end().to_owned());
        }
        said.push_str(&line);
    }
}

/// One HTTP/1.1 request; returns the status and the body.
fn request(mut stream: impl Read + Write, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: manage.{EXT}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

fn tcp(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // A hang is a failure, not a stuck test run.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
}

fn port_of(listening: &str) -> u16 {
    listening
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// `promtool check metrics` on `text`; panics with its complaints.
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool refused:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn satellite(site: &Site, args: &[&str]) -> String {
    let out = Command::new(program("satellite"))
        .args(args)
        .arg("--config")
        .arg(&site.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A row as written by the code that ends sessions: `ended` rows carry
/// their cause and its kind (`end_kind`).
fn insert(site: &Site, alias: &str, state: &str, jobid: Option<&str>, cause: Option<(&str, &str)>) {
    let (kind, text) = cause.unzip();
    site.db()
        .execute(
            "INSERT INTO proxy (alias, alias_compare_hash, state, jobid, end_cause, end_kind) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![alias, legacy_hash(alias), state, jobid, text, kind],
        )
        .unwrap();
}

/// The lines of `text` that start with `prefix`.
fn lines_of<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn satellite_metrics_prints_the_stores_gauges_in_a_format_promtool_accepts() {
    let site = Site::new();
    let routed = site.redeemed_token(COMPUTE_NODE, 8888);
    site.new_token();
    insert(&site, "able-acorn-zoo", "pending", Some("41"), None);
    insert(
        &site,
        "brisk-cod-elm",
        "ended",
        Some("42"),
        Some(("job_end", "job 42 ended (COMPLETED)")),
    );
    insert(
        &site,
        "calm-dew-fig",
        "ended",
        Some("43"),
        Some(("job_end", "job 43 is no longer known to the scheduler")),
    );
    insert(
        &site,
        "dark-eel-gum",
        "ended",
        Some("44"),
        Some((
            "binding_mismatch",
            "redeemed from 10.21.5.6, which is not a node of job 44 (c1)",
        )),
    );
    // A hand-edited state, with the characters a label value must escape.
    insert(&site, "eager-fox-hat", "od\"d\\", None, None);
    // The push is 100 s old now, and older by the time metrics reads it.
    let pushed = std::time::Instant::now();
    site.db()
        .execute(
            "INSERT INTO jobstates VALUES ('41', 'RUNNING', strftime('%s','now') - 100)",
            [],
        )
        .unwrap();

    let text = satellite(&site, &["metrics"]);
    // Whole seconds on both sides: up to one more than the time passed.
    let most = 100 + pushed.elapsed().as_secs() as i64 + 1;

    promtool_accepts(&text);
    assert_eq!(
        lines_of(&text, "satellite_tokens{"),
        [
            "satellite_tokens{state=\"pending\"} 2",
            "satellite_tokens{state=\"mapped\"} 0",
            "satellite_tokens{state=\"proxied\"} 1",
            "satellite_tokens{state=\"ended\"} 3",
            "satellite_tokens{state=\"od\\\"d\\\\\"} 1",
        ],
        "{text}"
    );
    assert_eq!(
        lines_of(&text, "satellite_routes_live "),
        ["satellite_routes_live 1"]
    );
    // The redeemed token, the fresh one and the odd row were never linked.
    assert_eq!(
        lines_of(&text, "satellite_tokens_unbound "),
        ["satellite_tokens_unbound 3"]
    );
    assert_eq!(
        lines_of(&text, "satellite_sessions_ended{"),
        [
            "satellite_sessions_ended{cause=\"destroy\"} 0",
            "satellite_sessions_ended{cause=\"revoke\"} 0",
            "satellite_sessions_ended{cause=\"ttl\"} 0",
            "satellite_sessions_ended{cause=\"job_end\"} 2",
            "satellite_sessions_ended{cause=\"binding_mismatch\"} 1",
        ]
    );
    let age = lines_of(&text, "satellite_jobstate_push_age_seconds ");
    let age: i64 = age[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        (100..=most).contains(&age),
        "age {age}, not in 100..={most}: {text}"
    );
    // No counters: a CGI site has no process to keep them.
    assert!(!text.contains("satellite_requests_total"), "{text}");
    assert_eq!(site.state_of(&routed).as_deref(), Some("proxied"));
}

/// Each way a session ends, taken through the real programs (the CGI
/// destroy, `satellite revoke`, cron at the TTL, a job end pushed to
/// update-jobs), is counted once under its cause, and the counter is in
/// the database, so a CGI site reports it too.
#[test]
fn session_ends_are_counted_by_cause_through_the_real_programs() {
    let site = Site::new();
    let destroyed = site.redeemed_token(COMPUTE_NODE, 8888);
    let answer = site
        .cgi("destroytoken")
        .remote(COMPUTE_NODE)
        .query(format!("token={destroyed}"))
        .run();
    assert_eq!(
        answer.status_and_text(),
        (200, "Success! Token destroyed.\n".into())
    );

    let revoked = site.redeemed_token(COMPUTE_NODE, 8889);
    satellite(&site, &["revoke", &revoked]);

    let outlived = site.new_token();
    site.db()
        .execute(
            "UPDATE proxy SET modified = datetime('now', '-3 days') WHERE alias = ?1",
            [&outlived],
        )
        .unwrap();
    let cron = Command::new(program("cron"))
        .env("SATELLITE_CONFIG", &site.config)
        .output()
        .unwrap();
    assert!(
        cron.status.success(),
        "{}",
        String::from_utf8_lossy(&cron.stderr)
    );

    let job_over = site.new_token();
    let linked = site
        .cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={job_over}&jobid=5151"))
        .run();
    assert_eq!(linked.status, 200, "{}", linked.stderr);
    let pushed = site
        .cgi("update-jobs")
        .remote(SLURM_CONTROLLER)
        .post("jobstates=5151 CANCELLED\n")
        .run();
    assert_eq!(pushed.status, 200, "{}", pushed.stderr);
    assert_eq!(site.state_of(&job_over).as_deref(), Some("ended"));

    let text = satellite(&site, &["metrics"]);
    promtool_accepts(&text);
    assert!(text.contains("# TYPE satellite_session_ends_total counter\n"));
    assert_eq!(
        lines_of(&text, "satellite_session_ends_total{"),
        [
            "satellite_session_ends_total{cause=\"destroy\"} 1",
            "satellite_session_ends_total{cause=\"revoke\"} 1",
            "satellite_session_ends_total{cause=\"ttl\"} 1",
            "satellite_session_ends_total{cause=\"job_end\"} 1",
            "satellite_session_ends_total{cause=\"binding_mismatch\"} 0",
        ],
        "{text}"
    );
}

#[test]
fn satellite_metrics_without_any_job_state_omits_the_age_sample() {
    let site = Site::new();
    let text = satellite(&site, &["metrics"]);
    promtool_accepts(&text);
    assert!(text.contains("# TYPE satellite_jobstate_push_age_seconds gauge\n"));
    assert!(lines_of(&text, "satellite_jobstate_push_age_seconds ").is_empty());
    assert!(
        text.contains("\nsatellite_tokens{state=\"pending\"} 0\n"),
        "{text}"
    );
}

#[test]
fn serve_counts_real_requests_by_endpoint_and_result_and_promtool_accepts_its_metrics() {
    // Over TCP without trusted proxies the peer is the client: loopback
    // plays both the compute node and the Prometheus server.
    let site =
        Site::with_config("tgtipmask = [\"127.0.0.0/8\"]\nmetrics_allow = [\"127.0.0.1/32\"]");
    let (_serve, listening) = start_serve(&site, &["--listen", "127.0.0.1:0"]);
    let port = port_of(&listening);

    let (status, body) = request(tcp(port), "/getlink.cgi", &[]);
    assert_eq!(status, 200, "{body}");
    let token = body.trim_start_matches("Your token is \n").trim_end();
    let asks = [
        (format!("/redeemtoken.cgi?token={token}&port=80"), 400),
        (
            "/redeemtoken.cgi?token=no-such-token&port=8888".to_owned(),
            404,
        ),
        (format!("/redeemtoken.cgi?token={token}&port=8888"), 200),
        (format!("/redeemtoken.cgi?token={token}&port=8888"), 409),
        (format!("/destroytoken.cgi?token={token}"), 200),
    ];
    for (target, want) in &asks {
        assert_eq!(request(tcp(port), target, &[]).0, *want, "{target}");
    }

    let (status, text) = request(tcp(port), "/metrics", &[]);

    assert_eq!(status, 200, "{text}");
    promtool_accepts(&text);
    let counted: Vec<&str> = lines_of(&text, "satellite_requests_total{")
        .into_iter()
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert_eq!(
        counted,
        [
            "satellite_requests_total{endpoint=\"getlink\",result=\"ok\"} 1",
            "satellite_requests_total{endpoint=\"redeemtoken\",result=\"ok\"} 1",
            "satellite_requests_total{endpoint=\"redeemtoken\",result=\"bad_input\"} 1",
            "satellite_requests_total{endpoint=\"redeemtoken\",result=\"unknown\"} 1",
            "satellite_requests_total{endpoint=\"redeemtoken\",result=\"conflict\"} 1",
            "satellite_requests_total{endpoint=\"destroytoken\",result=\"ok\"} 1",
        ],
        "{text}"
    );
    assert_eq!(
        lines_of(&text, "satellite_redeem_duration_seconds_count"),
        ["satellite_redeem_duration_seconds_count 4"]
    );
    assert_eq!(
        lines_of(
            &text,
            "satellite_redeem_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        ["satellite_redeem_duration_seconds_bucket{le=\"+Inf\"} 4"]
    );
    // The store's gauges come with serve's counters: the destroyed token
    // is gone, and with it its route.
    assert_eq!(
        lines_of(&text, "satellite_routes_live "),
        ["satellite_routes_live 0"]
    );
    assert!(
        text.contains("\nsatellite_tokens{state=\"pending\"} 0\n"),
        "{text}"
    );
}

#[test]
fn serve_refuses_metrics_with_404_to_clients_outside_metrics_allow_also_through_apache() {
    let site = Site::with_config("metrics_allow = [\"10.9.9.9/32\"]");
    let socket = site.path("var/serve.sock");
    let (_serve, listening) = start_serve(&site, &["--socket", socket.to_str().unwrap()]);
    assert_eq!(listening, format!("unix:{}", socket.display()));
    let unix = || {
        let stream = UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream
    };
    let addr = "X-Satellite-Client-Addr";

    // A browser through Apache: Apache names its address, which is not
    // allowed; the socket being Apache's says nothing about the client.
    assert_eq!(
        request(unix(), "/metrics", &[(addr, OUTSIDER)]),
        (404, "Oops! Not found\n".to_owned())
    );
    // No address at all is nobody's.
    assert_eq!(
        request(unix(), "/metrics", &[]),
        (404, "Oops! Not found\n".to_owned())
    );
    let (status, text) = request(unix(), "/metrics", &[(addr, "10.9.9.9")]);
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("# HELP satellite_tokens "), "{text}");
}

#[test]
fn serve_answers_metrics_to_nobody_by_default_with_a_real_404_even_under_legacy_statuses() {
    let site = Site::with_config("tgtipmask = [\"127.0.0.0/8\"]\nlegacy_status_200 = true");
    let (_serve, listening) = start_serve(&site, &["--listen", "127.0.0.1:0"]);
    let port = port_of(&listening);
    let (status, body) = request(tcp(port), "/metrics", &[]);
    assert_eq!((status, body.as_str()), (404, "Oops! Not found\n"));
    // The endpoints keep the original's 200 for their refusals.
    let (status, body) = request(tcp(port), "/redeemtoken.cgi?token=no-such-token", &[]);
    assert_eq!(
        (status, body.as_str()),
        (200, "Oops! Missing 'port' parameter\n")
    );
}

#[test]
fn stats_json_has_stable_field_names() {
    let site = Site::new();
    site.redeemed_token(COMPUTE_NODE, 8888);
    site.new_token();
    site.db()
        .execute("INSERT INTO jobstates VALUES ('41', 'RUNNING', 0)", [])
        .unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&satellite(&site, &["stats", "--json"])).unwrap();

    assert_eq!(
        json["tokens_by_state"],
        serde_json::json!({"pending": 1, "proxied": 1})
    );
    assert_eq!(
        json["sessions_per_host"],
        serde_json::json!({ COMPUTE_NODE: 1 })
    );
    assert_eq!(json["jobstates"], 1);
    assert!(
        json["oldest_modified"].as_str().unwrap().len() == 19,
        "{json}"
    );
}

#[test]
fn show_json_names_every_field_of_the_token() {
    let site = Site::new();
    let token = site.redeemed_token(COMPUTE_NODE, 8888);
    site.db()
        .execute(
            "UPDATE proxy SET jobid = '77', modified = '2001-02-03 04:05:06'",
            [],
        )
        .unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&satellite(&site, &["show", &token, "--json"])).unwrap();

    let age = json["age_seconds"].as_i64().unwrap();
    assert!(age > 700_000_000, "{json}");
    assert_eq!(
        json,
        serde_json::json!({
            "alias": token,
            "url": format!("https://{token}.{EXT}/"),
            "state": "proxied",
            "dsthost": COMPUTE_NODE,
            "dstport": 8888,
            "jobid": "77",
            "modified": "2001-02-03 04:05:06",
            "age_seconds": age,
        })
    );
}

#[test]
fn check_json_lists_each_finding_with_its_level_and_says_whether_any_failed() {
    let site = Site::new();
    let out = Command::new(program("satellite"))
        .args(["check", "--json", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = json["findings"].as_array().unwrap();
    assert!(!findings.is_empty(), "{json}");
    for finding in findings {
        let keys: Vec<&String> = finding.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["fix", "level", "what"], "{finding}");
        assert!(["ok", "warn", "fail"].contains(&finding["level"].as_str().unwrap()));
        assert!(finding["fix"].is_null() || finding["fix"].is_string());
    }
    let failed = findings.iter().any(|f| f["level"] == "fail");
    assert_eq!(json["ok"], !failed);
    // The exit status agrees with "ok", as without --json.
    assert_eq!(out.status.success(), !failed);
    // The same findings as the text report, in the same order.
    let text = satellite_check_text(&site.config);
    let whats: Vec<&str> = findings
        .iter()
        .map(|f| f["what"].as_str().unwrap())
        .collect();
    let text_whats: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("     fix: "))
        .map(|l| &l[5..])
        .collect();
    assert_eq!(whats, text_whats);
}

fn satellite_check_text(config: &Path) -> String {
    let out = Command::new(program("satellite"))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Waits until `path` holds text that `done` likes; returns it.
fn wait_for_file(path: &Path, child: &mut Child, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process exited before writing {}",
            path.display()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{} never became what was expected: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cron_watch_writes_its_expiries_and_publication_latency_for_the_textfile_collector() {
    let site = Site::with_config("metrics_textfile_dir = \"../metrics\"");
    std::fs::create_dir(site.path("metrics")).unwrap();
    insert(&site, "old-owl-pea", "pending", None, None);
    site.db()
        .execute("UPDATE proxy SET modified = '2001-01-01 00:00:00'", [])
        .unwrap();
    let mut watcher = apache::Running(
        Command::new(program("cron"))
            .arg("--watch")
            .env("SATELLITE_CONFIG", &site.config)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let file = site.path("metrics/satellite-cron.prom");

    // Expiry is cumulative: once counted, it stays 1 whatever runs follow.
    let text = wait_for_file(&file, &mut watcher.0, |t| {
        t.contains("\nsatellite_tokens_expired_total 1\n")
    });
    drop(watcher);

    promtool_accepts(&text);
    let runs = lines_of(&text, "satellite_route_publication_duration_seconds_count ");
    let runs: u64 = runs[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(runs >= 1, "{text}");
    assert_eq!(
        lines_of(
            &text,
            "satellite_route_publication_duration_seconds_bucket{le=\"+Inf\"} "
        ),
        [format!(
            "satellite_route_publication_duration_seconds_bucket{{le=\"+Inf\"}} {runs}"
        )]
    );
    assert_eq!(
        lines_of(&text, "satellite_cron_failures_total "),
        ["satellite_cron_failures_total 0"]
    );
    // Only the collector's *.prom files, no temporary file left behind.
    let names: Vec<String> = std::fs::read_dir(site.path("metrics"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["satellite-cron.prom"]);
}

#[test]
fn jobstates_poll_counts_failed_scheduler_queries_for_the_textfile_collector() {
    let site = Site::with_config("metrics_textfile_dir = \"../metrics\"");
    std::fs::create_dir(site.path("metrics")).unwrap();
    // A broker without a working Slurm client: every query fails.
    let mut poller = apache::Running(
        Command::new(program("satellite"))
            .args(["jobstates", "poll", "--every", "1", "--squeue"])
            .arg(site.path("no-such-squeue"))
            .env("SATELLITE_CONFIG", &site.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let file = site.path("metrics/satellite-poll.prom");

    let text = wait_for_file(&file, &mut poller.0, |t| !t.is_empty());
    drop(poller);

    promtool_accepts(&text);
    // A slow machine may have polled more than once before the file was
    // read: as many queries as errors, and at least one.
    let count = |name: &str| -> u64 {
        let lines = lines_of(&text, &format!("{name} "));
        assert_eq!(lines.len(), 1, "one {name} line: {text}");
        lines[0].rsplit(' ').next().unwrap().parse().unwrap()
    };
    let queries = count("satellite_scheduler_queries_total");
    let errors = count("satellite_scheduler_query_errors_total");
    assert!(queries >= 1, "{text}");
    assert_eq!(errors, queries, "every query failed: {text}");
    assert_eq!(
        lines_of(&text, "satellite_scheduler_").len(),
        2,
        "only the two scheduler counters: {text}"
    );
}

#[test]
fn through_apache_metrics_reach_serve_only_from_allowed_addresses_and_never_on_token_hosts() {
    let apache = apache::Apache::start_serving(apache::Routing::Map);
    let mut overrides = vec![("metrics_allow", "[\"127.0.0.2/32\"]".to_owned())];
    if nix::unistd::geteuid().is_root() {
        // Apache's children run as nobody:nogroup: the socket's group.
        overrides.push(("serve_socket_group", "\"nogroup\"".to_owned()));
    }
    apache.write_config(&overrides);
    let socket = apache.serve_socket();
    let (_serve, _) = start_serve_with(
        &apache.config_file(),
        &["--socket", socket.to_str().unwrap()],
    );
    apache.getlink();
    let manage = apache.host_port("manage");
    let client = apache.client();

    let refused = client.bind("127.0.0.1").get(&manage, "/metrics").unwrap();
    let allowed = client.bind("127.0.0.2").get(&manage, "/metrics").unwrap();
    let on_token_host = client
        .bind("127.0.0.2")
        .get(&apache.host_port("calm-dew-fig"), "/metrics")
        .unwrap();

    assert_eq!(
        (refused.status, refused.text().as_str()),
        (404, "Oops! Not found\n"),
        "{}",
        apache.error_log()
    );
    assert_eq!(allowed.status, 200, "{allowed}\n{}", apache.error_log());
    let text = allowed.text();
    promtool_accepts(&text);
    // serve counted the getlink Apache sent it, and refused scrapes are
    // not endpoint requests.
    assert!(
        text.contains("\nsatellite_requests_total{endpoint=\"getlink\",result=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\nsatellite_tokens{state=\"pending\"} 1\n"),
        "{text}"
    );
    // A token's host keeps every path for its notebook (or the waiting
    // page): /metrics there is not serve's.
    assert!(
        !on_token_host.text().contains("satellite_"),
        "{on_token_host}"
    );
}

/// The metric names a text exposition declares (`# TYPE` lines).
fn declared(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Every `satellite_…` name in a text, histogram series folded into their
/// family.
fn names_used(text: &str, exported: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("satellite_") {
        let start = at + found;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        let before = start.checked_sub(1).map(|i| bytes[i]);
        if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| exported.iter().any(|e| e == base))
                })
                .unwrap_or(name);
            names.push(family.to_owned());
        }
        at = end;
    }
    names.sort();
    names.dedup();
    names
}

/// The shipped alert rules and dashboard name only metrics the programs
/// really export: the names are read from `satellite metrics`, serve's
/// `/metrics`, and the textfiles of `cron --watch` and `jobstates poll`.
/// And Prometheus accepts the rules, which its unit tests prove fire on
/// the failure they name and stay quiet otherwise.
#[test]
fn the_alert_rules_and_the_dashboard_name_only_metrics_the_programs_export() {
    let site = Site::with_config(
        "metrics_textfile_dir = \"../metrics\"\nmetrics_allow = [\"127.0.0.1/32\"]\n\
         apache_status_url = \"http://127.0.0.1:9/server-status?auto\"",
    );
    std::fs::create_dir(site.path("metrics")).unwrap();
    let mut exported = declared(&satellite(&site, &["metrics"]));

    let (_serve, listening) = start_serve(&site, &["--listen", "127.0.0.1:0"]);
    let (status, text) = request(tcp(port_of(&listening)), "/metrics", &[]);
    assert_eq!(status, 200, "{text}");
    exported.extend(declared(&text));

    let mut watcher = apache::Running(
        Command::new(program("cron"))
            .arg("--watch")
            .env("SATELLITE_CONFIG", &site.config)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let text = wait_for_file(
        &site.path("metrics/satellite-cron.prom"),
        &mut watcher.0,
        |t| t.contains("satellite_tunnels_cut_total"),
    );
    drop(watcher);
    exported.extend(declared(&text));
    let mut poller = apache::Running(
        Command::new(program("satellite"))
            .args(["jobstates", "poll", "--every", "1", "--squeue"])
            .arg(site.path("no-such-squeue"))
            .env("SATELLITE_CONFIG", &site.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let text = wait_for_file(
        &site.path("metrics/satellite-poll.prom"),
        &mut poller.0,
        |t| !t.is_empty(),
    );
    drop(poller);
    exported.extend(declared(&text));
    exported.sort();
    exported.dedup();

    let dist = repo_root().join("dist");
    let rules = std::fs::read_to_string(dist.join("prometheus/satellite-alerts.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dist.join("grafana/satellite.json")).unwrap(),
    )
    .unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(queries.len() >= 10, "{queries:?}");
    for (what, text) in [
        ("the alert rules", rules),
        ("the dashboard", queries.join("\n")),
    ] {
        let unknown: Vec<String> = names_used(&text, &exported)
            .into_iter()
            .filter(|name| !exported.contains(name))
            .collect();
        assert!(
            unknown.is_empty(),
            "{what} name metrics nothing exports: {unknown:?}\nexported: {exported:?}"
        );
    }

    for args in [
        vec!["check", "rules", "satellite-alerts.yml"],
        vec!["test", "rules", "satellite-alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(dist.join("prometheus"))
            .output()
            .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
