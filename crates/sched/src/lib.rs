//! The scheduler interface of satellite: what the batch system says about
//! jobs, in a form the broker can act on.
//!
//! A [`Scheduler`] takes a [`JobSnapshot`]: every job it knows at one
//! moment, each a [`JobInfo`] with its state classified ([`StateClass`]:
//! pending, running, ended or unknown), reason, start, time limit, owner
//! and expanded node names. The snapshot travels from the host that can
//! query the scheduler to the broker's `update-jobs.cgi` in the form body
//! of [`wire`], which old brokers still read as their `<jobid> <state>`
//! table.
//!
//! Failure semantics: a scheduler error is no news. A failed, timed-out or
//! oversized query is an `Err`, never a snapshot; a snapshot with lines we
//! could not parse keeps the jobs we could read but is not `complete`, so
//! a job missing from it proves nothing.
//!
//! ```
//! use satellite_sched::{wire, JobSnapshot, StateClass};
//!
//! let snapshot = wire::parse_form_body(b"jobstates=4242+RUNNING%0A4243+CD%0A");
//! assert!(!snapshot.complete); // an old-style push says nothing of absent jobs
//! assert_eq!(snapshot.jobs[1].state.class(), StateClass::Ended);
//! ```
//!
//! Adding a scheduler: write a module next to [`slurm`] with a type that
//! implements [`Scheduler`] by one query for all jobs (PBS: one
//! `qstat -f -x -F json`, or `qstat -f` parsed record by record, run with
//! [`run_with_timeout`]), map its state letters in [`state`] (PBS's `Q H W`
//! pending, `R E S` running, `F X` ended) and export it here.

pub mod hostlist;
mod process;
pub mod slurm;
pub mod state;
pub mod wire;

use std::time::Duration;

pub use process::{run_with_timeout, Output, MAX_OUTPUT};
pub use slurm::SlurmScheduler;
pub use state::{JobState, StateClass};

/// One job as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    pub id: String,
    pub state: JobState,
    /// Why it waits or why it ended (`Priority`, `Resources`,
    /// `NonZeroExitCode`…); `None` when the scheduler gives none.
    pub reason: Option<String>,
    /// Epoch seconds: the actual start, or the estimated start while
    /// pending (when the scheduler has an estimate).
    pub start: Option<i64>,
    /// `None` when unlimited or unknown.
    pub time_limit_secs: Option<i64>,
    pub user: Option<String>,
    pub uid: Option<u32>,
    /// Node names, expanded (at most [`hostlist::MAX_HOSTS`]).
    pub nodes: Vec<String>,
}

impl JobInfo {
    /// A job known by id and state only (a legacy push).
    pub fn new(id: impl Into<String>, state: JobState) -> Self {
        JobInfo {
            id: id.into(),
            state,
            reason: None,
            start: None,
            time_limit_secs: None,
            user: None,
            uid: None,
            nodes: Vec::new(),
        }
    }
}

/// The jobs a scheduler reported at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSnapshot {
    /// Every job the scheduler knows now is in `jobs`: a linked job absent
    /// from a complete snapshot has ended (or been purged, which is later).
    pub complete: bool,
    /// Epoch seconds when the query was sent: jobs submitted after it may
    /// be missing even from a complete snapshot.
    pub taken_at: i64,
    pub jobs: Vec<JobInfo>,
}

impl JobSnapshot {
    pub fn job(&self, id: &str) -> Option<&JobInfo> {
        self.jobs.iter().find(|job| job.id == id)
    }

    /// The `update-jobs.cgi` POST body (see [`wire`]).
    pub fn to_form_body(&self) -> String {
        wire::to_form_body(self)
    }
}

/// Why a scheduler query gave no snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not answer within {after:?} and was killed")]
    Timeout { program: String, after: Duration },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{program} printed more than {limit} bytes")]
    TooLarge { program: String, limit: usize },
    #[error("reading the output of {program}")]
    Io {
        program: String,
        source: std::io::Error,
    },
}

/// A batch system that can list its jobs.
pub trait Scheduler {
    /// Every job the scheduler knows now, by one query that is abandoned
    /// (and its process killed) after `timeout`.
    ///
    /// # Errors
    /// Any failure of the query: it must never be mistaken for an empty
    /// or partial list of jobs.
    fn snapshot(&self, timeout: Duration) -> Result<JobSnapshot, SchedError>;
}
