//! `satellite serve` answers exactly as the CGI programs do, cannot be told
//! a client address by anyone but Apache (its Unix socket or a trusted
//! proxy), and refuses what a proxy could frame differently.
//! The tests that go through the store are listed in `on_both_stores!`
//! (at the end) and run on SQLite and on PostgreSQL; the others are about
//! HTTP and serve's process, whichever store answers.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// The same rows in every site: a pending token, a redeemed and linked one,
/// and a job state.
fn fixture_site(store: StoreKind, extra: &str) -> Site {
    let site = Site::with_config_on(
        store,
        &format!("routing = \"vhost\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n{extra}"),
    );
    let mut db = site.sql();
    db.execute(
        "INSERT INTO proxy (alias, alias_compare_hash, state) VALUES ('able-acorn-zoo', $1, 'pending')",
        &[&legacy_hash("able-acorn-zoo")],
    );
    db.execute(
        "INSERT INTO proxy (alias, alias_compare_hash, state, dsthost, dstport, jobid) \
         VALUES ('zen-yak-bat', $1, 'mapped', '10.21.3.4', 8888, '77')",
        &[&legacy_hash("zen-yak-bat")],
    );
    db.batch(&format!(
        "INSERT INTO jobstates VALUES ('77', 'RUNNING', {})",
        epoch_now()
    ));
    site
}

struct Serve {
    child: Child,
    port: u16,
}

impl Serve {
    fn start(site: &Site) -> Serve {
        let mut command = Command::new(program("satellite"));
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        Self::start_command(site, command)
    }

