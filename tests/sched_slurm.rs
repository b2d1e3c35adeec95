//! `SlurmScheduler` against a real single-node Slurm (tests/support/slurm.rs):
//! real sbatch, scancel, scontrol and squeue, every ending of a job.

mod support;

use std::time::Duration;

use satellite_sched::{JobInfo, JobSnapshot, SchedError, Scheduler, SlurmScheduler, StateClass};
use support::slurm::{wait_until, Slurm, NODE};

const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

fn scheduler(slurm: &Slurm) -> SlurmScheduler {
    SlurmScheduler::new().with_conf(slurm.conf())
}

fn snapshot(slurm: &Slurm) -> JobSnapshot {
    let snapshot = scheduler(slurm).snapshot(QUERY_TIMEOUT).unwrap();
    assert!(snapshot.complete, "{snapshot:#?}");
    snapshot
}

/// Takes snapshots until the job is in `state`, and returns it.
fn wait_for_job(slurm: &Slurm, id: &str, state: &str, within: Duration) -> JobInfo {
    wait_until(&format!("job {id} {state} in a snapshot"), within, || {
        let snapshot = snapshot(slurm);
        match snapshot.job(id) {
            Some(job) if job.state.raw() == state => Ok(job.clone()),
            other => Err(other.map(|j| (j.state.raw().to_owned(), j.reason.clone()))),
        }
    })
}

const SOON: Duration = Duration::from_secs(30);

#[test]
fn a_running_job_is_running_on_its_node_with_start_limit_and_owner() {
    let slurm = Slurm::shared();
    let before = chrono::Utc::now().timestamp();
    let id = slurm.sbatch(&["--time=10", "--wrap=sleep 120"]);
    let job = wait_for_job(&slurm, &id, "RUNNING", SOON);
    assert_eq!(job.state.class(), StateClass::Running);
    assert_eq!(job.nodes, [NODE]);
    assert_eq!(job.time_limit_secs, Some(600));
    assert_eq!(job.user.as_deref(), Some("root"));
    assert_eq!(job.uid, Some(0));
    assert_eq!(job.reason, None);
    let start = job.start.unwrap();
    assert!(
        start >= before - 1 && start <= chrono::Utc::now().timestamp(),
        "{start}"
    );
    slurm.scancel(&[&id]);
}

#[test]
fn a_job_that_begins_later_is_pending_with_its_reason_and_estimated_start() {
    let slurm = Slurm::shared();
    let before = chrono::Utc::now().timestamp();
    let id = slurm.sbatch(&["--begin=now+1hour", "--wrap=true"]);
    let after = chrono::Utc::now().timestamp();
    // The reason and the estimate may come only once the scheduler has
    // looked at the job.
    let job = wait_until(
        &format!("job {id} pending with its estimate"),
        SOON,
        || match snapshot(&slurm).job(&id) {
            Some(job)
                if job.state.raw() == "PENDING"
                    && job.reason.as_deref() == Some("BeginTime")
                    && job.start.is_some() =>
            {
                Ok(job.clone())
            }
            other => Err(other.map(|j| (j.state.raw().to_owned(), j.reason.clone(), j.start))),
        },
    );
    assert_eq!(job.state.class(), StateClass::Pending);
    let start = job.start.unwrap();
    assert!(
        (before + 3600 - 1..=after + 3600 + 1).contains(&start),
        "{start} not an hour after {before}..{after}"
    );
    assert!(job.nodes.is_empty());
    slurm.scancel(&[&id]);
}

#[test]
fn a_held_job_is_pending_without_a_start() {
    let slurm = Slurm::shared();
    let id = slurm.sbatch(&["--hold", "--wrap=true"]);
    let job = wait_for_job(&slurm, &id, "PENDING", SOON);
    assert_eq!(job.reason.as_deref(), Some("JobHeldUser"));
    assert_eq!(job.start, None);
    slurm.scancel(&[&id]);
}

#[test]
fn a_job_that_finishes_is_completed_and_ended() {
    let slurm = Slurm::shared();
    let id = slurm.sbatch(&["--wrap=true"]);
    let job = wait_for_job(&slurm, &id, "COMPLETED", SOON);
    assert!(job.state.is_ended());
    assert_eq!(job.nodes, [NODE]);
}

#[test]
fn scancel_while_pending_ends_the_job_as_cancelled() {
    let slurm = Slurm::shared();
    let id = slurm.sbatch(&["--begin=now+1hour", "--wrap=true"]);
    wait_for_job(&slurm, &id, "PENDING", SOON);
    slurm.scancel(&[&id]);
    let job = wait_for_job(&slurm, &id, "CANCELLED", SOON);
    assert!(job.state.is_ended());
    assert!(job.nodes.is_empty(), "never ran: {:?}", job.nodes);
}

#[test]
fn scancel_while_running_ends_the_job_as_cancelled() {
    let slurm = Slurm::shared();
    let id = slurm.sbatch(&["--wrap=sleep 120"]);
    wait_for_job(&slurm, &id, "RUNNING", SOON);
    slurm.scancel(&[&id]);
    let job = wait_for_job(&slurm, &id, "CANCELLED", SOON);
    assert!(job.state.is_ended());
    assert_eq!(job.nodes, [NODE]);
}

