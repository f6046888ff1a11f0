//! End-to-end throughput: conveyor's processor with the `echo` handler
//! against a bare rdkafka consume→produce loop, on the same broker, topics,
//! message count and producer settings, alternated in one run.
//!
//! ```sh
//! cargo bench --bench pipeline                       # in-process mock cluster
//! cargo bench --bench pipeline -- --brokers 127.0.0.1:9092 --messages 200000
//! ```
//!
//! Two more modes replace the throughput rounds. Latency mode
//!
//! ```sh
//! cargo bench --bench pipeline -- --latency 2000,10000,40000 --seconds 5 --linger 0
//! ```
//!
//! offers each rate open-loop (on schedule, whether results keep up or not)
//! to the raw loop, then to conveyor's processor, and prints p50/p99/p99.9
//! of submitted → result received by a consumer, for each.
//! Scaling mode
//!
//! ```sh
//! cargo bench --bench pipeline -- --brokers 127.0.0.1:9092 --scaling 1,2,4
//! ```
//!
//! runs that many real `conveyor worker` processes in one group over the
//! same preloaded tasks (a fresh group and output topic each time) and
//! prints the rate at which their results arrive.
//!
//! Prefetch mode
//!
//! ```sh
//! cargo bench --bench pipeline -- --prefetch-rss --partitions 256 --messages 512000 --seconds 30
//! ```
//!
//! preloads the backlog, then runs one real `conveyor worker` process that
//! owns every partition but works one task at a time (so the backlog waits
//! in librdkafka's prefetch), and prints the process's RSS every 2 s: with
//! the default `kafka.prefetch_bytes`, then with the per-partition limits
//! conveyor used before it (2,000 records / 4 MiB / 1 MiB fetches each).
//!
//! Metrics-cost mode (`--metrics-cost`) alternates conveyor's processor with
//! metrics recorded and with `metrics.enabled = false` instead of the raw
//! loop, and prints the throughput ratio on/off.
//!
//! Options: `--messages N` (100,000), `--partitions P` (8), `--rounds R`
//! (3), `--payload BYTES` (200), `--linger MS` (every producer's
//! `linger.ms`; librdkafka's default is 5), `--ordering none|key|partition`
//! (the processor's ordering; none), `--keys K` (the preloaded records use
//! K distinct keys in turn; default: each its task id, a lane per record
//! under `key`), `--json FILE` (machine-readable results, with machine,
//! date and commit, for `benches/charts.py`). For profiling, the environment variables
//! `BENCH_MAX` and `BENCH_PP` set the processor's `max_in_flight` and
//! `max_in_flight_per_partition` (default: conveyor's defaults), and `BENCH_OPTS`
//! adds librdkafka properties (`key=value,key=value`). The real `conveyor
//! worker` processes of the scaling, prefetch and waiting modes log at
//! `warn` unless `BENCH_WORKER_LOG` gives another `RUST_LOG` filter.
//! `BENCH_LOG=<level>` installs the workers' own log subscriber (text, to
//! standard error) in the bench process at that level, so the in-process
//! processor pays for its per-task span as a worker does (without it the
//! bench runs with no subscriber).
//!
//! Waiting mode (`--waiting N`) starts one real `conveyor worker` with the
//! `sleep` handler and prints its RSS idle, then with N ten-minute tasks
//! in flight, and the difference per task. `BENCH_WAITING_WITHOUT=events,cancel`
//! turns those default-on features off in that worker, to see what each
//! adds to a waiting task.
//!
//! Each round preloads nothing new: the input topic is filled once, and
//! each run reads all of it with a fresh consumer group into a fresh output
//! topic. Throughput counts from the first output acknowledged to the last,
//! the same way for both, so group-join time is not measured. CPU seconds
//! are the whole process's (with the mock cluster, its broker threads too).
//!
//! The baseline is the fastest honest loop here: a `BaseConsumer` polled on
//! one thread with librdkafka's default prefetch, a `ThreadedProducer` whose
//! delivery callback advances a per-partition contiguous watermark
//! (conveyor's own `OffsetTracker`), and offsets stored by the poll loop in
//! one call per thousand records: at-least-once, like conveyor, with no task
//! per record.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that cannot run stops

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};

use conveyor::shutdown::CancellationToken;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use conveyor::codec::{Codec, TaskRequest};
use conveyor::handlers::Registry;
use conveyor::kafka;
use conveyor::metrics::Metrics;
use conveyor::offsets::OffsetTracker;
use conveyor::processor::{self, ProcessorSpec, ProcessorStatus};
use conveyor::settings::{HandlerKind, KafkaSettings, Ordering, ProcessorSettings, TaskSettings};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer, ProducerContext,
    ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// The allocator the `conveyor` binary uses (src/main.rs), so the processor
/// measured in this process allocates as the worker does. The raw pipe
/// allocates almost nothing on the Rust side; librdkafka keeps the system
/// allocator in both.
///
/// `--only` runs also count the Rust side's allocations (librdkafka's go to
/// the system allocator and are not counted) while the side runs, and print
/// them per record (#32: "count allocations per record in a bench").
#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Whether allocations are being counted now, and how many were.
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// mimalloc, counting allocations while [`COUNTING`] is set.
struct Counting;

