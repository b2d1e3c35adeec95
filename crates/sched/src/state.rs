//! Job state classes: what a scheduler's state text means for a session.

/// What a state means for the session of the job in that state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateClass {
    /// Not started yet (queued, held, configuring nodes, requeued).
    Pending,
    /// Holds its allocation: the notebook may be serving.
    Running,
    /// Over for good: the session's route must go.
    Ended,
    /// A state this crate does not know: no news either way.
    Other,
}

/// A scheduler's state text as it gave it, with its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobState {
    raw: String,
    class: StateClass,
}

impl JobState {
    /// Classifies `raw`, long or short Slurm codes alike (`CANCELLED`, `CA`,
    /// sacct's `CANCELLED by 0` and its truncated `CANCELLED+`).
    pub fn new(raw: impl Into<String>) -> Self {
        let raw = raw.into();
        let class = classify(&raw);
        JobState { raw, class }
    }

    /// The text as the scheduler printed it.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// The first word of the text, without sacct's truncation mark: what
    /// goes on the wire, where a field cannot contain blanks.
    pub fn base(&self) -> &str {
        self.raw
            .split_ascii_whitespace()
            .next()
            .unwrap_or("")
            .trim_end_matches('+')
    }

    pub fn class(&self) -> StateClass {
        self.class
    }

    pub fn is_ended(&self) -> bool {
        self.class == StateClass::Ended
    }
}

/// Slurm's long names and short codes (squeue(1), JOB STATE CODES).
///
/// COMPLETING (CG) counts as ended: the batch script has exited, so the
/// notebook is gone or being killed, and a node stuck in its epilog can
/// keep a job in CG for many minutes, longer than a stale route may live.
/// A requeued job also passes through CG; its session died with it, and
/// the requeued run starts a new one.
///
/// SUSPENDED, STOPPED, SIGNALING and RESIZING keep the allocation, so they
/// count as running. SPECIAL_EXIT and the REQUEUE states put the job back
/// in the queue, so they count as pending. PR is Slurm's PREEMPTED, which
/// is unrelated to satellite's synthetic `PR` (proxied) code.
const SLURM_STATES: &[(&str, &str, StateClass)] = &[
    ("PENDING", "PD", StateClass::Pending),
    ("CONFIGURING", "CF", StateClass::Pending),
    ("REQUEUED", "RQ", StateClass::Pending),
    ("REQUEUE_FED", "RF", StateClass::Pending),
    ("REQUEUE_HOLD", "RH", StateClass::Pending),
    ("RESV_DEL_HOLD", "RD", StateClass::Pending),
    ("SPECIAL_EXIT", "SE", StateClass::Pending),
    ("POWER_UP_NODE", "PU", StateClass::Pending),
    ("RUNNING", "R", StateClass::Running),
    ("SUSPENDED", "S", StateClass::Running),
    ("STOPPED", "ST", StateClass::Running),
    ("SIGNALING", "SI", StateClass::Running),
    ("RESIZING", "RS", StateClass::Running),
    ("COMPLETING", "CG", StateClass::Ended),
    ("COMPLETED", "CD", StateClass::Ended),
    ("CANCELLED", "CA", StateClass::Ended),
    ("FAILED", "F", StateClass::Ended),
    ("TIMEOUT", "TO", StateClass::Ended),
    ("NODE_FAIL", "NF", StateClass::Ended),
    ("OUT_OF_MEMORY", "OOM", StateClass::Ended),
    ("PREEMPTED", "PR", StateClass::Ended),
    ("BOOT_FAIL", "BF", StateClass::Ended),
    ("DEADLINE", "DL", StateClass::Ended),
    ("REVOKED", "RV", StateClass::Ended),
    ("STAGE_OUT", "SO", StateClass::Ended),
];

fn classify(raw: &str) -> StateClass {
    let word = raw
        .split_ascii_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches('+');
    SLURM_STATES
        .iter()
        .find(|(long, short, _)| {
            word.eq_ignore_ascii_case(long) || word.eq_ignore_ascii_case(short)
        })
        .map_or(StateClass::Other, |&(_, _, class)| class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_terminal_state_of_the_issue_is_ended_in_long_and_short_form() {
        for code in [
            "COMPLETED",
            "CD",
            "CANCELLED",
            "CA",
            "FAILED",
            "F",
            "TIMEOUT",
            "TO",
            "NODE_FAIL",
            "NF",
            "OUT_OF_MEMORY",
            "OOM",
            "PREEMPTED",
            "PR",
            "BOOT_FAIL",
            "BF",
            "DEADLINE",
            "DL",
        ] {
            assert_eq!(JobState::new(code).class(), StateClass::Ended, "{code}");
        }
    }

    #[test]
    fn sacct_spellings_are_understood() {
        let state = JobState::new("CANCELLED by 0");
        assert!(state.is_ended());
        assert_eq!(state.base(), "CANCELLED");
        assert_eq!(state.raw(), "CANCELLED by 0");
        assert_eq!(JobState::new("CANCELLED+").base(), "CANCELLED");
        assert!(JobState::new("cancelled").is_ended());
    }

    #[test]
    fn queued_and_running_states_are_not_ended() {
        for (code, class) in [
            ("PENDING", StateClass::Pending),
            ("PD", StateClass::Pending),
            ("CONFIGURING", StateClass::Pending),
            ("REQUEUED", StateClass::Pending),
            ("RUNNING", StateClass::Running),
            ("R", StateClass::Running),
            ("SUSPENDED", StateClass::Running),
            ("S", StateClass::Running),
        ] {
            assert_eq!(JobState::new(code).class(), class, "{code}");
        }
    }

    #[test]
    fn unknown_or_empty_text_is_no_news() {
        for code in ["", "   ", "WHATEVER", "R2", "\u{fffd}"] {
            assert_eq!(JobState::new(code).class(), StateClass::Other, "{code:?}");
        }
    }
}
