//! Satellite behind a real Apache httpd (issue 3, "Tests with a real
//! Apache"): a private Apache per test group with the project's
//! `httpd-conf/`, the CGI programs installed as in production, backends on
//! their own loopback addresses, and an HTTPS client. Every scenario that
//! applies to both routing modes is written once and run for `map` and
//! `vhost`. The tests fail, not skip, when Apache is missing. The tests
//! listed in `on_both_stores!` (at the end) run on SQLite and on
//! PostgreSQL (Apache's map lookup through APR's pgsql driver); the others
//! are about Apache alone (mod_qos, check's probes) or a SQLite file.
//!
//! No test asserts a timing: where something becomes true eventually (a
//! graceful reload in vhost routing, `cron --watch`), it is polled for with
//! a generous deadline. In map routing a route must work on the very next
//! request after redeem answers, so there it is not polled for.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::apache::{Apache, Routing, Running, DEFAULT_ANSWER};
use support::backend::{answer_body, Backend, ReservedPort};
use support::client::{Request, Response};
use support::{on_both_stores, StoreKind};

const JUPYTER_WS: &str = "v1.kernel.websocket.jupyter.org";
const BACKEND_A: &str = "127.0.0.3";
const BACKEND_B: &str = "127.0.0.4";
const LATE_BACKEND: &str = "127.0.0.5";

/// `Ok` if `alias` answers `path` from `backend` (checked by the header it
/// adds and the body naming it).
fn from_backend(
    apache: &Apache,
    alias: &str,
    backend: &Backend,
    path: &str,
) -> Result<Response, String> {
    let r = apache
        .client()
        .get(&apache.host_port(alias), path)
        .map_err(|e| e.to_string())?;
    if r.status == 200
        && r.header("X-Backend") == Some(backend.name.as_str())
        && r.text() == answer_body(&backend.name, "GET", path)
    {
        Ok(r)
    } else {
        Err(r.to_string())
    }
}

/// After a change of routes: in map routing the route must work at once;
/// in vhost routing run `cron` and wait for the graceful reload.
fn publish(apache: &Apache) {
    if apache.routing == Routing::Vhost {
        apache.cron_ok();
    }
}

/// `alias` reaches `backend`: at once in map routing, eventually (the
/// reload after cron) in vhost routing.
fn assert_live(apache: &Apache, alias: &str, backend: &Backend) -> Response {
    let path = "/live-probe?token=abc";
    match apache.routing {
        Routing::Map => from_backend(apache, alias, backend, path).unwrap_or_else(|last| {
            panic!(
                "{alias} does not reach backend {} right after redeem: {last}\n{}",
                backend.name,
                apache.error_log()
            )
        }),
        Routing::Vhost => apache.eventually_in_a_row(
            &format!("{alias} reaching backend {}", backend.name),
            || from_backend(apache, alias, backend, path),
        ),
    }
}

fn default_answer(apache: &Apache, alias: &str) -> Result<(), String> {
    let r = apache
        .client()
        .get(&apache.host_port(alias), "/")
        .map_err(|e| e.to_string())?;
    if r.status == 200 && r.text() == DEFAULT_ANSWER {
        Ok(())
    } else {
        Err(r.to_string())
    }
}

/// `alias` is no longer routed (its host shows the static waiting page,
/// which then says the session is over): at once in map routing,
/// eventually in vhost routing.
fn assert_gone(apache: &Apache, alias: &str) {
    match apache.routing {
        Routing::Map => waiting_answer(apache, alias).unwrap_or_else(|last| {
            panic!(
                "{alias} still routed right after destroy: {last}\n{}",
                apache.error_log()
            )
        }),
        Routing::Vhost => apache
            .eventually_in_a_row(&format!("{alias} back to the waiting page"), || {
                waiting_answer(apache, alias)
            }),
    }
}

fn waiting_answer(apache: &Apache, alias: &str) -> Result<(), String> {
    let r = apache
        .client()
        .get(&apache.host_port(alias), "/")
        .map_err(|e| e.to_string())?;
    if r.status == 200 && r.text().contains("tokenjobstate.cgi") {
        Ok(())
    } else {
        Err(r.to_string())
    }
}

/// The waiting page of a pending (or not yet live) alias.
fn assert_waiting_page(apache: &Apache, alias: &str, path: &str) {
    let r = apache.get(alias, path);
    assert_eq!(r.status, 200, "{path}: {r}\n{}", apache.error_log());
    assert!(
        r.header("Content-Type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{path}: {r}"
    );
    assert!(
        r.text().contains("tokenjobstate.cgi"),
        "{path}: not the waiting page: {r}"
    );
}

fn expected_state(apache: &Apache) -> &'static str {
    match apache.routing {
        Routing::Map => "proxied",
        Routing::Vhost => "mapped",
    }
}

