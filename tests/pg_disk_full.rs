//! Issue 18 on PostgreSQL: the database server's disk full for a while.
//! A private cluster (not the shared one: its disk is filled) keeps its
//! data directory on a small tmpfs; once the site has tokens, a filler
//! takes every free byte (and every byte a checkpoint frees afterwards).
//! Every write then answers either a success that is committed (a
//! relation page or WAL segment with room left) or a clear refusal: 503,
//! `Retry-After` and an `Oops!`; never `Success!` without a commit, never
//! a 500. Reads that write nothing answer as before while the server is
//! up. Nothing committed is lost; when the space is back, writes work
//! again and every proxied token has its route. Root only: it mounts a
//! tmpfs, as the SQLite test of the same fault does.

mod support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use satellite_core::store::pg_harness::Cluster;
use support::{Answer, Site, COMPUTE_NODE, LOGIN_NODE};

/// The tmpfs: initdb's files (about 28 MB with 1 MB WAL segments), the
/// site's database (a copy of template1, about 8 MB) and some room.
const DISK_SIZE: &str = "size=48m";

#[test]
fn a_full_database_disk_refuses_writes_clearly_and_recovers() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let disk = scratch.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    // Declared before the cluster, so dropped after it: the server stops
    // before its file system goes.
    let _unmount = Mount::tmpfs(&disk);
    Cluster::give_to_owner(&disk).unwrap();
    // Small WAL segments, few of them kept: the WAL cannot hide much room.
    // A commit is answered once its WAL is written, as by default in
    // production (the shared test cluster does not wait).
    let cluster = Cluster::start_with_data_dir(
        &disk.join("data"),
        &["--wal-segsize=1"],
        "min_wal_size = 2MB\nmax_wal_size = 4MB\nsynchronous_commit = on\n",
    )
    .unwrap_or_else(|why| panic!("starting a cluster on the tmpfs: {why}"));
    let site = Site::on_postgres_url(&cluster.new_database());

    let proxied: Vec<String> = (0..10)
        .map(|i| site.redeemed_token(COMPUTE_NODE, 40000 + i))
        .collect();
    let to_destroy: Vec<String> = (0..5)
        .map(|i| site.redeemed_token(COMPUTE_NODE, 41000 + i))
        .collect();
    let pending: Vec<String> = (0..10).map(|_| site.new_token()).collect();
    let states_before: BTreeMap<String, Option<String>> = proxied
        .iter()
        .chain(&to_destroy)
        .chain(&pending)
        .map(|token| (token.clone(), site.state_of(token)))
        .collect();
    let polls_before: Vec<(u16, String)> = proxied
        .iter()
        .map(|token| poll(&site, token).status_and_text())
        .collect();

    let filler = Filler::start(disk.join("filler"));
    let mut seen = Observations::default();
    // Reads first too: the server may not outlive the writes.
    polls_answer_as_before(&cluster, &site, &proxied, &polls_before, &mut seen);

    // getlink until PostgreSQL has refused some (a free slot in a page, or
    // WAL room, lets the first ones through), then some more.
    let mut granted = Vec::new();
    let mut getlinks = 0;
    while getlinks < 300 && (seen.refused("getlink") < 5 || getlinks < 20) {
        getlinks += 1;
        let answer = site.cgi("getlink").remote(LOGIN_NODE).run();
        if let Some(text) = seen.record("getlink", &answer, "Your token is \n") {
            granted.push(text["Your token is \n".len()..].trim_end().to_owned());
        }
    }
    assert!(
        seen.refused("getlink") > 0,
        "no getlink was refused in {getlinks}: the disk was not full\n{}",
        cluster.log()
    );
    let mut redeemed = Vec::new();
    for (i, token) in pending.iter().enumerate() {
        let answer = site
            .cgi("redeemtoken")
            .remote(COMPUTE_NODE)
            .query(format!("token={token}&port={}", 42000 + i))
            .run();
        if seen.record("redeemtoken", &answer, "Success!").is_some() {
            redeemed.push(token.clone());
        }
    }
    let mut destroyed = Vec::new();
    for token in &to_destroy {
        let answer = site
            .cgi("destroytoken")
            .remote(COMPUTE_NODE)
            .query(format!("token={token}"))
            .run();
        if seen.record("destroytoken", &answer, "Success!").is_some() {
            destroyed.push(token.clone());
        }
    }
    polls_answer_as_before(&cluster, &site, &proxied, &polls_before, &mut seen);
    let running_while_full = cluster.is_running();
    println!(
        "while full: {}; the server {} running",
        seen.summary(),
        if running_while_full { "was" } else { "was not" }
    );

    let mut said: Vec<&str> = Vec::new();
    let log = cluster.log();
    for line in log.lines().filter(|l| {
        ["PANIC", "FATAL", "No space", "terminated", "shut down"]
            .iter()
            .any(|w| l.contains(w))
    }) {
        // Without the time and the process id.
        let what = line.split_once("] ").map_or(line, |(_, what)| what);
        if !said.contains(&what) {
            said.push(what);
        }
    }
    let more = said.len().saturating_sub(12);
    said.truncate(12);
    println!(
        "PostgreSQL said:\n  {}{}",
        said.join("\n  "),
        if more > 0 {
            format!("\n  … and {more} more")
        } else {
            String::new()
        }
    );

    filler.stop();
    if !cluster.is_running() {
        // PostgreSQL stops by itself when a WAL write fails (a PANIC) and
        // the crash recovery that follows has no room either: that is
        // PostgreSQL's behaviour, not ours; an admin starts it again.
        println!("PostgreSQL had stopped: started again with pg_ctl");
        cluster
            .start_again()
            .unwrap_or_else(|why| panic!("restarting PostgreSQL: {why}"));
    }
    let mut db = eventually_connected(&site);

    // Nothing committed is lost, nothing refused was written.
    for (token, before) in &states_before {
        let now = site.state_of(token);
        if redeemed.contains(token) {
            assert_eq!(now.as_deref(), Some("proxied"), "{token}");
        } else if destroyed.contains(token) {
            let ended = db.value(
                "SELECT end_kind FROM proxy WHERE alias = $1 AND end_kind IS NOT NULL",
                &[token.as_str()],
            );
            assert!(ended.is_some(), "{token} was destroyed but did not end");
        } else {
            assert_eq!(&now, before, "{token} changed though refused");
        }
    }
    for token in &granted {
        assert!(site.state_of(token).is_some(), "{token} granted but lost");
    }
    // Space is back: writes work again.
    let token = site.redeemed_token(COMPUTE_NODE, 43000);
    assert_eq!(site.state_of(&token).as_deref(), Some("proxied"));
    let routeless = db.count(
        "SELECT count(*) FROM proxy WHERE state = 'proxied' \
         AND (dsthost IS NULL OR dstport IS NULL)",
        &[],
    );
    assert_eq!(routeless, 0, "proxied tokens without a route");
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path) -> Mount {
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", DISK_SIZE, "satellite-test"])
            .arg(at)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount tmpfs on {}", at.display());
        Mount(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A file that takes every free byte of its file system, and keeps taking
/// what the server frees (old WAL segments a checkpoint removes) until it
/// is stopped, as a runaway log would.
struct Filler {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Filler {
    /// Starts filling; returns once the file system is full.
    fn start(path: PathBuf) -> Filler {
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    while file.write_all(&chunk).is_ok() {}
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Filler { path, stop, thread }
    }

    /// Stops filling and gives all the space back.
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        std::fs::remove_file(&self.path).unwrap();
    }
}

/// What each endpoint answered, by kind of answer.
#[derive(Default)]
struct Observations {
    answers: BTreeMap<(String, String), usize>,
}

impl Observations {
    /// Checks and counts one answer of `endpoint`: a 200 whose body starts
    /// with `success` (its body returned, so that the caller can check its
    /// commit afterwards), or a clear refusal: 503, `Retry-After`, an
    /// `Oops!` and no panic.
    fn record(&mut self, endpoint: &str, answer: &Answer, success: &str) -> Option<String> {
        let text = answer.text();
        assert!(!answer.stderr.contains("panicked"), "{answer:?}");
        let granted = answer.status == 200 && text.starts_with(success);
        if !granted {
            assert_eq!(answer.status, 503, "{endpoint}: {answer:?}");
            assert!(answer.header("Retry-After").is_some(), "{answer:?}");
            assert!(text.starts_with("Oops! "), "{answer:?}");
        }
        let kind = match answer.header("Retry-After") {
            Some(after) => format!("{} Retry-After {after} {:?}", answer.status, text),
            None if granted => format!("{} (success)", answer.status),
            None => format!("{} {:?}", answer.status, text),
        };
        *self.answers.entry((endpoint.into(), kind)).or_default() += 1;
        granted.then_some(text)
    }

    fn refused(&self, endpoint: &str) -> usize {
        self.answers
            .iter()
            .filter(|((e, kind), _)| e == endpoint && kind.starts_with("503"))
            .map(|(_, n)| n)
            .sum()
    }

    fn summary(&self) -> String {
        self.answers
            .iter()
            .map(|((endpoint, kind), n)| format!("{endpoint} {n}x {kind}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A poll of a known token writes nothing: while the server stays up (the
/// same postmaster before and after, answering), it answers as before the
/// disk filled; else it is a refusal to retry.
fn polls_answer_as_before(
    cluster: &Cluster,
    site: &Site,
    tokens: &[String],
    before: &[(u16, String)],
    seen: &mut Observations,
) {
    for (token, before) in tokens.iter().zip(before) {
        let up_before = server_start(cluster, site);
        let answer = poll(site, token);
        let up_after = server_start(cluster, site);
        if up_before.is_some() && up_before == up_after {
            assert_eq!(&answer.status_and_text(), before, "{answer:?}");
        }
        seen.record("tokenjobstate", &answer, "");
    }
}

/// tokenjobstate of `token`: a read of a known token, which writes nothing.
fn poll(site: &Site, token: &str) -> Answer {
    site.cgi("tokenjobstate")
        .remote(LOGIN_NODE)
        .query(format!("token={token}"))
        .run()
}

/// When the running postmaster started, if it answers now.
fn server_start(cluster: &Cluster, site: &Site) -> Option<String> {
    if !cluster.is_running() {
        return None;
    }
    let mut client = postgres::Client::connect(site.database_url()?, postgres::NoTls).ok()?;
    let row = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .ok()?;
    row.get(0)
}

/// The site's database once the server accepts connections again (after a
/// crash it first replays its WAL).
fn eventually_connected(site: &Site) -> support::Db {
    let url = site.database_url().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match postgres::Client::connect(url, postgres::NoTls) {
            Ok(_) => return site.sql(),
            Err(err) if Instant::now() >= deadline => {
                panic!("PostgreSQL did not come back: {err}")
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}