fn count_allocation() {
    if COUNTING.load(AtomicOrdering::Relaxed) {
        ALLOCATIONS.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

// SAFETY: every call is passed on unchanged to mimalloc's allocator.
#[allow(unsafe_code)] // a global allocator is an unsafe trait
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller's contract, passed on.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

struct Options {
    brokers: Option<String>,
    messages: usize,
    partitions: i32,
    rounds: usize,
    payload: usize,
    /// Latency mode: the open-loop rates to offer, tasks per second.
    latency: Vec<u64>,
    /// Latency mode: seconds per rate.
    seconds: u64,
    /// `linger.ms` of every producer (the task producer and the processor's).
    linger: Option<u64>,
    /// Scaling mode: how many `conveyor worker` processes to run in turn.
    scaling: Vec<usize>,
    /// Metrics-cost mode: conveyor with metrics on against metrics off.
    metrics_cost: bool,
    /// Prefetch mode: a worker's RSS over time with a backlog it reads slowly.
    prefetch_rss: bool,
    /// Waiting mode: how many `sleep` tasks to keep waiting in one worker.
    waiting: usize,
    /// Distinct record keys of the preloaded requests (0: each its own id).
    keys: usize,
    /// Where to write the machine-readable results (`--json FILE`).
    json: Option<String>,
    /// `--only raw|conveyor|none`: run one side of the throughput
    /// comparison (or neither: the set-up and preload alone), for counting
    /// instructions per record under callgrind (BENCHMARKS.md).
    only: Option<String>,
}

/// Machine-readable results, written with `--json FILE` for
/// `benches/charts.py`.
static REPORT: Mutex<Vec<serde_json::Value>> = Mutex::new(Vec::new());

fn report(entry: serde_json::Value) {
    if let Ok(mut report) = REPORT.lock() {
        report.push(entry);
    }
}

fn ordering_name() -> &'static str {
    match ORDERING.get().copied().unwrap_or(Ordering::None) {
        Ordering::None => "none",
        Ordering::Key => "key",
        Ordering::Partition => "partition",
    }
}

/// Writes the report with what identifies the run: machine, date, commit.
fn write_report(path: &str, o: &Options, broker: &str) {
    let command = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let document = serde_json::json!({
        "broker": broker,
        "ordering": ordering_name(),
        "keys": o.keys,
        "messages": o.messages,
        "partitions": o.partitions,
        "payload": o.payload,
        "date": command("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": command("git", &["rev-parse", "--short", "HEAD"]),
        "machine": format!("{cpu}, {} cores", std::thread::available_parallelism().map_or(0, |n| n.get())),
        "results": REPORT.lock().map(|r| r.clone()).unwrap_or_default(),
    });
    let text = serde_json::to_string_pretty(&document).expect("report serializes");
    std::fs::write(path, text).expect("write the --json file");
    println!("machine-readable results written to {path}");
}

/// The processor's `ordering` (`--ordering none|key|partition`; none by
/// default). Requests are keyed by their task id, so under `key` every
/// record is a lane of its own.
static ORDERING: std::sync::OnceLock<Ordering> = std::sync::OnceLock::new();

fn options() -> Options {
    let mut o = Options {
        brokers: None,
        messages: 100_000,
        partitions: 8,
        rounds: 3,
        payload: 200,
        latency: Vec::new(),
        seconds: 5,
        linger: None,
        scaling: Vec::new(),
        metrics_cost: false,
        prefetch_rss: false,
        waiting: 0,
        keys: 0,
        json: None,
        only: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--brokers" => o.brokers = Some(value()),
            "--messages" => o.messages = value().parse().unwrap_or(o.messages),
            "--partitions" => o.partitions = value().parse().unwrap_or(o.partitions),
            "--rounds" => o.rounds = value().parse().unwrap_or(o.rounds),
            "--payload" => o.payload = value().parse().unwrap_or(o.payload),
            "--latency" => {
                o.latency = value()
                    .split(',')
                    .filter_map(|v| v.trim().parse().ok())
                    .collect()
            }
            "--seconds" => o.seconds = value().parse().unwrap_or(o.seconds),
            "--scaling" => {
                o.scaling = value()
                    .split(',')
                    .filter_map(|v| v.trim().parse().ok())
                    .collect()
            }
            "--linger" => o.linger = value().parse().ok(),
            "--metrics-cost" => o.metrics_cost = true,
            "--prefetch-rss" => o.prefetch_rss = true,
            "--waiting" => o.waiting = value().parse().unwrap_or(10_000),
            "--keys" => o.keys = value().parse().unwrap_or(o.keys),
            "--json" => o.json = Some(value()),
            "--only" => o.only = Some(value()),
            "--ordering" => {
                let ordering = match value().as_str() {
                    "partition" => Ordering::Partition,
                    "key" => Ordering::Key,
                    _ => Ordering::None,
                };
                let _ = ORDERING.set(ordering);
            }
            _ => {} // cargo bench passes --bench
        }
    }
    o
}

enum Broker {
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
    External(String),
}

impl Broker {
    fn brokers(&self) -> String {
        match self {
            Broker::Mock(c) => c.bootstrap_servers(),
            Broker::External(b) => b.clone(),
        }
    }

    async fn topic(&self, prefix: &str, partitions: i32) -> String {
        let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
        match self {
            Broker::Mock(c) => c.create_topic(&name, partitions, 1).expect("create topic"),
            Broker::External(b) => {
                let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", b)
                    .create()
                    .expect("admin");
                let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
                for r in admin
                    .create_topics([&topic], &AdminOptions::new())
                    .await
                    .expect("create topics")
                {
                    r.expect("topic created");
                }
            }
        }
        name
    }
}

#[allow(unsafe_code)] // getrusage through libc
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid start.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

#[allow(unsafe_code)] // getrusage through libc
fn peak_rss_mib() -> f64 {
    // SAFETY: as above.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

async fn preload(kafka: &KafkaSettings, topic: &str, n: usize, payload: usize, keys: usize) {
    let body = vec![b'x'; payload];
    preload_tasks(kafka, topic, n, keys, || {
        TaskRequest::new("echo", body.clone())
    })
    .await
}

/// Writes `n` requests made by `make` to `topic` and waits until all are
/// acknowledged; `keys` as in [`Options::keys`].
async fn preload_tasks(
    kafka: &KafkaSettings,
    topic: &str,
    n: usize,
    keys: usize,
    make: impl Fn() -> TaskRequest,
) {
    let producer: FutureProducer = kafka::producer_config(kafka)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let codec = Codec::default();
    let mut pending = Vec::with_capacity(n);
    let mut value = Vec::new();
    for i in 0..n {
        let request = make();
        value.clear();
        codec.encode_request(&request, &mut value);
        let key = match keys {
            0 => request.id.as_bytes().to_vec(),
            keys => format!("key-{}", i % keys).into_bytes(),
        };
        loop {
            let record = FutureRecord::to(topic).key(&key).payload(&value);
            match producer.send_result(record) {
                Ok(d) => {
                    pending.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err((e, _)) => panic!("preload: {e}"),
            }
        }
    }
    for d in pending {
        d.await.expect("delivery").expect("acknowledged");
    }
}

/// Measured span of one run.
struct Run {
    rate: f64,
    cpu_per_100k: f64,
}

fn run_from(first: Instant, last: Instant, n: usize, cpu: f64) -> Run {
    let seconds = (last - first).as_secs_f64().max(1e-9);
    Run {
        rate: (n.saturating_sub(1)) as f64 / seconds,
        cpu_per_100k: cpu / n as f64 * 100_000.0,
    }
}

struct RawContext {
    trackers: Mutex<HashMap<i32, OffsetTracker>>,
    /// Watermarks advanced by deliveries, stored by the poll loop in one
    /// call per batch (storing per delivery cost a list and a lock each).
    to_store: Mutex<HashMap<i32, i64>>,
    delivered: AtomicU64,
    first: OnceLock<Instant>,
    /// Set once the consumer owns partitions.
    ready: Arc<AtomicBool>,
}

impl ClientContext for RawContext {}

impl ProducerContext for RawContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        if result.is_err() {
            panic!(
                "baseline produce failed: {:?}",
                result.as_ref().err().map(|e| &e.0)
            );
        }
        self.first.get_or_init(Instant::now);
        let partition = (opaque >> 48) as i32;
        let offset = (opaque & ((1 << 48) - 1)) as i64;
        let watermark = self
            .trackers
            .lock()
            .ok()
            .and_then(|mut t| t.get_mut(&partition).and_then(|t| t.finished(offset)));
        if let (Some(w), Ok(mut to_store)) = (watermark, self.to_store.lock()) {
            to_store.insert(partition, w);
        }
        self.delivered.fetch_add(1, AtomicOrdering::Relaxed);
    }
}

fn baseline(kafka: &KafkaSettings, input: &str, output: &str, n: usize) -> Run {
    baseline_until_ready(kafka, input, output, n, Arc::default())
}

/// The baseline loop; sets `ready` once its consumer owns partitions.
fn baseline_until_ready(
    kafka: &KafkaSettings,
    input: &str,
    output: &str,
    n: usize,
    ready: Arc<AtomicBool>,
) -> Run {
    let context = Arc::new(RawContext {
        trackers: Mutex::new(HashMap::new()),
        to_store: Mutex::new(HashMap::new()),
        delivered: AtomicU64::new(0),
        first: OnceLock::new(),
        ready,
    });
    let producer: ThreadedProducer<ArcContext> = kafka::producer_config(kafka)
        .create_with_context(ArcContext(context.clone()))
        .expect("producer");
    let group = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
    let consumer: Arc<BaseConsumer> = Arc::new(
        kafka::consumer_config(kafka, &group, 10_000)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            // librdkafka's own prefetch limits: conveyor's lower ones are
            // per partition queue, but all of this loop's partitions share
            // the consumer's queue, and the limits would cap them together.
            .set("queued.min.messages", "100000")
            .set("queued.max.messages.kbytes", "65536")
            .create_with_context(DefaultConsumerContext)
            .expect("consumer"),
    );
    consumer.subscribe(&[input]).expect("subscribe");
    let cpu = cpu_seconds();
    let mut since_store = 0usize;
    while context.delivered.load(AtomicOrdering::Relaxed) < n as u64 {
        let polled = consumer.poll(Duration::from_millis(100));
        since_store += 1;
        if polled.is_none() || since_store >= 1_000 {
            since_store = 0;
            let pending = std::mem::take(&mut *context.to_store.lock().expect("to_store"));
            if !pending.is_empty() {
                let mut list = TopicPartitionList::new();
                for (partition, watermark) in pending {
                    let _ = list.add_partition_offset(input, partition, Offset::Offset(watermark));
                }
                let _ = consumer.store_offsets(&list);
            }
        }
        if !context.ready.load(AtomicOrdering::Relaxed)
            && consumer.assignment().is_ok_and(|a| a.count() > 0)
        {
            context.ready.store(true, AtomicOrdering::Relaxed);
        }
        let Some(message) = polled else {
            continue;
        };
        let message = message.expect("consume");
        let (partition, offset) = (message.partition(), message.offset());
        if let Ok(mut t) = context.trackers.lock() {
            let _ = t.entry(partition).or_default().dispatched(offset);
        }
        let opaque = ((partition as usize) << 48) | offset as usize;
        let mut record = BaseRecord::with_opaque_to(output, opaque)
            .payload(message.payload().unwrap_or_default())
            .key(message.key().unwrap_or_default());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("baseline send: {e}"),
            }
        }
    }
    let last = Instant::now();
    let cpu = cpu_seconds() - cpu;
    let first = context.first.get().copied().unwrap_or(last);
    drop(consumer);
    let _ = producer.flush(Duration::from_secs(10));
    run_from(first, last, n, cpu)
}

