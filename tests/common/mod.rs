//! Shared test harness: a real Kafka-protocol broker for every test.
//!
//! Every test runs against librdkafka's in-process mock cluster, so
//! `cargo test` needs nothing installed. When `CONVEYOR_TEST_BROKERS`
//! (`host:port`) is set, the same test runs a second time against that
//! external broker (`.ci/run` starts nisshi and sets it). Topic and group
//! names are random per test, so tests never see each other's records.
//!
//! Which broker a test ran against is written straight to the process's
//! standard error, past the test harness's output capture, so a passing run
//! still shows it.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::Write;
use std::time::Duration;

use conveyor::settings::Settings;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// Environment variable naming an external broker (`host:port`).
pub const BROKERS_ENV: &str = "CONVEYOR_TEST_BROKERS";

/// How long test set-up waits for a broker to answer.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

enum Backend {
    Mock(MockCluster<'static, DefaultProducerContext>),
    External,
}

/// A broker a test runs against. Not `Send` (the mock cluster is not); keep
/// it on the test's own task.
pub struct TestKafka {
    backend: Backend,
    brokers: String,
    /// How clients connect (TLS, SASL); plaintext unless made with
    /// [`TestKafka::secured`].
    security: conveyor::security::SecuritySettings,
}

impl Drop for TestKafka {
    /// A test that fails while workers run unwinds with the cluster still
    /// in use: a worker's drain ends with a synchronous commit, which
    /// waits without end for a cluster that is gone, and the runtime waits
    /// for that worker's thread, so the failed test would hang instead of
    /// failing. The cluster is left running (leaked) then; the process ends
    /// soon after.
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Backend::Mock(cluster) = std::mem::replace(&mut self.backend, Backend::External)
            {
                std::mem::forget(cluster);
            }
        }
    }
}

impl TestKafka {
    /// A fresh in-process mock cluster with one broker.
    pub fn mock() -> TestKafka {
        let cluster = MockCluster::new(1).expect("librdkafka starts a mock cluster");
        let brokers = cluster.bootstrap_servers();
        TestKafka {
            backend: Backend::Mock(cluster),
            brokers,
            security: Default::default(),
        }
    }

    /// The external broker named by `CONVEYOR_TEST_BROKERS`, if set.
    pub fn external() -> Option<TestKafka> {
        let brokers = std::env::var(BROKERS_ENV).ok()?;
        let brokers = brokers.trim().to_owned();
        (!brokers.is_empty()).then_some(TestKafka {
            backend: Backend::External,
            brokers,
            security: Default::default(),
        })
    }

    /// An external broker at `brokers`, reached with `security`.
    pub fn secured(brokers: &str, security: conveyor::security::SecuritySettings) -> TestKafka {
        TestKafka {
            backend: Backend::External,
            brokers: brokers.to_owned(),
            security,
        }
    }

    /// The brokers `test` runs against: the mock cluster, then the external
    /// broker when configured. Announces each on standard error.
    pub fn all(test: &str) -> Vec<TestKafka> {
        let all: Vec<TestKafka> = std::iter::once(TestKafka::mock())
            .chain(TestKafka::external())
            .collect();
        let names: Vec<String> = all.iter().map(TestKafka::describe).collect();
        announce(&format!("{test}: runs against {}", names.join(" and ")));
        all
    }

    /// `mock cluster at …` or `external broker at …`.
    pub fn describe(&self) -> String {
        match self.backend {
            Backend::Mock(_) => format!("the mock cluster at {}", self.brokers),
            Backend::External => format!("the external broker at {}", self.brokers),
        }
    }

    /// Whether this is the in-process mock cluster.
    pub fn is_mock(&self) -> bool {
        matches!(self.backend, Backend::Mock(_))
    }

