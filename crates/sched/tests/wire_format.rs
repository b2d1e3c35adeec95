//! The update-jobs body: new snapshots round-trip, old bodies keep their
//! meaning, hostile bodies never panic.

use satellite_sched::slurm::parse_squeue;
use satellite_sched::wire::parse_form_body;
use satellite_sched::{JobInfo, JobSnapshot, JobState, StateClass};

fn full_job() -> JobInfo {
    JobInfo {
        id: "4242".into(),
        state: JobState::new("PENDING"),
        reason: Some("Nodes required for job are DOWN, DRAINED 100% - really".into()),
        start: Some(1_795_699_621),
        time_limit_secs: Some(3_600),
        user: Some("ålice".into()),
        uid: Some(1_234),
        nodes: vec![
            "node01".into(),
            "node02".into(),
            "node03".into(),
            "node07".into(),
            "gpu-2".into(),
        ],
    }
}

#[test]
fn a_complete_snapshot_round_trips_through_the_body() {
    let snapshot = JobSnapshot {
        complete: true,
        taken_at: 1_795_696_030,
        jobs: vec![
            full_job(),
            JobInfo::new("4243", JobState::new("RUNNING")),
            JobInfo {
                reason: Some("-".into()),
                ..JobInfo::new("4244_[1-5%2]", JobState::new("CANCELLED by 0"))
            },
        ],
    };
    let body = snapshot.to_form_body();
    let back = parse_form_body(body.as_bytes());
    assert!(back.complete);
    assert_eq!(back.taken_at, 1_795_696_030);
    assert_eq!(back.jobs[0], snapshot.jobs[0]);
    assert_eq!(back.jobs[1], snapshot.jobs[1]);
    // The wire carries the state's first word: old brokers read it.
    assert_eq!(back.jobs[2].state.raw(), "CANCELLED");
    assert_eq!(back.jobs[2].id, "4244_[1-5%2]");
    assert_eq!(back.jobs[2].reason.as_deref(), Some("-"));
}

#[test]
fn the_body_is_exactly_what_old_brokers_split_into_id_and_state() {
    let snapshot = JobSnapshot {
        complete: true,
        taken_at: 17,
        jobs: vec![full_job(), JobInfo::new("9", JobState::new("CD"))],
    };
    assert_eq!(
        snapshot.to_form_body(),
        "jobstates=4242+PENDING+Nodes%2520required%2520for%2520job%2520are%2520DOWN%2C\
         %2520DRAINED%2520100%2525%2520-%2520really+1795699621+3600+%25C3%25A5lice+1234\
         +node%5B01-03%2C07%5D%2Cgpu-2%0A9+CD+-+-+-+-+-+-%0A&complete=1&taken=17"
    );
}

#[test]
fn a_real_squeue_snapshot_survives_the_trip() {
    let output = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/squeue-node-down.txt"),
    )
    .unwrap();
    let snapshot = parse_squeue(&output, 1_795_696_050);
    assert_eq!(
        parse_form_body(snapshot.to_form_body().as_bytes()),
        snapshot
    );
}

#[test]
fn an_old_style_body_is_never_complete_and_ignores_extra_fields() {
    let old =
        parse_form_body(b"jobstates=%20%20%204242%20RUNNING%20debug%20jupyter%0A4243 PENDING\n");
    assert!(!old.complete);
    assert_eq!(old.jobs.len(), 2);
    assert_eq!(old.jobs[0].id, "4242");
    assert_eq!(old.jobs[0].state.class(), StateClass::Running);
    assert_eq!(old.jobs[0].reason, None);
    assert_eq!(old.jobs[1].state.raw(), "PENDING");
    // complete=1 without taken is not a new pusher's body.
    assert!(!parse_form_body(b"jobstates=1+R%0A&complete=1").complete);
}

#[test]
fn a_bad_line_is_skipped_and_makes_the_snapshot_incomplete() {
    let body = b"jobstates=1+RUNNING+-+-+-+-+-+-%0A2+RUNNING+-+-%0A3+R+-+notanumber+-+-+-+-%0A\
4+R+-+-+-+-+-+n%5B0-99999999%5D%0A5+R+-+-+-+-+-1+-%0A&complete=1&taken=9";
    let snapshot = parse_form_body(body);
    assert!(!snapshot.complete);
    assert_eq!(snapshot.taken_at, 9);
    assert_eq!(snapshot.jobs.len(), 1);
    assert_eq!(snapshot.jobs[0].id, "1");
}

#[test]
fn the_first_of_repeated_fields_counts_and_unknown_fields_are_ignored() {
    let snapshot = parse_form_body(
        b"other=x;jobstates=1+R+-+-+-+-+-+-&jobstates=2+R&complete=1&complete=0&taken=5&taken=6",
    );
    assert!(snapshot.complete);
    assert_eq!(snapshot.taken_at, 5);
    assert_eq!(snapshot.jobs.len(), 1);
}

#[test]
fn hostile_bodies_never_panic() {
    for body in [
        &b""[..],
        b"&&&==&",
        b"jobstates",
        b"jobstates=%",
        b"jobstates=%zz%4",
        b"jobstates=%FF%FE+%FF&taken=%FF",
        b"jobstates=1+R+%FF+-+-+-+-+-&taken=1&complete=1",
        b"jobstates=1+R+-+99999999999999999999999+-+-+-+-&taken=1",
        b"taken=-99999999999999999999999&complete=1",
    ] {
        let snapshot = parse_form_body(body);
        assert!(!snapshot.complete, "{body:?}");
    }
    let junk: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let _ = parse_form_body(&junk);
}

#[test]
fn an_empty_complete_snapshot_says_there_are_no_jobs() {
    let snapshot = JobSnapshot {
        complete: true,
        taken_at: 3,
        jobs: vec![],
    };
    assert_eq!(snapshot.to_form_body(), "jobstates=%0A&complete=1&taken=3");
    assert_eq!(
        parse_form_body(b"jobstates=%0A&complete=1&taken=3"),
        snapshot
    );
    assert_eq!(parse_form_body(b"jobstates=&complete=1&taken=3"), snapshot);
}

#[test]
fn legacy_tables_keep_underscores_and_skip_unusable_lines() {
    let jobs = satellite_sched::wire::parse_legacy_table(
        b"\n  12345 PENDING\n12346 OUT_OF_MEMORY extra\n0 R\n12347\n12348.tscc-mgr.local R\r\n",
    );
    let pairs: Vec<(&str, &str)> = jobs
        .iter()
        .map(|j| (j.id.as_str(), j.state.raw()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("12345", "PENDING"),
            ("12346", "OUT_OF_MEMORY"),
            ("12348.tscc-mgr.local", "R")
        ]
    );
}