    /// Starts `command`, a serve told to listen on port 0, and learns the
    /// port the system gave it from what it says once it listens: no port
    /// is chosen first and bound later, so none can be lost to another
    /// process in between.
    fn start_command(site: &Site, mut command: Command) -> Serve {
        let mut child = command
            .env("SATELLITE_CONFIG", &site.config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        match satellite_demo::serve_child::listening_addr(&mut child) {
            Ok(addr) => Serve {
                child,
                port: addr.port(),
            },
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{err:#}");
            }
        }
    }

    /// One request over HTTP/1.1; returns status, headers and body.
    fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        // A hang is a failure, not a stuck test run.
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(raw[..split].to_vec()).unwrap();
        let mut lines = head.lines();
        let status = lines.next().unwrap()[9..12].parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        (status, headers, raw[split + 4..].to_vec())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Headers whose values the two transports must agree on.
const COMPARED: [&str; 7] = [
    "Content-Type",
    "Cache-Control",
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Vary",
    "Allow",
    "Retry-After",
];

struct Case {
    method: &'static str,
    path: &'static str,
    query: &'static str,
    client: &'static str,
    host: String,
    origin: Option<String>,
    body: &'static [u8],
}

fn case(
    method: &'static str,
    path: &'static str,
    query: &'static str,
    client: &'static str,
) -> Case {
    Case {
        method,
        path,
        query,
        client,
        host: format!("manage.{EXT}"),
        origin: None,
        body: b"",
    }
}

fn serve_answers_the_request_table_byte_for_byte_as_cgi(store: StoreKind) {
    let cgi_site = fixture_site(store, "");
    let serve_site = fixture_site(store, "");
    let serve = Serve::start(&serve_site);
    let mut table = vec![
        case(
            "GET",
            "/redeemtoken.cgi",
            "token=able-acorn-zoo&port=50123",
            COMPUTE_NODE,
        ),
        case(
            "GET",
            "/redeemtoken.cgi",
            "token=able-acorn-zoo&port=50124",
            COMPUTE_NODE,
        ),
        case(
            "GET",
            "/redeemtoken.cgi",
            "token=x%5C&port=8888",
            COMPUTE_NODE,
        ),
        case(
            "GET",
            "/redeemtoken.cgi",
            "token=able-acorn-zoo&port=80",
            COMPUTE_NODE,
        ),
        case(
            "GET",
            "/redeemtoken.cgi",
            "token=able-acorn-zoo",
            COMPUTE_NODE,
        ),
        case(
            "POST",
            "/redeemtoken.cgi",
            "token=able-acorn-zoo&port=8888",
            COMPUTE_NODE,
        ),
        case(
            "GET",
            "/linktoken.cgi",
            "token=able-acorn-zoo&jobid=4242",
            LOGIN_NODE,
        ),
        case(
            "GET",
            "/linktoken.cgi",
            "token=able-acorn-zoo&jobid=4243",
            LOGIN_NODE,
        ),
        case("GET", "/linktoken.cgi", "token=able-acorn-zoo", LOGIN_NODE),
        case(
            "GET",
            "/destroytoken.cgi",
            "token=zen-yak-bat",
            OTHER_COMPUTE_NODE,
        ),
        case("GET", "/destroytoken.cgi", "token=zen-yak-bat", OUTSIDER),
        case(
            "GET",
            "/tokenjobstate.cgi",
            "token=zen-yak-bat.example.org",
            OUTSIDER,
        ),
        case("GET", "/tokenjobstate.cgi", "token=no-such-token", OUTSIDER),
        case(
            "OPTIONS",
            "/tokenjobstate.cgi",
            "token=zen-yak-bat",
            OUTSIDER,
        ),
        case("GET", "/update-jobs.cgi", "", SLURM_CONTROLLER),
        case("GET", "/getlink.cgi", "", OUTSIDER),
        case(
            "GET",
            "/destroytoken.cgi",
            "token=zen-yak-bat",
            COMPUTE_NODE,
        ),
        case("GET", "/", "", OUTSIDER),
    ];
    table.push(Case {
        body: b"jobstates=\n77 COMPLETED\n  78 PENDING\n",
        ..case("POST", "/update-jobs.cgi", "", SLURM_CONTROLLER)
    });
    table.push(Case {
        origin: Some(format!("https://zen-yak-bat.{EXT}")),
        ..case("GET", "/tokenjobstate.cgi", "token=zen-yak-bat", OUTSIDER)
    });
    table.push(Case {
        host: format!("able-acorn-zoo.{EXT}"),
        ..case("GET", "/lab", "token=abc", OUTSIDER)
    });
    table.push(Case {
        host: format!("able-acorn-zoo.{EXT}"),
        ..case("HEAD", "/", "", OUTSIDER)
    });
    table.push(Case {
        host: format!("able-acorn-zoo.{EXT}"),
        ..case("DELETE", "/", "", OUTSIDER)
    });

    for c in &table {
        let mut call = cgi_site
            .cgi(c.path.trim_start_matches('/').trim_end_matches(".cgi"))
            .method(c.method)
            .query(c.query)
            .remote(c.client)
            .header("Host", c.host.clone())
            .env("SCRIPT_NAME", c.path);
        if c.path == "/" || c.path == "/lab" {
            call = cgi_site
                .cgi("index")
                .method(c.method)
                .query(c.query)
                .remote(c.client)
                .header("Host", c.host.clone())
                .env("SCRIPT_NAME", c.path);
        }
        if let Some(origin) = &c.origin {
            call = call.header("Origin", origin.clone());
        }
        if !c.body.is_empty() {
            call = call.post(c.body.to_vec()).method(c.method);
        }
        let cgi = call.run();

        let target = if c.query.is_empty() {
            c.path.to_owned()
        } else {
            format!("{}?{}", c.path, c.query)
        };
        let mut headers = vec![
            ("Host", c.host.clone()),
            ("X-Satellite-Client-Addr", c.client.to_owned()),
        ];
        if let Some(origin) = &c.origin {
            headers.push(("Origin", origin.clone()));
        }
        if !c.body.is_empty() {
            headers.push(("Content-Type", "application/x-www-form-urlencoded".into()));
        }
        let (status, native_headers, body) = serve.request(c.method, &target, &headers, c.body);
        let what = format!("{} {target} from {}", c.method, c.client);
        assert_eq!(status, cgi.status, "{what}");
        assert_eq!(
            body,
            cgi.body,
            "{what}: {:?} vs {:?}",
            String::from_utf8_lossy(&body),
            cgi.text()
        );
        for name in COMPARED {
            assert_eq!(
                header(&native_headers, name),
                cgi.header(name),
                "{what}: {name}"
            );
        }
    }
    assert_eq!(cgi_site.snapshot().len(), serve_site.snapshot().len());
}

#[test]
fn a_client_cannot_claim_another_address() {
    // No trusted proxies: the TCP peer (127.0.0.1) is the client, whatever
    // it says in headers.
    let site = Site::with_config("");
    let serve = Serve::start(&site);
    for (name, value) in [
        ("X-Satellite-Client-Addr", COMPUTE_NODE),
        ("X-Forwarded-For", COMPUTE_NODE),
        ("X-Real-IP", COMPUTE_NODE),
    ] {
        let (status, _, body) =
            serve.request("GET", "/getlink.cgi", &[(name, value.to_owned())], b"");
        assert_eq!(status, 403, "{name}");
        assert!(
            String::from_utf8_lossy(&body)
                .starts_with("Oops! Client (your) IP not in ranges 10.21.0.0/16"),
            "{name}"
        );
    }
    // Behind a trusted proxy, only the configured header counts.
    let site = Site::with_config("trusted_proxies = [\"127.0.0.1/32\"]");
    let serve = Serve::start(&site);
    let (status, _, _) = serve.request(
        "GET",
        "/getlink.cgi",
        &[("X-Forwarded-For", COMPUTE_NODE.to_owned())],
        b"",
    );
    assert_eq!(status, 403);
    let (status, _, body) = serve.request(
        "GET",
        "/getlink.cgi",
        &[("X-Satellite-Client-Addr", LOGIN_NODE.to_owned())],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn serve_refuses_oversized_bodies_and_survives_a_client_that_vanishes() {
    let site = Site::with_config("max_body_bytes = 1024");
    let serve = Serve::start(&site);
    let (status, _, body) = serve.request("POST", "/update-jobs.cgi", &[], &[b'a'; 2048]);
    assert_eq!(
        (status, body),
        (
            413,
            b"Oops! Request body too large (at most 1024 bytes)\n".to_vec()
        )
    );
    // Announce a body, send half, hang up.
    let mut stream = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
    stream
        .write_all(b"POST /update-jobs.cgi HTTP/1.1\r\nContent-Length: 500\r\n\r\njobstates=")
        .unwrap();
    drop(stream);
    let (status, _, _) = serve.request("GET", "/", &[], b"");
    assert_eq!(status, 200);
}

#[test]
fn sigterm_stops_serve_cleanly() {
    let site = Site::new();
    let mut serve = Serve::start(&site);
    let (status, _, _) = serve.request("GET", "/", &[], b"");
    assert_eq!(status, 200);
    nix_kill(serve.child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nix_kill(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn idle_connections_do_not_starve_real_clients() {
    let site = Site::new();
    let serve = Serve::start(&site);
    // Slowloris-style: connections that send half a request and stall.
    let stalled: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
            s.write_all(b"GET /getlink.cgi HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let (status, _, body) = serve.request("GET", "/", &[], b"");
    assert_eq!(
        (status, body),
        (
            200,
            b"Please see documentation on how to use this service.\n".to_vec()
        )
    );
    drop(stalled);
}

fn a_database_locked_by_a_long_writer_gets_503_not_a_hang(store: StoreKind) {
    let site = Site::with_config_on(
        store,
        "busy_timeout_ms = 200\ntrusted_proxies = [\"127.0.0.1/32\"]",
    );
    let token = site.new_token();
    let serve = Serve::start(&site);
    let mut writer = site.sql();
    writer.begin_holding_the_write_lock();
    let target = format!("/redeemtoken.cgi?token={token}&port=8888");
    let client = [("X-Satellite-Client-Addr", COMPUTE_NODE.to_owned())];
    let (status, headers, body) = serve.request("GET", &target, &client, b"");
    assert_eq!(status, 503);
    assert_eq!(header(&headers, "Retry-After"), Some("2"));
    assert_eq!(
        body,
        b"Oops! The service is busy, please try again in a moment.\n"
    );
    writer.batch("ROLLBACK");
    let (status, _, body) = serve.request("GET", &target, &client, b"");
    assert_eq!((status, body), (200, b"Success!\n".to_vec()));
}

fn jobstates_push_posts_squeue_output_to_update_jobs(store: StoreKind) {
    let site = Site::with_config_on(store, "jobstateipmask = [\"127.0.0.1/32\"]");
    let token = site.new_token();
    site.cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={token}&jobid=4242"))
        .run();
    let serve = Serve::start(&site);
    let mut push = Command::new(program("satellite"))
        .args([
            "jobstates",
            "push",
            "--from",
            "-",
            "--url",
            &format!("http://127.0.0.1:{}/update-jobs.cgi", serve.port),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    push.stdin
        .take()
        .unwrap()
        .write_all(b"   4242 PENDING\n4243 RUNNING\n")
        .unwrap();
    let out = push.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "pushed 2 job state(s) to http://127.0.0.1:{}/update-jobs.cgi\n",
            serve.port
        )
    );
    let state = site
        .cgi("tokenjobstate")
        .query(format!("token={token}"))
        .run();
    assert_eq!(state.text(), "Q");
}

fn sigterm_under_load_finishes_what_it_started(store: StoreKind) {
    let site = Site::with_config_on(store, "trusted_proxies = [\"127.0.0.1/32\"]");
    let mut serve = Serve::start(&site);
    let port = serve.port;
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let answered = answered.clone();
            std::thread::spawn(move || {
                let mut complete = 0;
                for _ in 0..200 {
                    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                        break;
                    };
                    let sent = stream.write_all(
                        b"GET /tokenjobstate.cgi?token=a-b-c HTTP/1.1\r\nConnection: close\r\n\r\n",
                    );
                    let mut answer = Vec::new();
                    if sent.is_err()
                        || stream.read_to_end(&mut answer).is_err()
                        || answer.is_empty()
                    {
                        // Refused or closed before it was taken: never half-answered.
                        continue;
                    }
                    let text = String::from_utf8_lossy(&answer);
                    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
                    assert!(text.contains("Content-Length: 0\r\n"), "{text}");
                    complete += 1;
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                complete
            })
        })
        .collect();
    // Under load means answering: stop serve once it has answered one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "serve answered nobody");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix_kill(serve.child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop under load");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let answered: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(answered > 0);
}

fn a_flood_beyond_the_queue_gets_quick_503s_and_nobody_hangs(store: StoreKind) {
    // One worker, stuck behind a database lock: the bounded queue fills and
    // the readers answer the rest themselves. The lock is released within
    // `deadline`, well inside the busy timeout, so however slow the run the
    // stuck request waits for the lock instead of timing out into a 503.
    let site = Site::with_config_on(
        store,
        "serve_workers = 1\nbusy_timeout_ms = 60000\ntrusted_proxies = [\"127.0.0.1/32\"]",
    );
    let token = site.new_token();
    let serve = Serve::start(&site);
    let mut writer = site.sql();
    writer.begin_holding_the_write_lock();
    let deadline = Instant::now() + Duration::from_secs(30);
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..120)
        .map(|_| {
            let (port, token, answered) = (serve.port, token.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                // A hang is a failure, not a stuck test run.
                stream
                    .set_read_timeout(Some(Duration::from_secs(120)))
                    .unwrap();
                let request = format!(
                    "GET /redeemtoken.cgi?token={token}&port=8888 HTTP/1.1\r\nX-Satellite-Client-Addr: {COMPUTE_NODE}\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).unwrap();
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).unwrap();
                answered.fetch_add(1, Ordering::SeqCst);
                String::from_utf8_lossy(&answer).into_owned()
            })
        })
        .collect();
    // While the lock is held only the readers can answer: wait for them to
    // refuse what the queue cannot hold (at least 120 - 1 - 64 = 55).
    while answered.load(Ordering::SeqCst) < 40 {
        assert!(
            Instant::now() < deadline,
            "the readers did not refuse the overflow"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.batch("ROLLBACK");
    let answers: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let busy = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 503"))
        .count();
    let success = answers
        .iter()
        .filter(|a| a.ends_with("\r\n\r\nSuccess!\n"))
        .count();
    let conflict = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 409"))
        .count();
    assert!(busy >= 40, "{busy} refused");
    assert_eq!(success, 1);
    assert_eq!(busy + success + conflict, 120, "{answers:#?}");
    for refusal in answers.iter().filter(|a| a.starts_with("HTTP/1.1 503")) {
        assert!(
            refusal.ends_with("\r\n\r\nOops! The service is busy, please try again in a moment.\n"),
            "{refusal}"
        );
    }
}

/// A megabyte of header is refused (431, see below) without reading it
/// all; what matters here is that serve carries on.
#[test]
fn oversized_headers_do_not_take_serve_down() {
    let site = Site::new();
    let serve = Serve::start(&site);
    let mut stream = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
    let huge = "a".repeat(1 << 20);
    let _ = write!(
        stream,
        "GET / HTTP/1.1\r\nConnection: close\r\nX-Huge: {huge}\r\n\r\n"
    );
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let (status, _, _) = serve.request("GET", "/", &[], b"");
    assert_eq!(status, 200);
}

#[test]
fn running_out_of_file_descriptors_does_not_stop_serve_for_good() {
    let site = Site::new();
    // A low descriptor limit, so a burst of connections makes accept fail.
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!(
        "ulimit -n 48 && exec {} serve --listen 127.0.0.1:0",
        program("satellite")
    ));
    let serve = Serve::start_command(&site, command);
    let port = serve.port;
    let burst: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(burst);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answered = std::panic::catch_unwind(|| serve.request("GET", "/", &[], b"").0);
        if answered.as_ref().ok() == Some(&200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve stopped accepting after the burst"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- Hardening (issue 10, item 2): each attack against the real binary ----

/// serve on a Unix socket in a directory of its own.
struct SocketServe {
    child: Child,
    socket: std::path::PathBuf,
}

impl SocketServe {
    fn start(site: &Site, env: &[(&str, &str)]) -> SocketServe {
        let socket = site.path("run/serve.sock");
        let mut command = Command::new(program("satellite"));
        command
            .args(["serve", "--socket"])
            .arg(&socket)
            .env("SATELLITE_CONFIG", &site.config)
            .stderr(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        SocketServe { child, socket }
    }

    fn exchange(&self, raw: &[u8]) -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.write_all(raw).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }
}

impl Drop for SocketServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `raw` over TCP and reads until serve closes the connection.
fn exchange(port: u16, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // A refused request may be cut short: serve answers without reading
    // it all, so a failed write is expected here.
    let _ = stream.write_all(raw);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn responses_in(answer: &str) -> usize {
    answer.matches("HTTP/1.1 ").count()
}

#[test]
fn the_client_address_header_is_believed_on_the_unix_socket_and_not_over_tcp() {
    let site = Site::new();
    let serve = SocketServe::start(&site, &[]);
    let asked = format!(
        "GET /getlink.cgi HTTP/1.1\r\nHost: manage.{EXT}\r\nX-Satellite-Client-Addr: {LOGIN_NODE}\r\n\r\n"
    );
    let answer = serve.exchange(asked.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("\r\n\r\nYour token is \n"), "{answer}");

    // A local process over TCP forging the header is only 127.0.0.1.
    let tcp = Serve::start(&site);
    let answer = exchange(tcp.port, asked.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(
        answer.contains("\r\n\r\nOops! Client (your) IP not in ranges 10.21.0.0/16"),
        "{answer}"
    );
}

#[test]
fn the_unix_socket_admits_only_its_owner_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let site = Site::new();
    let serve = SocketServe::start(&site, &[]);
    let mode = std::fs::metadata(&serve.socket).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o660, "{mode:o}");
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: cannot try the socket as another user");
        return;
    }
    // Let anyone reach the socket's directory: only its mode may stop them.
    for dir in [site.dir.path().to_owned(), site.path("run")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let try_as = |uid: u32| {
        use std::os::unix::process::CommandExt;
        Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
            ])
            .arg(&serve.socket)
            .arg("http://localhost/")
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap()
    };
    let root = try_as(0);
    assert_eq!(String::from_utf8_lossy(&root.stdout), "200");
    let nobody = try_as(65534);
    assert!(!nobody.status.success());
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("Couldn't connect"),
        "{}",
        String::from_utf8_lossy(&nobody.stderr)
    );
    // The same user gets in once the socket's group is its own (what
    // serve_socket_group does for Apache's group).
    nix::unistd::chown(&serve.socket, None, Some(nix::unistd::Gid::from_raw(65534))).unwrap();
    let member = try_as(65534);
    assert_eq!(
        String::from_utf8_lossy(&member.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
}

#[test]
fn ambiguous_framing_gets_one_400_and_never_a_second_response() {
    let site = Site::new();
    let serve = Serve::start(&site);
    let smuggled = "GET /getlink.cgi HTTP/1.1\r\nHost: x\r\n\r\n";
    let attacks = [
        (
            "CL+TE",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "TE+CL",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "duplicate Content-Length",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "differing Content-Length",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 39\r\n\r\n{smuggled}"
            ),
        ),
        (
            "a Content-Length list",
            format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 0\r\n\r\n{smuggled}"),
        ),
        (
            "chunked, identity",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two Transfer-Encoding fields",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "identity",
            format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n{smuggled}"),
        ),
        (
            "chunked in HTTP/1.0",
            format!(
                "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "a bare LF in a chunk line",
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\n\r\n{smuggled}"
            ),
        ),
        (
            "two Host fields",
            format!("GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n{smuggled}"),
        ),
    ];
    for (what, raw) in attacks {
        let answer = exchange(serve.port, raw.as_bytes());
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{what}: {answer}"
        );
        assert!(
            answer.contains("\r\nConnection: close\r\n"),
            "{what}: {answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\nOops! Malformed request\n"),
            "{what}: {answer}"
        );
        assert_eq!(responses_in(&answer), 1, "{what}: {answer}");
    }
}

#[test]
fn a_chunked_body_is_read_as_the_same_form_as_a_counted_one() {
    let site = Site::with_config("jobstateipmask = [\"127.0.0.1/32\"]");
    let token = site.new_token();
    site.cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={token}&jobid=4242"))
        .run();
    let serve = Serve::start(&site);
    let answer = exchange(
        serve.port,
        b"POST /update-jobs.cgi HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Content-Type: application/x-www-form-urlencoded\r\n\r\n\
          a;ext=1\r\njobstates=\r\n9\r\n4242 PEND\r\n4\r\nING\n\r\n0\r\nX-Trailer: y\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(responses_in(&answer), 1, "{answer}");
    let state = site
        .cgi("tokenjobstate")
        .query(format!("token={token}"))
        .run();
    assert_eq!(state.text(), "Q");
}

#[test]
fn a_200_kb_header_or_a_hundred_and_one_fields_get_431() {
    let site = Site::new();
    let serve = Serve::start(&site);
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let answer = exchange(serve.port, huge.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert!(
        answer.ends_with("\r\n\r\nOops! Request header too large\n"),
        "{answer}"
    );

    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-Field-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let answer = exchange(serve.port, many.as_bytes());
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\nOops! Too many request header fields\n"),
        "{answer}"
    );
    // A hundred fields in all are fine.
    let mut most = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..99 {
        most.push_str(&format!("X-Field-{i}: {i}\r\n"));
    }
    most.push_str("\r\n");
    assert!(exchange(serve.port, most.as_bytes()).starts_with("HTTP/1.1 200 OK\r\n"));
}

#[test]
fn a_slow_sender_gets_408_when_its_time_is_up_even_while_trickling() {
    let site = Site::with_config("serve_read_timeout_ms = 1000");
    let serve = Serve::start(&site);
    // Half a head, then nothing.
    let mut stalled = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stalled.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut answer = Vec::new();
    stalled.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\nOops! Request not received in time\n"),
        "{answer}"
    );

    // One byte every 100 ms: each read is quick, the whole is not. The
    // deadline is for the request, not for each read.
    let mut trickle = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(100)
    );
    let mut answer = Vec::new();
    let mut sent = 0;
    for byte in request.as_bytes() {
        if trickle.write_all(&[*byte]).is_err() {
            break;
        }
        sent += 1;
        let mut buf = [0u8; 1024];
        match trickle.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if !answer.is_empty() {
            break;
        }
    }
    trickle
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let _ = trickle.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        sent < request.len(),
        "the whole request went through: {answer}"
    );
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
}

/// Bytes `stream` has sent that its peer has not read yet (SIOCOUTQ; on a
/// Unix stream socket what was sent stays charged to the sender until the
/// receiver has read it).
fn unread_by_peer(stream: &std::os::unix::net::UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut unread: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQ (which Linux numbers as TIOCOUTQ) writes one int.
    let done = unsafe { nix::libc::ioctl(stream.as_raw_fd(), nix::libc::TIOCOUTQ, &mut unread) };
    assert_eq!(done, 0, "{}", std::io::Error::last_os_error());
    usize::try_from(unread).unwrap()
}

/// How many of serve's reader threads (named `satellite-reader`, which
/// the kernel keeps as its first 15 bytes) are alive.
fn reader_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "satellite-reade")
        .count()
}

