//! The poison-pill breaker: when more than a set share of the recent tasks
//! fail for good, something is wrong with the handler or its dependencies,
//! not with the tasks. Rather than drain the whole topic into the
//! dead-letter topic, the processor stops: the failure that trips the
//! breaker is not dead-lettered, intake pauses, and nothing further is
//! committed until a cool-down has passed (or the worker restarts).
//!
//! The window counts terminal outcomes only (a task that will be retried
//! counts once it ends). It trips on the failure that would bring the
//! failures among the last `window` outcomes to `failure_ratio × window`
//! (500 of the last 1,000 by default), and that failure is held, not
//! dead-lettered: fewer dead letters than that are written before it trips.
//! After the cool-down the window starts empty.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Outcomes remembered.
    pub window: usize,
    /// Share of failures in the window that trips it, 0 to 1.
    pub failure_ratio: f64,
    /// How long it stays open.
    pub cooldown: Duration,
}

/// Sliding-window breaker. Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    outcomes: VecDeque<bool>,
    failures: usize,
    open_until: Option<Instant>,
}

/// What recording an outcome did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carry on.
    Closed,
    /// This failure tripped the breaker (or it was open already): hold the
    /// task until the breaker closes.
    Open,
}

impl Breaker {
    /// A closed breaker with an empty window.
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            outcomes: VecDeque::with_capacity(config.window),
            failures: 0,
            open_until: None,
        }
    }

    /// Failures in the window that trip it (at least 1).
    pub fn threshold(&self) -> usize {
        ((self.config.failure_ratio * self.config.window as f64).ceil() as usize).max(1)
    }

    /// Whether it is open at `now`; closing after the cool-down empties the
    /// window.
    pub fn is_open(&mut self, now: Instant) -> bool {
        match self.open_until {
            Some(until) if now < until => true,
            Some(_) => {
                self.open_until = None;
                self.outcomes.clear();
                self.failures = 0;
                false
            }
            None => false,
        }
    }

    /// When it closes, if open.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    /// Whether a success would change nothing: closed, and the window
    /// full of successes (a success then replaces a success). The caller
    /// may skip recording successes while this holds.
    pub fn settled(&self) -> bool {
        self.open_until.is_none() && self.failures == 0 && self.outcomes.len() >= self.config.window
    }

    /// Records a success.
    pub fn success(&mut self, now: Instant) {
        if !self.is_open(now) {
            self.push(false);
        }
    }

    /// Records a terminal failure; `Open` means do not dead-letter it.
    pub fn failure(&mut self, now: Instant) -> Verdict {
        if self.is_open(now) {
            return Verdict::Open;
        }
        // Failures in the window once this one is in and the oldest out.
        let full = self.outcomes.len() >= self.config.window;
        let evicted = usize::from(full && self.outcomes.front() == Some(&true));
        if self.failures + 1 - evicted >= self.threshold() {
            self.open_until = Some(now + self.config.cooldown);
            return Verdict::Open;
        }
        self.push(true);
        Verdict::Closed
    }

    fn push(&mut self, failed: bool) {
        if self.config.window == 0 {
            return;
        }
        if self.outcomes.len() == self.config.window {
            if let Some(true) = self.outcomes.pop_front() {
                self.failures -= 1;
            }
        }
        self.outcomes.push_back(failed);
        if failed {
            self.failures += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            window: 10,
            failure_ratio: 0.5,
            cooldown: Duration::from_secs(60),
        })
    }

    #[test]
    fn settled_once_the_window_is_full_of_successes() {
        let mut b = breaker();
        let now = Instant::now();
        for _ in 0..9 {
            b.success(now);
            assert!(!b.settled(), "the window is not full yet");
        }
        b.success(now);
        assert!(b.settled());
        assert_eq!(b.failure(now), Verdict::Closed);
        assert!(!b.settled(), "a failure is in the window");
        for _ in 0..9 {
            b.success(now);
            assert!(!b.settled(), "the failure is still in the window");
        }
        b.success(now);
        assert!(b.settled(), "the failure left the window");
    }

    #[test]
    fn trips_on_the_failure_that_reaches_the_threshold() {
        let mut b = breaker();
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(b.failure(now), Verdict::Closed);
        }
        assert_eq!(b.failure(now), Verdict::Open, "the fifth of ten trips it");
        assert!(b.is_open(now));
        assert_eq!(b.failure(now), Verdict::Open);
    }

    #[test]
    fn old_failures_slide_out_of_the_window() {
        let mut b = breaker();
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(b.failure(now), Verdict::Closed);
        }
        for _ in 0..6 {
            b.success(now);
        }
        // The window is full: 4 failures, then 6 successes. Each new failure
        // pushes out an old failure first, so the count stays at 4.
        for _ in 0..4 {
            assert_eq!(b.failure(now), Verdict::Closed);
        }
        for _ in 0..6 {
            b.success(now);
        }
        assert!(!b.is_open(now));
    }

    #[test]
    fn closes_after_the_cooldown_with_an_empty_window() {
        let mut b = breaker();
        let now = Instant::now();
        for _ in 0..5 {
            b.failure(now);
        }
        assert!(b.is_open(now + Duration::from_secs(59)));
        let later = now + Duration::from_secs(61);
        assert!(!b.is_open(later));
        for _ in 0..4 {
            assert_eq!(b.failure(later), Verdict::Closed);
        }
    }
}
