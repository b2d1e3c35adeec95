//! Sessions that live and die with their batch job.
//!
//! A token linked to a job (`linktoken`) is a session of that job. When the
//! scheduler says the job is over (a terminal state, or absence from a
//! complete snapshot), the session ends: its route goes in the same
//! transaction, the row stays as an `ended` tombstone until its TTL (the
//! alias is never issued again meanwhile), and tokenjobstate answers `D`.
//! With `job_binding = "enforce"`, a session whose redeem did not come
//! from one of its job's nodes, or whose job runs as a denied user, ends
//! too; `"warn"` only logs it.
//!
//! A scheduler error is no news: nothing here ends a session because a
//! query failed or a node name did not resolve. Only what the scheduler
//! positively reported (or a complete snapshot's silence) counts.
//!
//! To support another scheduler, parse its output into [`JobRecord`]s (its
//! terminal states must be in [`is_terminal`]) and call [`apply_snapshot`].

use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::{Config, JobBinding};
use crate::error::Result;
use crate::store::{EndCause, JobRecord, LinkedSession, SessionEnd, Store};

/// A job linked less than this before a snapshot was taken may be missing
/// from it without having ended (the snapshot can predate the `sbatch`).
pub const SNAPSHOT_GRACE_SECS: i64 = 120;

/// Whether a scheduler state means the job is over (satellite-sched's
/// classes: Slurm's long names and short codes; COMPLETING counts as over).
pub fn is_terminal(state: &str) -> bool {
    satellite_sched::JobState::new(state).is_ended()
}

/// Running states: the only ones in which a redeem can be checked against
/// the job's nodes.
pub fn is_running(state: &str) -> bool {
    satellite_sched::JobState::new(state).class() == satellite_sched::StateClass::Running
}

/// What the scheduler knows now, as pushed to update-jobs or queried by the
/// broker itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every job the scheduler knows is in `jobs`: a linked job that is not
    /// has ended. False for legacy pushes and anything partial.
    pub complete: bool,
    /// When the scheduler was asked (epoch seconds); defaults to now.
    pub taken_at: Option<i64>,
    pub jobs: Vec<JobRecord>,
}

/// What applying a snapshot did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub recorded: usize,
    /// Sessions ended now.
    pub ended: Vec<SessionEnd>,
    /// Binding mismatches seen in `warn` mode (alias, what), logged only.
    pub warned: Vec<(String, String)>,
}

impl Snapshot {
    /// What satellite-sched read from a push (or a query): the job
    /// records the store keeps.
    pub fn from_wire(snapshot: &satellite_sched::JobSnapshot) -> Self {
        Snapshot {
            complete: snapshot.complete,
            taken_at: Some(snapshot.taken_at),
            jobs: snapshot
                .jobs
                .iter()
                .map(|job| JobRecord {
                    jobid: job.id.clone(),
                    state: job.state.base().to_owned(),
                    reason: job.reason.clone(),
                    start_time: job.start,
                    time_limit_secs: job.time_limit_secs,
                    user: job.user.clone(),
                    uid: job.uid.map(i64::from),
                    nodes: job.nodes.clone(),
                })
                .collect(),
        }
    }
}

/// Records a snapshot and ends the sessions whose job is over or does not
/// match them, in one transaction.
pub fn apply_snapshot(
    store: &mut dyn Store,
    config: &Config,
    snapshot: &Snapshot,
    now: DateTime<Utc>,
) -> Result<Applied> {
    let reported: HashMap<&str, &JobRecord> = snapshot
        .jobs
        .iter()
        .map(|job| (job.jobid.as_str(), job))
        .collect();
    let taken_at = snapshot.taken_at.unwrap_or_else(|| now.timestamp());
    let mut resolver = NodeResolver::new(config);
    let mut applied = Applied::default();
    for session in store.linked_sessions(now, config.ttl_secs)? {
        let job_over = match reported.get(session.jobid.as_str()) {
            Some(job) if is_terminal(&job.state) => {
                Some(format!("job {} ended ({})", session.jobid, job.state))
            }
            Some(job) => {
                if let Some(mismatch) = binding_violation(config, &mut resolver, &session, job) {
                    if config.job_binding == JobBinding::Enforce {
                        applied.ended.push(SessionEnd {
                            alias: session.alias,
                            kind: EndCause::BindingMismatch,
                            cause: mismatch,
                        });
                    } else {
                        applied.warned.push((session.alias, mismatch));
                    }
                }
                continue;
            }
            None if snapshot.complete && linked_before(&session, taken_at) => Some(format!(
                "job {} is no longer known to the scheduler",
                session.jobid
            )),
            None => None,
        };
        if let Some(cause) = job_over {
            applied.ended.push(SessionEnd {
                alias: session.alias,
                kind: EndCause::JobEnd,
                cause,
            });
        }
    }
    // The decisions above use what this snapshot says, not what the store
    // had: the job records and the ends they cause go in one transaction.
    applied.recorded = store.record_jobs(&snapshot.jobs, &applied.ended, now.timestamp())?;
    Ok(applied)
}