#[test]
fn a_job_that_fails_at_start_is_failed_with_its_reason() {
    let slurm = Slurm::shared();
    let exits = slurm.sbatch(&["--wrap=exit 1"]);
    let missing = slurm.sbatch(&["--wrap=/nonexistent/jupyter-lab"]);
    for id in [&exits, &missing] {
        let job = wait_for_job(&slurm, id, "FAILED", SOON);
        assert!(job.state.is_ended());
        assert_eq!(job.reason.as_deref(), Some("NonZeroExitCode"));
    }
}

#[test]
fn a_node_set_down_ends_its_job_as_node_fail() {
    let slurm = Slurm::exclusive();
    // Without --no-requeue Slurm would queue the job again (PENDING).
    let id = slurm.sbatch(&["--no-requeue", "--wrap=sleep 120"]);
    wait_for_job(&slurm, &id, "RUNNING", SOON);
    let down = slurm.node_down();
    let job = wait_for_job(&slurm, &id, "NODE_FAIL", SOON);
    assert!(job.state.is_ended());
    assert_eq!(job.reason.as_deref(), Some("NodeDown"));
    // A job submitted now waits for the node, and says why once the main
    // scheduler has looked at it. Slurm 22.05 gives one of two reasons,
    // depending on when that was.
    let waiting = slurm.sbatch(&["--wrap=true"]);
    let node_reasons = [
        format!("ReqNodeNotAvail, UnavailableNodes:{NODE}"),
        "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions"
            .to_owned(),
    ];
    wait_until(
        &format!("job {waiting} pending for the node"),
        SOON,
        || match snapshot(&slurm).job(&waiting) {
            Some(job)
                if job.state.raw() == "PENDING"
                    && node_reasons.iter().any(|r| Some(r) == job.reason.as_ref()) =>
            {
                Ok(())
            }
            other => Err(other.map(|j| (j.state.raw().to_owned(), j.reason.clone()))),
        },
    );
    drop(down);
    wait_for_job(&slurm, &waiting, "COMPLETED", SOON);
}

#[test]
fn a_stopped_controller_is_an_error_not_an_empty_snapshot() {
    let slurm = Slurm::exclusive();
    let id = slurm.sbatch(&["--hold", "--wrap=true"]);
    wait_for_job(&slurm, &id, "PENDING", SOON);
    slurm.stop_controller();
    let err = scheduler(&slurm).snapshot(QUERY_TIMEOUT).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SchedError::Failed { .. }), "{text}");
    assert!(
        text.starts_with("/usr/bin/squeue failed (exit status: 1): "),
        "{text}"
    );
    assert!(
        text.contains("Unable to contact slurm controller"),
        "{text}"
    );
    // Its state survives a restart: the job is still there, still held.
    slurm.start_controller();
    let job = wait_for_job(&slurm, &id, "PENDING", SOON);
    assert_eq!(job.reason.as_deref(), Some("JobHeldUser"));
    slurm.scancel(&[&id]);
}

#[test]
fn a_controller_that_does_not_answer_times_out_and_is_killed() {
    let slurm = Slurm::exclusive();
    slurm.freeze_controller(true);
    let err = scheduler(&slurm)
        .snapshot(Duration::from_secs(2))
        .unwrap_err();
    slurm.freeze_controller(false);
    assert_eq!(
        err.to_string(),
        "/usr/bin/squeue did not answer within 2s and was killed"
    );
    // Thawed, it answers again.
    snapshot(&slurm);
}

#[test]
fn a_hundred_jobs_cancelled_at_once_are_all_ended_in_one_squeue_call() {
    let slurm = Slurm::shared();
    let ids: Vec<String> = (0..100)
        .map(|_| slurm.sbatch(&["--hold", "--wrap=true"]))
        .collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    slurm.scancel(&refs);
    // squeue through a wrapper that counts its calls: the real program
    // still answers.
    let calls = slurm.dir().join(format!("squeue-calls-{}", ids[0]));
    let wrapper = slurm.dir().join(format!("squeue-counting-{}", ids[0]));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho call >> '{}'\nexec /usr/bin/squeue \"$@\"\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let counted = scheduler(&slurm).with_squeue(&wrapper);
    let snapshot = wait_until("100 cancelled jobs in one snapshot", SOON, || {
        let snapshot = counted.snapshot(QUERY_TIMEOUT).unwrap();
        let cancelled = ids
            .iter()
            .filter(|id| {
                snapshot
                    .job(id)
                    .is_some_and(|j| j.state.raw() == "CANCELLED")
            })
            .count();
        if cancelled == 100 {
            Ok(snapshot)
        } else {
            Err(cancelled)
        }
    });
    assert!(snapshot.complete);
    // One snapshot, one call.
    let calls_made = std::fs::read_to_string(&calls).unwrap().lines().count();
    counted.snapshot(QUERY_TIMEOUT).unwrap();
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap().lines().count(),
        calls_made + 1
    );
}