/// Lets the delivery callback live in an `Arc` shared with the poll loop.
struct ArcContext(Arc<RawContext>);

impl ClientContext for ArcContext {}

impl ProducerContext for ArcContext {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        self.0.delivery(result, opaque);
    }
}

/// A processor running the `echo` handler from `input` to `output`, in a
/// fresh group named after `group_prefix`, with the default bounds.
fn echo_processor(group_prefix: &str, input: &str, output: &str, dlq: &str) -> ProcessorSettings {
    let mut tasks = std::collections::BTreeMap::new();
    tasks.insert("echo".to_owned(), TaskSettings::new(HandlerKind::Echo));
    ProcessorSettings {
        name: "bench".into(),
        group_id: Some(format!("{group_prefix}-{}", uuid::Uuid::new_v4().simple())),
        input_topics: vec![input.to_owned()],
        output_topic: Some(output.to_owned()),
        dead_letter_topic: Some(dlq.to_owned()),
        tasks,
        ordering: ORDERING.get().copied().unwrap_or(Ordering::None),
        retry_topic_threshold_ms: 0,
        ..ProcessorSettings::default()
    }
}

/// Starts conveyor's processor with the `echo` handler on `input`.
fn start_processor(
    kafka: &KafkaSettings,
    input: &str,
    output: &str,
    dlq: &str,
    metrics: Metrics,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), processor::ProcessorError>>,
    Arc<ProcessorStatus>,
) {
    let defaults = echo_processor("bench-conveyor", input, output, dlq);
    let settings = ProcessorSettings {
        max_in_flight: std::env::var("BENCH_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.max_in_flight),
        max_in_flight_per_partition: std::env::var("BENCH_PP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.max_in_flight_per_partition),
        ..defaults
    };
    let registry = Registry::from_settings(&settings).expect("registry");
    let status = Arc::new(ProcessorStatus::default());
    let spec = ProcessorSpec {
        settings,
        kafka: kafka.clone(),
        codec: Codec::default(),
        registry,
        worker: "bench".into(),
        status: status.clone(),
        metrics: Arc::new(metrics),
        lag_interval_ms: 5_000,
        workflows: Default::default(),
        delay_tiers: None,
        rate_limits: Default::default(),
        events: conveyor::settings::EventSettings {
            enabled: false,
            ..Default::default()
        },
        cancels: None,
    };
    let stop = CancellationToken::new();
    let running = tokio::spawn(processor::run(spec, stop.clone()));
    (stop, running, status)
}

async fn conveyor_run(
    kafka: &KafkaSettings,
    input: &str,
    output: &str,
    dlq: &str,
    n: usize,
    metrics: Metrics,
) -> Run {
    let (stop, running, status) = start_processor(kafka, input, output, dlq, metrics);
    while status.finished() == 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let first = Instant::now();
    let cpu = cpu_seconds();
    while status.finished() < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let last = Instant::now();
    let cpu = cpu_seconds() - cpu;
    stop.cancel();
    running.await.expect("processor task").expect("processor");
    run_from(first, last, n, cpu)
}

fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Latency mode: offers `rate` tasks per second for `seconds` (open loop:
/// sends on schedule whether or not results keep up), each carrying its
/// send time in microseconds as the payload; the `echo` processor returns
/// it as the output (or, with `raw`, the baseline loop copies the request
/// to the output topic), and a consumer takes the difference on arrival.
/// Prints p50/p99/p99.9 of submitted → result received.
async fn latency_run(broker: &Broker, kafka: &KafkaSettings, rate: u64, seconds: u64, raw: bool) {
    let input = broker.topic("bench-lat-in", 8).await;
    let output = broker.topic("bench-lat-out", 8).await;
    let dlq = broker.topic("bench-lat-dlq", 1).await;
    let total = (rate * seconds) as usize;
    let ready = Arc::new(AtomicBool::new(false));
    let pipe = if raw {
        let (k, i, o, r) = (kafka.clone(), input.clone(), output.clone(), ready.clone());
        let raw = tokio::task::spawn_blocking(move || baseline_until_ready(&k, &i, &o, total, r));
        Pipe::Raw(raw)
    } else {
        let (stop, running, status) = start_processor(kafka, &input, &output, &dlq, Metrics::new());
        Pipe::Conveyor(stop, running, status)
    };

    // The result consumer, from the start of the output topic.
    let reader_kafka = kafka.clone();
    let reader_topic = output.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<DefaultConsumerContext> = kafka::consumer_config(
            &reader_kafka,
            &format!("bench-lat-{}", uuid::Uuid::new_v4()),
            10_000,
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "1")
        .create()
        .expect("result consumer");
        consumer
            .subscribe(&[reader_topic.as_str()])
            .expect("subscribe");
        let codec = Codec::default();
        let mut latencies = Vec::with_capacity(total);
        let deadline = Instant::now() + Duration::from_secs(seconds + 60);
        while latencies.len() < total && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let arrived = micros_now();
                let bytes = m.payload().unwrap_or_default();
                let echoed = if raw {
                    codec.decode_request(bytes).ok().map(|r| r.payload)
                } else {
                    codec.decode_result(bytes).ok().and_then(|r| r.output)
                };
                let sent = echoed.and_then(|o| {
                    std::str::from_utf8(&o)
                        .ok()
                        .and_then(|t| t.parse::<u64>().ok())
                });
                if let Some(sent) = sent {
                    latencies.push(arrived.saturating_sub(sent));
                }
            }
        }
        latencies
    });
    // Let the pipe and the reader join their groups first.
    while !match &pipe {
        Pipe::Raw(_) => ready.load(AtomicOrdering::Relaxed),
        Pipe::Conveyor(_, _, status) => status.assigned_partitions() > 0,
    } {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let producer: FutureProducer = kafka::producer_config(kafka).create().expect("producer");
    let codec = Codec::default();
    let started = Instant::now();
    let mut sent = 0usize;
    let mut value = Vec::new();
    let mut pending = std::collections::VecDeque::new();
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as usize).min(total);
        while sent < due {
            let mut request = TaskRequest::new("echo", micros_now().to_string().into_bytes());
            request.content_type = "text/plain".into();
            value.clear();
            codec.encode_request(&request, &mut value);
            match producer.send_result(
                FutureRecord::to(&input)
                    .key(request.id.as_bytes())
                    .payload(&value),
            ) {
                Ok(d) => pending.push_back(d),
                Err((e, _)) => panic!("latency producer: {e}"),
            }
            sent += 1;
        }
        while pending.len() > 100_000 {
            if let Some(d) = pending.pop_front() {
                let _ = d.await;
            }
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let offered = sent as f64 / started.elapsed().as_secs_f64();
    let mut latencies = reader.await.expect("reader");
    match pipe {
        Pipe::Raw(raw) => {
            raw.await.expect("baseline loop");
        }
        Pipe::Conveyor(stop, running, _) => {
            stop.cancel();
            running.await.expect("processor task").expect("processor");
        }
    }
    latencies.sort_unstable();
    let q = |p: f64| {
        let at = ((latencies.len().max(1) - 1) as f64 * p).round() as usize;
        latencies.get(at).copied().unwrap_or(0) as f64 / 1000.0
    };
    let what = if raw { "raw pipe" } else { "conveyor" };
    // The distribution for the CDF chart: every 1/1000th quantile.
    let quantiles: Vec<f64> = (0..=1000).map(|p| q(p as f64 / 1000.0)).collect();
    report(serde_json::json!({
        "kind": "latency",
        "pipe": if raw { "raw" } else { "conveyor" },
        "rate": rate,
        "offered": offered,
        "results": latencies.len(),
        "expected": total,
        "latency_ms_by_permille": quantiles,
    }));
    println!(
        "{what:>8} latency at {rate:>6}/s (offered {offered:>8.0}/s): p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  max {:>7.2} ms  ({} of {total} results)",
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0),
        latencies.len()
    );
}

