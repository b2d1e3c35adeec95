//! The soak's faults, spread from 10% to 60% of the run, and
//! the check of what each must lead to: kill -9 of serve, of the watcher
//! and of an Apache child under load, the database locked by another
//! program for 10 s, and (PostgreSQL) the server restarted in fast mode.
//! Within a fault's window (and [`RECOVERY`] after) a 502, a 503 with
//! `Retry-After` or a refused connection is the expected answer of the
//! load; after it, the service must be back within [`RECOVERY`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use satellite_core::store::pg_harness;

use super::load::{Load, RECOVERY};
use super::site::StoreKind;

/// How long another program holds the database.
const LOCK_HELD: Duration = Duration::from_secs(10);
/// A request meeting the lock must be refused by then: the store's busy
/// timeout (5 s by default) and some slack, never a hang.
const REFUSED_WITHIN: Duration = Duration::from_secs(9);
/// How long a recovery is watched before it is called failed.
const GIVE_UP: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    KillServe,
    KillWatcher,
    KillApacheChild,
    DatabaseLocked,
    PostgresRestart,
}

impl Fault {
    pub fn label(self) -> &'static str {
        match self {
            Fault::KillServe => "kill -9 serve",
            Fault::KillWatcher => "kill -9 the watcher",
            Fault::KillApacheChild => "kill -9 an Apache child",
            Fault::DatabaseLocked => "database locked 10 s",
            Fault::PostgresRestart => "PostgreSQL restarted (fast)",
        }
    }

    /// The faults a run has: no serve to kill in the CGI-only variant, no
    /// server to restart on SQLite.
    pub fn plan(serving: bool, store: StoreKind) -> Vec<Fault> {
        let mut plan = Vec::new();
        if serving {
            plan.push(Fault::KillServe);
        }
        plan.extend([
            Fault::KillWatcher,
            Fault::KillApacheChild,
            Fault::DatabaseLocked,
        ]);
        if store == StoreKind::Postgres {
            plan.push(Fault::PostgresRestart);
        }
        plan
    }
}

/// What a fault led to.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub fault: Fault,
    /// Seconds into the run.
    pub at_secs: f64,
    /// From the fault's end (the kill, the lock's release, the server's
    /// return) to the first full answer (a new token and a live route).
    pub back_in: Option<Duration>,
    /// The fault's own expectation (the process restarted; the lock
    /// answered with 503 and Retry-After in time) and what was seen.
    pub expected: bool,
    pub detail: String,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.expected && self.back_in.is_some_and(|t| t <= RECOVERY)
    }
}

/// The pids the faults aim at (they change as the programs restart).
pub struct Targets {
    pub serve: Option<Arc<AtomicU32>>,
    pub watcher: Arc<AtomicU32>,
}

fn kill9(pid: u32) -> bool {
    pid > 1
        && nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
}

