//! The configuration tree: every key conveyor reads, its default, and the
//! checks it must pass before anything starts.
//!
//! Layers, later ones winning: the defaults written on these structs → the
//! TOML file given with `--config` → environment variables
//! `CONVEYOR__<SECTION>__<KEY>` (for example `CONVEYOR__KAFKA__BROKERS`).
//! Unknown keys are errors, not silently ignored, so a typo cannot quietly
//! fall back to a default. Durations are whole milliseconds in keys ending
//! in `_ms`. `conveyor.example.toml` documents every key; these `///` docs
//! are the same text for library users.
//!
//! [`Settings::load`] deserializes, fills the defaults that depend on other
//! keys (a processor's group id, input and output topics), then runs
//! [`Settings::validate`], which reports *every* problem found, each naming
//! its key, such as `processors[1].max_in_flight: must be > 0`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;
use crate::codec::WireFormat;
use crate::retry::RetryPolicy;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "CONVEYOR";
/// Separator between the prefix, sections and keys in those variables.
pub const ENV_SEPARATOR: &str = "__";

/// librdkafka properties that conveyor sets itself because its guarantees
/// depend on them, with the key that controls each instead.
/// librdkafka properties that hold secrets: printed as `***`.
const SECRET_OPTIONS: &[&str] = &[
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
];

const MANAGED_KAFKA_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("group.id", "set processors[].group_id instead"),
    (
        "session.timeout.ms",
        "set processors[].session_timeout_ms instead (the drain deadline is checked against it)",
    ),
    (
        "enable.auto.offset.store",
        "conveyor stores an offset only after the task's outputs are acknowledged",
    ),
    (
        "enable.idempotence",
        "conveyor's producers are always idempotent (at-least-once without reordering)",
    ),
    ("acks", "conveyor's producers always use acks=all"),
];

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Connection to the Kafka cluster, shared by every client.
    pub kafka: KafkaSettings,
    /// How task records are framed on the wire.
    pub codec: CodecSettings,
    /// Log level and format.
    pub log: LogSettings,
    /// Default topic names.
    pub topics: TopicSettings,
    /// The Prometheus endpoint.
    pub metrics: MetricsSettings,
    /// Span export over OpenTelemetry's OTLP.
    pub otlp: OtlpSettings,
    /// The HTTP gateway.
    pub gateway: GatewaySettings,
    /// The processors a worker runs, each its own consumer-group member.
    pub processors: Vec<ProcessorSettings>,
    /// Workflow definitions: named sequences of steps (task types), with
    /// fan-out and join.
    pub workflows: Vec<WorkflowSettings>,
}

/// `[[workflows]]`: one workflow definition.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSettings {
    /// Unique name, used in `POST /v1/workflows/{name}` and in every step's
    /// request.
    pub name: String,
    /// The steps, run in this order.
    pub steps: Vec<StepSettings>,
    /// The whole run must finish within this many milliseconds of its
    /// start, or it fails; 0: no limit.
    #[serde(default)]
    pub timeout_ms: u64,
    /// Most children one fan-out may make: a step whose output is a longer
    /// array fails the run, naming the size and this cap (a handler's
    /// output is outside input; one array must not turn into a flood of
    /// records). At most 2147483647.
    #[serde(default = "default_max_fan_out")]
    pub max_fan_out: usize,
}

/// The default [`WorkflowSettings::max_fan_out`].
pub const DEFAULT_MAX_FAN_OUT: usize = 10_000;

fn default_max_fan_out() -> usize {
    DEFAULT_MAX_FAN_OUT
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepSettings {
    /// The task type that runs the step; a processor of this configuration
    /// must handle it.
    pub task: String,
    /// The step's output is a JSON array; each element becomes a child task
    /// of the next step. A join must follow.
    #[serde(default)]
    pub fan_out: bool,
    /// Receives, once every child has finished, the JSON array of the
    /// children's outputs in child order.
    #[serde(default)]
    pub join: bool,
}

/// `[kafka]`: the cluster and client options.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Bootstrap brokers, comma-separated `host:port`.
    pub brokers: String,
    /// Prefix of each client's `client.id`; the worker adds the host name and
    /// process id, which also identify it in results (`worker`).
    pub client_id: String,
    /// Passed unchanged to librdkafka after conveyor's own defaults and
    /// `[kafka.security]`, so it can override them (`fetch.queue.backoff.ms`,
    /// any security property the typed section lacks, …). The few
    /// properties conveyor's guarantees depend on are refused here.
    pub options: BTreeMap<String, String>,
    /// TLS and SASL, for every client of the process.
    pub security: crate::security::SecuritySettings,
    /// Bytes of records a worker process lets librdkafka fetch ahead of its
    /// processors (64 MiB). Split evenly between the processors, and each
    /// share evenly over the partitions of the topics the processor reads
    /// (the most it could be assigned): a worker's prefetch stays within
    /// about twice this (see `kafka::prefetch_limits`) however many
    /// partitions it owns. `[kafka.options]` `queued.max.messages.kbytes`,
    /// `queued.min.messages` or `max.partition.fetch.bytes` override it.
    pub prefetch_bytes: u64,
}

/// Default of `kafka.prefetch_bytes`: 64 MiB.
pub const DEFAULT_PREFETCH_BYTES: u64 = 64 * 1024 * 1024;

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            client_id: "conveyor".into(),
            options: BTreeMap::new(),
            security: crate::security::SecuritySettings::default(),
            prefetch_bytes: DEFAULT_PREFETCH_BYTES,
        }
    }
}

/// `[codec]`: the wire format of task records.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecSettings {
    /// `avro` (bare Avro binary) or `confluent` (magic byte and schema id
    /// first, for Schema Registry tooling). Both are always accepted on input.
    pub wire_format: WireFormatName,
    /// Schema Registry id of `schemas/task_request.avsc`; required with
    /// `confluent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_schema_id: Option<u32>,
    /// Schema Registry id of `schemas/task_result.avsc`; required with
    /// `confluent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_schema_id: Option<u32>,
}

/// Name of a wire format in the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFormatName {
    /// Bare Avro binary.
    #[default]
    Avro,
    /// Confluent wire format.
    Confluent,
}

