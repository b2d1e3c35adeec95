//! Parsing `squeue` outputs captured from a real Slurm 22.05 (Debian 12's
//! slurm-wlm, the single-node cluster of `tests/support/slurm.rs`), and
//! hostile variations of them.

use satellite_sched::slurm::parse_squeue;
use satellite_sched::{JobSnapshot, StateClass};

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn classes(snapshot: &JobSnapshot) -> Vec<(&str, &str, StateClass)> {
    snapshot
        .jobs
        .iter()
        .map(|j| (j.id.as_str(), j.state.raw(), j.state.class()))
        .collect()
}

#[test]
fn a_queue_with_running_held_and_waiting_jobs_is_read_whole() {
    let snapshot = parse_squeue(&fixture("squeue-queue.txt"), 1_795_696_030);
    assert!(snapshot.complete);
    assert_eq!(snapshot.taken_at, 1_795_696_030);
    assert_eq!(
        classes(&snapshot),
        [
            ("4", "FAILED", StateClass::Ended),
            ("2", "PENDING", StateClass::Pending),
            ("5", "PENDING", StateClass::Pending),
            ("6", "PENDING", StateClass::Pending),
            ("3", "PENDING", StateClass::Pending),
            ("1", "RUNNING", StateClass::Running),
        ]
    );
    let running = snapshot.job("1").unwrap();
    assert_eq!(running.nodes, ["satnode"]);
    assert_eq!(running.start, Some(1_795_696_021));
    assert_eq!(running.reason, None);
    assert_eq!(running.user.as_deref(), Some("root"));
    assert_eq!(running.uid, Some(0));
    assert_eq!(running.time_limit_secs, None);
    let begins_later = snapshot.job("2").unwrap();
    assert_eq!(begins_later.reason.as_deref(), Some("BeginTime"));
    assert_eq!(begins_later.start, Some(1_795_699_621));
    assert!(begins_later.nodes.is_empty());
    let held = snapshot.job("3").unwrap();
    assert_eq!(held.reason.as_deref(), Some("JobHeldUser"));
    assert_eq!(held.start, None);
    let failed = snapshot.job("4").unwrap();
    assert_eq!(failed.reason.as_deref(), Some("NonZeroExitCode"));
}

#[test]
fn cancelled_completed_failed_and_node_failed_jobs_are_ended() {
    let snapshot = parse_squeue(&fixture("squeue-mixed.txt"), 0);
    assert!(snapshot.complete);
    let ended: Vec<&str> = snapshot
        .jobs
        .iter()
        .filter(|j| j.state.is_ended())
        .map(|j| j.id.as_str())
        .collect();
    assert_eq!(ended, ["1", "2", "7", "6", "4", "5", "8"]);
    assert_eq!(snapshot.job("7").unwrap().time_limit_secs, Some(60));
    let node_fail = snapshot.job("8").unwrap();
    assert_eq!(node_fail.state.raw(), "NODE_FAIL");
    assert_eq!(node_fail.reason.as_deref(), Some("NodeDown"));
    assert_eq!(
        snapshot.job("3").unwrap().state.class(),
        StateClass::Pending
    );
}

#[test]
fn a_reason_with_blanks_and_commas_stays_one_field() {
    let snapshot = parse_squeue(&fixture("squeue-node-down.txt"), 0);
    assert!(snapshot.complete);
    assert_eq!(
        snapshot.job("8").unwrap().reason.as_deref(),
        Some("Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions")
    );
}

#[test]
fn walltime_exceeded_is_timeout_and_days_in_limits_are_read() {
    let snapshot = parse_squeue(&fixture("squeue-timeout.txt"), 0);
    assert!(snapshot.complete);
    let timeout = snapshot.job("9").unwrap();
    assert_eq!(timeout.state.raw(), "TIMEOUT");
    assert!(timeout.state.is_ended());
    assert_eq!(timeout.reason.as_deref(), Some("TimeLimit"));
    assert_eq!(timeout.time_limit_secs, Some(60));
    assert_eq!(
        snapshot.job("10").unwrap().time_limit_secs,
        Some(2 * 86_400 + 3 * 3_600 + 5 * 60)
    );
}

#[test]
fn local_times_printed_without_slurm_time_format_are_read_too() {
    // Captured on a UTC machine; the epoch values depend on the local
    // time zone, so only their distance is compared.
    let local = parse_squeue(&fixture("squeue-local-times.txt"), 0);
    assert!(local.complete);
    let (pending, timeout) = (local.job("10").unwrap(), local.job("9").unwrap());
    assert_eq!(pending.start.unwrap() - timeout.start.unwrap(), 7_200);
}

#[test]
fn an_empty_queue_is_a_complete_snapshot_of_no_jobs() {
    let snapshot = parse_squeue(b"", 5);
    assert!(snapshot.complete);
    assert!(snapshot.jobs.is_empty());
}

#[test]
fn a_garbled_line_is_skipped_and_the_snapshot_is_not_complete() {
    let mut output = fixture("squeue-queue.txt");
    output.extend_from_slice(b"this is not squeue output\n");
    output.extend_from_slice(b"11\x1fRUNNING\x1fNone\x1f1\x1fUNLIMITED\x1froot\x1f0\n");
    output.extend_from_slice(
        b"12\x1fRUNNING\x1fNone\x1fyesterday\x1fUNLIMITED\x1froot\x1f0\x1fsatnode\n",
    );
    output.extend_from_slice(b"13\x1fRUNNING\x1fNone\x1f1\x1fUNLIMITED\x1froot\x1f-1\x1fsatnode\n");
    output
        .extend_from_slice(b"14 x\x1fRUNNING\x1fNone\x1f1\x1fUNLIMITED\x1froot\x1f0\x1fsatnode\n");
    let snapshot = parse_squeue(&output, 0);
    assert!(!snapshot.complete);
    assert_eq!(snapshot.jobs.len(), 6);
}

#[test]
fn hostile_node_lists_are_refused_without_exploding() {
    let line = b"15\x1fRUNNING\x1fNone\x1f1\x1fUNLIMITED\x1froot\x1f0\x1fn[0-99999999999]\n";
    let snapshot = parse_squeue(line, 0);
    assert!(!snapshot.complete);
    assert!(snapshot.jobs.is_empty());
    let nested = b"16\x1fRUNNING\x1fNone\x1f1\x1fUNLIMITED\x1froot\x1f0\x1fn[1-2[3]]\n";
    assert!(!parse_squeue(nested, 0).complete);
}

#[test]
fn non_utf8_and_binary_output_never_panics() {
    let mut output =
        b"17\x1fRUNNING\x1f\xff\xfe\x1f1\x1fUNLIMITED\x1froot\x1f0\x1fsatnode\n".to_vec();
    output.extend((0u8..=255).cycle().take(10_000));
    let snapshot = parse_squeue(&output, 0);
    assert!(!snapshot.complete);
    assert!(snapshot.job("17").is_none());
    for len in 0..200 {
        let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
        let _ = parse_squeue(&junk, 0);
    }
}

#[test]
fn windows_line_ends_and_blank_lines_are_harmless() {
    let text = String::from_utf8(fixture("squeue-timeout.txt")).unwrap();
    let crlf = text.replace('\n', "\r\n\r\n");
    let snapshot = parse_squeue(crlf.as_bytes(), 0);
    assert!(snapshot.complete);
    assert_eq!(snapshot.jobs.len(), 3);
}