/// A body that is not all one byte, so a reordered or truncated copy
/// shows.
fn big_body(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha1_hex(bytes: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The whole life of a proxied session, and two sessions side by side.
fn proxying(store: StoreKind, routing: Routing) {
    let apache = Apache::start_on(store, routing);
    let a = Backend::start("alpha", BACKEND_A);
    let b = Backend::start("bravo", BACKEND_B);

    // Pending: the root with Jupyter's token and a deep link both wait.
    let alias = apache.getlink();
    assert_eq!(apache.state_of(&alias).as_deref(), Some("pending"));
    assert_waiting_page(&apache, &alias, "/?token=abc");
    assert_waiting_page(&apache, &alias, "/lab/tree/work/notes.ipynb?token=abc");
    // So does an upper-case spelling of the host.
    assert_waiting_page(&apache, &alias.to_uppercase(), "/?token=abc");
    // An unknown token's host gets the very same bytes (nothing to learn
    // by guessing), never from a cache once it is live.
    let pending_page = apache.get(&alias, "/");
    let unknown_page = apache.get("never-issued-token", "/lab");
    assert_eq!(pending_page.body, unknown_page.body);
    assert_eq!(pending_page.header("Cache-Control"), Some("no-store"));
    // Hosts that are not token-shaped get the original's default message.
    for host in ["manage", "www"] {
        default_answer(&apache, host).unwrap_or_else(|e| panic!("{host}: {e}"));
    }

    // Redeemed from the backend's own address; live after publishing.
    apache.redeem_ok(&alias, BACKEND_A, a.port());
    assert_eq!(
        apache.state_of(&alias).as_deref(),
        Some(expected_state(&apache))
    );
    publish(&apache);
    assert_live(&apache, &alias, &a);
    assert_eq!(apache.state_of(&alias).as_deref(), Some("proxied"));

    // Path and query arrive exactly as sent.
    let path = "/lab/tree/a%20b/notes.ipynb?token=abc&x=1&y=%2F";
    let r = from_backend(&apache, &alias, &a, path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.header("Referrer-Policy"), Some("no-referrer"), "{r}");
    let seen = a.last("/lab/tree/").expect("the backend saw the request");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target, path);
    // What the backend learns about the client.
    assert_eq!(
        seen.header("X-Forwarded-For"),
        Some("127.0.0.1"),
        "{seen:?}"
    );
    assert_eq!(
        seen.header("X-Forwarded-Host"),
        Some(apache.host_port(&alias).as_str()),
        "{seen:?}"
    );
    assert_eq!(seen.header("X-Forwarded-Proto"), Some("https"), "{seen:?}");
    // As the original: the backend sees its own address as Host.
    assert_eq!(
        seen.header("Host"),
        Some(format!("{BACKEND_A}:{}", a.port()).as_str()),
        "{seen:?}"
    );
    // An upper-case host reaches the same session.
    from_backend(&apache, &alias.to_uppercase(), &a, "/upper")
        .unwrap_or_else(|e| panic!("upper-case host: {e}"));

    // A 1 MiB upload arrives whole.
    let body = big_body(1 << 20);
    let r = apache
        .client()
        .request(&Request::post(
            &apache.host_port(&alias),
            "/api/contents/upload?token=abc",
            body.clone(),
        ))
        .unwrap();
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.text(),
        answer_body("alpha", "POST", "/api/contents/upload?token=abc")
    );
    let seen = a.last("/api/contents/upload").unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body_len, body.len());
    assert_eq!(seen.body_sha1, sha1_hex(&body));

    // The backend's redirect to itself comes back as the public URL.
    let r = apache.get(&alias, "/redirect");
    assert_eq!(r.status, 302, "{r}");
    assert_eq!(
        r.header("Location"),
        Some(format!("{}/lab", apache.origin(&alias)).as_str()),
        "{r}"
    );

    // A Jupyter kernel websocket: protocol and frames both ways.
    let ws_path = "/api/kernels/k-1/channels?session_id=s-1&token=abc";
    let mut ws = apache.client().connect(&apache.host(&alias)).unwrap();
    let r = ws
        .websocket(&apache.host_port(&alias), ws_path, JUPYTER_WS)
        .unwrap();
    assert_eq!(r.status, 101, "{r}\n{}", apache.error_log());
    assert_eq!(r.header("Sec-WebSocket-Protocol"), Some(JUPYTER_WS), "{r}");
    for text in [
        "hello",
        "{\"msg_type\": \"execute_request\"}",
        &"x".repeat(70_000),
    ] {
        ws.send_text(text).unwrap();
        assert_eq!(ws.recv_text().unwrap(), text);
    }
    let seen = a.last("/api/kernels/").unwrap();
    assert_eq!(seen.target, ws_path);
    assert_eq!(seen.header("Sec-WebSocket-Protocol"), Some(JUPYTER_WS));

    // A second session on another backend.
    let other = apache.getlink();
    apache.redeem_ok(&other, BACKEND_B, b.port());
    publish(&apache);
    assert_live(&apache, &other, &b);
    // The open websocket survived whatever publishing did.
    ws.send_text("still there").unwrap();
    assert_eq!(ws.recv_text().unwrap(), "still there");

    // Fresh connections, alternately: never crossed.
    for i in 0..5 {
        let p = format!("/fresh/{i}?token=abc");
        from_backend(&apache, &alias, &a, &p).unwrap_or_else(|e| panic!("{alias}: {e}"));
        from_backend(&apache, &other, &b, &p).unwrap_or_else(|e| panic!("{other}: {e}"));
    }
    // One kept-alive TLS connection (SNI: the first alias) carrying both.
    let mut conn = apache.client().connect(&apache.host(&alias)).unwrap();
    for i in 0..6 {
        for (host, backend) in [(&alias, &a), (&other, &b)] {
            let p = format!("/same-conn/{i}?from={host}");
            let r = conn.get(&apache.host_port(host), &p).unwrap();
            assert_eq!(r.status, 200, "{host} {p}: {r}\n{}", apache.error_log());
            assert_eq!(r.header("X-Backend"), Some(backend.name.as_str()), "{r}");
            assert_eq!(r.text(), answer_body(&backend.name, "GET", &p));
        }
    }
    for (backend, foreign) in [(&a, &other), (&b, &alias)] {
        assert!(
            backend
                .seen()
                .iter()
                .all(|s| !s.target.contains(&format!("from={foreign}"))),
            "backend {} saw a request for {foreign}",
            backend.name
        );
    }

    // Destroyed: the default answer again; the other session is untouched.
    drop(ws);
    apache.destroy_ok(&alias, BACKEND_A);
    // A tombstone until its TTL, so the page can say it was shut down.
    assert_eq!(apache.state_of(&alias).as_deref(), Some("ended"));
    publish(&apache);
    assert_gone(&apache, &alias);
    from_backend(&apache, &other, &b, "/after-destroy")
        .unwrap_or_else(|e| panic!("{other} after destroying {alias}: {e}"));
}

