//! Issue 16: several Apache frontends on one PostgreSQL. Each frontend is
//! a private Apache with the shipped `httpd-conf/`, its CGI programs on
//! the shared database (`database_url`) and its map lookup reading the
//! same `routes` through APR's pgsql driver; the database is a private
//! PostgreSQL cluster the harness starts on a Unix socket.

mod support;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use satellite_core::store::pg_harness;
use satellite_core::store::PgStore;
use support::apache::Apache;
use support::backend::Backend;
use support::client::Response;

/// Frontend B's address: frontends of one site are different hosts.
const SECOND_FRONTEND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const JUPYTER_WS: &str = "v1.kernel.websocket.jupyter.org";

/// A database with satellite's schema, and its connection string.
fn shared_database() -> String {
    let url = pg_harness::new_database();
    PgStore::open_or_create(&url, Duration::from_secs(5)).expect("creating the schema");
    url
}

/// What a watcher says when it leads the site's once-only work, and when
/// another frontend's does.
const LEADING: &str = "leading: this watcher expires tokens";
const FOLLOWING: &str = "another frontend's watcher expires tokens";

/// A frontend on `url` at `ip` whose watcher and health check go by `name`.
fn named_frontend(url: &str, serving: bool, ip: Ipv4Addr, name: &str) -> Apache {
    Apache::start_frontend(url, serving, ip, &[("watcher_name", format!("{name:?}"))])
}

fn reaches(apache: &Apache, alias: &str, backend: &Backend) -> bool {
    let r = apache.get(alias, "/lab");
    r.status == 200 && r.header("X-Backend") == Some(backend.name.as_str())
}

/// getlink on frontend A, redeem on B: the route is live on both the
/// moment redeem answers, with no reload and no sync step; a destroy on
/// A ends it on both.
#[test]
fn a_session_made_through_one_frontend_is_live_on_every_frontend_at_once() {
    let url = shared_database();
    let a = Apache::start_on_postgres(&url, false);
    let b = Apache::start_on_postgres_at(&url, false, SECOND_FRONTEND);
    let node = Backend::start("node", "127.0.0.3");

    let alias = a.getlink();
    b.redeem_ok(&alias, &node.ip(), node.port());
    assert!(reaches(&a, &alias, &node), "frontend A does not route it");
    assert!(reaches(&b, &alias, &node), "frontend B does not route it");

    a.destroy_ok(&alias, &node.ip());
    for frontend in [&a, &b] {
        let r = frontend.get(&alias, "/lab");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("X-Backend"), None, "still routed after destroy");
    }
}

