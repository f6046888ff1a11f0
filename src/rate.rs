//! Rate limits per task type (`rate_limit = "50/s"`): tasks of a limited
//! type wait for a token before each attempt; other types, and the
//! partitions' other work, go on meanwhile.
//!
//! A waiting task holds its place in the processor's in-flight bounds
//! (it was read and not finished) and its lane (order per key holds), and
//! is counted by `conveyor_rate_limited_tasks`; a drain lets go of it at
//! once, like any task that only waits. Tokens come from a
//! [`governor`] limiter (GCRA): up to one period's count at once, then
//! evenly spaced.
//!
//! **Scope.** `rate_limit_scope = "group"` (the default) shares the rate
//! across the consumer group: each member takes the share of the type's
//! input partitions it owns, recomputed at every rebalance, so the
//! members' shares add up to the whole rate while the partitions are
//! spread. The group's total then stays within one burst per member of
//! the rate over any window (a member's first period may be a full burst),
//! and for the moment of a rebalance a member may run at its old share.
//! With `"worker"` every worker allows the whole rate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};

use crate::settings::{ProcessorSettings, RateScope};

/// Most tokens a rate may give in one period.
pub const MAX_RATE_COUNT: u32 = 1_000_000;

/// A rate: `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: u32,
    /// In how long.
    pub per: Duration,
}

/// Reads `50/s`, `100/min`, `3600/h`.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || {
        format!("`{text}` is not a rate: write <count>/s, <count>/min or <count>/h, such as 50/s")
    };
    let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count == 0 || count > MAX_RATE_COUNT {
        return Err(format!("`{text}`: the count must be 1 to {MAX_RATE_COUNT}"));
    }
    Ok(Rate { count, per })
}

/// The quota for `share` (0 to 1] of `rate`: tokens evenly spaced, with a
/// burst of the share's count per period (at least one).
fn quota(rate: Rate, share: f64) -> Option<Quota> {
    let count = f64::from(rate.count) * share.clamp(0.0, 1.0);
    if count <= 0.0 {
        return None;
    }
    let period = rate.per.div_f64(count);
    let burst = NonZeroU32::new((count.floor() as u32).max(1))?;
    Quota::with_period(period.max(Duration::from_nanos(1))).map(|q| q.allow_burst(burst))
}

/// One task type's limit.
#[derive(Debug)]
pub struct Limit {
    /// As configured.
    pub rate: Rate,
    scope: RateScope,
    /// The topics its tasks come from, whose partitions make the share.
    topics: Vec<String>,
    /// The limiter of the current share (replaced at rebalances; a task
    /// already waiting finishes its wait on the one it had).
    limiter: Mutex<Option<Arc<DefaultDirectRateLimiter>>>,
    /// The share `limiter` is for.
    share: Mutex<Option<f64>>,
}

impl Limit {
    /// The limiter to wait on now.
    pub fn limiter(&self) -> Option<Arc<DefaultDirectRateLimiter>> {
        self.limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A new limiter for `share`, unless the share is the one in force
    /// (a new limiter starts with a full burst).
    fn set_share(&self, share: f64) {
        let mut current = self.share.lock().unwrap_or_else(PoisonError::into_inner);
        if *current == Some(share) {
            return;
        }
        *current = Some(share);
        let limiter =
            quota(self.rate, share).map(|q| Arc::new(DefaultDirectRateLimiter::direct(q)));
        *self.limiter.lock().unwrap_or_else(PoisonError::into_inner) = limiter;
    }
}

/// The limits of a processor's task types.
#[derive(Debug, Default)]
pub struct Limits {
    by_type: HashMap<String, Limit>,
}

impl Limits {
    /// The limits `settings` configure (validated: a rate that does not
    /// parse is left out). Group-scoped ones start at the whole rate until
    /// the first assignment says the share.
    pub fn of(settings: &ProcessorSettings, task_topic: impl Fn(&str) -> String) -> Limits {
        let mut by_type = HashMap::new();
        for (task_type, task) in &settings.tasks {
            let Some(rate) = task.rate_limit.as_deref().and_then(|r| parse_rate(r).ok()) else {
                continue;
            };
            let own = task_topic(task_type);
            let mut topics = if settings.input_topics.contains(&own) {
                vec![own]
            } else {
                settings.input_topics.clone()
            };
            // Its retries come from the retry topics.
            if settings.uses_retry_topics() {
                let retries: Vec<String> = topics.iter().map(|t| settings.retry_topic(t)).collect();
                topics.extend(retries);
            }
            let limit = Limit {
                rate,
                scope: task.rate_limit_scope,
                topics,
                limiter: Mutex::new(None),
                share: Mutex::new(None),
            };
            limit.set_share(1.0);
            by_type.insert(task_type.clone(), limit);
        }
        Limits { by_type }
    }

