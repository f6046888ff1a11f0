//! Which topics a configuration needs: computed here and nowhere else, for
//! the worker's start-up check, `conveyor dev` and `conveyor topics`.
//!
//! A configuration needs each processor's input topics, their retry
//! topics (when some task type's backoff can reach the retry-topic
//! threshold), its output and dead-letter topics, the default results and
//! dead-letter topics, the task topics the gateway accepts and workflows
//! write, and for each workflow join the compacted changelog
//! `<join topic>.joins` with as many partitions as its join topic (each
//! partition's join state lives in the same partition of the changelog),
//! the delay tier topics when `[delays]` is on, the schedule topic
//! (one partition, compacted) when there are `[[schedules]]`, the events
//! topic when `[events]` is on and the control topic (compacted) when
//! `[cancel]` is.

use std::collections::BTreeMap;

use crate::settings::{ProcessorSettings, Settings};
use crate::workflow::{Workflows, JOINS_SUFFIX};

/// What a topic is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TopicKind {
    /// Task requests a processor reads (or the gateway, a workflow writes).
    Tasks,
    /// Parked retries of an input topic.
    Retry,
    /// Task results.
    Results,
    /// Dead letters.
    DeadLetter,
    /// A join's state; compacted, partitioned like its join topic.
    JoinChangelog,
    /// Delayed tasks waiting out one tier.
    Delay,
    /// The last tick each schedule fired; one partition, compacted.
    Schedules,
    /// Task events (started, progress, retrying, cancelled).
    Events,
    /// Cancellations; compacted, read whole by every worker.
    Control,
    /// Worker reports; compacted, read whole by every gateway.
    Workers,
}

impl TopicKind {
    /// A word for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Tasks => "tasks",
            TopicKind::Retry => "retry",
            TopicKind::Results => "results",
            TopicKind::DeadLetter => "dead-letter",
            TopicKind::JoinChangelog => "join changelog",
            TopicKind::Delay => "delay tier",
            TopicKind::Schedules => "schedules",
            TopicKind::Events => "events",
            TopicKind::Control => "control",
            TopicKind::Workers => "workers",
        }
    }

    /// Whether the topic must be compacted (`cleanup.policy = compact`).
    pub fn compacted(self) -> bool {
        matches!(
            self,
            TopicKind::JoinChangelog
                | TopicKind::Schedules
                | TopicKind::Control
                | TopicKind::Workers
        )
    }

    /// The partitions the topic must have whatever `[topics]` says: one
    /// for the schedule topic (its owner fires the schedules).
    pub fn fixed_partitions(self) -> Option<i32> {
        (self == TopicKind::Schedules).then_some(1)
    }
}

/// One topic a configuration needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeededTopic {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub kind: TopicKind,
    /// A topic whose partition count it must have (a changelog's join
    /// topic).
    pub partitions_of: Option<String>,
}

/// Results of a processor without `output_topic` (before
/// [`Settings::fill_derived`] sets it) go here.
const DEFAULT_RESULTS: &str = "conveyor.results";
/// Dead letters likewise.
const DEFAULT_DEAD_LETTERS: &str = "conveyor.dlq";

impl ProcessorSettings {
    /// The topics this processor reads: its inputs, and their retry topics
    /// when some task type's backoff can reach the threshold.
    pub fn read_topics(&self) -> Vec<String> {
        let mut topics = self.input_topics.clone();
        if self.uses_retry_topics() {
            topics.extend(self.input_topics.iter().map(|t| self.retry_topic(t)));
        }
        topics
    }