/// A websocket opened through frontend A is cut within 2 s of a destroy
/// made through frontend B: each frontend's watcher reads the shared
/// record of ended routes and cuts its own Apache's tunnels.
#[test]
fn a_websocket_through_one_frontend_is_cut_when_the_session_ends_through_another() {
    let url = shared_database();
    let a = named_frontend(&url, false, Ipv4Addr::LOCALHOST, "frontend-a");
    let b = named_frontend(&url, false, SECOND_FRONTEND, "frontend-b");
    let _watch_a = a.run_watcher();
    let _watch_b = b.run_watcher();
    let node = Backend::start("node", "127.0.0.3");
    let alias = a.getlink();
    a.redeem_ok(&alias, &node.ip(), node.port());

    // Both watchers have registered before the session ends (else the
    // ending could precede a watcher's first cursor).
    a.eventually("both watchers registered", || {
        let store = PgStore::open(&url, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let names: Vec<String> = satellite_core::Store::watchers(&store)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|w| w.name)
            .collect();
        if names.len() == 2 {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    });

    let mut ws = a.client().connect(&a.host(&alias)).unwrap();
    let opened = ws
        .websocket(&a.host_port(&alias), "/api/kernels/k/channels", JUPYTER_WS)
        .unwrap();
    assert_eq!(opened.status, 101, "{opened}");
    ws.send_text("through A").unwrap();
    assert_eq!(ws.recv_text().unwrap(), "through A");
    ws.set_read_timeout(Duration::from_secs(5)).unwrap();

    let destroyed = Instant::now();
    b.destroy_ok(&alias, &node.ip());
    let outcome = ws.recv_text();
    let cut = destroyed.elapsed();
    let err = outcome.expect_err("the websocket through A answered after the destroy on B");
    assert!(
        !matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the websocket through A is still open {cut:?} after the destroy on B"
    );
    println!("websocket through A cut {cut:?} after the destroy through B");
    assert!(
        cut < Duration::from_secs(2),
        "cut after {cut:?}, not within 2 s"
    );
}

/// `satellite check` on a PostgreSQL frontend: the store's schema, Apache's
/// pgsql driver and that Apache's SATELLITE_DBD_PARAMS name the database
/// satellite writes.
#[test]
fn check_says_whether_apache_reads_the_database_satellite_writes() {
    let url = shared_database();
    let a = Apache::start_on_postgres(&url, false);
    let check = |apache: &Apache| {
        let out = std::process::Command::new(support::apache::SATELLITE)
            .args(["check", "--config"])
            .arg(apache.config_file())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let report = check(&a);
    for line in [
        "OK   APR's PostgreSQL driver for mod_dbd: ",
        "OK   Apache reads its routes from the PostgreSQL database satellite writes",
    ] {
        assert!(report.contains(line), "{line}\n{report}");
    }
    // Apache left on its SQLite default while satellite writes PostgreSQL.
    let sqlite_apache = Apache::start(support::apache::Routing::Map);
    sqlite_apache.write_config(&[("database_url", format!("{url:?}"))]);
    let report = check(&sqlite_apache);
    assert!(
        report.contains(
            "FAIL satellite uses PostgreSQL (database_url) but Apache reads routes with the sqlite3 driver"
        ),
        "{report}"
    );
}

/// Expiry and the repair pass run on one frontend at a time: the first
/// watcher leads, the other only cuts its own Apache's tunnels; when the
/// leading frontend's watcher is killed (-9), the other takes over at its
/// next step, and expires what is due.
#[test]
fn the_once_only_work_moves_to_another_frontend_when_its_leader_dies() {
    let url = shared_database();
    let a = named_frontend(&url, false, Ipv4Addr::LOCALHOST, "frontend-a");
    let b = named_frontend(&url, false, SECOND_FRONTEND, "frontend-b");
    let mut leader = a.run_watcher();
    a.await_watcher_saying(LEADING);
    let _follower = b.run_watcher();
    b.await_watcher_saying(FOLLOWING);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = leader.0.wait();
    let killed = Instant::now();
    b.await_watcher_saying(LEADING);
    let took = killed.elapsed();
    println!("the other frontend led {took:?} after the leader was killed");

    // A token past its TTL is expired by B now.
    let alias = b.getlink();
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    db.execute(
        "UPDATE proxy SET modified = '2000-01-01 00:00:00' WHERE alias = $1",
        &[&alias],
    )
    .unwrap();
    b.eventually("B expiring the old token", || {
        let left: i64 = db
            .query_one("SELECT count(*) FROM proxy WHERE alias = $1", &[&alias])
            .map_err(|e| e.to_string())?
            .get(0);
        if left == 0 {
            Ok(())
        } else {
            Err("still there".to_owned())
        }
    });
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} to take the lead over"
    );
}

