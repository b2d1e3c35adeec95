//! Issue 16: PostgreSQL restarted (fast mode) under load. Every answer
//! during the outage is a refusal that says when to come back (503 with
//! `Retry-After`, or Apache's 502/503 for a backend it could not reach), never
//! a `Success!` without a commit nor the waiting page for a live session;
//! nothing committed is lost; afterwards every route is live again and
//! every endpoint works: the frontend's watcher sees the server's new run
//! and restarts Apache gracefully, whose kept lookup connections had lost
//! their prepared statements (APR's pgsql driver never prepares them
//! again: without the watcher, every route stayed 503). In a binary of
//! its own: the test cluster is shared by one binary's tests.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use satellite_core::store::pg_harness;
use satellite_core::store::PgStore;
use support::apache::Apache;
use support::backend::Backend;

#[test]
fn a_postgresql_restart_under_load_loses_nothing_and_lies_about_nothing() {
    let url = pg_harness::new_database();
    PgStore::open_or_create(&url, Duration::from_secs(5)).expect("creating the schema");
    let apache = Arc::new(Apache::start_on_postgres(&url, false));
    // The frontend's watcher, as it runs in production: it restarts Apache
    // gracefully when the database server restarted.
    let _watcher = apache.run_watcher();
    let node = Arc::new(Backend::start("node", "127.0.0.3"));
    let live: Vec<String> = (0..5)
        .map(|_| {
            let alias = apache.getlink();
            apache.redeem_ok(&alias, &node.ip(), node.port());
            alias
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(Mutex::new(Vec::<String>::new()));
    let issued = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    // getlink: a token answered is a token committed.
    {
        let (apache, stop, refused, answered, wrong, issued) = (
            apache.clone(),
            stop.clone(),
            refused.clone(),
            answered.clone(),
            wrong.clone(),
            issued.clone(),
        );
        load.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = apache
                    .client()
                    .get(&apache.host_port("manage"), "/getlink.cgi");
                match r {
                    Ok(r) if r.status == 200 => {
                        let text = r.text();
                        match text.strip_prefix("Your token is \n") {
                            Some(token) => issued.lock().unwrap().push(token.trim().to_owned()),
                            None => wrong.lock().unwrap().push(format!("getlink 200: {text:?}")),
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) if r.status == 503 && r.header("Retry-After").is_some() => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => wrong.lock().unwrap().push(format!("getlink: {r}")),
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // The live sessions' URLs: the backend, or a 503 to retry; never the
    // waiting page, which would tell their users they are not there.
    {
        let (apache, node, stop, refused, answered, wrong, live) = (
            apache.clone(),
            node.clone(),
            stop.clone(),
            refused.clone(),
            answered.clone(),
            wrong.clone(),
            live.clone(),
        );
        load.push(thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let alias = &live[i % live.len()];
                match apache.client().get(&apache.host_port(alias), "/lab") {
                    Ok(r)
                        if r.status == 200 && r.header("X-Backend") == Some(node.name.as_str()) =>
                    {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) if r.status == 503 && r.header("Retry-After").is_some() => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => wrong.lock().unwrap().push(format!(
                        "{alias}: {} {:?}",
                        r.status,
                        r.text().chars().take(80).collect::<String>()
                    )),
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    thread::sleep(Duration::from_secs(2));
    pg_harness::cluster()
        .restart_fast()
        .expect("restarting PostgreSQL");
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        thread.join().unwrap();
    }

    // Everything recovered by itself: every live route through Apache,
    // several times in a row (each kept mod_dbd connection finds its
    // connection broken once), and a new session end to end.
    for alias in &live {
        apache.eventually_in_a_row("the route after the restart", || {
            let r = apache
                .client()
                .get(&apache.host_port(alias), "/lab")
                .map_err(|e| e.to_string())?;
            if r.status == 200 && r.header("X-Backend") == Some(node.name.as_str()) {
                Ok(())
            } else {
                Err(format!("{} for {alias}", r.status))
            }
        });
    }
    let alias = apache.getlink();
    apache.redeem_ok(&alias, &node.ip(), node.port());
    let said = apache.watcher_said();
    assert!(
        said.contains("the database server restarted (or failed over)"),
        "the watcher said:\n{said}"
    );

    let wrong = wrong.lock().unwrap();
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
    let store = PgStore::open(&url, Duration::from_secs(5)).unwrap();
    let issued = issued.lock().unwrap();
    for token in issued.iter() {
        assert!(
            satellite_core::Store::find_token(&store, token)
                .unwrap()
                .is_some(),
            "{token} was answered but is not in the database"
        );
    }
    println!(
        "PostgreSQL restarted under load: {} answers, {} refusals (503 with Retry-After, or a connection Apache closed), 0 wrong, {} tokens issued, 0 lost",
        answered.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        issued.len()
    );
}