impl CodecSettings {
    /// The codec writing this wire format; `None` if the settings are
    /// incomplete (which [`Settings::validate`] reports).
    pub fn codec(&self) -> Option<crate::codec::Codec> {
        self.wire_format().map(crate::codec::Codec::new)
    }

    /// The wire format to write; `None` if the settings are incomplete (which
    /// [`Settings::validate`] reports).
    pub fn wire_format(&self) -> Option<WireFormat> {
        match self.wire_format {
            WireFormatName::Avro => Some(WireFormat::Plain),
            WireFormatName::Confluent => Some(WireFormat::Confluent {
                request_schema_id: self.request_schema_id?,
                result_schema_id: self.result_schema_id?,
            }),
        }
    }
}

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// Level or `tracing` filter (`info`, `conveyor=debug,rdkafka=warn`).
    /// The `RUST_LOG` environment variable, when set, wins.
    pub level: String,
    /// `text` for people, `json` for log pipelines; `--log-format` wins.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Whether workers record metrics at all. `false` records none and
    /// serves no `/metrics` (it exists to measure what recording costs).
    pub enabled: bool,
    /// Address of the `/metrics` listener (`host:port`); empty: none.
    pub listen: String,
    /// How often consumer lag is refreshed from librdkafka's statistics, in
    /// milliseconds.
    pub lag_interval_ms: u64,
    /// A worker's `/healthz` fails when a processor's poll loop has not gone
    /// round for this long, in milliseconds (a consumer that is alive but
    /// has silently stopped consuming). Must exceed every processor's
    /// `drain_timeout_ms`: a revoke blocks the poll loop while it drains.
    pub poll_stall_ms: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            lag_interval_ms: 5_000,
            poll_stall_ms: 60_000,
        }
    }
}

/// `[otlp]`: exporting `tracing` spans (one per task, children of the
/// request's `traceparent`) to an OpenTelemetry collector over OTLP/HTTP
/// with protobuf bodies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpSettings {
    /// Full URL spans are posted to, e.g. `http://127.0.0.1:4318/v1/traces`;
    /// empty: no export.
    pub endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// How long one export request may take, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for OtlpSettings {
    fn default() -> Self {
        OtlpSettings {
            endpoint: String::new(),
            service_name: "conveyor".into(),
            timeout_ms: 10_000,
        }
    }
}

/// `[gateway]`: the HTTP front door (`conveyor gateway`, and part of
/// `conveyor dev`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Address the API listens on (`host:port`). `/metrics` is served here
    /// too.
    pub listen: String,
    /// Task types the gateway accepts besides those of `[[processors]]`
    /// (for a gateway whose configuration runs no processor). Each goes to
    /// `<topics.task_prefix><type>`.
    pub task_types: Vec<String>,
    /// Bearer tokens accepted on `/v1/…`; empty: no authentication.
    /// `/healthz`, `/readyz`, `/metrics` and `/openapi.json` stay open.
    pub auth_tokens: Vec<String>,
    /// Largest `payload` of one task, in bytes of JSON text (413 above).
    pub max_payload_bytes: usize,
    /// Largest request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most tasks in one `POST /v1/tasks:batch`.
    pub max_batch: usize,
    /// Longest a request may take before it is answered 503, in
    /// milliseconds.
    pub request_timeout_ms: u64,
    /// Longest `?wait=` honoured, in milliseconds; below
    /// `request_timeout_ms`.
    pub max_wait_ms: u64,
    /// Longest a submitted task waits for the broker's acknowledgement
    /// before the request is answered 503 (librdkafka's
    /// `message.timeout.ms` of the gateway's producer).
    pub produce_timeout_ms: u64,
    /// How long an `idempotency_key` maps to its first task, in
    /// milliseconds.
    pub idempotency_window_ms: u64,
    /// At start, how far back the status view reads the results and task
    /// topics, in milliseconds.
    pub view_lookback_ms: u64,
    /// Most tasks the status view keeps; the oldest are forgotten first.
    pub view_max_tasks: usize,
    /// Longest the status view keeps a task, in milliseconds.
    pub view_max_age_ms: u64,
    /// Most bytes of outputs and errors the status view keeps.
    pub view_max_bytes: usize,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            listen: "127.0.0.1:8080".into(),
            task_types: Vec::new(),
            auth_tokens: Vec::new(),
            max_payload_bytes: 1 << 20,
            max_body_bytes: 8 << 20,
            max_batch: 100,
            request_timeout_ms: 30_000,
            max_wait_ms: 25_000,
            produce_timeout_ms: 5_000,
            idempotency_window_ms: 3_600_000,
            view_lookback_ms: 3_600_000,
            view_max_tasks: 100_000,
            view_max_age_ms: 3_600_000,
            view_max_bytes: 256 << 20,
        }
    }
}

impl Settings {
    /// The task types the gateway accepts and the topic each is produced
    /// to: every processor's types (to its input topic named after the type,
    /// or its only input topic), then `gateway.task_types`.
    pub fn gateway_task_topics(&self) -> BTreeMap<String, String> {
        let mut topics = self.task_topics();
        for task_type in &self.gateway.task_types {
            topics
                .entry(task_type.clone())
                .or_insert_with(|| self.topics.task_topic(task_type));
        }
        topics
    }

    /// The topic each task type of the processors is read from (the first
    /// processor handling a type decides).
    pub fn task_topics(&self) -> BTreeMap<String, String> {
        let mut topics = BTreeMap::new();
        for p in &self.processors {
            for task_type in p.tasks.keys() {
                let default = self.topics.task_topic(task_type);
                let topic = match p.input_topics.as_slice() {
                    [only] if !p.input_topics.contains(&default) => only.clone(),
                    _ => default,
                };
                topics.entry(task_type.clone()).or_insert(topic);
            }
        }
        topics
    }
}

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

