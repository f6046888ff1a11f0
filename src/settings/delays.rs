//! `[delays]`: delayed tasks wait in tier topics, one per fixed delay.

use super::*;

/// `[delays]`: where delayed tasks wait and how long they may.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelaySettings {
    /// Workers move delayed tasks through the tiers, and the gateway
    /// accepts `delay` and `run_at` (on by default). Off: the tier topics
    /// are not needed, and a task with a delay is refused.
    pub enabled: bool,
    /// The tier topics are `<topic_prefix><tier>`, such as
    /// `conveyor.delay.10m`.
    pub topic_prefix: String,
    /// The tiers, in seconds, ascending: a task waits in the longest tier
    /// not longer than what remains of its delay, then moves on to a
    /// shorter one or, when due, to its task topic. A task starts at most
    /// the shortest tier after its time (plus the tiers' lag).
    pub tiers_s: Vec<u64>,
    /// The longest delay accepted, in seconds (30 days).
    pub max_delay_s: u64,
    /// The consumer group of the workers' movers.
    pub group_id: String,
    /// The movers' session timeout: how long a crashed worker's tier
    /// partitions wait before another mover takes them (10 s, as the
    /// processors' default).
    pub session_timeout_ms: u64,
}

/// Longest tier: a week.
pub const MAX_TIER_S: u64 = 7 * 24 * 3600;
/// Most tiers.
pub const MAX_TIERS: usize = 16;
/// Longest `max_delay_s`: a year.
pub const MAX_DELAY_S: u64 = 366 * 24 * 3600;

impl Default for DelaySettings {
    fn default() -> Self {
        DelaySettings {
            enabled: true,
            topic_prefix: "conveyor.delay.".into(),
            tiers_s: vec![1, 10, 60, 600, 3600, 36_000],
            max_delay_s: 30 * 24 * 3600,
            group_id: "conveyor.delays".into(),
            session_timeout_ms: 10_000,
        }
    }
}

/// A tier's name: its length in the largest unit that divides it (`90s`,
/// `10m`, `1h`, `2d`).
pub fn tier_label(seconds: u64) -> String {
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if seconds >= size && seconds.is_multiple_of(size) {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
}

impl DelaySettings {
    /// The tier topics, shortest tier first, with each tier's length.
    pub fn tier_topics(&self) -> Vec<(u64, String)> {
        self.tiers_s
            .iter()
            .map(|&s| (s, format!("{}{}", self.topic_prefix, tier_label(s))))
            .collect()
    }

    pub(super) fn validate(&self, bad: &mut impl FnMut(String, &str)) {
        if let Err(why) = check_topic_name(&format!("{}1s", self.topic_prefix)) {
            bad("delays.topic_prefix".into(), &why);
        }
        if self.group_id.trim().is_empty() {
            bad("delays.group_id".into(), "must not be empty");
        }
        if self.tiers_s.is_empty() {
            bad("delays.tiers_s".into(), "needs at least one tier");
        }
        if self.tiers_s.len() > MAX_TIERS {
            bad(
                "delays.tiers_s".into(),
                &format!("has {} tiers; at most {MAX_TIERS}", self.tiers_s.len()),
            );
        }
        for (i, &s) in self.tiers_s.iter().enumerate() {
            if s == 0 || s > MAX_TIER_S {
                bad(
                    format!("delays.tiers_s[{i}]"),
                    &format!("must be 1 to {MAX_TIER_S} seconds"),
                );
            }
            if i > 0 && self.tiers_s.get(i - 1).is_some_and(|&before| before >= s) {
                bad(
                    format!("delays.tiers_s[{i}]"),
                    "must be longer than the tier before it (tiers ascend)",
                );
            }
        }
        if !(1_000..=3_600_000).contains(&self.session_timeout_ms) {
            bad(
                "delays.session_timeout_ms".into(),
                "must be between 1000 and 3600000",
            );
        }
        if self.max_delay_s == 0 || self.max_delay_s > MAX_DELAY_S {
            bad(
                "delays.max_delay_s".into(),
                &format!("must be 1 to {MAX_DELAY_S} seconds"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_named_by_their_largest_whole_unit() {
        let names: Vec<String> = DelaySettings::default()
            .tier_topics()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        assert_eq!(
            names,
            [
                "conveyor.delay.1s",
                "conveyor.delay.10s",
                "conveyor.delay.1m",
                "conveyor.delay.10m",
                "conveyor.delay.1h",
                "conveyor.delay.10h"
            ]
        );
        assert_eq!(tier_label(90), "90s");
        assert_eq!(tier_label(172_800), "2d");
    }

    #[test]
    fn bad_tiers_are_named() {
        let mut problems = Vec::new();
        let settings = DelaySettings {
            tiers_s: vec![10, 10, 0],
            max_delay_s: 0,
            topic_prefix: "bad prefix".into(),
            ..DelaySettings::default()
        };
        settings.validate(&mut |key, why| problems.push(format!("{key}: {why}")));
        assert_eq!(
            problems,
            [
                "delays.topic_prefix: `bad prefix1s` contains ' '; topic names use only letters, digits, `.`, `_` and `-`",
                "delays.tiers_s[1]: must be longer than the tier before it (tiers ascend)",
                "delays.tiers_s[2]: must be 1 to 604800 seconds",
                "delays.tiers_s[2]: must be longer than the tier before it (tiers ascend)",
                "delays.max_delay_s: must be 1 to 31622400 seconds",
            ]
        );
    }
}