    /// `bootstrap.servers` of this broker.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Default settings pointed at this broker.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        settings.kafka.brokers = self.brokers.clone();
        settings.kafka.client_id = "conveyor-test".into();
        settings.kafka.security = self.security.clone();
        // Tests run workers side by side: each takes any free port.
        settings.metrics.listen = "127.0.0.1:0".into();
        // Delays need their tier topics: a test that uses them makes its
        // own (`TestKafka::delay_tiers`).
        settings.delays.enabled = false;
        // Likewise the events and control topics (`with_lifecycle`).
        settings.events.enabled = false;
        settings.cancel.enabled = false;
        // And the workers topic (`with_workers`).
        settings.workers.enabled = false;
        if !self.is_mock() {
            // nisshi 0.8.1 sometimes stores an idempotent producer's
            // pipelined produce requests out of order: its log says
            // "idempotent batch out of order … next_sequence=1567
            // base_sequence=1569" and it answers OutOfOrderSequenceNumber,
            // which librdkafka takes as fatal, so the worker stops (as it
            // must) and a test waits out its timeout (seen in CI runs here,
            // once failing an in-process rebalance test). One request in
            // flight per connection keeps the batches in order; conveyor's
            // own default (librdkafka's 5) is what the mock cluster runs.
            settings
                .kafka
                .options
                .insert("max.in.flight.requests.per.connection".into(), "1".into());
        }
        settings
    }

    /// Creates a topic with a random name starting with `prefix` and
    /// `partitions` partitions; returns its name.
    pub async fn create_topic(&self, prefix: &str, partitions: i32) -> String {
        let name = unique(prefix);
        self.create_named_topic(&name, partitions).await;
        name
    }

    /// Creates topic `name` with `partitions` partitions.
    pub async fn create_named_topic(&self, name: &str, partitions: i32) {
        match &self.backend {
            // The mock cluster has no admin CreateTopics.
            Backend::Mock(cluster) => cluster
                .create_topic(name, partitions, 1)
                .expect("mock cluster creates the topic"),
            Backend::External => {
                let admin: AdminClient<DefaultClientContext> =
                    conveyor::kafka::admin_config(&self.settings().kafka)
                        .create()
                        .expect("admin client");
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let options = AdminOptions::new().operation_timeout(Some(SETUP_TIMEOUT));
                let results = admin
                    .create_topics([&topic], &options)
                    .await
                    .expect("CreateTopics request answered");
                for result in results {
                    result.expect("topic created");
                }
            }
        }
    }
}

/// A name that no other test uses: `prefix-<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Writes a line to the process's standard error, bypassing libtest's
/// capture (which only intercepts the `print!` family).
pub fn announce(line: &str) {
    let _ = std::io::stderr().write_all(format!("conveyor-test: {line}\n").as_bytes());
}

/// Whether python3 can import `module`. When it cannot: fails if the
/// environment variable `require` is set (CI sets it), else announces that
/// `test` is skipped and how to install what it needs.
pub fn python_module_available(test: &str, module: &str, require: &str, install: &str) -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os(require).is_none(),
            "{require} is set but python3 cannot import {module}"
        );
        announce(&format!(
            "{test}: SKIPPED: python3 or {module} is missing ({install})"
        ));
    }
    found
}

// ---------------------------------------------------------------------------
// Producing requests, reading results, running workers.

