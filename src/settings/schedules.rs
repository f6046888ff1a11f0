//! `[[schedules]]` (periodic tasks) and `[scheduler]` (where the firing is
//! recorded).

use super::*;

/// What a worker that finds ticks it did not fire in time does with them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Misfire {
    /// One task for all of them (the latest tick).
    #[default]
    FireOnce,
    /// None: they are counted as misfires and the schedule goes on.
    Skip,
    /// One task each, the latest `max_catch_up` of them; older ones are
    /// counted as misfires.
    FireAll,
}

impl TryFrom<String> for Misfire {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        [Misfire::FireOnce, Misfire::Skip, Misfire::FireAll]
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                format!("`{name}` is not a misfire policy: use fire_once, skip or fire_all")
            })
    }
}

impl Misfire {
    /// The policy's name in a configuration.
    pub fn name(self) -> &'static str {
        match self {
            Misfire::FireOnce => "fire_once",
            Misfire::Skip => "skip",
            Misfire::FireAll => "fire_all",
        }
    }
}

/// One `[[schedules]]` entry: a task fired on a cron schedule.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSettings {
    /// Names the schedule in metrics, `conveyor schedules list` and each
    /// task's id (derived from the name and the tick).
    pub name: String,
    /// When: a cron expression of five fields (minute hour day-of-month
    /// month day-of-week) or six, seconds first (`*/5 * * * * *`).
    pub cron: String,
    /// The IANA time zone the expression is read in (`Europe/Paris`).
    #[serde(default = "utc")]
    pub timezone: String,
    /// The task type fired; it goes to that type's task topic.
    #[serde(rename = "type")]
    pub task_type: String,
    /// The task's payload: JSON text.
    #[serde(default = "empty_object")]
    pub payload: String,
    /// The task's key (ordering); none by default.
    #[serde(default)]
    pub key: Option<String>,
    /// What happens to ticks not fired within `misfire_grace_ms`.
    #[serde(default)]
    pub misfire: Misfire,
    /// How late a tick may be fired and still count as on time.
    #[serde(default = "default_grace")]
    pub misfire_grace_ms: u64,
    /// With `misfire = "fire_all"`: the most missed ticks fired.
    #[serde(default = "default_catch_up")]
    pub max_catch_up: u32,
    /// Each tick fires up to this long after its time, the same offset
    /// for a given tick whichever worker fires it (spreads schedules that
    /// share a tick).
    #[serde(default)]
    pub jitter_ms: u64,
}

fn utc() -> String {
    "UTC".into()
}

fn empty_object() -> String {
    "{}".into()
}

fn default_grace() -> u64 {
    60_000
}

fn default_catch_up() -> u32 {
    100
}

/// Most schedules in one configuration.
pub const MAX_SCHEDULES: usize = 1_000;
/// Largest `max_catch_up`.
pub const MAX_CATCH_UP: u32 = 10_000;
/// Longest `jitter_ms` and `misfire_grace_ms`: a day.
pub const MAX_SCHEDULE_SLACK_MS: u64 = 24 * 3_600_000;
/// Largest schedule payload.
pub const MAX_SCHEDULE_PAYLOAD: usize = 64 * 1024;

/// `[scheduler]`: how workers share the firing of `[[schedules]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSettings {
    /// A one-partition topic: the worker that owns its partition fires the
    /// schedules, and records each tick fired there (compacted, keyed by
    /// schedule).
    pub topic: String,
    /// The consumer group the workers share to pick that owner.
    pub group_id: String,
    /// How long a crashed owner's schedules wait before another worker
    /// takes over.
    pub session_timeout_ms: u64,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        SchedulerSettings {
            topic: "conveyor.schedules".into(),
            group_id: "conveyor.schedules".into(),
            session_timeout_ms: 10_000,
        }
    }
}

impl Settings {
    pub(super) fn validate_schedules(&self, bad: &mut impl FnMut(String, &str)) {
        if self.schedules.is_empty() {
            return;
        }
        if let Err(why) = check_topic_name(&self.scheduler.topic) {
            bad("scheduler.topic".into(), &why);
        }
        if self.scheduler.group_id.trim().is_empty() {
            bad("scheduler.group_id".into(), "must not be empty");
        }
        if !(1_000..=3_600_000).contains(&self.scheduler.session_timeout_ms) {
            bad(
                "scheduler.session_timeout_ms".into(),
                "must be between 1000 and 3600000",
            );
        }
        if self.schedules.len() > MAX_SCHEDULES {
            bad(
                "schedules".into(),
                &format!(
                    "has {} schedules; at most {MAX_SCHEDULES}",
                    self.schedules.len()
                ),
            );
        }
        let mut names = BTreeMap::new();
        for (i, s) in self.schedules.iter().enumerate() {
            let at = |key: &str| format!("schedules[{i}] ({}).{key}", s.name);
            if s.name.is_empty() {
                bad(format!("schedules[{i}].name"), "required");
            } else if !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                bad(at("name"), "use only letters, digits, `_`, `-` and `.`");
            } else if let Some(first) = names.insert(s.name.as_str(), i) {
                bad(
                    at("name"),
                    &format!("`{}` is also the name of schedules[{first}]", s.name),
                );
            }
            if let Err(why) = crate::schedule::parse_cron(&s.cron) {
                bad(at("cron"), &why);
            }
            if let Err(why) = crate::schedule::parse_timezone(&s.timezone) {
                bad(at("timezone"), &why);
            }
            if let Err(why) = check_topic_name(&s.task_type) {
                bad(at("type"), &format!("task type {why}"));
            }
            if s.payload.len() > MAX_SCHEDULE_PAYLOAD {
                bad(
                    at("payload"),
                    &format!(
                        "is {} bytes; at most {MAX_SCHEDULE_PAYLOAD}",
                        s.payload.len()
                    ),
                );
            } else if let Err(e) = serde_json::from_str::<serde_json::Value>(&s.payload) {
                bad(at("payload"), &format!("is not valid JSON: {e}"));
            }
            if s.misfire_grace_ms > MAX_SCHEDULE_SLACK_MS {
                bad(
                    at("misfire_grace_ms"),
                    &format!("must be at most {MAX_SCHEDULE_SLACK_MS}"),
                );
            }
            if s.jitter_ms > MAX_SCHEDULE_SLACK_MS {
                bad(
                    at("jitter_ms"),
                    &format!("must be at most {MAX_SCHEDULE_SLACK_MS}"),
                );
            }
            if s.max_catch_up == 0 || s.max_catch_up > MAX_CATCH_UP {
                bad(at("max_catch_up"), &format!("must be 1 to {MAX_CATCH_UP}"));
            }
        }
    }
}