/// `[[processors]]`: one consumer-group member of a worker.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorSettings {
    /// Unique name, used in logs, metrics and the default group id.
    pub name: String,
    /// Consumer group; copies with the same group share the partitions.
    /// Default: `conveyor.<name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Topics to read. Default: the task topic of each type in `tasks`.
    pub input_topics: Vec<String>,
    /// Where results go. Default: `topics.results`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_topic: Option<String>,
    /// Task type → handler. At least one.
    pub tasks: BTreeMap<String, TaskSettings>,
    /// `partition`: one task at a time per partition. `key`: one at a time
    /// per key, different keys concurrently. `none`: as concurrent as the
    /// bounds allow.
    pub ordering: Ordering,
    /// Most tasks running or awaiting acknowledgement in this processor;
    /// its partitions are not read while it is reached.
    pub max_in_flight: usize,
    /// Most such tasks from any one partition.
    pub max_in_flight_per_partition: usize,
    /// Most bytes of request records held by such tasks; its partitions are
    /// not read while it is reached. A record larger than this still runs,
    /// alone.
    pub max_in_flight_bytes: usize,
    /// Most records of one partition dispatched at or above its oldest
    /// unfinished record, finished or not. Kafka commits a watermark: while
    /// one slow task sits at a partition's head, the tasks behind it finish
    /// but stay uncommitted. At this bound the partition is not read
    /// further until the head finishes, which bounds the memory they hold
    /// and what runs again after a crash on a broker that drops commit
    /// metadata. At least `max_in_flight_per_partition`.
    pub max_uncommitted_per_partition: usize,
    /// How often finished offsets are committed (with the finished offsets
    /// above the watermark in the commit's metadata), in milliseconds.
    pub commit_interval_ms: u64,
    /// Consumer-group session timeout, in milliseconds.
    pub session_timeout_ms: u64,
    /// How long a revoke or shutdown waits for in-flight tasks before letting
    /// go of the partitions, in milliseconds; must be below
    /// `session_timeout_ms`.
    pub drain_timeout_ms: u64,
    /// Attempts in all (the first included) for a task that fails with a
    /// retryable error, a timeout or a panic. Task types may override it.
    pub max_attempts: u32,
    /// Backoff after the first failed attempt, in milliseconds; it doubles
    /// with each further attempt. Task types may override it.
    pub initial_backoff_ms: u64,
    /// Longest backoff, in milliseconds. Task types may override it.
    pub max_backoff_ms: u64,
    /// Spread of each backoff, as a fraction (0.2: ±20%).
    pub backoff_jitter: f64,
    /// Backoffs at least this long (in milliseconds) go through the retry
    /// topic instead of holding the partition; 0 turns retry topics off.
    pub retry_topic_threshold_ms: u64,
    /// The retry topic of input topic `T` is `T<retry_topic_suffix>`. It must
    /// exist when retry topics are in use.
    pub retry_topic_suffix: String,
    /// Where tasks that fail for good, and records that cannot be decoded,
    /// are copied. Default: `topics.dead_letter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// The poison-pill breaker.
    pub breaker: BreakerSettings,
}

/// `[processors.breaker]`: stop instead of dead-lettering a whole topic when
/// most tasks fail.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Whether the breaker is on.
    pub enabled: bool,
    /// How many recent terminal outcomes it looks at.
    pub window: usize,
    /// Share of failures among them that trips it (0.5: more than half).
    pub failure_ratio: f64,
    /// How long it stays open before trying again, in milliseconds.
    pub cooldown_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            enabled: true,
            window: 1000,
            failure_ratio: 0.5,
            cooldown_ms: 60_000,
        }
    }
}

impl ProcessorSettings {
    /// The retry policy of `task_type`: the processor's settings with the
    /// task type's overrides.
    pub fn retry_policy(&self, task_type: &str) -> RetryPolicy {
        let task = self.tasks.get(task_type);
        let pick = |over: Option<u64>, base: u64| Duration::from_millis(over.unwrap_or(base));
        RetryPolicy {
            max_attempts: task
                .and_then(|t| t.max_attempts)
                .unwrap_or(self.max_attempts),
            initial_backoff: pick(
                task.and_then(|t| t.initial_backoff_ms),
                self.initial_backoff_ms,
            ),
            max_backoff: pick(task.and_then(|t| t.max_backoff_ms), self.max_backoff_ms),
            jitter: self.backoff_jitter,
            retry_topic_threshold: (self.retry_topic_threshold_ms > 0)
                .then(|| Duration::from_millis(self.retry_topic_threshold_ms)),
        }
    }

    /// Whether any task type can back off long enough to use the retry
    /// topics (the worker then reads them too).
    pub fn uses_retry_topics(&self) -> bool {
        self.tasks.keys().any(|t| {
            let p = self.retry_policy(t);
            p.max_attempts > 1
                && p.retry_topic_threshold.is_some_and(|threshold| {
                    // The longest backoff, jitter included.
                    p.max_backoff.as_secs_f64() * (1.0 + p.jitter) >= threshold.as_secs_f64()
                })
        })
    }

    /// The retry topic of input topic `input`.
    pub fn retry_topic(&self, input: &str) -> String {
        format!("{input}{}", self.retry_topic_suffix)
    }

    /// The breaker's settings, when it is on.
    pub fn breaker_config(&self) -> Option<BreakerConfig> {
        self.breaker.enabled.then(|| BreakerConfig {
            window: self.breaker.window,
            failure_ratio: self.breaker.failure_ratio,
            cooldown: Duration::from_millis(self.breaker.cooldown_ms),
        })
    }
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        ProcessorSettings {
            name: String::new(),
            group_id: None,
            input_topics: Vec::new(),
            output_topic: None,
            tasks: BTreeMap::new(),
            ordering: Ordering::Key,
            max_in_flight: 10_000,
            max_in_flight_per_partition: 2_500,
            max_in_flight_bytes: 64 * 1024 * 1024,
            max_uncommitted_per_partition: 10_000,
            commit_interval_ms: 1000,
            session_timeout_ms: 10_000,
            drain_timeout_ms: 5_000,
            max_attempts: 3,
            initial_backoff_ms: 500,
            max_backoff_ms: 60_000,
            backoff_jitter: 0.2,
            retry_topic_threshold_ms: 5_000,
            retry_topic_suffix: ".retry".into(),
            dead_letter_topic: None,
            breaker: BreakerSettings::default(),
        }
    }
}

/// How tasks of one processor may overlap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    /// One at a time per partition, in offset order.
    Partition,
    /// One at a time per key, in offset order; keys run concurrently. The
    /// default: a task without a key (keyed by its id) runs as concurrently
    /// as with `None`, as task queues usually do, and tasks that share a
    /// key keep their order, which is what users ask for when they need
    /// order.
    #[default]
    Key,
    /// No ordering.
    None,
}