    /// Its consumer group: `group_id`, else `conveyor.<name>` (what
    /// [`Settings::fill_derived`] writes in).
    pub fn group(&self) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("conveyor.{}", self.name))
    }

    /// Where its results go.
    pub fn results_topic(&self) -> &str {
        self.output_topic.as_deref().unwrap_or(DEFAULT_RESULTS)
    }

    /// Where its dead letters go.
    pub fn dead_letters_topic(&self) -> &str {
        self.dead_letter_topic
            .as_deref()
            .unwrap_or(DEFAULT_DEAD_LETTERS)
    }

    /// Every topic this processor reads or writes: what it reads, its
    /// results and dead letters, the next steps' task topics of the
    /// workflow steps it runs, and the changelog of each join it reads.
    /// Its start-up check refuses to run while one is missing.
    pub fn topology(&self, workflows: &Workflows) -> Vec<NeededTopic> {
        let need = |name: &str, kind, partitions_of: Option<String>| NeededTopic {
            name: name.to_owned(),
            kind,
            partitions_of,
        };
        let mut topics: Vec<NeededTopic> = self
            .input_topics
            .iter()
            .map(|t| need(t, TopicKind::Tasks, None))
            .collect();
        if self.uses_retry_topics() {
            let retry = self.input_topics.iter().map(|t| self.retry_topic(t));
            topics.extend(retry.map(|t| need(&t, TopicKind::Retry, None)));
        }
        topics.push(need(self.results_topic(), TopicKind::Results, None));
        topics.push(need(self.dead_letters_topic(), TopicKind::DeadLetter, None));
        let types = self.tasks.keys().map(String::as_str).collect();
        let after = workflows.topics_after(&types);
        topics.extend(after.iter().map(|t| need(t, TopicKind::Tasks, None)));
        for join in workflows.join_topics() {
            if self.input_topics.contains(&join) {
                let changelog = format!("{join}{JOINS_SUFFIX}");
                topics.push(need(&changelog, TopicKind::JoinChangelog, Some(join)));
            }
        }
        topics
    }
}

impl Settings {
    /// The events, control and workers topics, when on: every worker
    /// writes the first, reads the second and writes the third, every
    /// gateway reads the first, writes the second and reads the third.
    pub fn lifecycle_topics(&self) -> Vec<(String, TopicKind)> {
        let mut topics = Vec::new();
        if self.events.enabled {
            topics.push((self.events.topic.clone(), TopicKind::Events));
        }
        if self.cancel.enabled {
            topics.push((self.cancel.topic.clone(), TopicKind::Control));
        }
        if self.workers.enabled {
            topics.push((self.workers.topic.clone(), TopicKind::Workers));
        }
        topics
    }