/// `satellite migrate --to URL` moves a site from its SQLite file into an
/// empty PostgreSQL database: tokens in every state (pending, linked,
/// proxied, tombstones of a destroy and of a job end), job states and
/// their details, routes and the ending counters, with the counts
/// verified; the file is left untouched, a second move is refused, and a
/// frontend on the new database serves the moved session.
#[test]
fn migrate_to_moves_a_sqlite_site_into_postgresql() {
    let site = support::Site::with_config(
        "tgtipmask = [\"127.0.0.0/8\", \"10.21.0.0/16\"]\njobstateipmask = [\"127.0.0.1/32\"]",
    );
    let node = Backend::start("node", "127.0.0.3");
    let pending = site.new_token();
    let linked = site.new_token();
    let answer = site
        .cgi("linktoken")
        .remote(support::LOGIN_NODE)
        .query(format!("token={linked}&jobid=4242"))
        .run();
    assert_eq!(answer.status, 200, "{answer:?}");
    let proxied = site.redeemed_token("127.0.0.3", node.port());
    let destroyed = site.redeemed_token("127.0.0.3", 40001);
    let answer = site
        .cgi("destroytoken")
        .remote("127.0.0.3")
        .query(format!("token={destroyed}"))
        .run();
    assert_eq!(answer.status, 200, "{answer:?}");
    let job_ended = site.new_token();
    let answer = site
        .cgi("linktoken")
        .remote(support::LOGIN_NODE)
        .query(format!("token={job_ended}&jobid=4243"))
        .run();
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = site
        .cgi("update-jobs")
        .remote("127.0.0.1")
        .post("jobstates=\n4242 RUNNING\n4243 TIMEOUT\n")
        .run();
    assert_eq!(answer.status, 200, "{answer:?}");
    let states = |t: &str| site.state_of(t);
    assert_eq!(states(&destroyed).as_deref(), Some("ended"));
    assert_eq!(states(&job_ended).as_deref(), Some("ended"));
    let before = std::fs::read(&site.db).unwrap();

    let url = pg_harness::new_database();
    let migrate = |url: &str| {
        std::process::Command::new(program_path())
            .args(["migrate", "--config"])
            .arg(&site.config)
            .args(["--to", url])
            .output()
            .unwrap()
    };
    let out = migrate(&url);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("moved into") && said.contains("5 tokens, 2 job states"),
        "{said}"
    );
    assert_eq!(
        std::fs::read(&site.db).unwrap(),
        before,
        "the SQLite file changed"
    );

    let store = PgStore::open(&url, Duration::from_secs(5)).unwrap();
    for (alias, state) in [
        (&pending, "pending"),
        (&linked, "pending"),
        (&proxied, "proxied"),
        (&destroyed, "ended"),
        (&job_ended, "ended"),
    ] {
        let row = satellite_core::Store::find_token(&store, alias)
            .unwrap()
            .unwrap_or_else(|| panic!("{alias} not moved"));
        assert_eq!(row.state, state, "{alias}");
    }
    let linked_row = satellite_core::Store::find_token(&store, &linked)
        .unwrap()
        .unwrap();
    assert_eq!(linked_row.jobid.as_deref(), Some("4242"));

    // Into a database that already holds a site: refused, nothing written.
    let again = migrate(&url);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds 5 token(s)"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // A frontend on the new database routes the moved session.
    let frontend = Apache::start_on_postgres(&url, false);
    assert!(reaches(&frontend, &proxied, &node));
}

fn program_path() -> &'static str {
    support::apache::SATELLITE
}

/// A Perl-era file (the original's schema, nothing of satellite's) moves
/// too: the copy is brought to the current schema, the file is untouched.
#[test]
fn migrate_to_moves_a_perl_era_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite");
    support::write_perl_era_database(&db);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "insert into jobstates (jobid, state, lastseen) values ('77', 'R', '2026-12-01 10:00:00')",
        [],
    )
    .unwrap();
    drop(conn);
    let before = std::fs::read(&db).unwrap();
    let url = pg_harness::new_database();
    let out = std::process::Command::new(program_path())
        .args(["migrate", "--db"])
        .arg(&db)
        .args(["--to", &url])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("3 tokens, 1 job states"), "{said}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "the Perl-era file changed"
    );
    let store = PgStore::open(&url, Duration::from_secs(5)).unwrap();
    let row = satellite_core::Store::find_token(&store, "zen-yak-bat")
        .unwrap()
        .unwrap();
    assert_eq!((row.state.as_str(), row.dstport), ("proxied", Some(50123)));
}

