//! What to do after a failed attempt: retry in place after a short backoff,
//! park the task in the retry topic for a long one, or give up. Pure and
//! unit-tested; the engine carries the decision out.
//!
//! Backoff before attempt `n + 1` is `initial × 2^(n-1)`, capped at `max`,
//! then spread by ± `jitter` (a fraction) so that tasks that failed
//! together do not all come back at the same instant.

use std::time::Duration;

/// Retry settings of one task type, resolved from the processor's settings
/// and the task type's overrides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff after the first failure.
    pub initial_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Spread of each backoff, 0 to 1.
    pub jitter: f64,
    /// Backoffs at least this long go through the retry topic; `None`: never.
    pub retry_topic_threshold: Option<Duration>,
}

/// The decision after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No attempts left: the task fails for good.
    Exhausted,
    /// Wait this long, then run again in place (the lane waits).
    InPlace(Duration),
    /// Hand the task to the retry topic, due after this long.
    RetryTopic(Duration),
}

impl RetryPolicy {
    /// The backoff after failed attempt `attempt` (1-based), before jitter.
    pub fn base_backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(62);
        let factor = 1u64 << doublings;
        let millis = u64::try_from(self.initial_backoff.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(factor);
        Duration::from_millis(millis).min(self.max_backoff)
    }

    /// What to do after attempt `attempt` failed with a retryable error.
    /// `unit` is a uniform random number in [0, 1) for the jitter.
    pub fn decide(&self, attempt: u32, unit: f64) -> Decision {
        self.decide_after(attempt, None, unit)
    }

    /// [`RetryPolicy::decide`] when the handler asked for a wait of its
    /// own (`asked`, an HTTP `Retry-After`): that wait, capped at
    /// `max_backoff` and not jittered, replaces the backoff.
    pub fn decide_after(&self, attempt: u32, asked: Option<Duration>, unit: f64) -> Decision {
        if attempt >= self.max_attempts {
            return Decision::Exhausted;
        }
        let delay = match asked {
            Some(asked) => asked.min(self.max_backoff),
            None => {
                let base = self.base_backoff(attempt).as_secs_f64();
                let spread = self.jitter.clamp(0.0, 1.0) * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
                Duration::from_secs_f64((base * (1.0 + spread)).max(0.0))
            }
        };
        match self.retry_topic_threshold {
            Some(threshold) if delay >= threshold => Decision::RetryTopic(delay),
            _ => Decision::InPlace(delay),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1_000),
            jitter: 0.0,
            retry_topic_threshold: Some(Duration::from_millis(800)),
        }
    }

    #[test]
    fn a_wait_the_handler_asks_for_replaces_the_backoff_up_to_the_cap() {
        let p = policy();
        let asked = |ms| p.decide_after(1, Some(Duration::from_millis(ms)), 0.99);
        assert_eq!(asked(300), Decision::InPlace(Duration::from_millis(300)));
        assert_eq!(asked(900), Decision::RetryTopic(Duration::from_millis(900)));
        assert_eq!(
            asked(60_000),
            Decision::RetryTopic(Duration::from_millis(1_000))
        );
        assert_eq!(
            p.decide_after(6, Some(Duration::from_millis(300)), 0.5),
            Decision::Exhausted
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = policy();
        let ms: Vec<u128> = (1..=6).map(|a| p.base_backoff(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn short_backoffs_stay_in_place_long_ones_use_the_retry_topic() {
        let p = policy();
        assert_eq!(
            p.decide(1, 0.5),
            Decision::InPlace(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(3, 0.5),
            Decision::InPlace(Duration::from_millis(400))
        );
        assert_eq!(
            p.decide(4, 0.5),
            Decision::RetryTopic(Duration::from_millis(800))
        );
        assert_eq!(p.decide(6, 0.5), Decision::Exhausted);
        let no_topic = RetryPolicy {
            retry_topic_threshold: None,
            ..p
        };
        assert_eq!(
            no_topic.decide(5, 0.5),
            Decision::InPlace(Duration::from_millis(1000))
        );
    }

    #[test]
    fn jitter_spreads_within_its_fraction() {
        let p = RetryPolicy {
            jitter: 0.2,
            ..policy()
        };
        assert_eq!(
            p.decide(2, 0.0),
            Decision::InPlace(Duration::from_millis(160))
        );
        assert_eq!(
            p.decide(2, 0.5),
            Decision::InPlace(Duration::from_millis(200))
        );
        let Decision::InPlace(high) = p.decide(2, 0.999_999) else {
            panic!("in place")
        };
        assert!(high <= Duration::from_millis(240) && high > Duration::from_millis(239));
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let p = RetryPolicy {
            max_attempts: 1,
            ..policy()
        };
        assert_eq!(p.decide(1, 0.5), Decision::Exhausted);
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy();
        assert_eq!(p.base_backoff(u32::MAX), Duration::from_millis(1000));
    }
}