fn map_mode_proxying(store: StoreKind) {
    proxying(store, Routing::Map);
}

fn vhost_mode_proxying(store: StoreKind) {
    proxying(store, Routing::Vhost);
}

/// galyleo redeems before Jupyter listens: the retry page, then the
/// notebook once it starts.
fn retry_page(store: StoreKind, routing: Routing) {
    let apache = Apache::start_on(store, routing);
    let alias = apache.getlink();
    let reserved = ReservedPort::on(LATE_BACKEND);
    let port = reserved.port;
    apache.redeem_ok(&alias, LATE_BACKEND, port);
    publish(&apache);
    let retry = || -> Result<Response, String> {
        let r = apache
            .client()
            .get(&apache.host_port(&alias), "/lab?token=abc")
            .map_err(|e| e.to_string())?;
        if r.status == 503 && r.text().contains("almost ready") {
            Ok(r)
        } else {
            Err(r.to_string())
        }
    };
    let r = match routing {
        Routing::Map => retry().unwrap_or_else(|e| panic!("no retry page: {e}")),
        // In a row: the second ask below must not meet a child of the
        // generation before the route.
        Routing::Vhost => apache.eventually_in_a_row("the retry page", retry),
    };
    assert!(
        r.header("Content-Type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{r}"
    );
    // Asked again while still down: still the retry page.
    retry().unwrap_or_else(|e| panic!("no retry page the second time: {e}"));

    let late = reserved.listen("late");
    apache.eventually("the late backend answering", || {
        from_backend(&apache, &alias, &late, "/lab?token=abc")
    });
}

fn map_mode_retry_page_until_the_backend_listens(store: StoreKind) {
    retry_page(store, Routing::Map);
}

fn vhost_mode_retry_page_until_the_backend_listens(store: StoreKind) {
    retry_page(store, Routing::Vhost);
}

/// vhost routing: a rendered config that Apache refuses is never left in
/// place, and the routes Apache has keep working.
fn vhost_mode_failed_config_test_keeps_the_previous_routes(store: StoreKind) {
    let apache = Apache::start_on(store, Routing::Vhost);
    let a = Backend::start("alpha", BACKEND_A);
    let b = Backend::start("bravo", BACKEND_B);
    let first = apache.getlink();
    apache.redeem_ok(&first, BACKEND_A, a.port());
    publish(&apache);
    assert_live(&apache, &first, &a);
    let good = std::fs::read(apache.vhost_file()).unwrap();
    let generations = apache.generations();

    // From now on Apache's config test fails: it includes a broken file,
    // as a bad template or a broken include would.
    let broken = apache.dir.path().join("broken.conf");
    std::fs::write(&broken, "ThisIsNotAnApacheDirective on\n").unwrap();
    let failing = apache.configtest_command(Some(&broken));
    assert!(
        !std::process::Command::new(&failing[0])
            .args(&failing[1..])
            .output()
            .unwrap()
            .status
            .success(),
        "the broken include should fail the config test"
    );
    apache.write_config(&[("apache_configtest", format!("{failing:?}"))]);

    let second = apache.getlink();
    apache.redeem_ok(&second, BACKEND_B, b.port());
    let out = apache.cron();
    assert!(
        !out.status.success(),
        "cron must fail when the config test fails: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(apache.state_of(&second).as_deref(), Some("mapped"));
    assert_eq!(apache.state_of(&first).as_deref(), Some("proxied"));
    assert_eq!(
        std::fs::read(apache.vhost_file()).unwrap(),
        good,
        "the previous file must be back"
    );
    // No reload, the old route works, the new one waits.
    assert_eq!(apache.generations(), generations, "{}", apache.error_log());
    from_backend(&apache, &first, &a, "/still-working")
        .unwrap_or_else(|e| panic!("the previous route broke: {e}"));
    assert_waiting_page(&apache, &second, "/?token=abc");
    // A failing run does not leave temporary files behind.
    let leftovers: Vec<_> = std::fs::read_dir(apache.path("dynconf"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Fixed: the next run publishes both.
    apache.write_config(&[]);
    apache.cron_ok();
    assert_live(&apache, &second, &b);
    assert_live(&apache, &first, &a);
    assert_eq!(apache.state_of(&second).as_deref(), Some("proxied"));
}

/// vhost routing: one cron at a time, and a missing generated file is
/// recreated.
fn vhost_mode_cron_lock_and_missing_file(store: StoreKind) {
    let apache = Apache::start_on(store, Routing::Vhost);
    let a = Backend::start("alpha", BACKEND_A);
    let b = Backend::start("bravo", BACKEND_B);
    let alias = apache.getlink();
    apache.redeem_ok(&alias, BACKEND_A, a.port());

    // Another run holds the lock: this one exits 0 at once, doing nothing.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(apache.path("dynconf/.satellite.lock"))
        .unwrap();
    lock.lock().unwrap();
    let out = apache.cron();
    assert!(
        out.status.success(),
        "a second cron must exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(apache.state_of(&alias).as_deref(), Some("mapped"));
    let text = std::fs::read_to_string(apache.vhost_file()).unwrap_or_default();
    assert!(!text.contains(&alias), "written under another run's lock");
    drop(lock);

    // Two crons started at once: both exit 0, one publishes, the file is
    // whole.
    let spawn = || {
        apache
            .cron_command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (one, two) = (spawn(), spawn());
    for out in [
        one.wait_with_output().unwrap(),
        two.wait_with_output().unwrap(),
    ] {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_live(&apache, &alias, &a);
    assert_eq!(apache.state_of(&alias).as_deref(), Some("proxied"));
    let text = std::fs::read_to_string(apache.vhost_file()).unwrap();
    assert_eq!(
        text.matches(&format!("ServerName {}", apache.host(&alias)))
            .count(),
        1,
        "{text}"
    );

    // The generated file deleted: the next run writes it again, with a
    // route added meanwhile.
    std::fs::remove_file(apache.vhost_file()).unwrap();
    let other = apache.getlink();
    apache.redeem_ok(&other, BACKEND_B, b.port());
    apache.cron_ok();
    let text = std::fs::read_to_string(apache.vhost_file()).expect("the file is back");
    assert!(
        text.contains(&format!("ServerName {}", apache.host(&alias))),
        "{text}"
    );
    assert!(
        text.contains(&format!("ServerName {}", apache.host(&other))),
        "{text}"
    );
    assert_live(&apache, &other, &b);
    assert_live(&apache, &alias, &a);

    // Deleted again with nothing else changed: still recreated.
    std::fs::remove_file(apache.vhost_file()).unwrap();
    apache.cron_ok();
    assert_eq!(std::fs::read_to_string(apache.vhost_file()).unwrap(), text);
    assert_live(&apache, &alias, &a);
}

/// vhost routing with `cron --watch`: a redeem goes live and a destroy goes
/// away with no manual cron run.
/// Starts `cron --watch` and returns once its first run is over (it says
/// it is watching), with how many backends its routes lead to: requests
/// made before could meet that run's graceful restart (vhost routing).
fn start_watcher(apache: &Apache) -> (Running, usize) {
    let mut watcher = Running(
        apache
            .cron_command()
            .arg("--watch")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let said = std::io::BufReader::new(watcher.0.stdout.take().unwrap());
    let (lines, watching) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(said).map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    const WATCHING: &str = "watching the database; routes lead to ";
    loop {
        let line = watching
            .recv_timeout(Duration::from_secs(60))
            .expect("the watcher said it is watching");
        if let Some(at) = line.find(WATCHING) {
            let count = line[at + WATCHING.len()..]
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{line}"));
            return (watcher, count);
        }
    }
}

fn vhost_mode_cron_watch_publishes_without_a_manual_run(store: StoreKind) {
    let apache = Apache::start_on(store, Routing::Vhost);
    let a = Backend::start("alpha", BACKEND_A);
    let (_watch, _) = start_watcher(&apache);
    let alias = apache.getlink();
    apache.redeem_ok(&alias, BACKEND_A, a.port());
    apache.eventually("the watcher publishing the route", || {
        from_backend(&apache, &alias, &a, "/watched?token=abc")
    });
    apache.eventually("the row becoming proxied", || {
        match apache.state_of(&alias).as_deref() {
            Some("proxied") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    apache.destroy_ok(&alias, BACKEND_A);
    apache.eventually("the watcher removing the route", || {
        waiting_answer(&apache, &alias)
    });
}

/// map routing: routes come and go with the routes table alone; Apache is
/// never reloaded, not even with websockets open.
fn map_mode_routes_change_without_any_reload(store: StoreKind) {
    let apache = Apache::start_on(store, Routing::Map);
    let a = Backend::start("alpha", BACKEND_A);
    let b = Backend::start("bravo", BACKEND_B);
    let parent = apache.parent_pid();
    let generations = apache.generations();
    let restarts = apache.restarts();

    let first = apache.getlink();
    apache.redeem_ok(&first, BACKEND_A, a.port());
    // Live the moment redeem answered.
    assert_eq!(apache.state_of(&first).as_deref(), Some("proxied"));
    from_backend(&apache, &first, &a, "/right-away?token=abc")
        .unwrap_or_else(|e| panic!("not live right after redeem: {e}\n{}", apache.error_log()));
    let mut ws_first = apache.client().connect(&apache.host(&first)).unwrap();
    let r = ws_first
        .websocket(
            &apache.host_port(&first),
            "/api/kernels/k/channels",
            JUPYTER_WS,
        )
        .unwrap();
    assert_eq!(r.status, 101, "{r}");

    // A second route while a websocket is open, then one right after the
    // other (two map writes within one second).
    let second = apache.getlink();
    apache.redeem_ok(&second, BACKEND_B, b.port());
    from_backend(&apache, &second, &b, "/right-away?token=abc")
        .unwrap_or_else(|e| panic!("not live right after redeem: {e}\n{}", apache.error_log()));
    let mut ws_second = apache.client().connect(&apache.host(&second)).unwrap();
    let r = ws_second
        .websocket(
            &apache.host_port(&second),
            "/api/events/subscribe",
            JUPYTER_WS,
        )
        .unwrap();
    assert_eq!(r.status, 101, "{r}");
    let third = apache.getlink();
    apache.redeem_ok(&third, BACKEND_A, a.port());
    from_backend(&apache, &third, &a, "/third")
        .unwrap_or_else(|e| panic!("not live right after redeem: {e}"));

    // Destroyed: gone on the next request.
    apache.destroy_ok(&third, BACKEND_A);
    waiting_answer(&apache, &third)
        .unwrap_or_else(|e| panic!("still routed right after destroy: {e}"));
    apache.destroy_ok(&first, BACKEND_A);
    waiting_answer(&apache, &first)
        .unwrap_or_else(|e| panic!("still routed right after destroy: {e}"));
    from_backend(&apache, &second, &b, "/untouched")
        .unwrap_or_else(|e| panic!("the remaining route broke: {e}"));

    // The websocket of the remaining session still works.
    ws_second.send_text("ping?").unwrap();
    assert_eq!(ws_second.recv_text().unwrap(), "ping?");
    drop(ws_first);

    // The same Apache generation throughout.
    assert_eq!(apache.parent_pid(), parent);
    assert_eq!(apache.generations(), generations, "{}", apache.error_log());
    assert_eq!(apache.restarts(), restarts, "{}", apache.error_log());

    // cron in map mode only expires and repairs: it does not reload either.
    apache.cron_ok();
    from_backend(&apache, &second, &b, "/after-cron")
        .unwrap_or_else(|e| panic!("cron broke the route: {e}"));
    assert_eq!(apache.parent_pid(), parent);
    assert_eq!(apache.generations(), generations, "{}", apache.error_log());
}

/// The routes table and the tokens never disagree: checked from the
/// database side, whatever killed whom.
fn routes_equal_the_database(apache: &Apache) -> Result<(), String> {
    let mut db = apache.sql();
    let mut count = |sql: &str| db.count(sql, &[]);
    let orphans = count(
        "SELECT count(*) FROM routes r LEFT JOIN proxy p ON p.alias = r.alias \
         WHERE p.alias IS NULL OR p.state <> 'proxied' \
         OR r.target <> p.dsthost || ':' || p.dstport",
    );
    let unrouted = count(
        "SELECT count(*) FROM proxy p LEFT JOIN routes r ON r.alias = p.alias \
         WHERE p.state = 'proxied' AND r.alias IS NULL",
    );
    if (orphans, unrouted) == (0, 0) {
        Ok(())
    } else {
        Err(format!(
            "{orphans} route(s) without their proxied token, {unrouted} proxied token(s) without a route"
        ))
    }
}

/// Runs the installed redeemtoken.cgi as Apache would, and kills it with
/// SIGKILL after `delay`: wherever it is, in or out of its transaction.
fn redeem_killed_after(apache: &Apache, token: &str, port: u16, delay: Duration) {
    let mut child = Command::new(apache.path("cgi/redeemtoken.cgi"))
        .env_clear()
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", "GET")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("QUERY_STRING", format!("token={token}&port={port}"))
        .env("REMOTE_ADDR", BACKEND_A)
        .env("SCRIPT_NAME", "/redeemtoken.cgi")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
}

/// map routing under load: while one session is used without pause,
/// others go live and away, and redeems are killed with SIGKILL at every
/// point of their run. Nothing is reloaded, the busy session never sees an
/// error, and the routes Apache reads always equal the database.
fn map_mode_routes_come_and_go_under_load_and_survive_kill_9_of_writers(store: StoreKind) {
    let apache = Apache::start_on(store, Routing::Map);
    let a = Backend::start("alpha", BACKEND_A);
    let busy = apache.getlink();
    apache.redeem_ok(&busy, BACKEND_A, a.port());
    let generations = apache.generations();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let client = apache.client();
        let host = apache.host_port(&busy);
        std::thread::spawn(move || {
            let (mut ok, mut failures) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(&host, "/busy") {
                    Ok(r) if r.status == 200 && r.header("X-Backend") == Some("alpha") => ok += 1,
                    Ok(r) => failures.push(r.to_string()),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (ok, failures)
        })
    };

    for round in 0..20u64 {
        let token = apache.getlink();
        apache.redeem_ok(&token, BACKEND_A, a.port());
        from_backend(&apache, &token, &a, "/live")
            .unwrap_or_else(|e| panic!("round {round}: not live after redeem: {e}"));
        apache.destroy_ok(&token, BACKEND_A);
        waiting_answer(&apache, &token)
            .unwrap_or_else(|e| panic!("round {round}: still routed after destroy: {e}"));

        let victim = apache.getlink();
        redeem_killed_after(
            &apache,
            &victim,
            a.port(),
            Duration::from_micros(round * 250),
        );
        routes_equal_the_database(&apache).unwrap_or_else(|e| panic!("round {round}: {e}"));
        // Routed exactly when its row says so.
        match apache.state_of(&victim).as_deref() {
            Some("proxied") => from_backend(&apache, &victim, &a, "/victim")
                .unwrap_or_else(|e| panic!("round {round}: proxied but not routed: {e}")),
            Some("pending") => waiting_answer(&apache, &victim)
                .map(|()| apache.get(&victim, "/"))
                .unwrap_or_else(|e| panic!("round {round}: pending but routed: {e}")),
            other => panic!("round {round}: victim in state {other:?}"),
        };
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failures) = load.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert!(ok > 0);
    assert_eq!(apache.generations(), generations, "{}", apache.error_log());
}

// How every kind of ending cuts open websockets, with the watcher started
// before or after, is tested in tests/endings.rs.

/// No enumeration through Apache: a routed host answers with its
/// application and an unrouted one with satellite's own answers (the
/// waiting page, or a 404 for /static/..., or an endpoint for /x.cgi), so
/// each of those answers a guess. With mod_qos, an address whose answers
/// for unrouted token hosts reach SATELLITE_WAITING_LIMIT within the
/// period is refused at connection level, the routed host and the
/// endpoints included, while other addresses are served.
#[test]
fn map_mode_an_address_guessing_hosts_is_refused_after_the_waiting_page_limit() {
    const GUESSER: &str = "127.0.0.6";
    let apache = Apache::start_defining(
        Routing::Map,
        &[
            ("SATELLITE_WAITING_LIMIT", "10"),
            ("SATELLITE_WAITING_PERIOD", "600"),
        ],
    );
    let backend = Backend::start("alpha", BACKEND_A);
    let routed = apache.getlink();
    apache.redeem_ok(&routed, BACKEND_A, backend.port());
    let guesser = apache.client().bind(GUESSER);
    // Some(status) for an answer, None for a refused connection.
    let ask = |alias: &str, path: &str| {
        guesser
            .get(&apache.host_port(alias), path)
            .ok()
            .map(|r| r.status)
    };
    assert_eq!(ask(&routed, "/"), Some(200));

    // Every path of an unrouted host counts, not only the waiting page.
    let paths = ["/", "/static/lab.js", "/api/contents", "/nothing.cgi"];
    let answers: Vec<Option<u16>> = (0..15)
        .map(|i| ask(&format!("guess-number-{i}-here"), paths[i % paths.len()]))
        .collect();
    // mod_qos refuses once the count reaches the limit.
    assert!(
        answers[..9].iter().all(Option::is_some),
        "{answers:?}\n{}",
        apache.error_log()
    );
    assert!(answers[10..].iter().all(Option::is_none), "{answers:?}");
    assert_eq!(ask(&routed, "/"), None);
    assert_eq!(ask("manage", "/getlink.cgi"), None);

    // Everyone else is served as before.
    from_backend(&apache, &routed, &backend, "/still-here").unwrap();
    // And `satellite check` sees the limit in place.
    let check = Command::new(support::apache::SATELLITE)
        .args(["check", "--config"])
        .arg(apache.config_file())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("OK   mod_qos is loaded: answers for unrouted token hosts are limited per client address\n"),
        "{report}"
    );
    assert!(
        report.contains("OK   Apache reads its routes from the database satellite writes"),
        "{report}"
    );
    assert_eq!(
        apache.get("another-guess-here", "/").status,
        200,
        "{}",
        apache.error_log()
    );
}

/// A `SATELLITE_DB` that names another file than `dbfile` (a typo, a
/// second install) would make every token host show the waiting page:
/// `satellite check` asks Apache which database it reads and says so.
#[test]
fn map_mode_check_fails_when_apache_reads_another_database() {
    let elsewhere = tempfile::tempdir().unwrap();
    let wrong = elsewhere.path().join("state.sqlite");
    let apache = Apache::start_defining(Routing::Map, &[("SATELLITE_DB", wrong.to_str().unwrap())]);
    let check = Command::new(support::apache::SATELLITE)
        .args(["check", "--config"])
        .arg(apache.config_file())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains(&format!(
            "FAIL Apache reads routes from {} but satellite writes {}",
            wrong.display(),
            apache.db_file().display()
        )),
        "{report}"
    );
    assert!(!check.status.success());
}

/// `satellite check` reports what Apache really does, not what the files
/// say: serve probed where Apache sends the endpoints (down, then up), the
/// certificate served on the TLS port, the port-80 redirect, and the
/// domain Apache was told compared with extbasename.
#[test]
fn check_probes_what_apache_really_does() {
    let apache = Apache::start_serving(Routing::Map);
    let check = || {
        let out = Command::new(support::apache::SATELLITE)
            .args(["check", "--config"])
            .arg(apache.config_file())
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.success(),
        )
    };
    let socket = apache.serve_socket();
    apache.write_config(&[("serve_socket", format!("\"{}\"", socket.display()))]);
    let (report, passed) = check();
    assert!(
        report.contains(&format!(
            "FAIL Apache sends the endpoints to serve at {}, but nothing answers there",
            socket.display()
        )),
        "{report}"
    );
    assert!(!passed);
    for line in [
        "OK   Apache's SATELLITE_DOMAIN and SATELLITE_DOMAIN_RE name extbasename (example.test)"
            .to_owned(),
        format!(
            "OK   Apache serves a certificate for *.example.test and example.test on 127.0.0.1:{}",
            apache.addr().port()
        ),
        format!(
            "OK   http://check-satellite.example.test/ on 127.0.0.1:{} redirects to https://check-satellite.example.test",
            apache.http_port
        ),
    ] {
        assert!(report.contains(&line), "{line}\n{report}");
    }

    let _serve = apache.run_serve();
    let (report, _) = check();
    assert!(
        report.contains(&format!(
            "OK   serve answers on {} (HTTP ",
            socket.display()
        )),
        "{report}"
    );

    let unescaped =
        Apache::start_defining(Routing::Map, &[("SATELLITE_DOMAIN_RE", "example.test")]);
    let out = Command::new(support::apache::SATELLITE)
        .args(["check", "--config"])
        .arg(unescaped.config_file())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(
            "FAIL Apache's SATELLITE_DOMAIN_RE is \"example.test\", not \"example\\\\.test\""
        ),
        "{report}"
    );
}

/// `satellite check --live` proves the site end to end through the real
/// Apache (getlink, the waiting page, a redeem to a temporary backend the
/// check starts, the proxied URL, destroy), and names what is broken: an
/// untrusted certificate (Apache reading routes from another database:
/// `check_live_names_apache_reading_another_database`).
fn check_live_proves_the_site_end_to_end_and_names_what_is_broken(store: StoreKind) {
    let apache = Apache::start_on(store, Routing::Map);
    // Its websocket step needs the watcher (tests/check_live.rs).
    let _watcher = apache.run_watcher();
    apache.await_watcher_saying("watching the database");
    let ca = apache.path("check-ca.pem");
    std::fs::write(&ca, &apache.ca_pem).unwrap();
    let report = apache.check_live(&["--cacert", ca.to_str().unwrap()]);
    for line in [
        "OK   live: getlink from 127.0.0.1 gave a token",
        "OK   live: https://",
        "OK   live: redeem from 127.0.0.1 to a temporary backend on port ",
        "reached the temporary backend at 127.0.0.1:",
        "OK   live: destroy: Success! Token destroyed.",
        "OK   live: after destroy, https://",
    ] {
        assert!(report.contains(line), "{line}\n{report}");
    }
    assert!(!report.contains("FAIL live"), "{report}");
    // Nothing left behind: the check's token is ended.
    let live_rows = apache.sql().count(
        "SELECT count(*) FROM proxy WHERE state IN ('pending', 'mapped', 'proxied')",
        &[],
    );
    assert_eq!(live_rows, 0);

    // Without the private CA: said, and the steps still run.
    let report = apache.check_live(&[]);
    assert!(
        report.contains(
            "FAIL live: the certificate Apache serves for manage.example.test is not trusted here"
        ),
        "{report}"
    );
    assert!(report.contains("OK   live: destroy: Success!"), "{report}");
}

/// Apache reading another database: the redeem succeeds, the URL does not
/// reach the backend, and the check says so.
// SQLite only: the other database is another file (SATELLITE_DB).
#[test]
fn check_live_names_apache_reading_another_database() {
    let elsewhere = tempfile::tempdir().unwrap();
    let wrong = elsewhere.path().join("state.sqlite");
    let misread =
        Apache::start_defining(Routing::Map, &[("SATELLITE_DB", wrong.to_str().unwrap())]);
    let ca = misread.path("check-ca.pem");
    std::fs::write(&ca, &misread.ca_pem).unwrap();
    let report = misread.check_live(&["--cacert", ca.to_str().unwrap()]);
    assert!(report.contains("without reaching the backend"), "{report}");
}

/// A load balancer's health check of one frontend, through Apache to
/// serve: 503 until this frontend's watcher has run, 200 while it beats,
/// 503 again once it has been silent for a minute.
fn healthz_answers_200_only_with_the_store_and_this_frontends_watcher_alive(store: StoreKind) {
    let apache = Apache::start_serving_on(store, Routing::Map);
    let _serve = apache.run_serve();
    let health = || {
        let r = apache
            .client()
            .get(&apache.host_port("manage"), "/healthz")
            .unwrap();
        (
            r.status,
            r.text(),
            r.header("Retry-After").map(str::to_owned),
        )
    };
    let (status, text, retry) = apache.eventually("serve answering", || {
        // Apache's own 502/503 (an HTML page) until serve listens.
        let answer = health();
        if answer.1.starts_with("unavailable:") || answer.1.starts_with("ok:") {
            Ok(answer)
        } else {
            Err(format!("serve not up yet: {}", answer.0))
        }
    });
    assert_eq!(status, 503, "{text}");
    assert!(text.starts_with("unavailable: no watcher named "), "{text}");
    assert_eq!(retry.as_deref(), Some("5"));

    let mut watcher = apache.cron_command();
    watcher.arg("--watch");
    let watcher = support::apache::Running(watcher.spawn().unwrap());
    let text = apache.eventually("the watcher's first beat", || match health() {
        (200, text, _) => Ok(text),
        (status, text, _) => Err(format!("{status} {text}")),
    });
    assert!(text.starts_with("ok: store answers, watcher "), "{text}");

    // Its watcher dead for a minute: the frontend says it cannot serve.
    drop(watcher);
    apache.sql().execute(
        "UPDATE watchers SET heartbeat = $1",
        &[&support::utc_text(-90)],
    );
    let (status, text, _) = health();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("silent for 9"), "{text}");
    // Not on a token's host: there it is the waiting page's path.
    let on_token_host = apache.get("some-token-host", "/healthz");
    assert!(!on_token_host.text().starts_with("ok:"));
}

/// Requests already read when mod_qos's limit is reached (several at once,
/// on open connections) are refused with 429, never mod_qos's default 500
/// (seen under a flood from one address before `QS_ErrorResponseCode`).
/// The endpoints' answers close their HTTP/1.1 connection, through serve
/// and as CGI, on the management host and on a token's host (the waiting
/// page's poll): a websocket tunnel holds a worker of its Apache child for
/// its life, and a connection kept alive in a child whose every worker
/// became a tunnel got no answer to its next request (the PostgreSQL soak
/// saw two polls wait 30 s at its start, when it opens its websockets).
/// A routed session's own requests and the static pages stay kept alive.
#[test]
fn endpoint_answers_close_their_connection_and_sessions_stay_kept_alive() {
    for serving in [false, true] {
        let apache = if serving {
            Apache::start_serving(Routing::Map)
        } else {
            Apache::start(Routing::Map)
        };
        let _serve = serving.then(|| apache.run_serve());
        let how = if serving { "serve" } else { "CGI" };
        let backend = Backend::start("alpha", BACKEND_A);
        let pending = apache.getlink();
        let routed = apache.getlink();
        apache.redeem_ok(&routed, BACKEND_A, backend.port());

        let client = apache.client();
        let ask = |alias: &str, path: &str| {
            let mut conn = client.connect(&apache.host(alias)).unwrap();
            conn.get(&apache.host_port(alias), path).unwrap()
        };
        for (alias, path) in [
            ("manage", format!("/tokenjobstate.cgi?token={pending}")),
            (
                pending.as_str(),
                format!("/tokenjobstate.cgi?token={pending}"),
            ),
            ("manage", "/getlink.cgi".to_owned()),
            ("manage", format!("/linktoken.cgi?token={pending}&jobid=77")),
        ] {
            let r = ask(alias, &path);
            assert_eq!(r.status, 200, "{how}: {alias} {path}: {r}");
            assert!(
                r.closes_connection(),
                "{how}: {alias} {path} kept alive: {r}"
            );
        }
        // A session's requests, endpoint-like paths included, are the
        // application's: kept alive as the application and Apache agree.
        for path in ["/lab", "/tokenjobstate.cgi"] {
            let r = ask(&routed, path);
            assert_eq!(r.header("X-Backend"), Some("alpha"), "{how}: {path}: {r}");
            assert!(
                !r.closes_connection(),
                "{how}: the session's {path} closed: {r}"
            );
        }
        let waiting = ask(&pending, "/");
        assert_eq!(waiting.status, 200, "{how}: {waiting}");
        assert!(
            !waiting.closes_connection(),
            "{how}: the waiting page closed: {waiting}"
        );
    }
}

#[test]
fn map_mode_a_flood_of_guesses_is_refused_with_429_never_500() {
    let apache = Apache::start_defining(
        Routing::Map,
        &[
            ("SATELLITE_WAITING_LIMIT", "10"),
            ("SATELLITE_WAITING_PERIOD", "600"),
        ],
    );
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|worker| {
                let apache = &apache;
                scope.spawn(move || {
                    let mut seen = Vec::new();
                    let Ok(mut conn) = apache.client().connect(&apache.host("first-guess-here"))
                    else {
                        return seen;
                    };
                    for n in 0..20 {
                        let host = apache.host_port(&format!("guess-{worker}-{n}-here"));
                        match conn.get(&host, "/") {
                            Ok(r) => seen.push(r.status),
                            // Refused at connection level: the documented refusal.
                            Err(_) => break,
                        }
                    }
                    seen
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}\n{}",
        apache.error_log()
    );
    assert!(
        statuses.iter().filter(|s| **s == 200).count() <= 10,
        "{statuses:?}"
    );
}

on_both_stores!(
    map_mode_proxying,
    vhost_mode_proxying,
    map_mode_retry_page_until_the_backend_listens,
    vhost_mode_retry_page_until_the_backend_listens,
    vhost_mode_failed_config_test_keeps_the_previous_routes,
    vhost_mode_cron_lock_and_missing_file,
    vhost_mode_cron_watch_publishes_without_a_manual_run,
    map_mode_routes_change_without_any_reload,
    map_mode_routes_come_and_go_under_load_and_survive_kill_9_of_writers,
    check_live_proves_the_site_end_to_end_and_names_what_is_broken,
    healthz_answers_200_only_with_the_store_and_this_frontends_watcher_alive,
);