fn linked_before(session: &LinkedSession, taken_at: i64) -> bool {
    // Rows linked before satellite recorded link times count as old.
    session
        .linked_at
        .is_none_or(|linked| linked.timestamp() < taken_at - SNAPSHOT_GRACE_SECS)
}

/// Why `session` may not be its job's (`None`: nothing wrong, or nothing
/// known for sure). Checked only for a running job.
pub fn binding_violation(
    config: &Config,
    resolver: &mut NodeResolver<'_>,
    session: &LinkedSession,
    job: &JobRecord,
) -> Option<String> {
    if config.job_binding == JobBinding::Off || !is_running(&job.state) {
        return None;
    }
    if let Some(user) = denied_user(config, job) {
        return Some(format!(
            "job {} runs as {user}, who may not be proxied",
            job.jobid
        ));
    }
    let host: IpAddr = session.dsthost.as_deref()?.parse().ok()?;
    match resolver.job_has_address(&job.nodes, crate::ipmask::canonical_ip(host)) {
        Some(false) => Some(format!(
            "redeemed from {host}, which is not a node of job {} ({})",
            job.jobid,
            satellite_sched::hostlist::compress(&job.nodes)
        )),
        _ => None,
    }
}

fn denied_user(config: &Config, job: &JobRecord) -> Option<String> {
    let by_name = job
        .user
        .as_ref()
        .filter(|u| config.job_user_deny.iter().any(|d| d == *u));
    let by_uid = job
        .uid
        .filter(|uid| *uid < i64::from(config.job_uid_min))
        .map(|uid| format!("uid {uid}"));
    by_name.cloned().or(by_uid)
}

/// How long the name lookups of one binding check may take in all: a
/// slow resolver must not stall galyleo's launch or hold a serve worker.
/// Past it, the nodes not looked up prove nothing.
pub const RESOLVE_BUDGET: Duration = Duration::from_secs(2);
/// How long a looked-up node's addresses are kept by a long-running process
/// (serve, jobstates poll); a failed lookup is kept for less.
const RESOLVED_FOR: Duration = Duration::from_secs(300);
const UNRESOLVED_FOR: Duration = Duration::from_secs(30);

type ResolvedCache = Mutex<HashMap<String, (Instant, Option<Vec<IpAddr>>)>>;

/// Lookups shared by every check of the process.
fn resolved_cache() -> &'static ResolvedCache {
    static CACHE: OnceLock<ResolvedCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Node names to addresses: the configured `node_addresses` first, then
/// the resolver, each lookup bounded by [`RESOLVE_BUDGET`] and kept for a
/// while by the process.
pub struct NodeResolver<'a> {
    config: &'a Config,
    deadline: Option<Instant>,
}

impl<'a> NodeResolver<'a> {
    pub fn new(config: &'a Config) -> Self {
        NodeResolver {
            config,
            deadline: None,
        }
    }

    /// Whether `host` is an address of one of the job's nodes: `Some(true)`
    /// at the first node that has it (the rest are not looked up),
    /// `Some(false)` only when every node was resolved and none has it,
    /// `None` when that cannot be known (no nodes, a name that does not
    /// resolve, the lookup budget spent).
    pub fn job_has_address(&mut self, nodes: &[String], host: IpAddr) -> Option<bool> {
        if nodes.is_empty() {
            return None;
        }
        let mut all_known = true;
        for node in nodes {
            match self.node(node) {
                Some(addresses) if addresses.contains(&host) => return Some(true),
                Some(_) => {}
                None => all_known = false,
            }
        }
        all_known.then_some(false)
    }