/// `[processors.tasks.<type>]`: the handler of one task type.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSettings {
    /// Built-in handler: `echo`, `sleep`, `sha256` or `http`.
    pub handler: HandlerKind,
    /// `http` only: the URL each task is POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Longest one attempt may run, in milliseconds.
    #[serde(default = "default_task_timeout_ms")]
    pub timeout_ms: u64,
    /// `http` only: the largest response body taken, in bytes (read in
    /// chunks, never held past this). A larger answer fails the task for
    /// good, naming its size: it could not be a result anyway (brokers
    /// take ~1 MB per record by default).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Overrides the processor's `max_attempts` for this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Overrides the processor's `initial_backoff_ms` for this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff_ms: Option<u64>,
    /// Overrides the processor's `max_backoff_ms` for this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff_ms: Option<u64>,
}

impl TaskSettings {
    /// A task type run by `handler` with the default timeout and the
    /// processor's retry settings.
    pub fn new(handler: HandlerKind) -> Self {
        TaskSettings {
            handler,
            url: None,
            timeout_ms: default_task_timeout_ms(),
            max_response_bytes: default_max_response_bytes(),
            max_attempts: None,
            initial_backoff_ms: None,
            max_backoff_ms: None,
        }
    }
}

fn default_task_timeout_ms() -> u64 {
    30_000
}

fn default_max_response_bytes() -> u64 {
    1024 * 1024
}

/// Which handler runs a task type: a built-in, or one the program
/// registered by name ([`crate::app::App::handler`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerKind {
    /// Returns the payload as the output.
    Echo,
    /// Waits `payload.ms` milliseconds: stands in for I/O-bound work.
    Sleep,
    /// Hashes the payload repeatedly: stands in for CPU-bound work.
    Sha256,
    /// POSTs the task to `url`: handlers in any language.
    Http,
    /// Splits `payload.text` into parts of `payload.lines` lines: a JSON
    /// array, for a fan-out step.
    SplitLines,
    /// Counts the words of a JSON string payload.
    WordCount,
    /// Adds up a JSON array of numbers, for a join step.
    Sum,
    /// A handler registered by the program under this name (conveyor's
    /// own binary registers none: a name it does not know is an error
    /// listing the ones it has).
    #[serde(untagged)]
    Custom(String),
}

impl HandlerKind {
    /// The built-in handlers' names, as written in a configuration.
    pub const BUILT_IN: &'static [&'static str] = &[
        "echo",
        "http",
        "sha256",
        "sleep",
        "split_lines",
        "sum",
        "word_count",
    ];

    /// The name a configuration gives this handler.
    pub fn name(&self) -> &str {
        match self {
            HandlerKind::Echo => "echo",
            HandlerKind::Sleep => "sleep",
            HandlerKind::Sha256 => "sha256",
            HandlerKind::Http => "http",
            HandlerKind::SplitLines => "split_lines",
            HandlerKind::WordCount => "word_count",
            HandlerKind::Sum => "sum",
            HandlerKind::Custom(name) => name,
        }
    }
}

