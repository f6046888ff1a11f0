//! librdkafka client configuration: conveyor's defaults, the user's
//! `[kafka.options]` passthrough, and the properties the guarantees depend on.
//!
//! The order matters: conveyor's tuning defaults first, then the user's
//! options (which may override the tuning), then the managed properties,
//! which nothing overrides (`Settings::validate` refuses them in
//! `kafka.options` so the user learns why instead of being ignored).

use rdkafka::ClientConfig;

use crate::settings::KafkaSettings;

/// Consumer tuning that differs from librdkafka's defaults.
const CONSUMER_TUNING: &[(&str, &str)] = &[
    // The default of 1000 ms stalls a fast consumer whenever its prefetch
    // queue fills: the whole pipe fell to ~0.2x in DESIGN.md §6.
    ("fetch.queue.backoff.ms", "10"),
    // How long the broker holds a fetch that has no data. One fetch serves
    // every partition of a broker, so a partition resumed after a pause
    // waits for the fetch in flight: with librdkafka's 500 ms, each pause
    // cost up to half a second (a 5,500-task test took 45 s instead of 7 s).
    ("fetch.wait.max.ms", "20"),
    // Incremental rebalancing: members keep the partitions that do not
    // move, and a revoked partition is drained and committed while the
    // group is still stable. Under the eager protocol the revoke happens
    // after the group started rebalancing, and some brokers (librdkafka's
    // mock cluster among them) refuse commits then, which turns every
    // rebalance into a replay of the last commit interval.
    ("partition.assignment.strategy", "cooperative-sticky"),
    // Bound the prefetch: librdkafka's defaults (100,000 messages, 64 MiB)
    // let a large backlog fill memory ahead of the in-flight bounds. The
    // engine reads each partition from a queue of its own, and then these
    // limits apply per partition: prefetch memory is at most partitions ×
    // min(2,000 records, 4 MiB). That still keeps a fast pipe fed (the echo
    // processor moved the same 150k msg/s with 10,000 / 16 MiB).
    ("queued.min.messages", "2000"),
    ("queued.max.messages.kbytes", "4096"),
];

/// The least prefetch one partition gets, however the budget is split.
const MIN_PARTITION_PREFETCH: u64 = 64 * 1024;

/// librdkafka's prefetch properties for a consumer that reads `partitions`
/// partitions, each from a queue of its own, within `budget` bytes.
///
/// With split partition queues librdkafka applies its prefetch limits to
/// each partition (its CONFIGURATION.md, `queued.max.messages.kbytes`), so
/// the budget is divided: each partition gets `budget / partitions` (at
/// least 64 KiB) as `queued.max.messages.kbytes`, and no fetch answer adds
/// more than that again (`max.partition.fetch.bytes`, at most librdkafka's
/// 1 MiB default): at most about twice the budget in all, unless the
/// 64 KiB floor binds. `queued.min.messages` (records; librdkafka keeps a
/// few hundred bytes of bookkeeping per queued record that the byte limit
/// does not count) is the share / 512, at most 2,000.
pub fn prefetch_limits(budget: u64, partitions: usize) -> [(&'static str, String); 3] {
    let partitions = u64::try_from(partitions.max(1)).unwrap_or(u64::MAX);
    let share = (budget / partitions).max(MIN_PARTITION_PREFETCH);
    [
        ("queued.max.messages.kbytes", (share / 1024).to_string()),
        ("queued.min.messages", (share / 512).min(2000).to_string()),
        (
            "max.partition.fetch.bytes",
            share.min(1024 * 1024).to_string(),
        ),
    ]
}

/// Settings shared by every client: brokers, client id, `tuning` and the
/// user's options, in that order of precedence from lowest.
fn client_config(kafka: &KafkaSettings, tuning: &[(&str, &str)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("client.id", &kafka.client_id);
    for (key, value) in tuning {
        config.set(*key, *value);
    }
    for (key, value) in kafka.security.properties() {
        config.set(key, value);
    }
    for (key, value) in &kafka.options {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &kafka.brokers);
    config
}

/// An admin client (creating and describing topics).
pub fn admin_config(kafka: &KafkaSettings) -> ClientConfig {
    client_config(kafka, &[])
}

/// A producer that cannot lose or reorder what it was told was acknowledged:
/// `acks=all` and idempotence.
pub fn producer_config(kafka: &KafkaSettings) -> ClientConfig {
    let mut config = client_config(kafka, &[]);
    config.set("enable.idempotence", "true");
    config.set("acks", "all");
    config
}

/// A group consumer whose offsets are stored by conveyor only, never by
/// librdkafka on delivery to the application.
pub fn consumer_config(
    kafka: &KafkaSettings,
    group_id: &str,
    session_timeout_ms: u64,
) -> ClientConfig {
    let mut config = client_config(kafka, CONSUMER_TUNING);
    config.set("group.id", group_id);
    config.set("session.timeout.ms", session_timeout_ms.to_string());
    config.set("enable.auto.offset.store", "false");
    config
}

/// Records the first connection error retrying cannot fix (see
/// [`crate::security::fatal_connection_error`]); logs the others.
#[derive(Default)]
pub struct Watch {
    fatal: std::sync::Mutex<Option<String>>,
}

impl Watch {
    /// The error that retrying cannot fix, if one was seen.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl rdkafka::ClientContext for Watch {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        match crate::security::fatal_connection_error(error.rdkafka_error_code(), reason) {
            Some(message) => {
                let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
                fatal.get_or_insert(message);
            }
            None => tracing::debug!(%error, reason, "librdkafka error while connecting"),
        }
    }
}