/// What the clients were told of one token: the state it must be in, or
/// either of two when the request that would move it was cut off unanswered
/// (frontend A killed under it).
#[derive(Clone, Copy, Debug)]
struct Told {
    state: &'static str,
    or_else: Option<&'static str>,
}

type Ledger = Arc<Mutex<HashMap<String, Told>>>;

/// One frontend's load: session cycles (getlink, redeem, GET through the
/// new route, destroy) and GETs of the long-lived sessions, every answer
/// checked. A refused or cut connection counts as `lost_connections`, a
/// wrong answer is kept in `wrong`; what the clients were told goes into
/// the ledger.
struct Load {
    answered: AtomicU64,
    lost_connections: AtomicU64,
    wrong: Mutex<Vec<String>>,
}

impl Load {
    fn new() -> Arc<Load> {
        Arc::new(Load {
            answered: AtomicU64::new(0),
            lost_connections: AtomicU64::new(0),
            wrong: Mutex::new(Vec::new()),
        })
    }

    /// `Some(answer)` when the frontend answered; a lost connection is
    /// counted and gives `None`.
    fn ask(&self, apache: &Apache, from: &str, host: &str, target: &str) -> Option<Response> {
        match apache.client().bind(from).get(host, target) {
            Ok(answer) => {
                self.answered.fetch_add(1, Ordering::Relaxed);
                Some(answer)
            }
            Err(_) => {
                self.lost_connections.fetch_add(1, Ordering::Relaxed);
                // A client retries, but not in a busy loop.
                thread::sleep(Duration::from_millis(20));
                None
            }
        }
    }

    fn wrong(&self, what: String) {
        self.wrong.lock().unwrap().push(what);
    }

    /// One session through `apache`, start to end; stops at the first
    /// request left unanswered.
    fn cycle(&self, apache: &Apache, ledger: &Ledger, node: &Backend) {
        let manage = apache.host_port("manage");
        let record = |alias: &str, state, or_else| {
            ledger
                .lock()
                .unwrap()
                .insert(alias.to_owned(), Told { state, or_else });
        };
        let Some(r) = self.ask(apache, "127.0.0.1", &manage, "/getlink.cgi") else {
            return;
        };
        let Some(alias) = r
            .text()
            .strip_prefix("Your token is \n")
            .map(|rest| rest.trim().to_owned())
            .filter(|_| r.status == 200)
        else {
            return self.wrong(format!("getlink: {r}"));
        };
        record(&alias, "pending", Some("proxied"));
        let redeem = format!("/redeemtoken.cgi?token={alias}&port={}", node.port());
        let Some(r) = self.ask(apache, &node.ip(), &manage, &redeem) else {
            return;
        };
        if (r.status, r.text().as_str()) != (200, "Success!\n") {
            return self.wrong(format!("redeem {alias}: {r}"));
        }
        record(&alias, "proxied", None);

        let Some(r) = self.ask(apache, "127.0.0.1", &apache.host_port(&alias), "/lab") else {
            return;
        };
        if r.status != 200 || r.header("X-Backend") != Some(node.name.as_str()) {
            return self.wrong(format!("first GET of {alias}: {r}"));
        }

        record(&alias, "proxied", Some("ended"));
        let destroy = format!("/destroytoken.cgi?token={alias}");
        let Some(r) = self.ask(apache, &node.ip(), &manage, &destroy) else {
            return;
        };
        if (r.status, r.text().as_str()) != (200, "Success! Token destroyed.\n") {
            return self.wrong(format!("destroy {alias}: {r}"));
        }
        record(&alias, "ended", None);
    }

    /// A GET of a long-lived session: its backend, nothing else.
    fn visit(&self, apache: &Apache, alias: &str, node: &Backend) {
        if let Some(r) = self.ask(apache, "127.0.0.1", &apache.host_port(alias), "/lab") {
            if r.status != 200 || r.header("X-Backend") != Some(node.name.as_str()) {
                self.wrong(format!("{alias}: {r}"));
            }
        }
    }

