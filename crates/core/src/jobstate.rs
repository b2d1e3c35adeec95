//! Job states pushed by the scheduler and the synthetic progress code that
//! the waiting page polls (`U PE M PR Q R D`).

use crate::store::{ProxyState, TokenJob};

/// Pushed job state older than this no longer counts.
pub const STALE_AFTER_SECS: i64 = 600;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobClass {
    Waiting,
    Running,
    Gone,
    Unknown,
}

/// The configured code lists, normalised once.
#[derive(Clone, Debug)]
pub struct JobClassifier {
    wait: Vec<String>,
    run: Vec<String>,
    gone: Vec<String>,
}

/// Upper-case, letters and digits only: `out_of_memory`, `OUT_OF_MEMORY`
/// and the original's mangled `OUTOFMEMORY` all become `OUTOFMEMORY`.
pub fn normalize_state(state: &str) -> String {
    state
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

impl JobClassifier {
    pub fn new(wait: &[String], run: &[String], gone: &[String]) -> Self {
        let norm = |list: &[String]| list.iter().map(|s| normalize_state(s)).collect();
        JobClassifier {
            wait: norm(wait),
            run: norm(run),
            gone: norm(gone),
        }
    }

    /// Gone is tested first, as the original did: a code in two lists
    /// counts as gone.
    pub fn classify(&self, state: &str) -> JobClass {
        let state = normalize_state(state);
        if state.is_empty() {
            JobClass::Unknown
        } else if self.gone.contains(&state) {
            JobClass::Gone
        } else if self.run.contains(&state) {
            JobClass::Running
        } else if self.wait.contains(&state) {
            JobClass::Waiting
        } else {
            JobClass::Unknown
        }
    }

    /// The code tokenjobstate answers (legacy-srps.md 9.3).
    pub fn display_code(&self, token: &TokenJob, now_epoch: i64) -> &'static str {
        if token.proxy_state == ProxyState::Ended {
            return "D";
        }
        let class = token
            .job_state
            .as_deref()
            .map_or(JobClass::Unknown, |s| self.classify(s));
        let staleness = now_epoch - token.job_lastseen.unwrap_or(0);
        let basic =
            token.jobid.is_none() || class == JobClass::Unknown || staleness > STALE_AFTER_SECS;
        if !basic && class == JobClass::Gone {
            return "D";
        }
        match (&token.proxy_state, basic, class) {
            (ProxyState::Pending, true, _) => "PE",
            (ProxyState::Pending, false, JobClass::Waiting) => "Q",
            (ProxyState::Pending, false, _) => "R",
            (ProxyState::Mapped, _, _) => "M",
            (ProxyState::Proxied, _, _) => "PR",
            (ProxyState::Ended | ProxyState::Other(_), _, _) => "U",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{default_gone_codes, default_run_codes, default_wait_codes};

    fn classifier() -> JobClassifier {
        JobClassifier::new(
            &default_wait_codes(),
            &default_run_codes(),
            &default_gone_codes(),
        )
    }

    fn token(state: ProxyState, job: Option<(&str, i64)>) -> TokenJob {
        TokenJob {
            proxy_state: state,
            jobid: job.map(|_| "123".to_owned()),
            job_state: job.map(|(s, _)| s.to_owned()),
            job_lastseen: job.map(|(_, t)| t),
            job: None,
            redeemed: false,
            ended_at: None,
            end_cause: None,
            end_kind: None,
            expired: false,
        }
    }

    #[test]
    fn long_form_states_with_underscores_classify() {
        let c = classifier();
        assert_eq!(c.classify("OUT_OF_MEMORY"), JobClass::Gone);
        assert_eq!(c.classify("boot_fail"), JobClass::Gone);
        assert_eq!(c.classify("REQUEUE_HOLD"), JobClass::Waiting);
        assert_eq!(c.classify("running"), JobClass::Running);
        assert_eq!(c.classify("WHATEVER"), JobClass::Unknown);
        assert_eq!(c.classify(""), JobClass::Unknown);
    }

    #[test]
    fn the_display_table() {
        let c = classifier();
        let now = 10_000;
        let fresh = now - 10;
        assert_eq!(c.display_code(&token(ProxyState::Pending, None), now), "PE");
        assert_eq!(
            c.display_code(&token(ProxyState::Pending, Some(("PD", fresh))), now),
            "Q"
        );
        assert_eq!(
            c.display_code(&token(ProxyState::Pending, Some(("R", fresh))), now),
            "R"
        );
        assert_eq!(
            c.display_code(&token(ProxyState::Mapped, Some(("R", fresh))), now),
            "M"
        );
        assert_eq!(
            c.display_code(&token(ProxyState::Proxied, Some(("R", fresh))), now),
            "PR"
        );
        assert_eq!(
            c.display_code(&token(ProxyState::Proxied, Some(("CG", fresh))), now),
            "D"
        );
        assert_eq!(
            c.display_code(&token(ProxyState::Pending, Some(("CA", now - 601))), now),
            "PE"
        );
        assert_eq!(
            c.display_code(&token(ProxyState::Other("x".into()), None), now),
            "U"
        );
    }
}
