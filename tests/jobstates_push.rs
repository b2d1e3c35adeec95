//! `satellite jobstates push` against a real Slurm (tests/support/slurm.rs)
//! and a real `satellite serve`: one squeue query, one POST, and nothing
//! sent when the query fails.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use support::slurm::{wait_until, Slurm};
use support::*;

struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    /// Serve on port 0, its port learnt from what it says once it listens:
    /// no port is picked first and bound later, so none can be lost to
    /// another process (munge, a Slurm client) in between.
    fn start(site: &Site) -> Serve {
        let mut child = Command::new(program("satellite"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SATELLITE_CONFIG", &site.config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let port = match satellite_demo::serve_child::listening_addr(&mut child) {
            Ok(addr) => addr.port(),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{err:#}");
            }
        };
        Serve {
            child,
            url: format!("http://127.0.0.1:{port}/update-jobs.cgi"),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A site whose update-jobs accepts pushes from loopback, with a token
/// linked to `jobid` (as galyleo links it after sbatch).
fn site_with_linked_token(jobid: &str) -> (Site, String) {
    let site = Site::with_config("jobstateipmask = [\"127.0.0.1/32\"]");
    let token = site.new_token();
    site.cgi("linktoken")
        .remote(LOGIN_NODE)
        .query(format!("token={token}&jobid={jobid}"))
        .run();
    (site, token)
}

fn push(slurm: &Slurm, args: &[&str]) -> Output {
    Command::new(program("satellite"))
        .args(["jobstates", "push"])
        .args(args)
        .env("SLURM_CONF", slurm.conf())
        .output()
        .unwrap()
}

fn jobstate(site: &Site, token: &str) -> String {
    site.cgi("tokenjobstate")
        .query(format!("token={token}"))
        .run()
        .text()
}

/// Jobs squeue lists now. Only exclusive tests run here, so the count
/// changes only when Slurm purges an old job: `counted` retries then.
fn counted<T>(slurm: &Slurm, act: impl Fn() -> T) -> (usize, T) {
    let count = || {
        slurm
            .run("squeue", &["--noheader", "--states=all", "--format=%i"])
            .lines()
            .count()
    };
    wait_until("a stable job count", Duration::from_secs(30), || {
        let before = count();
        let result = act();
        if count() == before {
            Ok((before, result))
        } else {
            Err(before)
        }
    })
}

#[test]
fn push_sends_a_complete_snapshot_from_squeue_to_update_jobs() {
    let slurm = Slurm::exclusive();
    let id = slurm.sbatch(&["--wrap=sleep 120"]);
    slurm.wait_for_state(&id, "RUNNING", Duration::from_secs(30));
    let (site, token) = site_with_linked_token(&id);
    assert_eq!(jobstate(&site, &token), "PE");
    let serve = Serve::start(&site);
    let (jobs, out) = counted(&slurm, || push(&slurm, &["--url", &serve.url]));
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).as_ref()
        ),
        (Some(0), "")
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "pushed a complete snapshot of {jobs} job(s) to {}\n",
            serve.url
        )
    );
    assert_eq!(jobstate(&site, &token), "R");

    slurm.scancel(&[&id]);
    slurm.wait_for_state(&id, "CANCELLED", Duration::from_secs(30));
    let out = push(&slurm, &["--url", &serve.url, "--timeout", "10"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(jobstate(&site, &token), "D");
}

#[test]
fn push_writes_the_snapshot_into_the_database_with_db() {
    let slurm = Slurm::exclusive();
    let id = slurm.sbatch(&["--hold", "--wrap=true"]);
    slurm.wait_for_state(&id, "PENDING", Duration::from_secs(30));
    let (site, token) = site_with_linked_token(&id);
    let db = site.db.to_str().unwrap().to_owned();
    let (jobs, out) = counted(&slurm, || push(&slurm, &["--db", &db]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("wrote {jobs} job state(s) to {db}\n")
    );
    assert_eq!(jobstate(&site, &token), "Q");
}

#[test]
fn a_failed_squeue_sends_nothing_exits_non_zero_and_says_why() {
    let slurm = Slurm::exclusive();
    let id = slurm.sbatch(&["--wrap=sleep 120"]);
    slurm.wait_for_state(&id, "RUNNING", Duration::from_secs(30));
    let (site, token) = site_with_linked_token(&id);
    let serve = Serve::start(&site);
    assert!(push(&slurm, &["--url", &serve.url]).status.success());
    let seen = |site: &Site| -> i64 {
        site.db()
            .query_row(
                "SELECT lastseen FROM jobstates WHERE jobid = ?1",
                [&id],
                |r| r.get(0),
            )
            .unwrap()
    };
    // Aged, so that a push that got through would show as a newer time.
    site.db()
        .execute("UPDATE jobstates SET lastseen = lastseen - 100", [])
        .unwrap();
    let before = seen(&site);

    slurm.stop_controller();
    let out = push(&slurm, &["--url", &serve.url]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "satellite: the scheduler query failed; nothing was sent: /usr/bin/squeue failed \
         (exit status: 1): slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n"
    );
    // No news: the job is still running as far as the broker knows.
    assert_eq!(jobstate(&site, &token), "R");
    assert_eq!(seen(&site), before);

    let missing = push(
        &slurm,
        &["--url", &serve.url, "--squeue", "/nonexistent/squeue"],
    );
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "satellite: the scheduler query failed; nothing was sent: cannot run /nonexistent/squeue: \
         No such file or directory (os error 2)\n"
    );
    slurm.start_controller();
}

#[test]
fn push_every_logs_a_failed_cycle_and_goes_on() {
    let slurm = Slurm::exclusive();
    let (site, _token) = site_with_linked_token("1");
    let serve = Serve::start(&site);
    slurm.stop_controller();
    let mut every = KillOnDrop(
        Command::new(program("satellite"))
            .args(["jobstates", "push", "--every", "0.3", "--timeout", "10"])
            .args(["--url", &serve.url])
            .env("SLURM_CONF", slurm.conf())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let errors = lines_of(every.0.stderr.take().unwrap());
    let pushed = lines_of(every.0.stdout.take().unwrap());
    for _ in 0..2 {
        let line = errors.recv_timeout(Duration::from_secs(60)).unwrap();
        assert_eq!(
            line,
            "satellite: jobstates push: the scheduler query failed; nothing was sent: \
             /usr/bin/squeue failed (exit status: 1): slurm_load_jobs error: Unable to \
             contact slurm controller (connect failure)"
        );
    }
    slurm.start_controller();
    let line = pushed.recv_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        line.starts_with("pushed a complete snapshot of ")
            && line.ends_with(&format!(" job(s) to {}", serve.url)),
        "{line}"
    );
}

/// The lines a pipe delivers, to wait on with a deadline.
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// `--every` runs until killed, also when the test fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
