//! `conveyor dev`: an embedded Kafka-protocol cluster so a newcomer sees
//! conveyor work with no broker installed.
//!
//! The cluster is librdkafka's mock cluster (`rdkafka::mocking::MockCluster`):
//! real Kafka protocol on 127.0.0.1, in memory, gone when the process exits.
//! It has no admin CreateTopics, so topics are created through it here, and
//! it keeps at most 5 MiB per partition.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::codec::{Codec, TaskRequest};
use crate::kafka;
use crate::settings::{HandlerKind, ProcessorSettings, Settings, TaskSettings};

/// Partitions of every topic the dev cluster creates.
pub const DEV_PARTITIONS: i32 = 4;

/// Why the dev cluster could not start or answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// librdkafka refused to create the mock cluster or a topic.
    #[error("embedded cluster: {0}")]
    Cluster(rdkafka::error::KafkaError),
    /// Producing or consuming the check record failed.
    #[error("round trip through the embedded cluster failed: {0}")]
    RoundTrip(String),
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

    /// Creates every topic `settings` names: the processors' inputs and
    /// outputs, the results and dead-letter topics. Returns them, sorted.
    pub fn create_topics_for(&self, settings: &Settings) -> Result<Vec<String>, DevError> {
        let mut topics = vec![
            settings.topics.results.clone(),
            settings.topics.dead_letter.clone(),
        ];
        for p in &settings.processors {
            topics.extend(p.input_topics.iter().cloned());
            topics.extend(p.output_topic.iter().cloned());
        }
        topics.sort();
        topics.dedup();
        for topic in &topics {
            self.create_topic(topic, DEV_PARTITIONS)?;
        }
        Ok(topics)
    }
}

/// The configuration `conveyor dev` runs: one processor with the built-in
/// handlers, against the embedded cluster at `bootstrap`.
pub fn dev_settings(bootstrap: &str) -> Settings {
    let mut settings = Settings::default();
    settings.kafka.brokers = bootstrap.to_owned();
    settings.kafka.client_id = "conveyor-dev".into();
    let task = |handler| TaskSettings {
        handler,
        url: None,
        timeout_ms: 30_000,
    };
    settings.processors.push(ProcessorSettings {
        name: "dev".into(),
        tasks: [
            ("echo".to_owned(), task(HandlerKind::Echo)),
            ("sleep".to_owned(), task(HandlerKind::Sleep)),
            ("sha256".to_owned(), task(HandlerKind::Sha256)),
        ]
        .into_iter()
        .collect(),
        ..ProcessorSettings::default()
    });
    settings.fill_derived();
    settings
}

/// Produces `request` to `topic` (acks=all), reads it back from the
/// partition and offset the broker acknowledged, and decodes it: proof that
/// the cluster, the producer settings and the codec work together.
pub async fn round_trip(
    settings: &Settings,
    topic: &str,
    request: &TaskRequest,
    timeout: Duration,
) -> Result<TaskRequest, DevError> {
    let codec = settings
        .codec
        .wire_format()
        .map(Codec::new)
        .ok_or_else(|| DevError::RoundTrip("codec settings are incomplete".into()))?;
    let fail = |what: &str, e: &dyn std::fmt::Display| DevError::RoundTrip(format!("{what}: {e}"));

    let producer: FutureProducer = kafka::producer_config(&settings.kafka)
        .create()
        .map_err(|e| fail("creating the producer", &e))?;
    let mut value = Vec::new();
    codec.encode_request(request, &mut value);
    let key = request
        .key
        .clone()
        .unwrap_or_else(|| request.id.to_string());
    let delivered = producer
        .send(FutureRecord::to(topic).key(&key).payload(&value), timeout)
        .await
        .map_err(|(e, _)| fail("producing the request", &e))?;

    let group = format!("conveyor-dev-check-{}", Uuid::new_v4());
    let consumer: BaseConsumer = kafka::consumer_config(&settings.kafka, &group, 10_000)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| fail("creating the consumer", &e))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, delivered.partition, Offset::Offset(delivered.offset))
        .map_err(|e| fail("assigning the partition", &e))?;
    consumer
        .assign(&assignment)
        .map_err(|e| fail("assigning the partition", &e))?;

    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // BaseConsumer::poll blocks; poll briefly and yield in between so the
        // runtime stays responsive.
        match consumer.poll(Duration::ZERO) {
            Some(Ok(message)) => {
                let bytes = message.payload().unwrap_or_default();
                return codec
                    .decode_request(bytes)
                    .map_err(|e| fail("decoding the request read back", &e));
            }
            Some(Err(e)) => return Err(fail("consuming the request", &e)),
            None if tokio::time::Instant::now() >= deadline => {
                return Err(DevError::RoundTrip(format!(
                    "the request did not come back within {timeout:?}"
                )));
            }
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