fn sigterm_answers_the_requests_already_queued_and_takes_no_new_ones(store: StoreKind) {
    // One worker stuck behind a database lock; requests queue up behind it.
    // Every wait below shares one deadline, well inside the busy timeout:
    // however slow the run, the stuck request waits for the lock instead of
    // timing out into a 503.
    let site = Site::with_config_on(store, "serve_workers = 1\nbusy_timeout_ms = 60000");
    let token = site.new_token();
    let mut serve = SocketServe::start(&site, &[]);
    let mut writer = site.sql();
    writer.begin_holding_the_write_lock();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (read, was_read) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let (socket, token, read) = (serve.socket.clone(), token.clone(), read.clone());
            std::thread::spawn(move || {
                let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
                // A hang is a failure, not a stuck test run.
                stream
                    .set_read_timeout(Some(Duration::from_secs(120)))
                    .unwrap();
                let request = format!(
                    "GET /redeemtoken.cgi?token={token}&port=8888 HTTP/1.1\r\nHost: x\r\nX-Satellite-Client-Addr: {COMPUTE_NODE}\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).unwrap();
                // Tell the test once serve has read the whole request.
                while unread_by_peer(&stream) > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if unread_by_peer(&stream) == 0 {
                    read.send(()).unwrap();
                }
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).unwrap();
                String::from_utf8_lossy(&answer).into_owned()
            })
        })
        .collect();
    drop(read);
    // All five accepted and read by serve...
    for _ in 0..5 {
        was_read
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("serve did not read all five requests");
    }
    // ...and queued: a reader thread ends once it has queued its request.
    while reader_threads(serve.child.id()) > 0 {
        assert!(
            Instant::now() < deadline,
            "serve did not queue the requests"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    nix_kill(serve.child.id());
    while serve.socket.exists() {
        assert!(Instant::now() < deadline, "serve kept listening");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(std::os::unix::net::UnixStream::connect(&serve.socket).is_err());
    writer.batch("ROLLBACK");
    let answers: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let success = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200 OK\r\n") && a.ends_with("\r\n\r\nSuccess!\n"))
        .count();
    let conflict = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 409 Conflict\r\n") && a.contains("\r\n\r\nOops! "))
        .count();
    assert_eq!((success, conflict), (1, 4), "{answers:#?}");
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_panicking_handler_answers_500_and_its_worker_serves_on() {
    let site = Site::with_config("serve_workers = 1");
    let serve = SocketServe::start(&site, &[("SATELLITE_SERVE_TEST_PANIC", "1")]);
    for _ in 0..3 {
        let answer = serve.exchange(b"GET /.satellite-test/panic HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            answer.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with(
                "\r\n\r\nOops! Internal error, please try again later or tell the administrators.\n"
            ),
            "{answer}"
        );
        // The only worker is still there.
        let answer = serve.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            answer.ends_with("\r\n\r\nPlease see documentation on how to use this service.\n"),
            "{answer}"
        );
    }
}

#[test]
fn serve_takes_a_socket_passed_by_systemd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let site = Site::new();
    let path = site.path("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    // systemd's protocol: the socket is descriptor 3 and LISTEN_PID is the
    // server's own pid; a shell that execs serve knows it as $$.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "export LISTEN_PID=$$; exec {} serve",
            program("satellite")
        ))
        .env("SATELLITE_CONFIG", &site.config)
        .env("LISTEN_FDS", "1")
        .stderr(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; nothing else runs after fork.
    unsafe {
        command.pre_exec(move || {
            if nix::libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    drop(listener);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}

#[test]
fn a_client_that_expects_100_continue_is_told_to_go_on() {
    let site = Site::with_config("jobstateipmask = [\"127.0.0.1/32\"]");
    let serve = Serve::start(&site);
    let body = b"jobstates=4242 RUNNING\n";
    let mut stream = TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "POST /update-jobs.cgi HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
}

#[test]
fn serve_socket_group_gives_the_socket_to_apaches_group() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: cannot give a socket to another group");
        return;
    }
    // Debian's nogroup, RHEL's nobody: whichever name gid 65534 has here.
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
        .unwrap()
        .expect("a group with gid 65534")
        .name;
    let site = Site::with_config(&format!("serve_socket_group = \"{group}\""));
    let serve = SocketServe::start(&site, &[]);
    let meta = std::fs::metadata(&serve.socket).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (65534, 0o660));
}