    /// The load balancer's health check.
    fn health(&self, apache: &Apache) {
        if let Some(r) = self.ask(apache, "127.0.0.1", &apache.host_port("manage"), "/healthz") {
            if r.status != 200 {
                self.wrong(format!("/healthz: {r}"));
            }
        }
    }
}

fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// kill -9 of frontend A's Apache (parent and children), its serve and
/// its watcher (the leader) under load: frontend B, on another address,
/// answers every request right throughout, health check included; expiry
/// moves to B; and every token is in the state its clients were told,
/// with its route present exactly when it is proxied: 0 lost, 0
/// half-written.
#[test]
fn when_one_frontend_is_killed_under_load_the_other_serves_every_session_and_loses_nothing() {
    let url = shared_database();
    let a = Arc::new(named_frontend(
        &url,
        true,
        Ipv4Addr::LOCALHOST,
        "frontend-a",
    ));
    let b = Arc::new(named_frontend(&url, true, SECOND_FRONTEND, "frontend-b"));
    let mut serve_a = a.run_serve();
    let _serve_b = b.run_serve();
    let mut watcher_a = a.run_watcher();
    a.await_watcher_saying(LEADING);
    let _watcher_b = b.run_watcher();
    b.await_watcher_saying(FOLLOWING);
    let node = Arc::new(Backend::start("node", "127.0.0.3"));
    // Long-lived sessions, made half through each frontend.
    let live: Arc<Vec<String>> = Arc::new(
        (0..6)
            .map(|i| {
                let (issuer, redeemer) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                let alias = issuer.getlink();
                redeemer.redeem_ok(&alias, &node.ip(), node.port());
                alias
            })
            .collect(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Ledger = Arc::new(Mutex::new(HashMap::new()));
    let (load_a, load_b) = (Load::new(), Load::new());
    let mut threads = Vec::new();
    for (apache, load, cycle_ip) in [(&a, &load_a, "127.0.0.4"), (&b, &load_b, "127.0.0.5")] {
        for kind in ["cycles", "visits", "health"] {
            let (apache, load, ledger, node, live, stop) = (
                apache.clone(),
                load.clone(),
                ledger.clone(),
                node.clone(),
                live.clone(),
                stop.clone(),
            );
            threads.push(thread::spawn(move || {
                // Each new session of this thread on the ip:port the
                // previous one's destroy has just freed.
                let cycle_node = Backend::start("cycles", cycle_ip);
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_add(1);
                    match kind {
                        "cycles" => load.cycle(&apache, &ledger, &cycle_node),
                        "visits" => load.visit(&apache, &live[n % live.len()], &node),
                        _ => {
                            load.health(&apache);
                            thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            }));
        }
    }

    thread::sleep(Duration::from_secs(3));
    let apache_a = std::iter::once(a.parent_pid() as u32)
        .chain(a.children().into_iter().map(|pid| pid as u32));
    for pid in apache_a
        .chain([serve_a.0.id(), watcher_a.0.id()])
        .collect::<Vec<_>>()
    {
        kill9(pid);
    }
    let _ = serve_a.0.wait();
    let _ = watcher_a.0.wait();
    let killed = Instant::now();
    let answered_by_a = load_a.answered.load(Ordering::Relaxed);
    b.await_watcher_saying(LEADING);
    let took_over = killed.elapsed();
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }

    let wrong_a = load_a.wrong.lock().unwrap();
    assert!(
        wrong_a.is_empty(),
        "frontend A answered wrong:\n{}",
        wrong_a.join("\n")
    );
    let wrong_b = load_b.wrong.lock().unwrap();
    assert!(
        wrong_b.is_empty(),
        "frontend B answered wrong:\n{}",
        wrong_b.join("\n")
    );
    assert_eq!(
        load_b.lost_connections.load(Ordering::Relaxed),
        0,
        "frontend B refused or dropped connections"
    );
    assert!(
        // At most one answer per load thread already on its way.
        load_a.answered.load(Ordering::Relaxed) <= answered_by_a + 3,
        "frontend A still answered after kill -9"
    );

    // Every token is where its clients were told it is, its route with it.
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let ledger = ledger.lock().unwrap();
    for (alias, told) in ledger.iter() {
        let row = db
            .query_opt(
                "SELECT p.state, r.target FROM proxy p LEFT JOIN routes r USING (alias) WHERE p.alias = $1",
                &[alias],
            )
            .unwrap();
        let (state, route): (String, Option<String>) = match row {
            Some(row) => (row.get(0), row.get(1)),
            None => panic!("{alias} was answered to a client but is not in the database"),
        };
        assert!(
            state == told.state || Some(state.as_str()) == told.or_else,
            "{alias} is {state}, its clients were told {told:?}"
        );
        assert_eq!(
            route.is_some(),
            state == "proxied",
            "{alias} is {state} with route {route:?}"
        );
    }
    for alias in live.iter() {
        assert!(reaches(&b, alias, &node), "{alias} not routed by B");
    }

    // Expiry is B's now: a token past its TTL goes.
    let old = b.getlink();
    db.execute(
        "UPDATE proxy SET modified = '2000-01-01 00:00:00' WHERE alias = $1",
        &[&old],
    )
    .unwrap();
    b.eventually("B expiring the old token", || {
        let left: i64 = db
            .query_one("SELECT count(*) FROM proxy WHERE alias = $1", &[&old])
            .map_err(|e| e.to_string())?
            .get(0);
        (left == 0).then_some(()).ok_or("still there".to_owned())
    });
    println!(
        "frontend A killed (-9) under load: B answered {} requests right, 0 refused; A answered {} before and {} connections went unanswered after; B led {took_over:?} after; {} tokens checked, 0 lost",
        load_b.answered.load(Ordering::Relaxed),
        answered_by_a,
        load_a.lost_connections.load(Ordering::Relaxed),
        ledger.len()
    );
}

/// One of Apache's kept lookup connections cut alone (an admin's
/// `pg_terminate_backend`, a firewall's idle timeout), the server and the
/// watcher's own connection untouched: APR's pgsql driver reconnects it
/// without its prepared lookup, so every lookup on it fails. Apache logs
/// each failed lookup (satellite_lookup_failures.log); the watcher sees
/// the log grow while the database answers and restarts Apache
/// gracefully: the route is live again without anyone's hand.
#[test]
fn a_lookup_connection_cut_alone_heals_by_itself() {
    let url = shared_database();
    let apache = Apache::start_on_postgres(&url, false);
    let _watcher = apache.run_watcher();
    let node = Backend::start("node", "127.0.0.3");
    let alias = apache.getlink();
    apache.redeem_ok(&alias, &node.ip(), node.port());
    let reaches = || {
        apache
            .client()
            .get(&apache.host_port(&alias), "/lab")
            .is_ok_and(|r| r.status == 200 && r.header("X-Backend") == Some(node.name.as_str()))
    };
    for _ in 0..20 {
        assert!(reaches(), "the route before the cut");
    }

    // Apache's connections are the ones that do not call themselves
    // satellite (the programs and the watcher do).
    let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let cut: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND application_name <> 'satellite' AND backend_type = 'client backend') AS cut",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(cut > 0, "no connection of Apache's to cut");

    // Healed is every lookup working, whichever child and connection
    // answers: a hundred answers in a row.
    let cut_at = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 100 {
        assert!(
            cut_at.elapsed() < support::apache::DEADLINE,
            "the route is still not live on every connection"
        );
        in_a_row = if reaches() { in_a_row + 1 } else { 0 };
    }
    let healed = cut_at.elapsed();
    let said = apache.watcher_said();
    assert!(
        said.contains("Apache's route lookups failed while the database answers"),
        "the watcher said:\n{said}"
    );
    println!(
        "{cut} lookup connection(s) of Apache cut alone: every lookup works again {healed:?} after"
    );
}