use conveyor::shutdown::CancellationToken;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use conveyor::codec::{Codec, TaskRequest, TaskResult};
use conveyor::handlers::Registry;
use conveyor::processor::{ProcessorSpec, ProcessorStatus};
use conveyor::settings::{HandlerKind, Ordering, ProcessorSettings, TaskSettings};
use conveyor::worker::{self, WorkerError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

impl TestKafka {
    /// A producer with conveyor's producer settings.
    pub fn producer(&self) -> FutureProducer {
        conveyor::kafka::producer_config(&self.settings().kafka)
            .set("linger.ms", "5")
            .create()
            .expect("producer")
    }

    /// Produces `requests` to `topic`, keyed by their key or id, and waits
    /// until the broker acknowledged every one.
    pub async fn produce_requests(&self, topic: &str, requests: &[TaskRequest]) {
        let codec = Codec::default();
        self.produce_all(topic, requests, |request, value| {
            codec.encode_request(request, value);
            request
                .key
                .clone()
                .unwrap_or_else(|| request.id.to_string())
        })
        .await;
    }

    /// Produces `results` to `topic` (keyed by id) and waits for every
    /// acknowledgement.
    pub async fn produce_results(&self, topic: &str, results: &[TaskResult]) {
        let codec = Codec::default();
        self.produce_all(topic, results, |result, value| {
            codec.encode_result(result, value);
            result.id.to_string()
        })
        .await;
    }

    /// Produces each of `items`, encoded by `encode` (which writes the
    /// value and returns the key), then waits for every acknowledgement.
    async fn produce_all<T>(
        &self,
        topic: &str,
        items: &[T],
        encode: impl Fn(&T, &mut Vec<u8>) -> String,
    ) {
        let producer = self.producer();
        let mut pending = Vec::with_capacity(items.len());
        for item in items {
            let mut value = Vec::new();
            let key = encode(item, &mut value);
            pending.push(
                self.send(&producer, topic, key.as_bytes(), &value, None)
                    .await,
            );
        }
        for delivery in pending {
            acked(delivery).await;
        }
    }

    /// Queues one raw record, waiting while the producer queue is full.
    pub async fn send(
        &self,
        producer: &FutureProducer,
        topic: &str,
        key: &[u8],
        value: &[u8],
        partition: Option<i32>,
    ) -> rdkafka::producer::DeliveryFuture {
        loop {
            let mut record = FutureRecord::to(topic).key(key).payload(value);
            if let Some(p) = partition {
                record = record.partition(p);
            }
            match producer.send_result(record) {
                Ok(delivery) => return delivery,
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    _,
                )) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err((e, _)) => panic!("producing to {topic}: {e}"),
            }
        }
    }

    /// A consumer reading every partition of `topic` from the start, with
    /// end-of-partition events.
    pub fn reader(&self, topic: &str) -> (BaseConsumer, usize) {
        let consumer: BaseConsumer =
            conveyor::kafka::consumer_config(&self.settings().kafka, &unique("reader"), 6_000)
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "true")
                .create()
                .expect("reader");
        let metadata = consumer
            .fetch_metadata(Some(topic), SETUP_TIMEOUT)
            .expect("metadata");
        let mut list = TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                list.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .expect("partition");
            }
        }
        let count = list.count();
        assert!(count > 0, "topic {topic} has partitions");
        consumer.assign(&list).expect("assign");
        (consumer, count)
    }

    /// Reads `topic` until a result for every id in `expected` arrived (or
    /// `timeout` passes: then it panics naming how many are missing), then
    /// on to the end of every partition so that duplicates written so far
    /// are counted too.
    pub async fn collect_results(
        &self,
        topic: &str,
        expected: &HashSet<Uuid>,
        timeout: Duration,
    ) -> Results {
        let codec = Codec::default();
        let (consumer, partitions) = self.reader(topic);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut results = Results::default();
        let mut at_end = HashSet::new();
        loop {
            let complete = expected.iter().all(|id| results.by_id.contains_key(id));
            if complete && at_end.len() == partitions {
                return results;
            }
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    at_end.remove(&m.partition());
                    let result = codec
                        .decode_result(m.payload().unwrap_or_default())
                        .expect("results decode");
                    results.by_id.entry(result.id).or_default().push(result);
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {
                    if tokio::time::Instant::now() >= deadline {
                        let missing = expected
                            .iter()
                            .filter(|id| !results.by_id.contains_key(id))
                            .count();
                        // Records the cluster dropped before they were read
                        // (librdkafka's mock cluster keeps 5 MiB a
                        // partition) show as a low watermark above 0.
                        let dropped: i64 = (0..partitions as i32)
                            .filter_map(|p| consumer.fetch_watermarks(topic, p, SETUP_TIMEOUT).ok())
                            .map(|(low, _)| low)
                            .sum();
                        panic!(
                            "{}: {missing} of {} results missing after {timeout:?} \
                             ({dropped} records of {topic} no longer on the cluster)",
                            self.describe(),
                            expected.len()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// The group's committed offset of each partition of `topic`.
    pub fn committed(&self, group: &str, topic: &str) -> HashMap<i32, i64> {
        self.committed_with_metadata(group, topic)
            .into_iter()
            .map(|(partition, (offset, _))| (partition, offset))
            .collect()
    }

    /// The group's committed offset of each partition of `topic` that has
    /// one, with the commit's metadata.
    pub fn committed_with_metadata(&self, group: &str, topic: &str) -> HashMap<i32, (i64, String)> {
        let consumer: BaseConsumer =
            conveyor::kafka::consumer_config(&self.settings().kafka, group, 6_000)
                .set("enable.auto.commit", "false")
                .create()
                .expect("consumer");
        let (_, partitions) = self.reader(topic);
        let mut list = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            list.add_partition(topic, p);
        }
        let committed = consumer
            .committed_offsets(list, SETUP_TIMEOUT)
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), (o, e.metadata().to_owned()))),
                _ => None,
            })
            .collect()
    }

    /// The high watermark (end offset) of each partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> HashMap<i32, i64> {
        let (consumer, partitions) = self.reader(topic);
        (0..partitions as i32)
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(topic, p, SETUP_TIMEOUT)
                    .expect("watermarks");
                (p, high)
            })
            .collect()
    }
}