/// What carries tasks to results in a latency run.
enum Pipe {
    /// The baseline loop, on a blocking thread.
    Raw(tokio::task::JoinHandle<Run>),
    /// conveyor's processor: its stop flag, task and status.
    Conveyor(
        CancellationToken,
        tokio::task::JoinHandle<Result<(), processor::ProcessorError>>,
        Arc<ProcessorStatus>,
    ),
}

/// Writes `settings` to a temporary file and starts `workers` real
/// `conveyor worker` processes on it; returns the file (to remove) and them.
/// The topics a worker with the default settings also needs (events,
/// control, worker reports, delay tiers) are created first: by `conveyor
/// topics create` on an external broker, through the mock cluster's own
/// call on it (it has no CreateTopics).
async fn start_workers(
    broker: &Broker,
    settings: &conveyor::settings::Settings,
    workers: usize,
) -> (std::path::PathBuf, Vec<std::process::Child>) {
    let path = std::env::temp_dir().join(format!(
        "conveyor-bench-{}.toml",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, settings.to_toml().expect("settings serialize")).expect("write config");
    match broker {
        Broker::Mock(cluster) => {
            for topic in settings.topology() {
                let partitions = topic.kind.fixed_partitions().unwrap_or(8);
                // The bench's own topics exist already: that refusal is fine.
                let _ = cluster.create_topic(&topic.name, partitions, 1);
            }
        }
        Broker::External(_) => {
            let created = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
                .args(["topics", "create", "--config"])
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("run conveyor topics create");
            assert!(
                created.success(),
                "conveyor topics create failed: {created}"
            );
        }
    }
    let children = (0..workers)
        .map(|_| {
            std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
                .args(["worker", "--config"])
                .arg(&path)
                // Quiet unless asked (BENCH_WORKER_LOG=info is the
                // default level of a worker without RUST_LOG).
                .env(
                    "RUST_LOG",
                    std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start conveyor worker")
        })
        .collect();
    (path, children)
}

/// Scaling mode: `workers` real `conveyor worker` processes in one group
/// work through `n` preloaded tasks on `input`; a consumer counts the
/// results. Rate from the first result to the last.
async fn scaling_run(
    broker: &Broker,
    kafka: &KafkaSettings,
    input: &str,
    output: &str,
    dlq: &str,
    n: usize,
    workers: usize,
) -> f64 {
    let mut settings = conveyor::settings::Settings {
        kafka: kafka.clone(),
        ..Default::default()
    };
    settings.metrics.listen = String::new();
    settings
        .processors
        .push(echo_processor("bench-scale", input, output, dlq));
    settings.fill_derived();
    let (path, mut children) = start_workers(broker, &settings, workers).await;
    let counter_kafka = kafka.clone();
    let topic = output.to_owned();
    let rate = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<DefaultConsumerContext> = kafka::consumer_config(
            &counter_kafka,
            &format!("bench-count-{}", uuid::Uuid::new_v4().simple()),
            10_000,
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("result counter");
        consumer.subscribe(&[topic.as_str()]).expect("subscribe");
        let (mut seen, mut first, mut last) = (0usize, None, Instant::now());
        let deadline = Instant::now() + Duration::from_secs(300);
        while seen < n && Instant::now() < deadline {
            if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
                seen += 1;
                last = Instant::now();
                first.get_or_insert(last);
            }
        }
        let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
        if seen < n || span <= 0.0 {
            0.0
        } else {
            n as f64 / span
        }
    })
    .await
    .expect("counter");
    for child in &mut children {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    for child in &mut children {
        let _ = child.wait();
    }
    let _ = std::fs::remove_file(&path);
    rate
}

/// Prefetch mode: one `conveyor worker` process that owns all of `input`'s
/// partitions and runs one task at a time; its RSS (MiB) sampled every 2 s
/// for `seconds`.
async fn prefetch_rss_run(
    broker: &Broker,
    kafka: &KafkaSettings,
    input: &str,
    output: &str,
    dlq: &str,
    seconds: u64,
) -> Vec<f64> {
    let mut settings = conveyor::settings::Settings {
        kafka: kafka.clone(),
        ..Default::default()
    };
    settings.metrics.listen = String::new();
    let mut processor = echo_processor("bench-prefetch", input, output, dlq);
    processor.max_in_flight = 1;
    processor.max_in_flight_per_partition = 1;
    processor.max_uncommitted_per_partition = 1;
    settings.processors.push(processor);
    settings.fill_derived();
    let (path, mut children) = start_workers(broker, &settings, 1).await;
    let mut child = children.remove(0);
    let mut samples = Vec::new();
    for _ in 0..seconds.div_ceil(2) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        samples.push(rss_mib(child.id()));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    samples
}

/// VmRSS of process `pid`, MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// `conveyor_tasks_in_flight` as the worker's metrics endpoint on `port`
/// reports it (None while it does not answer).
async fn in_flight_on(port: u16) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(conveyor::metrics::TASKS_IN_FLIGHT))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