impl rdkafka::producer::ProducerContext for Watch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Connects to the cluster as every client of the process will (same
/// brokers, security and options) and reads its metadata, within
/// `within`. An error says what is wrong and which setting to check: an
/// authentication failure, a certificate that is not trusted or does not
/// name the host, a mechanism missing from the build, brokers that do not
/// answer. librdkafka would otherwise retry forever in its log.
pub fn check_connection(kafka: &KafkaSettings, within: std::time::Duration) -> Result<(), String> {
    use rdkafka::producer::{BaseProducer, Producer};
    use std::time::{Duration, Instant};
    let config = client_config(kafka, &[]);
    if let Ok(native) = config.create_native_config() {
        if let Ok(features) = native.get("builtin.features") {
            tracing::debug!(builtin_features = %features, "librdkafka built with");
        }
    }
    let client: BaseProducer<Watch> =
        config.create_with_context(Watch::default()).map_err(|e| {
            format!("cannot create a Kafka client: {e}; check kafka.security and kafka.options")
        })?;
    let deadline = Instant::now() + within;
    loop {
        // Serves every event that came (`poll` takes one per call with a
        // zero timeout, and log events queue up ahead of errors).
        client.poll(Duration::from_millis(100));
        if let Some(fatal) = client.context().fatal() {
            return Err(fatal);
        }
        match client
            .client()
            .fetch_metadata(None, Duration::from_millis(500))
        {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                client.poll(Duration::from_millis(100));
                if let Some(fatal) = client.context().fatal() {
                    return Err(fatal);
                }
                return Err(format!(
                    "no answer from the brokers at {} within {} s: {e}; check kafka.brokers and kafka.security.protocol",
                    kafka.brokers,
                    within.as_secs()
                ));
            }
            Err(_) => {}
        }
    }
}

/// How long a program waits for the cluster to answer at start.
pub const CONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// [`check_connection`] within [`CONNECT_WITHIN`], on the blocking pool
/// (it polls a client): what every program does before it starts work.
pub async fn connect(kafka: &KafkaSettings) -> Result<(), String> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || check_connection(&kafka, CONNECT_WITHIN))
        .await
        .map_err(|e| e.to_string())?
}