    fn node(&mut self, node: &str) -> Option<Vec<IpAddr>> {
        if let Some(configured) = self.config.node_addresses.get(node) {
            return Some(
                configured
                    .iter()
                    .map(|a| crate::ipmask::canonical_ip(*a))
                    .collect(),
            );
        }
        let cache = resolved_cache();
        if let Some((until, known)) = cache.lock().ok()?.get(node) {
            if Instant::now() < *until {
                return known.clone();
            }
        }
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + RESOLVE_BUDGET);
        let left = deadline.checked_duration_since(Instant::now())?;
        let (sender, answer) = mpsc::channel();
        let name = node.to_owned();
        // getaddrinfo has no timeout of its own: a thread that may outlive
        // the wait, its answer then kept for the next check.
        thread::spawn(move || {
            let found = (name.as_str(), 0)
                .to_socket_addrs()
                .ok()
                .map(|addrs| {
                    addrs
                        .map(|a| crate::ipmask::canonical_ip(a.ip()))
                        .collect::<Vec<_>>()
                })
                .filter(|addrs| !addrs.is_empty());
            let keep = if found.is_some() {
                RESOLVED_FOR
            } else {
                UNRESOLVED_FOR
            };
            if let Ok(mut cache) = resolved_cache().lock() {
                cache.insert(name, (Instant::now() + keep, found.clone()));
            }
            let _ = sender.send(found);
        });
        answer.recv_timeout(left).ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::EnvOverrides;
    use crate::store::{ProxyState, RoutePublication, SqliteStore};

    fn config(binding: &str) -> Config {
        Config::from_toml(
            &format!(
                "extbasename = \"example.org\"\ntgtipmask = [\"10.21.0.0/16\"]\n\
                 job_binding = \"{binding}\"\n[node_addresses]\nnode01 = [\"10.21.3.4\"]\n\
                 node02 = [\"10.21.3.5\"]\n"
            ),
            Path::new("/tmp"),
            &EnvOverrides::none(),
        )
        .unwrap()
    }

    /// A 512-node job whose first node is the redeemer: no other node is
    /// looked up (each could cost a slow resolver seconds).
    #[test]
    fn a_match_at_the_first_node_looks_up_no_other() {
        let config = config("enforce");
        let mut nodes = vec!["node01".to_owned()];
        nodes.extend((0..511).map(|n| format!("never-looked-up-{n}.invalid")));
        let mut resolver = NodeResolver::new(&config);
        assert_eq!(
            resolver.job_has_address(&nodes, "10.21.3.4".parse().unwrap()),
            Some(true)
        );
        let cache = resolved_cache().lock().unwrap();
        assert!(!cache.keys().any(|k| k.starts_with("never-looked-up-")));
    }

    /// A name that does not resolve proves nothing: no mismatch.
    #[test]
    fn an_unresolvable_node_proves_no_mismatch() {
        let config = config("enforce");
        let nodes = vec!["node02".to_owned(), "no-such-node.invalid".to_owned()];
        let mut resolver = NodeResolver::new(&config);
        assert_eq!(
            resolver.job_has_address(&nodes, "10.21.3.4".parse().unwrap()),
            None
        );
        let known = vec!["node02".to_owned()];
        assert_eq!(
            resolver.job_has_address(&known, "10.21.3.4".parse().unwrap()),
            Some(false)
        );
    }

