//! `conveyor topics create|check`: provisions the topics a configuration
//! needs ([`Settings::topology`]) through the Kafka admin API.
//!
//! `create` makes each missing topic with `[topics]` partitions,
//! replication factor and configs (a join changelog: compacted, with its
//! join topic's partition count) and leaves existing ones alone, saying
//! so. `check` reports what is missing or does not fit: a changelog not
//! compacted, or with another partition count than its join topic. What
//! the broker cannot answer (no CreateTopics on librdkafka's mock cluster,
//! an empty DescribeConfigs on nisshi) is said, never passed over.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::settings::Settings;
use crate::tools::{kafka_error, ToolError};
use crate::topology::{NeededTopic, TopicKind};

/// How long the broker may take to answer an admin request.
const TIMEOUT: Duration = Duration::from_secs(15);

/// What became of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Created now.
    Created,
    /// Would be created (`--dry-run`).
    WouldCreate,
    /// There already, and fits.
    Exists,
    /// Not there (`check`).
    Missing,
    /// There, but does not fit: why.
    Mismatch(String),
    /// The broker refused to create it: why.
    Failed(String),
}

impl Outcome {
    fn word(&self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::WouldCreate => "planned",
            Outcome::Exists => "exists",
            Outcome::Missing => "missing",
            Outcome::Mismatch(_) => "mismatch",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// One line of a report.
#[derive(Debug, Clone)]
pub struct Line {
    /// The topic.
    pub topic: NeededTopic,
    /// Its partitions: what it has, or what it gets.
    pub partitions: Option<i32>,
    /// What became of it.
    pub outcome: Outcome,
    /// Something the broker could not tell (said, not failed).
    pub note: Option<String>,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<12} {} ({}",
            self.outcome.word(),
            self.topic.name,
            self.topic.kind.as_str()
        )?;
        if let Some(p) = self.partitions {
            write!(f, ", {p} partitions")?;
        }
        if self.topic.kind.compacted() {
            write!(f, ", compacted")?;
        }
        write!(f, ")")?;
        match &self.outcome {
            Outcome::Mismatch(why) | Outcome::Failed(why) => write!(f, ": {why}")?,
            _ => {}
        }
        if let Some(note) = &self.note {
            write!(f, "; {note}")?;
        }
        Ok(())
    }
}

/// A report: one line per needed topic.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The lines, by topic name.
    pub lines: Vec<Line>,
}

impl Outcome {
    /// Whether the topic is there (or will be) as it should be.
    fn fits(&self) -> bool {
        matches!(
            self,
            Outcome::Created | Outcome::WouldCreate | Outcome::Exists
        )
    }
}

impl Report {
    /// Whether every topic is there and fits (nothing missing, mismatched
    /// or failed).
    pub fn ok(&self) -> bool {
        self.lines.iter().all(|l| l.outcome.fits())
    }

    /// The topics missing or not fitting, a line each (empty when
    /// [`Report::ok`]); at most the first 10, then how many more.
    pub fn problems(&self) -> Vec<String> {
        let bad: Vec<String> = self
            .lines
            .iter()
            .filter(|l| !l.outcome.fits())
            .map(|l| format!("{} {}", l.topic.name, l.outcome.word()))
            .collect();
        let more = bad.len().saturating_sub(10);
        let mut shown: Vec<String> = bad.into_iter().take(10).collect();
        if more > 0 {
            shown.push(format!("and {more} more"));
        }
        shown
    }
}

fn admin(settings: &Settings) -> Result<AdminClient<DefaultClientContext>, ToolError> {
    crate::kafka::admin_config(&settings.kafka)
        .create()
        .map_err(kafka_error("creating the admin client"))
}

/// The partition count of every topic in the cluster.
fn existing(admin: &AdminClient<DefaultClientContext>) -> Result<BTreeMap<String, i32>, ToolError> {
    let metadata = admin
        .inner()
        .fetch_metadata(None, TIMEOUT)
        .map_err(kafka_error("reading the cluster's topics"))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_owned(), t.partitions().len() as i32))
        .collect())
}

/// The partitions `topic` has or will get.
fn partitions_for(
    settings: &Settings,
    topic: &NeededTopic,
    existing: &BTreeMap<String, i32>,
) -> i32 {
    topic.kind.fixed_partitions().unwrap_or_else(|| {
        topic
            .partitions_of
            .as_ref()
            .and_then(|of| existing.get(of).copied())
            .unwrap_or(settings.topics.partitions)
    })
}

