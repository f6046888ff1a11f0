//! `[topics]`: default topic names and how `conveyor topics create` makes
//! them, with Kafka's topic-name rules.

use super::*;

/// `[topics]`: default topic names.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    /// Tasks of type `T` are read from `<task_prefix>T` unless a processor
    /// names its `input_topics`.
    pub task_prefix: String,
    /// Where results go unless a processor names its `output_topic`.
    pub results: String,
    /// The dead-letter topic.
    pub dead_letter: String,
    /// `conveyor topics create`: partitions of each topic it creates (a
    /// join's changelog gets its join topic's count instead).
    pub partitions: i32,
    /// `conveyor topics create`: replicas of each topic; -1: the broker's
    /// `default.replication.factor`.
    pub replication_factor: i32,
    /// `conveyor topics create`: topic configs given to every topic it
    /// creates (e.g. `retention.ms`); a changelog is always
    /// `cleanup.policy = compact`.
    pub configs: BTreeMap<String, String>,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            task_prefix: "conveyor.tasks.".into(),
            results: "conveyor.results".into(),
            dead_letter: "conveyor.dlq".into(),
            partitions: 8,
            replication_factor: -1,
            configs: BTreeMap::new(),
        }
    }
}

impl TopicSettings {
    /// The default topic of a task type.
    pub fn task_topic(&self, task_type: &str) -> String {
        format!("{}{}", self.task_prefix, task_type)
    }
}

/// Kafka's rules for topic names: 1 to 249 characters of `[A-Za-z0-9._-]`,
/// not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 249 {
        return Err(format!(
            "is {} characters long; Kafka allows 249",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a legal topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{name}` contains {c:?}; topic names use only letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

impl Settings {
    pub(super) fn validate_topics(&self, bad: &mut impl FnMut(String, &str)) {
        for (key, topic) in [
            ("topics.results", &self.topics.results),
            ("topics.dead_letter", &self.topics.dead_letter),
        ] {
            if let Err(why) = check_topic_name(topic) {
                bad(key.into(), &why);
            }
        }
        if let Err(why) = check_topic_name(&format!("{}x", self.topics.task_prefix)) {
            bad("topics.task_prefix".into(), &why);
        }

        if self.topics.partitions < 1 {
            bad("topics.partitions".into(), "must be at least 1");
        }
        if self.topics.replication_factor == 0 || self.topics.replication_factor < -1 {
            bad(
                "topics.replication_factor".into(),
                "must be at least 1, or -1 for the broker's default",
            );
        }
        if self.topics.configs.contains_key("cleanup.policy") {
            bad(
                "topics.configs.cleanup.policy".into(),
                "must not be set: task, result and dead-letter topics are deleted by retention, join changelogs compacted",
            );
        }
    }
}