/// One problem found in the configuration: the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, with list indices: `processors[1].max_in_flight`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The file could not be read or parsed.
    #[error("cannot read configuration: {0}")]
    Read(String),
    /// A key is unknown or has a value of the wrong type.
    #[error("{0}")]
    Parse(Problem),
    /// Values that parse but cannot work, every one found.
    #[error("invalid configuration:\n{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl SettingsError {
    /// Every problem with its key, one per entry.
    pub fn problems(&self) -> Vec<String> {
        match self {
            SettingsError::Read(message) => vec![message.clone()],
            SettingsError::Parse(problem) => vec![problem.to_string()],
            SettingsError::Invalid(problems) => problems.iter().map(Problem::to_string).collect(),
        }
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Settings {
    /// Loads defaults → `file` (if any) → the environment, fills derived
    /// defaults and validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Settings::load`] with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError::Read(format!(
                    "{}: no such file",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(env)),
        );
        let layered = builder
            .build()
            .map_err(|e| SettingsError::Read(e.to_string()))?;
        let mut settings: Settings = serde_path_to_error::deserialize(layered).map_err(|e| {
            let key = e.path().to_string();
            let mut message = e.into_inner().to_string();
            // The config crate appends the enclosing key, which the path
            // already names more precisely.
            if let Some(at) = message.rfind(" for key `") {
                message.truncate(at);
            }
            SettingsError::Parse(Problem {
                key: if key == "." { "<root>".into() } else { key },
                message,
            })
        })?;
        settings
            .kafka
            .security
            .read_secret_files()
            .map_err(|(key, message)| SettingsError::Invalid(vec![Problem { key, message }]))?;
        settings.fill_derived();
        settings.validate().map_err(SettingsError::Invalid)?;
        Ok(settings)
    }

    /// These settings with every secret shown as `***` (for printing).
    pub fn redacted(&self) -> Settings {
        let mut s = self.clone();
        s.kafka.security = s.kafka.security.redacted();
        for (key, value) in &mut s.kafka.options {
            if SECRET_OPTIONS.contains(&key.as_str()) && !value.is_empty() {
                *value = "***".into();
            }
        }
        s
    }

    /// Fills the defaults that depend on other keys, so the effective
    /// configuration is explicit.
    pub fn fill_derived(&mut self) {
        for p in &mut self.processors {
            if p.group_id.is_none() && !p.name.is_empty() {
                p.group_id = Some(format!("conveyor.{}", p.name));
            }
            if p.input_topics.is_empty() {
                p.input_topics = p.tasks.keys().map(|t| self.topics.task_topic(t)).collect();
            }
            if p.output_topic.is_none() {
                p.output_topic = Some(self.topics.results.clone());
            }
            if p.dead_letter_topic.is_none() {
                p.dead_letter_topic = Some(self.topics.dead_letter.clone());
            }
        }
    }

    /// Every problem with the values, each naming its key. Empty means usable.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad = |key: String, message: &str| {
            problems.push(Problem {
                key,
                message: message.to_owned(),
            })
        };

        if self.kafka.brokers.trim().is_empty() {
            bad("kafka.brokers".into(), "must name at least one host:port");
        }
        for broker in self.kafka.brokers.split(',').map(str::trim) {
            if !broker.is_empty() && !looks_like_host_port(broker) {
                bad(
                    "kafka.brokers".into(),
                    &format!("`{broker}` is not host:port"),
                );
            }
        }
        if self.kafka.client_id.trim().is_empty() {
            bad("kafka.client_id".into(), "must not be empty");
        }
        if self.kafka.prefetch_bytes < 1024 * 1024 {
            bad(
                "kafka.prefetch_bytes".into(),
                "must be at least 1048576 (1 MiB)",
            );
        }
        for (option, why) in MANAGED_KAFKA_OPTIONS {
            if self.kafka.options.contains_key(*option) {
                bad(
                    format!("kafka.options.\"{option}\""),
                    &format!("managed by conveyor: {why}"),
                );
            }
        }

        match self.codec.wire_format {
            WireFormatName::Confluent => {
                if self.codec.request_schema_id.is_none() {
                    bad(
                        "codec.request_schema_id".into(),
                        "required when codec.wire_format = \"confluent\"",
                    );
                }
                if self.codec.result_schema_id.is_none() {
                    bad(
                        "codec.result_schema_id".into(),
                        "required when codec.wire_format = \"confluent\"",
                    );
                }
            }
            WireFormatName::Avro => {
                for (key, value) in [
                    ("codec.request_schema_id", self.codec.request_schema_id),
                    ("codec.result_schema_id", self.codec.result_schema_id),
                ] {
                    if value.is_some() {
                        bad(
                            key.into(),
                            "only used with codec.wire_format = \"confluent\"",
                        );
                    }
                }
            }
        }

        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            bad(
                "metrics.listen".into(),
                "must be an IP address and port, like 127.0.0.1:9464 (or \"\" for none)",
            );
        }
        for (key, message) in self.kafka.security.problems() {
            bad(key, &message);
        }
        self.validate_gateway(&mut bad);
        self.validate_topics(&mut bad);
        self.validate_workflows(&mut bad);
        let endpoint = &self.otlp.endpoint;
        let web_url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !endpoint.is_empty() && !web_url {
            bad(
                "otlp.endpoint".into(),
                "must be an http:// or https:// URL, like http://127.0.0.1:4318/v1/traces (or \"\" for no export)",
            );
        }
        if self.otlp.service_name.trim().is_empty() {
            bad("otlp.service_name".into(), "must not be empty");
        }
        if self.otlp.timeout_ms == 0 {
            bad("otlp.timeout_ms".into(), "must be at least 1");
        }
        if self.metrics.lag_interval_ms < 100 {
            bad("metrics.lag_interval_ms".into(), "must be at least 100");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            bad("log.level".into(), &format!("not a valid filter: {e}"));
        }

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

        let mut names = BTreeMap::new();
        for (i, p) in self.processors.iter().enumerate() {
            let at = |key: &str| format!("processors[{i}].{key}");
            if p.name.is_empty() {
                bad(at("name"), "required");
            } else if !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                bad(at("name"), "use only letters, digits, `_` and `-`");
            } else if let Some(first) = names.insert(p.name.as_str(), i) {
                bad(
                    at("name"),
                    &format!("`{}` is also the name of processors[{first}]", p.name),
                );
            }
            if let Some(group) = &p.group_id {
                if group.trim().is_empty() {
                    bad(at("group_id"), "must not be empty");
                }
            }
            if p.tasks.is_empty() {
                bad(
                    at("tasks"),
                    "at least one task type is required, e.g. [processors.tasks.echo] handler = \"echo\"",
                );
            }
            for (task_type, task) in &p.tasks {
                let key = |k: &str| format!("processors[{i}].tasks.{task_type}.{k}");
                if let Err(why) = check_topic_name(task_type) {
                    bad(
                        format!("processors[{i}].tasks.{task_type}"),
                        &format!("task type {why}"),
                    );
                }
                if let HandlerKind::Custom(name) = &task.handler {
                    let fine = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if !fine {
                        bad(
                            key("handler"),
                            &format!(
                                "`{name}` is not a handler name: a built-in ({}) or a name \
                                 the program registers (letters, digits, _ and -)",
                                HandlerKind::BUILT_IN.join(", ")
                            ),
                        );
                    }
                }
                match (&task.handler, &task.url) {
                    (HandlerKind::Http, None) => bad(key("url"), "required by the http handler"),
                    (HandlerKind::Http, Some(url))
                        if !(url.starts_with("http://") || url.starts_with("https://")) =>
                    {
                        bad(key("url"), "must start with http:// or https://")
                    }
                    (HandlerKind::Http, Some(_)) => {}
                    (_, Some(_)) => bad(key("url"), "only used by the http handler"),
                    (_, None) => {}
                }
                if task.timeout_ms == 0 {
                    bad(key("timeout_ms"), "must be > 0");
                }
                if task.max_attempts == Some(0) {
                    bad(key("max_attempts"), "must be > 0");
                }
                let initial = task.initial_backoff_ms.unwrap_or(p.initial_backoff_ms);
                let max = task.max_backoff_ms.unwrap_or(p.max_backoff_ms);
                if (task.initial_backoff_ms.is_some() || task.max_backoff_ms.is_some())
                    && initial > max
                {
                    bad(
                        key("initial_backoff_ms"),
                        &format!("{initial} is above the max_backoff_ms in force ({max})"),
                    );
                }
            }
            for (j, topic) in p.input_topics.iter().enumerate() {
                if let Err(why) = check_topic_name(topic) {
                    bad(at(&format!("input_topics[{j}]")), &why);
                }
            }
            if let Some(topic) = &p.output_topic {
                if let Err(why) = check_topic_name(topic) {
                    bad(at("output_topic"), &why);
                }
            }
            if p.max_in_flight == 0 {
                bad(at("max_in_flight"), "must be > 0");
            }
            if p.max_in_flight_bytes == 0 {
                bad(at("max_in_flight_bytes"), "must be > 0");
            }
            if p.max_in_flight_per_partition == 0 {
                bad(at("max_in_flight_per_partition"), "must be > 0");
            } else if p.max_in_flight_per_partition > p.max_in_flight && p.max_in_flight > 0 {
                bad(
                    at("max_in_flight_per_partition"),
                    &format!("must not exceed max_in_flight ({})", p.max_in_flight),
                );
            }
            if p.max_uncommitted_per_partition < p.max_in_flight_per_partition {
                bad(
                    at("max_uncommitted_per_partition"),
                    &format!(
                        "must be at least max_in_flight_per_partition ({})",
                        p.max_in_flight_per_partition
                    ),
                );
            }
            if p.drain_timeout_ms >= self.metrics.poll_stall_ms {
                bad(
                    at("drain_timeout_ms"),
                    &format!(
                        "must be below metrics.poll_stall_ms ({}): a drain blocks the poll loop, and /healthz would fail meanwhile",
                        self.metrics.poll_stall_ms
                    ),
                );
            }
            if p.commit_interval_ms == 0 {
                bad(at("commit_interval_ms"), "must be > 0");
            }
            // librdkafka's own limits for session.timeout.ms.
            if !(1_000..=3_600_000).contains(&p.session_timeout_ms) {
                bad(at("session_timeout_ms"), "must be between 1000 and 3600000");
            }
            if p.max_attempts == 0 {
                bad(at("max_attempts"), "must be > 0 (1 means no retries)");
            }
            if p.initial_backoff_ms > p.max_backoff_ms {
                bad(
                    at("initial_backoff_ms"),
                    &format!("must not exceed max_backoff_ms ({})", p.max_backoff_ms),
                );
            }
            if !(0.0..=1.0).contains(&p.backoff_jitter) {
                bad(at("backoff_jitter"), "must be between 0 and 1");
            }
            if let Err(why) = check_topic_name(&format!("x{}", p.retry_topic_suffix)) {
                bad(at("retry_topic_suffix"), &why);
            } else if p.retry_topic_suffix.is_empty() {
                bad(
                    at("retry_topic_suffix"),
                    "must not be empty (the retry topic would be the input topic)",
                );
            }
            if let Some(topic) = &p.dead_letter_topic {
                if let Err(why) = check_topic_name(topic) {
                    bad(at("dead_letter_topic"), &why);
                }
            }
            if p.breaker.window == 0 {
                bad(at("breaker.window"), "must be > 0");
            }
            if !(p.breaker.failure_ratio > 0.0 && p.breaker.failure_ratio <= 1.0) {
                bad(at("breaker.failure_ratio"), "must be above 0 and at most 1");
            }
            if p.breaker.cooldown_ms == 0 {
                bad(at("breaker.cooldown_ms"), "must be > 0");
            }
            if p.drain_timeout_ms == 0 {
                bad(at("drain_timeout_ms"), "must be > 0");
            } else if p.drain_timeout_ms >= p.session_timeout_ms {
                bad(
                    at("drain_timeout_ms"),
                    &format!(
                        "must be below session_timeout_ms ({}), or the group evicts this member while it drains",
                        p.session_timeout_ms
                    ),
                );
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn validate_workflows(&self, bad: &mut impl FnMut(String, &str)) {
        let handled = self.task_topics();
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in self.workflows.iter().enumerate() {
            let at = |k: &str| format!("workflows[{i}] ({}).{k}", w.name);
            if let Err(why) = check_topic_name(&w.name) {
                bad(
                    format!("workflows[{i}].name"),
                    &format!("workflow name {why}"),
                );
            }
            if !names.insert(w.name.as_str()) {
                bad(
                    format!("workflows[{i}].name"),
                    &format!("`{}` is defined twice", w.name),
                );
            }
            if w.steps.is_empty() {
                bad(at("steps"), "must list at least one step");
            }
            if w.max_fan_out == 0 || i32::try_from(w.max_fan_out).is_err() {
                bad(at("max_fan_out"), "must be between 1 and 2147483647");
            }
            // Whether the steps so far are inside a fan-out not yet joined.
            let mut fanned_at: Option<usize> = None;
            for (s, step) in w.steps.iter().enumerate() {
                let key = at(&format!("steps[{s}]"));
                if !handled.contains_key(&step.task) {
                    bad(
                        format!("{key}.task"),
                        &format!(
                            "unknown task type `{}`: no [[processors]] entry handles it",
                            step.task
                        ),
                    );
                }
                if step.fan_out && step.join {
                    bad(key.clone(), "cannot be both fan_out and join");
                    continue;
                }
                if step.join {
                    match fanned_at {
                        None => bad(
                            format!("{key}.join"),
                            "a join needs a fan_out step before it (with no join between)",
                        ),
                        Some(f) if f + 1 == s => bad(
                            format!("{key}.join"),
                            &format!(
                                "needs at least one step for the children between it and the fan_out at steps[{f}]"
                            ),
                        ),
                        Some(_) => {}
                    }
                    fanned_at = None;
                }
                if step.fan_out {
                    if let Some(f) = fanned_at {
                        bad(
                            format!("{key}.fan_out"),
                            &format!("steps[{f}] fans out already and is not joined yet; nested fan-outs are not supported"),
                        );
                    }
                    fanned_at = Some(s);
                }
            }
            if let Some(f) = fanned_at {
                bad(
                    at(&format!("steps[{f}].fan_out")),
                    "a fan_out must be followed by a join step",
                );
            }
        }
    }

    fn validate_topics(&self, bad: &mut impl FnMut(String, &str)) {
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

    fn validate_gateway(&self, bad: &mut impl FnMut(String, &str)) {
        let g = &self.gateway;
        if g.listen.parse::<std::net::SocketAddr>().is_err() {
            bad(
                "gateway.listen".into(),
                "must be an IP address and port, like 127.0.0.1:8080",
            );
        }
        for (i, task_type) in g.task_types.iter().enumerate() {
            if let Err(why) = check_topic_name(task_type) {
                bad(
                    format!("gateway.task_types[{i}]"),
                    &format!("task type {why}"),
                );
            }
        }
        for (i, token) in g.auth_tokens.iter().enumerate() {
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                bad(
                    format!("gateway.auth_tokens[{i}]"),
                    "must be at least 16 printable ASCII characters without spaces",
                );
            }
        }
        for (key, value) in [
            ("gateway.max_payload_bytes", g.max_payload_bytes),
            ("gateway.max_body_bytes", g.max_body_bytes),
            ("gateway.max_batch", g.max_batch),
            ("gateway.view_max_tasks", g.view_max_tasks),
            ("gateway.view_max_bytes", g.view_max_bytes),
        ] {
            if value == 0 {
                bad(key.into(), "must be > 0");
            }
        }
        for (key, value) in [
            ("gateway.request_timeout_ms", g.request_timeout_ms),
            ("gateway.produce_timeout_ms", g.produce_timeout_ms),
            ("gateway.idempotency_window_ms", g.idempotency_window_ms),
            ("gateway.view_max_age_ms", g.view_max_age_ms),
        ] {
            if value == 0 {
                bad(key.into(), "must be > 0");
            }
        }
        if g.max_wait_ms >= g.request_timeout_ms {
            bad(
                "gateway.max_wait_ms".into(),
                &format!(
                    "must be below gateway.request_timeout_ms ({}), or a long poll is cut off",
                    g.request_timeout_ms
                ),
            );
        }
        if g.produce_timeout_ms >= g.request_timeout_ms {
            bad(
                "gateway.produce_timeout_ms".into(),
                &format!(
                    "must be below gateway.request_timeout_ms ({}), so a broker outage is answered 503 with its reason",
                    g.request_timeout_ms
                ),
            );
        }
    }

    /// The effective configuration as TOML, for `conveyor config check`.
    pub fn to_toml(&self) -> Result<String, SettingsError> {
        toml::to_string_pretty(self).map_err(|e| SettingsError::Read(e.to_string()))
    }
}