/// Creates every missing topic of `settings` (or says what it would).
pub async fn create(settings: &Settings, dry_run: bool) -> Result<Report, ToolError> {
    let admin = admin(settings)?;
    let existing = existing(&admin)?;
    let needed = settings.topology();
    let mut report = Report::default();
    let mut to_create = Vec::new();
    for topic in needed {
        if let Some(&p) = existing.get(&topic.name) {
            report
                .lines
                .push(fit(settings, &admin, topic, p, &existing).await);
            continue;
        }
        let partitions = partitions_for(settings, &topic, &existing);
        to_create.push((topic, partitions));
    }
    if dry_run {
        for (topic, partitions) in to_create {
            report.lines.push(Line {
                topic,
                partitions: Some(partitions),
                outcome: Outcome::WouldCreate,
                note: None,
            });
        }
    } else if !to_create.is_empty() {
        let replication = settings.topics.replication_factor;
        // Cancellations expire by age: the control topic forgets them too.
        let control_retention = settings.cancel.max_age_ms.to_string();
        // Gone workers are forgotten by age, and so by the topic.
        let workers_retention = settings.workers.forget_after_ms.to_string();
        let new_topics: Vec<NewTopic<'_>> = to_create
            .iter()
            .map(|(topic, partitions)| {
                let mut new = NewTopic::new(
                    &topic.name,
                    *partitions,
                    TopicReplication::Fixed(replication),
                );
                for (key, value) in &settings.topics.configs {
                    new = new.set(key, value);
                }
                if topic.kind == TopicKind::Control {
                    new = new
                        .set("cleanup.policy", "compact,delete")
                        .set("retention.ms", &control_retention);
                } else if topic.kind == TopicKind::Workers {
                    new = new
                        .set("cleanup.policy", "compact,delete")
                        .set("retention.ms", &workers_retention);
                } else if topic.kind.compacted() {
                    new = new.set("cleanup.policy", "compact");
                }
                new
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(TIMEOUT))
            .request_timeout(Some(TIMEOUT));
        let results = admin.create_topics(&new_topics, &options).await;
        let mut by_name: BTreeMap<String, Result<(), String>> = BTreeMap::new();
        match results {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(name) => {
                            by_name.insert(name, Ok(()));
                        }
                        Err((name, code)) => {
                            by_name.insert(name, Err(format!("{code}")));
                        }
                    }
                }
            }
            Err(e) => {
                let why = format!("the broker did not create topics: {e} (librdkafka's mock cluster has no CreateTopics; `conveyor dev` creates its topics itself)");
                for (topic, _) in &to_create {
                    by_name.insert(topic.name.clone(), Err(why.clone()));
                }
            }
        }
        for (topic, partitions) in to_create {
            let outcome = match by_name.remove(&topic.name) {
                Some(Ok(())) => Outcome::Created,
                Some(Err(why)) => Outcome::Failed(why),
                None => Outcome::Failed("the broker gave no answer for it".into()),
            };
            report.lines.push(Line {
                topic,
                partitions: Some(partitions),
                outcome,
                note: None,
            });
        }
    }
    report.lines.sort_by(|a, b| a.topic.name.cmp(&b.topic.name));
    Ok(report)
}

/// Checks every topic of `settings`: there, and fitting.
pub async fn check(settings: &Settings) -> Result<Report, ToolError> {
    let admin = admin(settings)?;
    let existing = existing(&admin)?;
    let mut report = Report::default();
    for topic in settings.topology() {
        let line = match existing.get(&topic.name) {
            Some(&p) => fit(settings, &admin, topic, p, &existing).await,
            None => Line {
                topic,
                partitions: None,
                outcome: Outcome::Missing,
                note: None,
            },
        };
        report.lines.push(line);
    }
    Ok(report)
}

/// How an existing `topic` with `partitions` fits what it is for.
async fn fit(
    _settings: &Settings,
    admin: &AdminClient<DefaultClientContext>,
    topic: NeededTopic,
    partitions: i32,
    existing: &BTreeMap<String, i32>,
) -> Line {
    let mut problems = Vec::new();
    let mut note = None;
    if let Some(of) = &topic.partitions_of {
        if let Some(&want) = existing.get(of) {
            if want != partitions {
                problems.push(format!(
                    "{partitions} partitions, but its join topic {of} has {want}: each join partition keeps its state in the same changelog partition"
                ));
            }
        }
    }
    if let Some(want) = topic.kind.fixed_partitions() {
        if want != partitions {
            problems.push(format!(
                "{partitions} partitions, must have {want} (the worker owning it fires the schedules)"
            ));
        }
    }
    if topic.kind.compacted() {
        match cleanup_policy(admin, &topic.name).await {
            Ok(Some(policy)) if policy.split(',').any(|p| p.trim() == "compact") => {}
            Ok(Some(policy)) => problems.push(format!(
                "cleanup.policy is {policy}, must be compact (its records would be deleted by retention: join state, or the ticks schedules fired)"
            )),
            Ok(None) => {
                note = Some("cleanup.policy not verified: the broker returned no topic configs".into())
            }
            Err(e) => note = Some(format!("cleanup.policy not verified: {e}")),
        }
    }
    Line {
        topic,
        partitions: Some(partitions),
        outcome: if problems.is_empty() {
            Outcome::Exists
        } else {
            Outcome::Mismatch(problems.join("; "))
        },
        note,
    }
}

/// `cleanup.policy` of `topic`, `None` when the broker describes no config.
async fn cleanup_policy(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<Option<String>, String> {
    let options = AdminOptions::new().request_timeout(Some(TIMEOUT));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await
        .map_err(|e| e.to_string())?;
    let resource = results
        .into_iter()
        .next()
        .ok_or_else(|| "no answer".to_owned())?
        .map_err(|code| code.to_string())?;
    if resource.entries.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        resource
            .entries
            .iter()
            .find(|e| e.name == "cleanup.policy")
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| "delete".into()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_what_happened_and_why() {
        let topic = NeededTopic {
            name: "t.joins".into(),
            kind: TopicKind::JoinChangelog,
            partitions_of: Some("t".into()),
        };
        let line = Line {
            topic,
            partitions: Some(4),
            outcome: Outcome::Mismatch("4 partitions, but its join topic t has 8".into()),
            note: Some("cleanup.policy not verified".into()),
        };
        assert_eq!(
            line.to_string(),
            "mismatch     t.joins (join changelog, 4 partitions, compacted): 4 partitions, but its join topic t has 8; cleanup.policy not verified"
        );
    }
}