    /// Whether any type is limited.
    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// `task_type`'s limit, if it has one.
    pub fn get(&self, task_type: &str) -> Option<&Limit> {
        self.by_type.get(task_type)
    }

    /// After a rebalance: each group-scoped limit takes the share of its
    /// topics' partitions in `owned` (partitions this member owns, by
    /// topic) out of `partitions` (each topic's partition count); a member
    /// owning none keeps one partition's share (no task of the type should
    /// come; one that does still waits).
    pub fn rescale(&self, owned: &HashMap<String, usize>, partitions: &HashMap<String, usize>) {
        for limit in self.by_type.values() {
            if limit.scope != RateScope::Group {
                continue;
            }
            let total: usize = limit
                .topics
                .iter()
                .map(|t| partitions.get(t).copied().unwrap_or(0))
                .sum();
            let mine: usize = limit
                .topics
                .iter()
                .map(|t| owned.get(t).copied().unwrap_or(0))
                .sum();
            let share = if total == 0 {
                1.0
            } else {
                mine.max(1) as f64 / total as f64
            };
            limit.set_share(share);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{HandlerKind, TaskSettings};

    #[test]
    fn rates_are_read_or_refused_with_the_form_to_use() {
        assert_eq!(
            parse_rate("50/s"),
            Ok(Rate {
                count: 50,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            parse_rate(" 100 / min ").map(|r| r.per),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(parse_rate("3600/h").map(|r| r.count), Ok(3600));
        for bad in ["50", "fifty/s", "50/day", "-1/s", "/s", ""] {
            assert_eq!(
                parse_rate(bad),
                Err(format!(
                    "`{bad}` is not a rate: write <count>/s, <count>/min or <count>/h, such as 50/s"
                )),
                "{bad}"
            );
        }
        assert_eq!(
            parse_rate("0/s"),
            Err("`0/s`: the count must be 1 to 1000000".into())
        );
    }

    #[test]
    fn a_group_limit_takes_the_share_of_partitions_owned() {
        let mut settings = ProcessorSettings {
            input_topics: vec!["t.pay".into(), "t.other".into()],
            retry_topic_threshold_ms: 0,
            ..ProcessorSettings::default()
        };
        settings.tasks.insert(
            "pay".into(),
            TaskSettings {
                rate_limit: Some("40/s".into()),
                ..TaskSettings::new(HandlerKind::Echo)
            },
        );
        settings.tasks.insert(
            "each".into(),
            TaskSettings {
                rate_limit: Some("10/s".into()),
                rate_limit_scope: RateScope::Worker,
                ..TaskSettings::new(HandlerKind::Echo)
            },
        );
        let limits = Limits::of(&settings, |t| format!("t.{t}"));
        let burst = |t: &str| {
            let limiter = limits.get(t).and_then(Limit::limiter);
            // Tokens to be had at once: the burst.
            limiter.map_or(0, |l| (0..100).take_while(|_| l.check().is_ok()).count())
        };
        assert_eq!(burst("pay"), 40);
        let partitions: HashMap<String, usize> =
            [("t.pay".to_owned(), 8), ("t.other".to_owned(), 8)].into();
        let owned: HashMap<String, usize> = [("t.pay".to_owned(), 2)].into();
        limits.rescale(&owned, &partitions);
        assert_eq!(burst("pay"), 10, "a quarter of the partitions: 10/s");
        // A worker-scoped limit keeps the whole rate; it reads every input.
        assert_eq!(burst("each"), 10);
        limits.rescale(&HashMap::new(), &partitions);
        assert_eq!(burst("pay"), 5, "owning none: one partition's share");
        assert!(limits.get("nothing").is_none());
    }
}
