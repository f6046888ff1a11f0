//! `conveyor dev`: an embedded Kafka-protocol cluster so a newcomer sees
//! conveyor work with no broker installed.
//!
//! The cluster is librdkafka's mock cluster (`rdkafka::mocking::MockCluster`):
//! real Kafka protocol on 127.0.0.1, in memory, gone when the process exits.
//! It has no admin CreateTopics, so topics are created through it here, and
//! it keeps at most 5 MiB per partition.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::settings::{
    HandlerKind, ProcessorSettings, Settings, StepSettings, TaskSettings, WorkflowSettings,
};

/// Partitions of every topic the dev cluster creates.
pub const DEV_PARTITIONS: i32 = 4;

/// Why the dev cluster could not start or answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// librdkafka refused to create the mock cluster or a topic.
    #[error("embedded cluster: {0}")]
    Cluster(rdkafka::error::KafkaError),
}

/// A running embedded cluster. Dropping it shuts the cluster down.
pub struct DevCluster {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl DevCluster {
    /// Starts a cluster of `brokers` brokers listening on 127.0.0.1.
    pub fn start(brokers: i32) -> Result<Self, DevError> {
        let cluster = MockCluster::new(brokers).map_err(DevError::Cluster)?;
        Ok(DevCluster { cluster })
    }

    /// The `bootstrap.servers` list of the cluster.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), DevError> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .map_err(DevError::Cluster)
    }

    /// Creates every topic `settings` needs ([`Settings::topology`]; the
    /// mock cluster has no admin CreateTopics, so `conveyor topics` cannot
    /// do it here). Returns them, sorted.
    pub fn create_topics_for(&self, settings: &Settings) -> Result<Vec<String>, DevError> {
        let topics: Vec<String> = settings.topology().into_iter().map(|t| t.name).collect();
        for topic in &topics {
            self.create_topic(topic, DEV_PARTITIONS)?;
        }
        Ok(topics)
    }
}

/// The demo workflow of `conveyor dev`: count the words of a text, its
/// lines counted in parallel.
pub const DEV_WORKFLOW: &str = "wordcount";

/// The configuration `conveyor dev` runs: one processor with the built-in
/// handlers and the demo workflow ([`DEV_WORKFLOW`]: `split_lines` fans a
/// text out into lines, `word_count` counts each, `sum` joins the counts),
/// against the embedded cluster at `bootstrap`.
pub fn dev_settings(bootstrap: &str) -> Settings {
    let mut settings = Settings::default();
    settings.kafka.brokers = bootstrap.to_owned();
    settings.kafka.client_id = "conveyor-dev".into();
    // Any free port: several dev instances may run on one machine.
    settings.metrics.listen = "127.0.0.1:0".into();
    let task = TaskSettings::new;
    settings.processors.push(ProcessorSettings {
        name: "dev".into(),
        tasks: [
            ("echo".to_owned(), task(HandlerKind::Echo)),
            ("sleep".to_owned(), task(HandlerKind::Sleep)),
            ("sha256".to_owned(), task(HandlerKind::Sha256)),
            ("split_lines".to_owned(), task(HandlerKind::SplitLines)),
            ("word_count".to_owned(), task(HandlerKind::WordCount)),
            ("sum".to_owned(), task(HandlerKind::Sum)),
        ]
        .into_iter()
        .collect(),
        ..ProcessorSettings::default()
    });
    let step = |task: &str, fan_out: bool, join: bool| StepSettings {
        task: task.into(),
        fan_out,
        join,
    };
    settings.workflows.push(WorkflowSettings {
        name: DEV_WORKFLOW.into(),
        steps: vec![
            step("split_lines", true, false),
            step("word_count", false, false),
            step("sum", false, true),
        ],
        timeout_ms: 60_000,
        max_fan_out: crate::settings::DEFAULT_MAX_FAN_OUT,
    });
    settings.fill_derived();
    settings
}