/// A context that does not report reaching the end of a partition as an
/// error: for a reader, it is the expected way to finish.
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            rdkafka::error::KafkaError::PartitionEOF(_)
                | rdkafka::error::KafkaError::Global(
                    rdkafka::types::RDKafkaErrorCode::PartitionEOF
                )
        );
        if !end_of_partition {
            tracing::warn!(%error, reason, "Kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// Why a client outside the engine (a reader, the command-line tools)
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Bad input from the user: the message names it.
    #[error("{0}")]
    Input(String),
    /// The cluster did not do what was asked.
    #[error("{what}: {source}")]
    Kafka {
        /// What was being done.
        what: String,
        /// librdkafka's error.
        source: rdkafka::error::KafkaError,
    },
    /// Nothing came within the time allowed.
    #[error("{0}")]
    Timeout(String),
    /// The producer went away before it answered (a run-time failure,
    /// exit 1, not the user's input).
    #[error("{0}")]
    Stopped(String),
}

/// Turns a librdkafka error met while doing `what` into a [`ClientError`].
pub fn kafka_error(
    what: impl Into<String>,
) -> impl FnOnce(rdkafka::error::KafkaError) -> ClientError {
    let what = what.into();
    move |source| ClientError::Kafka { what, source }
}

/// The codec the settings describe, for a client that reads or writes
/// conveyor's records; an input error while its settings are incomplete.
pub fn codec_of(settings: &crate::settings::Settings) -> Result<crate::codec::Codec, ClientError> {
    settings.codec.codec().ok_or_else(|| {
        ClientError::Input("codec settings are incomplete (run `conveyor config check`)".into())
    })
}

/// What one read of a [`Reader`] found.
pub enum Read<'a> {
    /// A record.
    Record(rdkafka::message::BorrowedMessage<'a>),
    /// The end of this partition (of the topic read) was reached.
    End(i32),
    /// Nothing within the time given.
    Idle,
    /// An error; librdkafka goes on after most.
    Error(rdkafka::error::KafkaError),
}

/// A consumer outside any consumer group's commits that reports reaching
/// the end of each partition: the one way conveyor reads topics from a
/// chosen point to their end (the command-line and dead-letter tools,
/// waiting for a result, the gateway's status view, a join's changelog).
pub struct Reader {
    consumer: rdkafka::consumer::BaseConsumer<ReaderContext>,
}

impl Reader {
    /// A reader with the cluster's settings; `purpose` names its
    /// (never committed) group, `conveyor-<purpose>-<uuid>`.
    pub fn new(kafka: &KafkaSettings, purpose: &str) -> Result<Reader, ClientError> {
        let group = format!("conveyor-{purpose}-{}", uuid::Uuid::new_v4());
        let consumer = consumer_config(kafka, &group, 10_000)
            .set("enable.auto.commit", "false")
            // The end is where the partition ends, not offset high - 1: in
            // a compacted topic that record may have been cleaned away.
            .set("enable.partition.eof", "true")
            .create_with_context(ReaderContext)
            .map_err(kafka_error("creating the consumer"))?;
        Ok(Reader { consumer })
    }

    /// The partitions of `topic`, sorted; an input error when the topic
    /// does not exist.
    pub fn partitions(&self, topic: &str) -> Result<Vec<i32>, ClientError> {
        use rdkafka::consumer::Consumer;
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), std::time::Duration::from_secs(10))
            .map_err(kafka_error(format!("reading the metadata of {topic}")))?;
        let mut partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(ClientError::Input(format!("topic {topic} does not exist")));
        }
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Reads `partitions` of `topic`, each from `from`, instead of what was
    /// read before.
    pub fn assign(
        &self,
        topic: &str,
        partitions: &[i32],
        from: rdkafka::Offset,
    ) -> Result<(), ClientError> {
        let mut list = rdkafka::TopicPartitionList::new();
        for p in partitions {
            list.add_partition_offset(topic, *p, from)
                .map_err(kafka_error("building the assignment"))?;
        }
        self.assign_list(&list)
    }

    /// Reads exactly the partitions and offsets of `list`.
    pub fn assign_list(&self, list: &rdkafka::TopicPartitionList) -> Result<(), ClientError> {
        use rdkafka::consumer::Consumer;
        self.consumer
            .assign(list)
            .map_err(kafka_error("assigning the partitions to read"))
    }

    /// Waits up to `timeout` for the next record or partition end.
    pub fn read(&self, timeout: std::time::Duration) -> Read<'_> {
        match self.consumer.poll(timeout) {
            None => Read::Idle,
            Some(Ok(message)) => Read::Record(message),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => Read::End(p),
            Some(Err(e)) => Read::Error(e),
        }
    }

    /// The consumer, for metadata, watermarks and offsets by time.
    pub fn client(&self) -> &rdkafka::consumer::BaseConsumer<ReaderContext> {
        &self.consumer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(budget: u64, partitions: usize) -> Vec<u64> {
        prefetch_limits(budget, partitions)
            .iter()
            .map(|(_, v)| v.parse().expect("a number"))
            .collect()
    }

    #[test]
    fn prefetch_budget_is_split_over_partitions() {
        const MIB: u64 = 1024 * 1024;
        // kbytes, records, fetch bytes
        assert_eq!(limits(64 * MIB, 16), vec![4096, 2000, MIB]);
        assert_eq!(limits(64 * MIB, 256), vec![256, 512, 256 * 1024]);
        // The whole budget, with one fetch answer more per partition, at
        // most twice the budget while the floor does not bind.
        for partitions in [1usize, 3, 8, 100, 512, 1024] {
            let l = limits(64 * MIB, partitions);
            let most = (l[0] * 1024 + l[2]) * partitions as u64;
            assert!(most <= 2 * 64 * MIB, "{partitions}: {most}");
        }
        // The floor: 64 KiB a partition, 100 records.
        assert_eq!(limits(MIB, 10_000), vec![64, 128, 64 * 1024]);
        assert_eq!(limits(MIB, 0), limits(MIB, 1));
    }

    #[test]
    fn user_options_override_tuning_but_not_managed_properties() {
        let mut kafka = KafkaSettings::default();
        kafka
            .options
            .insert("fetch.queue.backoff.ms".into(), "50".into());
        kafka
            .options
            .insert("enable.auto.offset.store".into(), "true".into());
        let config = consumer_config(&kafka, "g", 6000);
        assert_eq!(config.get("fetch.queue.backoff.ms"), Some("50"));
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("group.id"), Some("g"));
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        let producer = producer_config(&kafka);
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        // Consumer-only tuning stays off producers (librdkafka warns otherwise).
        assert_eq!(
            producer_config(&KafkaSettings::default()).get("fetch.queue.backoff.ms"),
            None
        );
    }
}