    fn pairs(ends: &[SessionEnd]) -> Vec<(String, String)> {
        ends.iter()
            .map(|end| (end.alias.clone(), end.cause.clone()))
            .collect()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn job(id: &str, state: &str, nodes: &[&str]) -> JobRecord {
        JobRecord {
            jobid: id.into(),
            state: state.into(),
            user: Some("alice".into()),
            uid: Some(5001),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            ..JobRecord::default()
        }
    }

    /// A store with one session per (alias, job, redeemed-from) linked at
    /// `linked` and redeemed when a host is given.
    fn sessions(
        linked: DateTime<Utc>,
        rows: &[(&str, &str, Option<&str>)],
    ) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) =
            SqliteStore::open_or_create(&dir.path().join("state.sqlite"), Duration::from_secs(1))
                .unwrap();
        for (alias, jobid, host) in rows {
            store.insert_pending(alias, linked).unwrap();
            store.link(alias, jobid, linked, 3600).unwrap();
            if let Some(host) = host {
                let target = format!("{host}:8888");
                store
                    .redeem(
                        alias,
                        host,
                        8888,
                        linked,
                        3600,
                        RoutePublication::Live { target: &target },
                    )
                    .unwrap();
            }
        }
        (dir, store)
    }

    #[test]
    fn terminal_states_long_short_and_with_their_suffixes() {
        for state in [
            "COMPLETED",
            "cd",
            "CANCELLED by 0",
            "CA+",
            "TIMEOUT",
            "NODE_FAIL",
            "OOM",
            "PR",
            "DEADLINE",
        ] {
            assert!(is_terminal(state), "{state}");
        }
        for state in ["RUNNING", "PENDING", "SUSPENDED", ""] {
            assert!(!is_terminal(state), "{state}");
        }
    }

    #[test]
    fn a_terminal_state_or_absence_from_a_complete_snapshot_ends_the_session() {
        let linked = at("2026-01-01T12:00:00Z");
        let now = at("2026-01-01T12:10:00Z");
        let (_dir, mut store) = sessions(
            linked,
            &[
                ("done-job-token", "1", Some("10.21.3.4")),
                ("gone-job-token", "2", Some("10.21.3.4")),
                ("live-job-token", "3", Some("10.21.3.4")),
                ("queued-job-token", "4", None),
            ],
        );
        let config = config("enforce");
        let snapshot = Snapshot {
            complete: true,
            taken_at: Some(now.timestamp()),
            jobs: vec![
                job("1", "COMPLETED", &["node01"]),
                job("3", "RUNNING", &["node01"]),
                job("4", "PENDING", &[]),
            ],
        };
        let applied = apply_snapshot(&mut store, &config, &snapshot, now).unwrap();
        assert_eq!(
            pairs(&applied.ended),
            vec![
                (
                    "done-job-token".to_owned(),
                    "job 1 ended (COMPLETED)".to_owned()
                ),
                (
                    "gone-job-token".to_owned(),
                    "job 2 is no longer known to the scheduler".to_owned()
                ),
            ]
        );
        assert_eq!(
            store.proxy_state("done-job-token", now, 3600).unwrap(),
            Some(ProxyState::Ended)
        );
        assert_eq!(store.live_route("done-job-token", now).unwrap(), None);
        assert!(store.live_route("live-job-token", now).unwrap().is_some());
        // A tombstone keeps its alias: the same alias cannot be issued.
        assert!(!store.insert_pending("done-job-token", now).unwrap());
    }

    #[test]
    fn a_scheduler_that_says_nothing_ends_nothing() {
        let linked = at("2026-01-01T12:00:00Z");
        let now = at("2026-01-01T12:10:00Z");
        let (_dir, mut store) = sessions(linked, &[("quiet-job-token", "9", Some("10.21.3.4"))]);
        // A legacy (incomplete) push without the job.
        let partial = Snapshot {
            complete: false,
            taken_at: None,
            jobs: vec![job("1", "RUNNING", &[])],
        };
        assert!(
            apply_snapshot(&mut store, &config("enforce"), &partial, now)
                .unwrap()
                .ended
                .is_empty()
        );
        // A complete snapshot taken before the link (sbatch raced the push).
        let early = Snapshot {
            complete: true,
            taken_at: Some(linked.timestamp() - 5),
            jobs: vec![],
        };
        assert!(apply_snapshot(&mut store, &config("enforce"), &early, now)
            .unwrap()
            .ended
            .is_empty());
        assert!(store.live_route("quiet-job-token", now).unwrap().is_some());
    }

    #[test]
    fn a_redeem_from_another_node_or_a_denied_user_ends_in_enforce_and_is_logged_in_warn() {
        let linked = at("2026-01-01T12:00:00Z");
        let now = at("2026-01-01T12:10:00Z");
        let rows = [
            ("right-node-token", "1", Some("10.21.3.4")),
            ("wrong-node-token", "2", Some("10.21.3.4")),
            ("root-job-token", "3", Some("10.21.3.4")),
            ("unknown-node-token", "4", Some("10.21.9.9")),
        ];
        let mut root = job("3", "RUNNING", &["node01"]);
        root.user = Some("root".into());
        root.uid = Some(0);
        let snapshot = Snapshot {
            complete: false,
            taken_at: None,
            jobs: vec![
                job("1", "RUNNING", &["node02", "node01"]),
                job("2", "RUNNING", &["node02"]),
                root,
                job("4", "RUNNING", &["no-such-node.invalid"]),
            ],
        };
        let (_dir, mut store) = sessions(linked, &rows);
        let warned = apply_snapshot(&mut store, &config("warn"), &snapshot, now).unwrap();
        assert!(warned.ended.is_empty());
        assert_eq!(
            warned
                .warned
                .iter()
                .map(|(a, _)| a.as_str())
                .collect::<Vec<_>>(),
            ["root-job-token", "wrong-node-token"]
        );
        let enforced = apply_snapshot(&mut store, &config("enforce"), &snapshot, now).unwrap();
        assert_eq!(
            pairs(&enforced.ended),
            vec![
                (
                    "root-job-token".to_owned(),
                    "job 3 runs as root, who may not be proxied".to_owned()
                ),
                (
                    "wrong-node-token".to_owned(),
                    "redeemed from 10.21.3.4, which is not a node of job 2 (node02)".to_owned()
                ),
            ]
        );
        assert!(store.live_route("right-node-token", now).unwrap().is_some());
        // A node name that resolves nowhere proves nothing.
        assert!(store
            .live_route("unknown-node-token", now)
            .unwrap()
            .is_some());
    }
}