async fn acked(delivery: rdkafka::producer::DeliveryFuture) {
    tokio::time::timeout(SETUP_TIMEOUT, delivery)
        .await
        .expect("delivery report in time")
        .expect("delivery future not cancelled")
        .expect("broker acknowledged the record");
}

/// Results read back, by task id (more than one entry: duplicates).
#[derive(Debug, Default)]
pub struct Results {
    pub by_id: HashMap<Uuid, Vec<TaskResult>>,
}

impl Results {
    /// Results beyond the first of each task.
    pub fn duplicates(&self) -> usize {
        self.by_id.values().map(|v| v.len().saturating_sub(1)).sum()
    }

    /// Every result, duplicates included.
    pub fn all(&self) -> impl Iterator<Item = &TaskResult> {
        self.by_id.values().flatten()
    }
}

/// Topics and group of one engine test.
pub struct Pipeline {
    pub input: String,
    pub output: String,
    pub dead_letter: String,
    pub group: String,
    pub partitions: i32,
}

impl TestKafka {
    /// Creates an input topic of `partitions` partitions, its retry topic,
    /// a results topic and a dead-letter topic.
    pub async fn pipeline(&self, partitions: i32) -> Pipeline {
        let input = self.create_topic("tasks", partitions).await;
        self.create_named_topic(&format!("{input}.retry"), partitions)
            .await;
        Pipeline {
            input,
            output: self.create_topic("results", 4).await,
            dead_letter: self.create_topic("dlq", 2).await,
            group: unique("group"),
            partitions,
        }
    }

    /// Waits until the pipeline's group has committed `records` records of
    /// its input (the committed offsets summed over its partitions).
    pub async fn wait_committed(&self, pipeline: &Pipeline, records: usize, within: Duration) {
        wait_until("every offset committed", within, || {
            self.committed(&pipeline.group, &pipeline.input)
                .values()
                .sum::<i64>()
                == records as i64
        })
        .await;
    }