/// Runs `plan` at its times over `duration` from `started`, unless the
/// load stops first; the outcome of each fault run.
pub fn run(
    load: &Load,
    targets: &Targets,
    plan: &[Fault],
    started: Instant,
    duration: Duration,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for (i, fault) in plan.iter().enumerate() {
        // From 10% to 60% of the run, evenly: the rest shows the
        // service settled again (its open files, its memory).
        let fraction = if plan.len() == 1 {
            0.1
        } else {
            0.1 + 0.5 * i as f64 / (plan.len() - 1) as f64
        };
        let at = started + duration.mul_f64(fraction);
        while Instant::now() < at {
            if load.stop.load(Ordering::Relaxed) {
                return outcomes;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let from = Instant::now();
        load.tally.fault_window(from, from + Duration::from_secs(2));
        let mut outcome = match inflict(load, targets, *fault) {
            Ok(outcome) => outcome,
            Err(e) => Outcome {
                fault: *fault,
                at_secs: 0.0,
                back_in: None,
                expected: false,
                detail: format!("could not be done: {e:#}"),
            },
        };
        let ended = Instant::now();
        load.tally.end_fault_window(ended);
        outcome.at_secs = (from - started).as_secs_f64();
        if outcome.back_in.is_none() && !outcome.detail.starts_with("could not") {
            outcome.back_in = back_within(load, ended, GIVE_UP);
        }
        eprintln!(
            "fault at {:.1} s: {}: back in {}; {}",
            outcome.at_secs,
            fault.label(),
            outcome
                .back_in
                .map_or("never".to_owned(), |t| format!("{:.2} s", t.as_secs_f64())),
            outcome.detail
        );
        outcomes.push(outcome);
    }
    outcomes
}

/// Does `fault`; the outcome's `back_in` is left for the caller to
/// measure from the fault's end, except where the fault measures it
/// itself.
fn inflict(load: &Load, targets: &Targets, fault: Fault) -> Result<Outcome> {
    let outcome = |expected: bool, detail: String| Outcome {
        fault,
        at_secs: 0.0,
        back_in: None,
        expected,
        detail,
    };
    Ok(match fault {
        Fault::KillServe | Fault::KillWatcher => {
            let pid = match fault {
                Fault::KillServe => targets.serve.clone().context("no serve in this run")?,
                _ => targets.watcher.clone(),
            };
            let old = pid.load(Ordering::SeqCst);
            let killed_at = Instant::now();
            if !kill9(old) {
                return Ok(outcome(false, format!("pid {old} could not be killed")));
            }
            let restarted = wait_for(GIVE_UP, || {
                let new = pid.load(Ordering::SeqCst);
                new != old && std::path::Path::new(&format!("/proc/{new}")).exists()
            });
            let mut o = outcome(
                restarted.is_some(),
                match restarted {
                    Some(_) => format!(
                        "pid {old} killed, restarted as {} after {:.1} s",
                        pid.load(Ordering::SeqCst),
                        killed_at.elapsed().as_secs_f64()
                    ),
                    None => format!("pid {old} killed, never restarted"),
                },
            );
            o.back_in = back_within(load, killed_at, GIVE_UP);
            o
        }
        Fault::KillApacheChild => {
            // A worker, not mod_cgid's daemon: the child with most threads.
            let children: Vec<u32> = load
                .site
                .apache_pids()
                .into_iter()
                .skip(1)
                .collect::<Vec<_>>();
            let child = children
                .iter()
                .copied()
                .max_by_key(|pid| super::sample::usage(*pid).map_or(0, |u| u.threads))
                .context("Apache has no children")?;
            let killed_at = Instant::now();
            let killed = kill9(child);
            let mut o = outcome(
                killed,
                format!("child {child} of {} killed", children.len()),
            );
            o.back_in = back_within(load, killed_at, GIVE_UP);
            o
        }
        Fault::DatabaseLocked => lock_database(load, fault)?,
        Fault::PostgresRestart => {
            pg_harness::cluster()
                .restart_fast()
                .map_err(anyhow::Error::msg)?;
            outcome(true, "every connection cut, the server back".into())
        }
    })
}

/// Holds the database locked from another connection for [`LOCK_HELD`]
/// (SQLite: an exclusive transaction; PostgreSQL: `LOCK TABLE proxy IN
/// ACCESS EXCLUSIVE MODE`, which stops readers too) while a getlink is
/// sent: it must be answered 503 with Retry-After within
/// [`REFUSED_WITHIN`].
fn lock_database(load: &Load, fault: Fault) -> Result<Outcome> {
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let site = load.site.clone();
    let holder = thread::spawn(move || -> Result<()> {
        let hold = |locked: Result<()>| {
            let ok = locked.is_ok();
            let _ = locked_tx.send(locked);
            if ok {
                let _ = release_rx.recv_timeout(LOCK_HELD);
            }
        };
        match &site.database_url {
            Some(url) => {
                let mut client = postgres::Client::connect(url, postgres::NoTls)?;
                let mut tx = client.transaction()?;
                let locked = tx
                    .batch_execute("LOCK TABLE proxy IN ACCESS EXCLUSIVE MODE")
                    .map_err(anyhow::Error::from);
                hold(locked);
                tx.commit()?;
            }
            None => {
                let mut conn = rusqlite::Connection::open(site.db_file())?;
                conn.busy_timeout(Duration::from_secs(30))?;
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
                hold(Ok(()));
                tx.commit()?;
            }
        }
        Ok(())
    });
    let locked_at = Instant::now();
    locked_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the lock was not taken within 30 s")??;
    thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let answer = load.site.client().get(&load.site.manage(), "/getlink.cgi");
    let took = asked.elapsed();
    let (expected, detail) = match &answer {
        Ok(r) if r.status == 503 && r.header("Retry-After").is_some() => (
            took <= REFUSED_WITHIN,
            format!(
                "a getlink meeting the lock: 503, Retry-After {}, in {:.1} s",
                r.header("Retry-After").unwrap_or(""),
                took.as_secs_f64()
            ),
        ),
        Ok(r) => (
            false,
            format!(
                "a getlink meeting the lock: {} {:?} in {:.1} s (wanted 503 with Retry-After)",
                r.status,
                r.text().chars().take(80).collect::<String>(),
                took.as_secs_f64()
            ),
        ),
        Err(e) => (
            false,
            format!(
                "a getlink meeting the lock: {e} after {:.1} s",
                took.as_secs_f64()
            ),
        ),
    };
    // The rest of the 10 s, then the lock goes.
    thread::sleep(LOCK_HELD.saturating_sub(locked_at.elapsed()));
    let _ = release_tx.send(());
    holder
        .join()
        .map_err(|_| anyhow::anyhow!("the lock holder panicked"))??;
    Ok(Outcome {
        fault,
        at_secs: 0.0,
        back_in: None,
        expected,
        detail,
    })
}

/// Polls `ready` every 100 ms for up to `limit`; how long it took.
fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ready() {
            return Some(started.elapsed());
        }
        thread::sleep(Duration::from_millis(100));
    }
    None
}

/// From `since` to the first moment the service answers in full: a new
/// token from getlink, and a long-lived route proxied to its own backend.
fn back_within(load: &Load, since: Instant, limit: Duration) -> Option<Duration> {
    let (alias, b) = load.long_lived.first()?;
    let backend = &load.backends[*b];
    wait_for(limit, || {
        let token = match load.site.getlink() {
            Ok(token) => token,
            Err(_) => return false,
        };
        load.tally.remember(&token, "pending");
        load.site
            .client()
            .get(&load.site.host_port(alias), "/lab")
            .is_ok_and(|r| r.status == 200 && r.header("X-Backend") == Some(&backend.name))
    })
    .map(|_| since.elapsed())
}
