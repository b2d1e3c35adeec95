//! `satellite jobstates poll`: the broker host asks the scheduler itself
//! (for sites where the Slurm client works on the proxy host) and applies
//! each snapshot to the store, as update-jobs does for a pushed one.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::Utc;
use satellite_core::metrics::{write_textfile, PollMetrics};
use satellite_core::sessions::{self, Snapshot};
use satellite_core::Config;
use satellite_sched::{Scheduler, SlurmScheduler};

pub struct PollOptions {
    /// Run one cycle and exit (non-zero if the query failed).
    pub once: bool,
    pub every: Duration,
    pub timeout: Duration,
    pub squeue: Option<PathBuf>,
}

/// Whether a cycle failed at the scheduler (not at the store): the
/// context `poll_once` gives a failed query.
fn is_query_error(err: &anyhow::Error) -> bool {
    err.to_string() == QUERY_FAILED
}

const QUERY_FAILED: &str = "querying the scheduler (no session was ended)";

/// One cycle: one scheduler query, applied. A failed query is an error and
/// changes nothing ("a scheduler error is no news").
pub fn poll_once(config: &Config, scheduler: &dyn Scheduler, timeout: Duration) -> Result<String> {
    let snapshot = scheduler.snapshot(timeout).context(QUERY_FAILED)?;
    let mut store = crate::admin::open_store(config)?;
    let applied = sessions::apply_snapshot(
        store.as_mut(),
        config,
        &Snapshot::from_wire(&snapshot),
        Utc::now(),
    )
    .context("applying the job snapshot")?;
    let mut out = String::new();
    for end in &applied.ended {
        let (alias, cause) = (&end.alias, &end.cause);
        out.push_str(&format!(
            "ended the session of token-id {}: {cause}\n",
            log_id(alias)
        ));
    }
    for (alias, mismatch) in &applied.warned {
        out.push_str(&format!(
            "job binding warning for token-id {}: {mismatch}\n",
            log_id(alias)
        ));
    }
    out.push_str(&format!(
        "{} job(s) from the scheduler{}\n",
        applied.recorded,
        if snapshot.complete {
            ""
        } else {
            " (incomplete snapshot: absent jobs are not taken as ended)"
        }
    ));
    Ok(out)
}

fn log_id(alias: &str) -> String {
    satellite_core::token::log_id(&satellite_core::token::alias_compare_hash(alias.as_bytes()))
        .to_owned()
}

/// `poll --once`, or a loop every `every` (±10% jitter, so that several
/// brokers do not query the controller in step) that logs and goes on
/// when a query fails.
pub fn poll(config: &Config, options: &PollOptions) -> Result<String> {
    let mut scheduler = SlurmScheduler::new();
    if let Some(squeue) = &options.squeue {
        scheduler = scheduler.with_squeue(squeue);
    }
    if options.once {
        return poll_once(config, &scheduler, options.timeout);
    }
    let metrics = PollMetrics::default();
    loop {
        metrics.queries.inc();
        match poll_once(config, &scheduler, options.timeout) {
            Ok(report) => crate::say(&report.to_string()),
            Err(err) => {
                if is_query_error(&err) {
                    metrics.errors.inc();
                }
                crate::complain(&format!("satellite jobstates poll: {err:#}"));
            }
        }
        if let Some(dir) = &config.metrics_textfile_dir {
            let mut text = String::new();
            metrics.render(&mut text);
            if let Err(err) = write_textfile(dir, "satellite-poll.prom", &text) {
                eprintln!("satellite jobstates poll: metrics: {err}");
            }
        }
        let jitter = rand::random_range(0.9..1.1);
        std::thread::sleep(options.every.mul_f64(jitter));
    }
}