fn looks_like_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_toml(text: &str) -> Result<Settings, SettingsError> {
        load_toml_env(text, &[])
    }

    fn load_toml_env(text: &str, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let mut file = tempfile();
        file.1.write_all(text.as_bytes()).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let result = Settings::load_from(Some(&file.0), env);
        let _ = std::fs::remove_file(&file.0);
        result
    }

    fn tempfile() -> (std::path::PathBuf, std::fs::File) {
        let path =
            std::env::temp_dir().join(format!("conveyor-test-{}.toml", uuid::Uuid::new_v4()));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }

    fn problems(result: Result<Settings, SettingsError>) -> Vec<String> {
        result
            .expect_err("configuration should be refused")
            .problems()
    }

    const ONE_PROCESSOR: &str = r#"
        [[processors]]
        name = "main"
        [processors.tasks.echo]
        handler = "echo"
    "#;

    #[test]
    fn the_prefetch_budget_is_at_least_one_mib() {
        let e = load_toml("[kafka]\nprefetch_bytes = 1048575\n").expect_err("under 1 MiB");
        assert!(
            e.to_string()
                .contains("kafka.prefetch_bytes: must be at least 1048576 (1 MiB)"),
            "{e}"
        );
        let s = load_toml("[kafka]\nprefetch_bytes = 1048576\n").expect("1 MiB");
        assert_eq!(s.kafka.prefetch_bytes, 1_048_576);
        assert_eq!(
            Settings::default().kafka.prefetch_bytes,
            DEFAULT_PREFETCH_BYTES
        );
    }

    #[test]
    fn handlers_are_built_ins_or_names_a_program_registers() {
        let toml = |handler: &str| {
            format!("[[processors]]\nname = \"p\"\n[processors.tasks.t]\nhandler = \"{handler}\"\n")
        };
        let s = load_toml(&toml("split_lines")).expect("built-in");
        assert_eq!(s.processors[0].tasks["t"].handler, HandlerKind::SplitLines);
        let s = load_toml(&toml("resize_image")).expect("a registered name");
        assert_eq!(
            s.processors[0].tasks["t"].handler,
            HandlerKind::Custom("resize_image".into())
        );
        assert_eq!(s.processors[0].tasks["t"].handler.name(), "resize_image");
        let e = load_toml(&toml("two words")).expect_err("not a name");
        assert!(
            e.to_string()
                .contains("processors[0].tasks.t.handler: `two words` is not a handler name"),
            "{e}"
        );
        for name in HandlerKind::BUILT_IN {
            let mut text = toml(name);
            if *name == "http" {
                text.push_str("url = \"http://127.0.0.1:1/t\"\n");
            }
            let s = load_toml(&text).expect("built-in");
            let kind = &s.processors[0].tasks["t"].handler;
            assert!(!matches!(kind, HandlerKind::Custom(_)), "{name}");
            assert_eq!(kind.name(), *name);
        }
    }

    #[test]
    fn defaults_alone_are_valid() {
        let settings = Settings::load_from(None, Vec::new()).unwrap();
        assert_eq!(settings, Settings::default());
    }

    #[test]
    fn derived_defaults_are_filled() {
        let s = load_toml(ONE_PROCESSOR).unwrap();
        let p = &s.processors[0];
        assert_eq!(p.group_id.as_deref(), Some("conveyor.main"));
        assert_eq!(p.input_topics, ["conveyor.tasks.echo"]);
        assert_eq!(p.output_topic.as_deref(), Some("conveyor.results"));
        assert_eq!(p.dead_letter_topic.as_deref(), Some("conveyor.dlq"));
        assert_eq!(p.ordering, Ordering::Key);
        // 60 s max backoff ≥ 5 s threshold: retry topics are in use.
        assert!(p.uses_retry_topics());
        assert_eq!(
            p.retry_topic("conveyor.tasks.echo"),
            "conveyor.tasks.echo.retry"
        );
    }

    #[test]
    fn typo_names_the_key_with_its_path() {
        let text = format!("{ONE_PROCESSOR}\n[[processors]]\nname = \"b\"\nmax_in_fligth = 3\n");
        let found = problems(load_toml(&text));
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with(
                "processors[1].max_in_fligth: unknown field `max_in_fligth`, expected one of `name`,"
            ),
            "{found:?}"
        );
    }

    #[test]
    fn zero_max_in_flight_names_the_key() {
        let text = format!("{ONE_PROCESSOR}\n[[processors]]\nname = \"b\"\nmax_in_flight = 0\n[processors.tasks.echo]\nhandler = \"echo\"\n");
        let found = problems(load_toml(&text));
        assert_eq!(found, ["processors[1].max_in_flight: must be > 0"]);
    }

    const WORKFLOW_PROCESSOR: &str = r#"
        [[processors]]
        name = "main"
        [processors.tasks.split]
        handler = "echo"
        [processors.tasks.count]
        handler = "echo"
        [processors.tasks.sum]
        handler = "echo"
    "#;

    fn workflow(steps: &str) -> Result<Settings, SettingsError> {
        load_toml(&format!(
            "{WORKFLOW_PROCESSOR}\n[[workflows]]\nname = \"wc\"\nsteps = [{steps}]\n"
        ))
    }

    #[test]
    fn a_well_formed_workflow_is_accepted() {
        let s = workflow(
            r#"{ task = "split", fan_out = true }, { task = "count" }, { task = "count" }, { task = "sum", join = true }, { task = "count" }"#,
        )
        .unwrap();
        assert_eq!(s.workflows[0].steps.len(), 5);
        assert!(s.workflows[0].steps[0].fan_out);
        assert!(s.workflows[0].steps[3].join);
        assert_eq!(s.workflows[0].timeout_ms, 0);
    }

    #[test]
    fn bad_workflows_name_the_workflow_and_step() {
        let cases = [
            ("", "workflows[0] (wc).steps: must list at least one step"),
            (
                r#"{ task = "split" }, { task = "resize" }"#,
                "workflows[0] (wc).steps[1].task: unknown task type `resize`: no [[processors]] entry handles it",
            ),
            (
                r#"{ task = "count" }, { task = "sum", join = true }"#,
                "workflows[0] (wc).steps[1].join: a join needs a fan_out step before it (with no join between)",
            ),
            (
                r#"{ task = "split", fan_out = true }, { task = "sum", join = true }"#,
                "workflows[0] (wc).steps[1].join: needs at least one step for the children between it and the fan_out at steps[0]",
            ),
            (
                r#"{ task = "split", fan_out = true }, { task = "count" }"#,
                "workflows[0] (wc).steps[0].fan_out: a fan_out must be followed by a join step",
            ),
            (
                r#"{ task = "split", fan_out = true }, { task = "split", fan_out = true }, { task = "count" }, { task = "sum", join = true }"#,
                "workflows[0] (wc).steps[1].fan_out: steps[0] fans out already and is not joined yet; nested fan-outs are not supported",
            ),
            (
                r#"{ task = "split", fan_out = true, join = true }"#,
                "workflows[0] (wc).steps[0]: cannot be both fan_out and join",
            ),
        ];
        for (steps, expected) in cases {
            let found = problems(workflow(steps));
            assert_eq!(found, [expected], "steps = [{steps}]");
        }
        let twice = format!(
            "{WORKFLOW_PROCESSOR}\n[[workflows]]\nname = \"a\"\nsteps = [{{ task = \"sum\" }}]\n[[workflows]]\nname = \"a\"\nsteps = [{{ task = \"sum\" }}]\n"
        );
        assert_eq!(
            problems(load_toml(&twice)),
            ["workflows[1].name: `a` is defined twice"]
        );
    }

    #[test]
    fn otlp_export_settings_are_checked() {
        let found = problems(load_toml(
            "[otlp]\nendpoint = \"collector:4318\"\nservice_name = \" \"\ntimeout_ms = 0\n",
        ));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("otlp.endpoint: must be an http:// or https:// URL"));
        assert!(found[1].starts_with("otlp.service_name: must not be empty"));
        assert!(found[2].starts_with("otlp.timeout_ms: must be at least 1"));
        let s = load_toml("[otlp]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\n").unwrap();
        assert_eq!(s.otlp.endpoint, "http://127.0.0.1:4318/v1/traces");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let found = problems(load_toml(
            "[kafka]\nbrokers = 5\n[codec]\nwire_format = \"xml\"\n",
        ));
        // The first error stops deserialization; it names its key.
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("codec.wire_format: "), "{found:?}");
        assert!(found[0].contains("xml"), "{found:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [kafka]
            brokers = "nohost"
            [kafka.options]
            "enable.auto.offset.store" = "true"
            [codec]
            wire_format = "confluent"
            [[processors]]
            name = "a"
            session_timeout_ms = 6000
            drain_timeout_ms = 6000
            [processors.tasks.web]
            handler = "http"
        "#;
        let found = problems(load_toml(text));
        assert_eq!(
            found,
            [
                "kafka.brokers: `nohost` is not host:port",
                "kafka.options.\"enable.auto.offset.store\": managed by conveyor: conveyor stores an offset only after the task's outputs are acknowledged",
                "codec.request_schema_id: required when codec.wire_format = \"confluent\"",
                "codec.result_schema_id: required when codec.wire_format = \"confluent\"",
                "processors[0].tasks.web.url: required by the http handler",
                "processors[0].drain_timeout_ms: must be below session_timeout_ms (6000), or the group evicts this member while it drains",
            ]
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let s = load_toml_env(
            "[kafka]\nbrokers = \"a:1\"\n",
            &[
                ("CONVEYOR__KAFKA__BROKERS", "b:2"),
                ("CONVEYOR__LOG__FORMAT", "json"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "b:2");
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_typo_is_refused() {
        let found = problems(load_toml_env("", &[("CONVEYOR__KAFKA__BROKER", "b:2")]));
        assert_eq!(
            found,
            ["kafka.broker: unknown field `broker`, expected one of `brokers`, `client_id`, `options`, `security`, `prefetch_bytes`"]
        );
    }

    #[test]
    fn kafka_options_keep_dotted_names() {
        let s = load_toml("[kafka.options]\n\"fetch.queue.backoff.ms\" = \"10\"\n\"security.protocol\" = \"SSL\"\n").unwrap();
        assert_eq!(
            s.kafka
                .options
                .get("fetch.queue.backoff.ms")
                .map(String::as_str),
            Some("10")
        );
        assert_eq!(
            s.kafka.options.get("security.protocol").map(String::as_str),
            Some("SSL")
        );
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Settings::load_from(Some(Path::new("/nonexistent/conveyor.toml")), Vec::new())
            .unwrap_err();
        assert_eq!(err.problems(), ["/nonexistent/conveyor.toml: no such file"]);
    }

    #[test]
    fn effective_config_round_trips_through_toml() {
        let s = load_toml(ONE_PROCESSOR).unwrap();
        let printed = s.to_toml().unwrap();
        assert_eq!(load_toml(&printed).unwrap(), s);
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(check_topic_name("conveyor.tasks.resize_image-2").is_ok());
        assert!(check_topic_name("").is_err());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name("a b").is_err());
        assert!(check_topic_name(&"x".repeat(250)).is_err());
    }
}