/// serve keeps its counts in memory, one table for every worker: a burst of
/// guesses spread over the workers is still one burst.
fn serve_answers_429_after_a_burst_of_unknown_guesses_from_one_address_only(store: StoreKind) {
    let site = fixture_site(
        store,
        "unknown_token_burst = 4\nunknown_token_rate = 0.0\nserve_workers = 3",
    );
    let serve = Serve::start(&site);
    let from = |addr: &str| vec![("X-Satellite-Client-Addr", addr.to_owned())];
    let too_many =
        b"Oops! Too many requests for unknown tokens from your address, please try again later.\n"
            .to_vec();
    // A compute node, so that redeem's unknown answers count too.
    let guesser = COMPUTE_NODE;
    for guess in ["wrong-guess-one", "wrong-guess-two"] {
        let (status, _, body) = serve.request(
            "GET",
            &format!("/tokenjobstate.cgi?token={guess}"),
            &from(guesser),
            b"",
        );
        assert_eq!((status, body), (200, Vec::new()), "{guess}");
    }
    let (status, _, body) = serve.request(
        "GET",
        "/tokenjobstate.cgi?token=wrong-guess-three&format=json",
        &from(guesser),
        b"",
    );
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (
            200,
            r#"{"cause":"unknown","job":null,"state":"X"}"#.to_owned()
        )
    );
    // Redeem's unknown answers fill the same count.
    let (status, _, body) = serve.request(
        "GET",
        "/redeemtoken.cgi?token=wrong-guess-four&port=8888",
        &from(guesser),
        b"",
    );
    assert_eq!(
        (status, body),
        (404, b"Oops! Unknown nonce or nonce already used\n".to_vec())
    );
    for target in [
        "/tokenjobstate.cgi?token=wrong-guess-six",
        "/tokenjobstate.cgi?token=able-acorn-zoo",
        "/tokenjobstate.cgi?token=zen-yak-bat&format=json",
        "/redeemtoken.cgi?token=able-acorn-zoo&port=8888",
    ] {
        let (status, headers, body) = serve.request("GET", target, &from(guesser), b"");
        assert_eq!((status, &body), (429, &too_many), "{target}");
        assert_eq!(header(&headers, "Retry-After"), Some("3600"), "{target}");
    }

    let (status, _, body) = serve.request(
        "GET",
        "/tokenjobstate.cgi?token=able-acorn-zoo",
        &from("198.51.100.7"),
        b"",
    );
    assert_eq!((status, body), (200, b"PE".to_vec()));
    let (status, _, body) = serve.request(
        "GET",
        "/tokenjobstate.cgi?token=wrong-guess-one",
        &from("203.0.113.10"),
        b"",
    );
    assert_eq!((status, body), (200, Vec::new()));
    let (status, _, body) = serve.request(
        "GET",
        "/redeemtoken.cgi?token=able-acorn-zoo&port=8888",
        &from(OTHER_COMPUTE_NODE),
        b"",
    );
    assert_eq!((status, body), (200, b"Success!\n".to_vec()));
}

on_both_stores!(
    serve_answers_the_request_table_byte_for_byte_as_cgi,
    a_database_locked_by_a_long_writer_gets_503_not_a_hang,
    jobstates_push_posts_squeue_output_to_update_jobs,
    a_flood_beyond_the_queue_gets_quick_503s_and_nobody_hangs,
    sigterm_answers_the_requests_already_queued_and_takes_no_new_ones,
    sigterm_under_load_finishes_what_it_started,
    serve_answers_429_after_a_burst_of_unknown_guesses_from_one_address_only,
);