    /// The topics a gateway follows for results: the processors' output
    /// topics, or the default results topic for a configuration that runs
    /// none. (The task topics it writes and follows are
    /// [`Settings::gateway_task_topics`].) Sorted, each once.
    pub fn gateway_result_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .processors
            .iter()
            .filter_map(|p| p.output_topic.clone())
            .collect();
        if topics.is_empty() {
            topics.push(self.topics.results.clone());
        }
        topics.sort();
        topics.dedup();
        topics
    }

    /// Every topic this configuration needs, by name: each processor's
    /// ([`ProcessorSettings::topology`]), the default results and
    /// dead-letter topics, the gateway's task topics, and every workflow's.
    /// Call on settings with derived defaults filled in (as
    /// [`Settings::load`] returns them).
    pub fn topology(&self) -> Vec<NeededTopic> {
        let mut topics: BTreeMap<String, (TopicKind, Option<String>)> = BTreeMap::new();
        let mut add = |name: &str, kind: TopicKind, partitions_of: Option<String>| {
            topics
                .entry(name.to_owned())
                .or_insert((kind, partitions_of));
        };
        let workflows = Workflows::from_settings(self);
        for p in &self.processors {
            for t in p.topology(&workflows) {
                add(&t.name, t.kind, t.partitions_of);
            }
        }
        add(&self.topics.results, TopicKind::Results, None);
        add(&self.topics.dead_letter, TopicKind::DeadLetter, None);
        for topic in self.gateway_task_topics().values() {
            add(topic, TopicKind::Tasks, None);
        }
        let all_types = self
            .workflows
            .iter()
            .flat_map(|w| w.steps.iter().map(|s| s.task.as_str()))
            .collect();
        for topic in workflows.topics_after(&all_types) {
            add(&topic, TopicKind::Tasks, None);
        }
        for topic in workflows.join_topics() {
            let changelog = format!("{topic}{JOINS_SUFFIX}");
            add(&changelog, TopicKind::JoinChangelog, Some(topic));
        }
        if self.delays.enabled {
            for (_, tier) in self.delays.tier_topics() {
                add(&tier, TopicKind::Delay, None);
            }
        }
        if !self.schedules.is_empty() {
            add(&self.scheduler.topic, TopicKind::Schedules, None);
        }
        for (topic, kind) in self.lifecycle_topics() {
            add(&topic, kind, None);
        }
        topics
            .into_iter()
            .map(|(name, (kind, partitions_of))| NeededTopic {
                name,
                kind,
                partitions_of,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{
        HandlerKind, ProcessorSettings, StepSettings, TaskSettings, WorkflowSettings,
    };

    #[test]
    fn two_processors_with_retries_and_a_join_need_every_topic_once() {
        let mut s = Settings::default();
        for (name, types) in [("a", vec!["split", "count"]), ("b", vec!["sum"])] {
            s.processors.push(ProcessorSettings {
                name: name.into(),
                tasks: types
                    .into_iter()
                    .map(|t| (t.to_owned(), TaskSettings::new(HandlerKind::Echo)))
                    .collect(),
                ..ProcessorSettings::default()
            });
        }
        s.processors[1].retry_topic_threshold_ms = 0; // no retry topics
        s.workflows.push(WorkflowSettings {
            name: "wc".into(),
            steps: vec![
                StepSettings {
                    task: "split".into(),
                    fan_out: true,
                    join: false,
                },
                StepSettings {
                    task: "count".into(),
                    fan_out: false,
                    join: false,
                },
                StepSettings {
                    task: "sum".into(),
                    fan_out: false,
                    join: true,
                },
            ],
            timeout_ms: 0,
            max_fan_out: crate::settings::DEFAULT_MAX_FAN_OUT,
        });
        s.fill_derived();
        let needed: Vec<(String, TopicKind, Option<String>)> = s
            .topology()
            .into_iter()
            .map(|t| (t.name, t.kind, t.partitions_of))
            .collect();
        let t = |n: &str, k, of: Option<&str>| (n.to_owned(), k, of.map(str::to_owned));
        let tiers = ["1s", "10s", "1m", "10m", "1h", "10h"];
        let mut expected: Vec<_> = tiers
            .iter()
            .map(|tier| t(&format!("conveyor.delay.{tier}"), TopicKind::Delay, None))
            .collect();
        expected.sort();
        let mut all = [
            expected,
            vec![
                t("conveyor.control", TopicKind::Control, None),
                t("conveyor.dlq", TopicKind::DeadLetter, None),
                t("conveyor.events", TopicKind::Events, None),
                t("conveyor.results", TopicKind::Results, None),
                t("conveyor.tasks.count", TopicKind::Tasks, None),
                t("conveyor.tasks.count.retry", TopicKind::Retry, None),
                t("conveyor.tasks.split", TopicKind::Tasks, None),
                t("conveyor.tasks.split.retry", TopicKind::Retry, None),
                t("conveyor.tasks.sum", TopicKind::Tasks, None),
                t(
                    "conveyor.tasks.sum.joins",
                    TopicKind::JoinChangelog,
                    Some("conveyor.tasks.sum"),
                ),
                t("conveyor.workers", TopicKind::Workers, None),
            ],
        ]
        .concat();
        all.sort();
        assert_eq!(needed, all);
        s.delays.enabled = false;
        assert!(
            s.topology().iter().all(|t| t.kind != TopicKind::Delay),
            "delays off: no tiers"
        );
    }
}