    /// Settings with one processor reading `pipeline` with `tasks`.
    pub fn worker_settings(
        &self,
        pipeline: &Pipeline,
        ordering: Ordering,
        tasks: &[(&str, HandlerKind)],
    ) -> Settings {
        let mut settings = self.settings();
        settings.processors.push(ProcessorSettings {
            name: "test".into(),
            group_id: Some(pipeline.group.clone()),
            input_topics: vec![pipeline.input.clone()],
            output_topic: Some(pipeline.output.clone()),
            dead_letter_topic: Some(pipeline.dead_letter.clone()),
            tasks: tasks
                .iter()
                .map(|(t, h)| ((*t).to_owned(), TaskSettings::new(h.clone())))
                .collect(),
            ordering,
            max_in_flight: 64,
            max_in_flight_per_partition: 16,
            commit_interval_ms: 500,
            // The mock cluster moves a departed member's partitions only
            // after the session timeout: keep it short.
            session_timeout_ms: 6_000,
            drain_timeout_ms: 3_000,
            ..ProcessorSettings::default()
        });
        settings.fill_derived();
        settings.validate().expect("test settings are valid");
        settings
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The value of the unlabelled metric `name` a worker's `/metrics` at
/// `port` shows, if it shows it.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every series of metric `name` a worker's `/metrics` at
/// `port` shows (0 when it shows none).
pub async fn metric_sum(port: u16, name: &str) -> f64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Turns delays on in `settings` with tier topics of their own
/// (`partitions` each), created on this broker.
pub async fn with_delay_tiers(kafka: &TestKafka, settings: &mut Settings, partitions: i32) {
    settings.delays.enabled = true;
    settings.delays.topic_prefix = format!("{}.", unique("delay"));
    settings.delays.group_id = unique("delays");
    // As the test processors': a killed worker's tiers move on quickly.
    settings.delays.session_timeout_ms = 6_000;
    for (_, topic) in settings.delays.tier_topics() {
        kafka.create_named_topic(&topic, partitions).await;
    }
}

/// Turns task events and cancellations on in `settings`, with an events
/// topic (`partitions` partitions) and a control topic of their own,
/// created on this broker.
pub async fn with_lifecycle(kafka: &TestKafka, settings: &mut Settings, partitions: i32) {
    settings.events.enabled = true;
    settings.events.topic = kafka.create_topic("events", partitions).await;
    settings.cancel.enabled = true;
    settings.cancel.topic = kafka.create_topic("control", 2).await;
}

/// Turns worker reports on in `settings`, every 200 ms, to a workers
/// topic of their own created on this broker.
pub async fn with_workers(kafka: &TestKafka, settings: &mut Settings) {
    settings.workers.enabled = true;
    settings.workers.report_interval_ms = 200;
    settings.workers.topic = kafka.create_topic("workers", 2).await;
}

/// The status and JSON body of a gateway's answer.
pub async fn json_answer(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("the answer's body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

/// POSTs `body` as JSON to `url`; the answer's status and JSON body.
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the gateway answers");
    json_answer(response).await
}

/// A worker running in this process.
pub struct InProcessWorker {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), WorkerError>>,
    /// The first processor's figures.
    pub status: Arc<ProcessorStatus>,
    /// Every processor's figures, in configuration order.
    pub statuses: Vec<Arc<ProcessorStatus>>,
    pub metrics: Arc<conveyor::metrics::Metrics>,
}

impl InProcessWorker {
    /// Starts the processors of `settings` as worker `name`, with `registry`
    /// (for every processor) instead of the configured handlers when given.
    pub fn start(settings: &Settings, name: &str, registry: Option<Registry>) -> Self {
        let mut specs: Vec<ProcessorSpec> = worker::processor_specs(settings).expect("specs");
        let mut statuses = Vec::new();
        for spec in &mut specs {
            spec.worker = name.to_owned();
            spec.status = Arc::new(ProcessorStatus::default());
            statuses.push(spec.status.clone());
            if let Some(r) = &registry {
                spec.registry = r.clone();
            }
        }
        let status = statuses[0].clone();
        let stop = CancellationToken::new();
        let metrics = specs[0].metrics.clone();
        let handle = tokio::spawn(worker::run(specs, stop.clone()));
        InProcessWorker {
            stop,
            handle,
            status,
            statuses,
            metrics,
        }
    }

    /// Awaits `work` while the worker runs: a worker that ends first (a
    /// processor stopped with an error) fails the test at once, naming the
    /// error, instead of leaving it to time out waiting for results.
    pub async fn alongside<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        tokio::select! {
            value = work => value,
            ended = &mut self.handle => panic!("the worker ended while the test waited on it: {ended:?}"),
        }
    }

    /// Asks the worker to stop and waits until it drained and committed.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let handle = std::mem::replace(&mut self.handle, tokio::spawn(async { Ok(()) }));
        tokio::time::timeout(SETUP_TIMEOUT, handle)
            .await
            .expect("worker stops in time")
            .expect("worker task did not panic")
            .expect("worker stopped cleanly");
    }
}

