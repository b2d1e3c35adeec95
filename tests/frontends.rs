//! Issue 16: several Apache frontends on one PostgreSQL. Each frontend is
//! a private Apache with the shipped `httpd-conf/`, its CGI programs on
//! the shared database (`database_url`) and its map lookup reading the
//! same `routes` through APR's pgsql driver; the database is a private
//! PostgreSQL cluster the harness starts on a Unix socket.

mod support;

use std::time::{Duration, Instant};

use satellite_core::store::pg_harness;
use satellite_core::store::PgStore;
use support::apache::{Apache, Running};
use support::backend::Backend;

const JUPYTER_WS: &str = "v1.kernel.websocket.jupyter.org";

/// A database with satellite's schema, and its connection string.
fn shared_database() -> String {
    let url = pg_harness::new_database();
    PgStore::open_or_create(&url, Duration::from_secs(5)).expect("creating the schema");
    url
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
    let b = Apache::start_on_postgres(&url, false);
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
    let a = Apache::start_on_postgres(&url, false);
    let b = Apache::start_on_postgres(&url, false);
    let watcher = |apache: &Apache, name: &str| {
        apache.write_config(&[("watcher_name", format!("{name:?}"))]);
        let mut cmd = apache.cron_command();
        cmd.arg("--watch")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        Running(cmd.spawn().expect("starting cron --watch"))
    };
    let _watch_a = watcher(&a, "frontend-a");
    let _watch_b = watcher(&b, "frontend-b");
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
    let a = Apache::start_on_postgres(&url, false);
    let b = Apache::start_on_postgres(&url, false);
    let watch = |apache: &Apache, name: &str| {
        apache.write_config(&[("watcher_name", format!("{name:?}"))]);
        let log = apache.path("watcher.log");
        let mut cmd = apache.cron_command();
        cmd.arg("--watch")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null());
        (Running(cmd.spawn().expect("starting cron --watch")), log)
    };
    let said = |log: &std::path::Path, what: &str| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(what)
    };
    let (mut leader, a_log) = watch(&a, "frontend-a");
    a.eventually("A leading", || {
        said(&a_log, "leading: this watcher expires tokens")
            .then_some(())
            .ok_or("not yet".to_owned())
    });
    let (_follower, b_log) = watch(&b, "frontend-b");
    b.eventually("B following", || {
        said(&b_log, "another frontend's watcher expires tokens")
            .then_some(())
            .ok_or("not yet".to_owned())
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = leader.0.wait();
    let killed = Instant::now();
    b.eventually("B leading", || {
        said(&b_log, "leading: this watcher expires tokens")
            .then_some(())
            .ok_or("not yet".to_owned())
    });
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