/// Waiting mode: one `conveyor worker` (release build) with the `sleep`
/// handler and bounds of `n`; its RSS once it is in the group with
/// nothing to do, then once `n` ten-minute `sleep` tasks, written after
/// that, are all in flight. Returns (idle MiB, loaded MiB, in flight).
async fn waiting_run(
    broker: &Broker,
    kafka: &KafkaSettings,
    input: &str,
    output: &str,
    dlq: &str,
    n: usize,
) -> (f64, f64, f64) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mut settings = conveyor::settings::Settings {
        kafka: kafka.clone(),
        ..Default::default()
    };
    settings.metrics.listen = format!("127.0.0.1:{port}");
    // What each default-on feature adds to a waiting task, by turning it
    // off: BENCH_WAITING_WITHOUT=events,cancel.
    let without = std::env::var("BENCH_WAITING_WITHOUT").unwrap_or_default();
    for feature in without.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        match feature {
            "events" => settings.events.enabled = false,
            "cancel" => settings.cancel.enabled = false,
            other => panic!("BENCH_WAITING_WITHOUT: `{other}` is not events or cancel"),
        }
    }
    let mut processor = echo_processor("bench-waiting", input, output, dlq);
    let mut sleep = TaskSettings::new(HandlerKind::Sleep);
    sleep.timeout_ms = 3_600_000;
    processor.tasks.insert("sleep".to_owned(), sleep);
    processor.max_in_flight = n;
    processor.max_in_flight_per_partition = n;
    processor.max_uncommitted_per_partition = n;
    settings.processors.push(processor);
    settings.fill_derived();
    let (path, mut children) = start_workers(broker, &settings, 1).await;
    let mut child = children.remove(0);
    let pid = child.id();
    // In the group, reading its (empty) partitions, then settled.
    let deadline = Instant::now() + Duration::from_secs(60);
    while in_flight_on(port).await.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = rss_mib(pid);
    preload_tasks(kafka, input, n, 0, || {
        TaskRequest::new("sleep", br#"{"ms": 600000}"#.to_vec())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut in_flight = 0.0;
    while Instant::now() < deadline {
        in_flight = in_flight_on(port).await.unwrap_or(0.0);
        if in_flight >= n as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded = rss_mib(pid);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&path);
    (idle, loaded, in_flight)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let o = options();
    let _telemetry = std::env::var("BENCH_LOG").ok().map(|level| {
        conveyor::telemetry::init(
            conveyor::settings::LogFormat::Text,
            &level,
            &conveyor::settings::OtlpSettings::default(),
        )
        .expect("BENCH_LOG: a log level")
    });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let broker = match &o.brokers {
            Some(b) => Broker::External(b.clone()),
            None => Broker::Mock(MockCluster::new(1).expect("mock cluster")),
        };
        let mut kafka = KafkaSettings {
            brokers: broker.brokers(),
            ..KafkaSettings::default()
        };
        if let Ok(extra) = std::env::var("BENCH_OPTS") {
            for pair in extra.split(',').filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once('=') {
                    kafka.options.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        let where_ = match &o.brokers {
            Some(b) => format!("external broker {b}"),
            None => "in-process mock cluster (keeps at most 5 MiB per partition: size runs to fit)".into(),
        };
        println!(
            "pipeline: {} messages, {}-byte payloads, {} partitions, {} rounds, on the {where_}",
            o.messages, o.payload, o.partitions, o.rounds
        );
        if let Some(linger) = o.linger {
            kafka.options.insert("linger.ms".into(), linger.to_string());
        }
        if !o.scaling.is_empty() {
            let input = broker.topic("bench-scale-in", o.partitions).await;
            let dlq = broker.topic("bench-scale-dlq", 1).await;
            preload(&kafka, &input, o.messages, o.payload, o.keys).await;
            println!(
                "scaling mode: {} preloaded tasks over {} partitions, `conveyor worker` processes in one group",
                o.messages, o.partitions
            );
            for &workers in &o.scaling {
                let output = broker.topic("bench-scale-out", o.partitions).await;
                let rate = scaling_run(&broker, &kafka, &input, &output, &dlq, o.messages, workers).await;
                println!("{workers} worker process(es): {rate:>9.0} msg/s");
            }
            return;
        }
        if o.waiting > 0 {
            println!(
                "waiting mode: one `conveyor worker` holding {} ten-minute `sleep` tasks at once, over {} partitions",
                o.waiting, o.partitions
            );
            for round in 1..=o.rounds {
                // Fresh topics: the worker starts with nothing to read.
                let input = broker.topic("bench-waiting-in", o.partitions).await;
                let output = broker.topic("bench-waiting-out", o.partitions).await;
                let dlq = broker.topic("bench-waiting-dlq", 1).await;
                let (idle, loaded, in_flight) =
                    waiting_run(&broker, &kafka, &input, &output, &dlq, o.waiting).await;
                let per_task = (loaded - idle) * 1024.0 * 1024.0 / in_flight.max(1.0);
                println!(
                    "round {round}: RSS idle {idle:.1} MiB, with {in_flight:.0} tasks waiting {loaded:.1} MiB: {per_task:.0} bytes per waiting task"
                );
                report(serde_json::json!({
                    "kind": "waiting",
                    "round": round,
                    "tasks": in_flight,
                    "idle_rss_mib": idle,
                    "loaded_rss_mib": loaded,
                    "bytes_per_task": per_task,
                }));
            }
            if let Some(path) = &o.json {
                write_report(path, &o, &where_);
            }
            return;
        }
        if o.prefetch_rss {
            let input = broker.topic("bench-prefetch-in", o.partitions).await;
            let dlq = broker.topic("bench-prefetch-dlq", 1).await;
            preload(&kafka, &input, o.messages, o.payload, o.keys).await;
            println!(
                "prefetch mode: {} preloaded tasks over {} partitions, one `conveyor worker` owning them all, one task at a time",
                o.messages, o.partitions
            );
            let mut before = kafka.clone();
            for (key, value) in [
                ("queued.min.messages", "2000"),
                ("queued.max.messages.kbytes", "4096"),
                ("max.partition.fetch.bytes", "1048576"),
            ] {
                before.options.insert(key.into(), value.into());
            }
            let variants = [
                (
                    format!("prefetch_bytes {} MiB (default)", kafka.prefetch_bytes >> 20),
                    kafka.clone(),
                ),
                ("per partition 2,000 records / 4 MiB (before)".to_owned(), before),
            ];
            for (label, settings) in variants {
                let output = broker.topic("bench-prefetch-out", o.partitions).await;
                let samples = prefetch_rss_run(&broker, &settings, &input, &output, &dlq, o.seconds).await;
                let shown: Vec<String> = samples.iter().map(|m| format!("{m:.0}")).collect();
                println!(
                    "{label}: worker RSS MiB every 2 s: {}; max {:.0}",
                    shown.join(" "),
                    samples.iter().copied().fold(0.0, f64::max)
                );
            }
            return;
        }
        if !o.latency.is_empty() {
            println!(
                "latency mode: echo processor, 8 partitions, {} s per rate, linger.ms {}",
                o.seconds,
                o.linger.map_or("librdkafka default (5)".to_owned(), |l| l.to_string())
            );
            for &rate in &o.latency {
                latency_run(&broker, &kafka, rate, o.seconds, true).await;
                latency_run(&broker, &kafka, rate, o.seconds, false).await;
            }
            if let Some(path) = &o.json {
                write_report(path, &o, &where_);
            }
            return;
        }
        let input = broker.topic("bench-in", o.partitions).await;
        let dlq = broker.topic("bench-dlq", 1).await;
        preload(&kafka, &input, o.messages, o.payload, o.keys).await;
        if o.metrics_cost {
            println!("metrics-cost mode: conveyor echo with metrics recorded, then with metrics.enabled = false");
            let mut ratios = Vec::new();
            for round in 1..=o.rounds {
                let out = broker.topic("bench-metrics-on-out", o.partitions).await;
                let on = conveyor_run(&kafka, &input, &out, &dlq, o.messages, Metrics::new()).await;
                let out = broker.topic("bench-metrics-off-out", o.partitions).await;
                let off =
                    conveyor_run(&kafka, &input, &out, &dlq, o.messages, Metrics::disabled()).await;
                let ratio = on.rate / off.rate;
                ratios.push(ratio);
                println!(
                    "round {round}: metrics on {:>9.0} msg/s ({:.2} CPU s/100k) | metrics off {:>9.0} msg/s ({:.2} CPU s/100k) | on/off {ratio:.2}",
                    on.rate, on.cpu_per_100k, off.rate, off.cpu_per_100k
                );
            }
            println!(
                "throughput with metrics on / off (median of {} rounds): {:.2}",
                ratios.len(),
                median(ratios)
            );
            return;
        }
        if let Some(side) = &o.only {
            // One side alone, once: what callgrind counts is then the
            // set-up, the preload and that side's pipeline.
            let out = broker.topic("bench-only-out", o.partitions).await;
            ALLOCATIONS.store(0, AtomicOrdering::Relaxed);
            COUNTING.store(true, AtomicOrdering::Relaxed);
            let (rate, cpu) = match side.as_str() {
                "raw" => {
                    let (k, i, m) = (kafka.clone(), input.clone(), o.messages);
                    let raw = tokio::task::spawn_blocking(move || baseline(&k, &i, &out, m))
                        .await
                        .expect("baseline");
                    (raw.rate, raw.cpu_per_100k)
                }
                "conveyor" => {
                    let ours =
                        conveyor_run(&kafka, &input, &out, &dlq, o.messages, Metrics::new()).await;
                    (ours.rate, ours.cpu_per_100k)
                }
                _ => (0.0, 0.0),
            };
            COUNTING.store(false, AtomicOrdering::Relaxed);
            let allocations = ALLOCATIONS.load(AtomicOrdering::Relaxed);
            println!(
                "only {side}: {rate:.0} msg/s ({cpu:.2} CPU s/100k); {:.2} Rust allocations a record \
                 ({allocations} while it ran, its set-up included)",
                allocations as f64 / o.messages.max(1) as f64
            );
            return;
        }
        let mut ratios = Vec::new();
        for round in 1..=o.rounds {
            let out = broker.topic("bench-raw-out", o.partitions).await;
            let (k, i, m) = (kafka.clone(), input.clone(), o.messages);
            let raw = tokio::task::spawn_blocking(move || baseline(&k, &i, &out, m))
                .await
                .expect("baseline");
            let out = broker.topic("bench-conveyor-out", o.partitions).await;
            let ours = conveyor_run(&kafka, &input, &out, &dlq, o.messages, Metrics::new()).await;
            let ratio = ours.rate / raw.rate;
            ratios.push(ratio);
            report(serde_json::json!({
                "kind": "throughput",
                "round": round,
                "raw_msgs_per_s": raw.rate,
                "conveyor_msgs_per_s": ours.rate,
                "raw_cpu_s_per_100k": raw.cpu_per_100k,
                "conveyor_cpu_s_per_100k": ours.cpu_per_100k,
            }));
            println!(
                "round {round}: raw {:>9.0} msg/s ({:.2} CPU s/100k) | conveyor echo {:>9.0} msg/s ({:.2} CPU s/100k) | ratio {ratio:.2}",
                raw.rate, raw.cpu_per_100k, ours.rate, ours.cpu_per_100k
            );
        }
        println!(
            "ratio conveyor/raw (median of {} rounds): {:.2}; peak RSS of the process {:.0} MiB",
            ratios.len(),
            median(ratios),
            peak_rss_mib()
        );
        if let Some(path) = &o.json {
            write_report(path, &o, &where_);
        }
    });
}