impl Drop for InProcessWorker {
    /// A test that fails before stopping its workers must still end: the
    /// runtime waits for every poll thread when it shuts down.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Polls `condition` until it holds, or panics after `timeout` naming `what`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`] with a condition that awaits (an HTTP probe).
pub async fn wait_until_async(
    what: &str,
    timeout: Duration,
    mut condition: impl AsyncFnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `settings` to a temporary TOML file for the `conveyor` binary.
pub fn config_file(settings: &Settings) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("conveyor-test-config")));
    std::fs::write(&path, settings.to_toml().expect("settings serialize")).expect("write config");
    path
}

/// `count` requests of `task_type` with `payload`.
pub fn requests(task_type: &str, payload: &str, count: usize) -> Vec<TaskRequest> {
    (0..count)
        .map(|_| TaskRequest::new(task_type, payload.as_bytes().to_vec()))
        .collect()
}

/// The ids of `requests`.
pub fn ids(requests: &[TaskRequest]) -> HashSet<Uuid> {
    requests.iter().map(|r| r.id).collect()
}

/// Sends the library's logs to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

impl TestKafka {
    /// The mock cluster, for fault injection; `None` on an external broker.
    pub fn mock_cluster(&self) -> Option<&MockCluster<'static, DefaultProducerContext>> {
        match &self.backend {
            Backend::Mock(cluster) => Some(cluster),
            Backend::External => None,
        }
    }

    /// Every record of `topic` from the start, once there are at least
    /// `at_least` and every partition was read to its end.
    pub async fn read_records(
        &self,
        topic: &str,
        at_least: usize,
        timeout: Duration,
    ) -> Vec<rdkafka::message::OwnedMessage> {
        let (consumer, partitions) = self.reader(topic);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut records = Vec::new();
        let mut at_end = HashSet::new();
        loop {
            if records.len() >= at_least && at_end.len() == partitions {
                return records;
            }
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    at_end.remove(&m.partition());
                    records.push(m.detach());
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{}: {} of at least {at_least} records on {topic} after {timeout:?}",
                        self.describe(),
                        records.len()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// The value of header `name` of `record`, as text.
pub fn header(record: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = record.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A gateway running in this process on a free port. Dropping it asks it to
/// stop, so a test that fails first still ends (the gateway's follower
/// thread would otherwise hold up the runtime's shutdown).
pub struct TestGateway {
    gateway: Option<conveyor::gateway::Gateway>,
    stop: CancellationToken,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl TestGateway {
    /// Starts the gateway `settings` describe, on any free loopback port,
    /// recording into `metrics`.
    pub async fn start(settings: &Settings, metrics: Arc<conveyor::metrics::Metrics>) -> Self {
        let mut settings = settings.clone();
        settings.gateway.listen = "127.0.0.1:0".into();
        let stop = CancellationToken::new();
        let gateway = conveyor::gateway::start(&settings, metrics, stop.clone())
            .await
            .expect("gateway starts");
        let base = format!("http://{}", gateway.address());
        TestGateway {
            gateway: Some(gateway),
            stop,
            base,
        }
    }

    /// Signals the gateway to stop (as SIGTERM does) without waiting.
    #[allow(dead_code)] // not every test binary signals
    pub fn signal(&self) {
        self.stop.cancel();
    }

    /// Asks the gateway to stop and waits until it stopped cleanly.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(gateway) = self.gateway.take() {
            tokio::time::timeout(SETUP_TIMEOUT, gateway.finished())
                .await
                .expect("gateway stops in time")
                .expect("gateway stopped cleanly");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
