//! The engine's guarantees where they used to rest on timing (#25): a
//! backlog taken over in offset order and within every bound, drains that
//! let go of what only waits or still runs at the deadline, commits whose
//! metadata a broker refuses, a produce error that clears by itself, and
//! one dead-letter contract. Mock cluster, and the external broker when
//! `CONVEYOR_TEST_BROKERS` is set (fault injection: mock cluster only).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{header, ids, requests, wait_until, InProcessWorker, Pipeline, TestKafka};
use conveyor::codec::{Codec, TaskRequest, TaskStatus};
use conveyor::handlers::{Handler, HandlerError, Output, Registry, TaskContext};
use conveyor::processor::headers as h;
use conveyor::processor::ProcessorStatus;
use conveyor::settings::{HandlerKind, Ordering, Settings};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::message::Message;

const LONG: Duration = Duration::from_secs(120);

/// Runs `payload = "<partition>:<seq>"` tasks: records, per partition, the
/// order they started in and the most running at once, and the most the
/// processor had in flight whenever one started.
struct Recorder {
    status: Mutex<Option<Arc<ProcessorStatus>>>,
    running: Mutex<HashMap<i32, usize>>,
    most_per_partition: Mutex<HashMap<i32, usize>>,
    running_total: AtomicUsize,
    most_total: AtomicUsize,
    most_in_flight: AtomicUsize,
    order: Mutex<HashMap<i32, Vec<u64>>>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Recorder {
            status: Mutex::new(None),
            running: Mutex::new(HashMap::new()),
            most_per_partition: Mutex::new(HashMap::new()),
            running_total: AtomicUsize::new(0),
            most_total: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            order: Mutex::new(HashMap::new()),
        })
    }
}

fn parse(payload: &[u8]) -> (i32, u64) {
    let text = std::str::from_utf8(payload).unwrap();
    let (p, seq) = text.split_once(':').unwrap();
    (p.parse().unwrap(), seq.parse().unwrap())
}

impl Handler for Recorder {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            let (partition, seq) = parse(&task.payload);
            if let Some(status) = &*self.status.lock().unwrap() {
                self.most_in_flight
                    .fetch_max(status.in_flight(), AtomicOrdering::Relaxed);
            }
            let now = self.running_total.fetch_add(1, AtomicOrdering::Relaxed) + 1;
            self.most_total.fetch_max(now, AtomicOrdering::Relaxed);
            {
                let mut running = self.running.lock().unwrap();
                let n = running.entry(partition).or_default();
                *n += 1;
                let mut most = self.most_per_partition.lock().unwrap();
                let m = most.entry(partition).or_default();
                *m = (*m).max(*n);
            }
            self.order
                .lock()
                .unwrap()
                .entry(partition)
                .or_default()
                .push(seq);
            tokio::time::sleep(Duration::from_millis(1)).await;
            *self.running.lock().unwrap().entry(partition).or_default() -= 1;
            self.running_total.fetch_sub(1, AtomicOrdering::Relaxed);
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

/// Produces `per_partition` tasks of type `record` to each partition of
/// `pipeline`'s input, payload `"<partition>:<seq>"`, in rounds of 100 per
/// partition waited for in turn: each round is a record batch of its own,
/// so that a fetch can bring part of a partition's backlog (a broker sends
/// whole batches).
async fn preload(kafka: &TestKafka, pipeline: &Pipeline, per_partition: u64) -> Vec<TaskRequest> {
    const ROUND: u64 = 100;
    let codec = Codec::default();
    let producer = kafka.producer();
    let mut sent = Vec::new();
    for first in (0..per_partition).step_by(ROUND as usize) {
        let mut pending = Vec::new();
        for p in 0..pipeline.partitions {
            for seq in first..(first + ROUND).min(per_partition) {
                let mut request = requests("record", "", 1).pop().unwrap();
                request.payload = format!("{p}:{seq}").into_bytes();
                let mut value = Vec::new();
                codec.encode_request(&request, &mut value);
                pending.push(
                    kafka
                        .send(&producer, &pipeline.input, b"k", &value, Some(p))
                        .await,
                );
                sent.push(request);
            }
        }
        for delivery in pending {
            delivery.await.unwrap().unwrap();
        }
    }
    sent
}

fn registry_with(settings: &Settings, task_type: &str, handler: Arc<dyn Handler>) -> Registry {
    let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
    registry.register(task_type, handler);
    registry
}

/// A worker that takes over a backlog far above its bounds reads each
/// partition in offset order (records fetched before a partition's queue
/// was split off come through the main queue first, and must not be
/// overtaken or dropped), never has more in flight than its bounds, and
/// runs every task exactly once.
///
/// Checked by mutation (2026-12-03): with the `main_clear` gate removed
/// from the poll loop, the fourth shape (main queue served a record per
/// pass) reads each partition's queue while the main queue still holds
/// 800 older records, and the test fails with the worker's error "record
/// …/0 offset 0 arrived after offset 163 of its partition without having
/// been read before; stopping rather than skipping it".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_far_above_the_bounds_is_taken_in_offset_order_within_them() {
    const PER_PARTITION: u64 = 1_500;
    for kafka in
        TestKafka::all("a_backlog_far_above_the_bounds_is_taken_in_offset_order_within_them")
    {
        // Tight bounds (records from the main queue wait for room), and
        // bounds the backlog fits in (none waits: only the order in which
        // the queues are read keeps each partition in order), the last
        // with the main queue served a record per pass, so that partition
        // queues are looked at while it still holds their older records.
        for (ordering, bound, per_partition, main_batch) in [
            (Ordering::Partition, 6, 2, None),
            (Ordering::None, 6, 2, None),
            (Ordering::Partition, 10_000, 2_500, None),
            (Ordering::Partition, 10_000, 2_500, Some(1)),
        ] {
            let pipeline = kafka.pipeline(8).await;
            let sent = preload(&kafka, &pipeline, PER_PARTITION).await;
            let mut settings =
                kafka.worker_settings(&pipeline, ordering, &[("record", HandlerKind::Echo)]);
            // A small read-ahead: the main queue holds only the first part
            // of each partition's backlog when its queue is split off, and
            // the rest arrives on the partition's queue.
            settings.kafka.prefetch_bytes = 1024 * 1024;
            // Each fetch brings a partition's next ~190 records, not its
            // whole backlog, and librdkafka fetches again soon after a
            // queue over its limits drains (1 s later by default): a
            // split-off queue refills with a partition's later records
            // while the main queue still holds its older ones.
            for (option, value) in [
                ("max.partition.fetch.bytes", "16384"),
                ("fetch.queue.backoff.ms", "10"),
            ] {
                settings.kafka.options.insert(option.into(), value.into());
            }
            let p = &mut settings.processors[0];
            p.max_in_flight = bound;
            p.max_in_flight_per_partition = per_partition;
            p.retry_topic_threshold_ms = 0;
            let recorder = Recorder::new();
            let mut worker = InProcessWorker::start(
                &settings,
                "worker",
                Some(registry_with(&settings, "record", recorder.clone())),
            );
            *recorder.status.lock().unwrap() = Some(worker.status.clone());
            // Records librdkafka fetches before the partitions' queues are
            // split off come through the main queue: a second's worth.
            worker.status.delay_splits(Duration::from_secs(1));
            if let Some(records) = main_batch {
                worker.status.serve_main_by(records);
            }
            let results = worker
                .alongside(kafka.collect_results(&pipeline.output, &ids(&sent), LONG))
                .await;
            kafka.wait_committed(&pipeline, sent.len(), LONG).await;
            let unsplit = worker.status.unsplit_partitions();
            let from_main = worker.status.from_main_queue();
            worker.stop().await;

            assert_eq!(results.by_id.len(), sent.len(), "every task has a result");
            assert_eq!(results.duplicates(), 0, "{ordering:?}: no task ran twice");
            assert!(results.all().all(|r| r.status == TaskStatus::Succeeded));
            let most_in_flight = recorder.most_in_flight.load(AtomicOrdering::Relaxed);
            let most_running = recorder.most_total.load(AtomicOrdering::Relaxed);
            let most_per_partition = recorder
                .most_per_partition
                .lock()
                .unwrap()
                .values()
                .copied()
                .max()
                .unwrap();
            common::announce(&format!(
                "{}, {ordering:?}, main queue served by {main_batch:?}: at most {most_in_flight} in flight, {most_running} running, \
                 {most_per_partition} running in one partition (bounds {bound} and {per_partition}); {unsplit} unsplit; \
                 {from_main} records came through the main queue",
                kafka.describe()
            ));
            assert!(
                most_in_flight <= bound,
                "{most_in_flight} in flight, bound {bound}"
            );
            assert!(
                most_running <= bound,
                "{most_running} running, bound {bound}"
            );
            assert!(
                most_per_partition <= per_partition,
                "{most_per_partition} running in one partition, bound {per_partition}"
            );
            let order = recorder.order.lock().unwrap();
            for p in 0..pipeline.partitions {
                let seqs = &order[&p];
                assert_eq!(
                    seqs.len() as u64,
                    PER_PARTITION,
                    "partition {p}: each ran once"
                );
                if ordering == Ordering::Partition {
                    assert!(
                        seqs.windows(2).all(|w| w[0] < w[1]),
                        "partition {p} ran out of offset order"
                    );
                }
            }
            assert_eq!(unsplit, 0, "every partition's queue was split off");
            assert!(
                from_main > 100,
                "only {from_main} records came through the main queue: the path is not exercised"
            );
        }
    }
}

/// Fails the first attempt of every task with a retryable error; later
/// attempts succeed. Counts attempts by task.
struct FailOnce {
    attempts: Mutex<HashMap<uuid::Uuid, u32>>,
}

impl Handler for FailOnce {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            let n = {
                let mut attempts = self.attempts.lock().unwrap();
                let n = attempts.entry(task.id).or_default();
                *n += 1;
                *n
            };
            if n == 1 {
                return Err(HandlerError::Retryable("first attempt fails".into()));
            }
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

/// SIGTERM's drain does not wait for a retry that is only waiting to be
/// due: the worker stops at once, everything that finished is committed,
/// the retry's record is not, and after a restart the retry runs when due.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_lets_go_of_a_retry_not_due_and_a_restart_runs_it() {
    const BACKOFF_MS: u64 = 60_000;
    for kafka in TestKafka::all("a_stop_lets_go_of_a_retry_not_due_and_a_restart_runs_it") {
        let pipeline = kafka.pipeline(1).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[("flaky", HandlerKind::Echo)],
        );
        let p = &mut settings.processors[0];
        p.initial_backoff_ms = BACKOFF_MS;
        p.max_backoff_ms = BACKOFF_MS;
        p.backoff_jitter = 0.0;
        p.retry_topic_threshold_ms = 1_000;
        // Far above what the stop below may take.
        p.drain_timeout_ms = 30_000;
        p.session_timeout_ms = 45_000;
        let flaky = Arc::new(FailOnce {
            attempts: Mutex::new(HashMap::new()),
        });
        let sent = requests("flaky", "retry me", 1);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let registry = registry_with(&settings, "flaky", flaky.clone());
        let worker = InProcessWorker::start(&settings, "worker-1", Some(registry.clone()));
        let retry_topic = format!("{}.retry", pipeline.input);
        // The first attempt failed and was parked in the retry topic; the
        // worker has read the parked record back and waits for it.
        kafka.read_records(&retry_topic, 1, LONG).await;
        kafka.wait_committed(&pipeline, 1, LONG).await;
        wait_until("the parked retry was read back", LONG, || {
            worker.status.parked() == 1
        })
        .await;
        let stopping = Instant::now();
        worker.stop().await;
        let took = stopping.elapsed();
        assert!(
            took < Duration::from_millis(10_000),
            "stopping took {took:?}: the drain waited on a retry due in 60 s (drain_timeout_ms 30000)"
        );
        assert_eq!(
            kafka.committed(&pipeline.group, &pipeline.input),
            kafka.end_offsets(&pipeline.input),
            "the input record finished (parked) and was committed"
        );
        let retry_committed = kafka
            .committed(&pipeline.group, &retry_topic)
            .get(&0)
            .copied()
            .unwrap_or(0);
        assert_eq!(retry_committed, 0, "the parked record was not committed");
        assert_eq!(flaky.attempts.lock().unwrap()[&sent[0].id], 1);

        // After a restart, the retry runs when due and succeeds.
        let worker = InProcessWorker::start(&settings, "worker-2", Some(registry));
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        kafka.wait_committed(&pipeline, 1, LONG).await;
        wait_until("the retry's record committed", LONG, || {
            kafka.committed(&pipeline.group, &retry_topic).get(&0) == Some(&1)
        })
        .await;
        worker.stop().await;
        let r = &results.by_id[&sent[0].id];
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, TaskStatus::Succeeded);
        assert_eq!(r[0].attempts, 2);
        assert_eq!(r[0].worker, "worker-2");
        common::announce(&format!(
            "{}: stop with a retry due in 60 s took {took:?}",
            kafka.describe()
        ));
    }
}

/// Never answers the first task it is given (until its future is dropped,
/// which it records); answers every later one at once.
struct Hang {
    first: AtomicBool,
    dropped: Arc<AtomicBool>,
}

struct OnDrop(Arc<AtomicBool>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.store(true, AtomicOrdering::SeqCst);
    }
}

impl Handler for Hang {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            if self.first.swap(false, AtomicOrdering::SeqCst) {
                let _guard = OnDrop(self.dropped.clone());
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

/// A handler still running at the drain deadline is cancelled (its future
/// dropped): the stop ends soon after the deadline, nothing is produced for
/// that task and its offset is not committed, so a restart runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_still_running_at_the_drain_deadline_is_cancelled_and_runs_again() {
    common::init_logs();
    for kafka in
        TestKafka::all("a_handler_still_running_at_the_drain_deadline_is_cancelled_and_runs_again")
    {
        let pipeline = kafka.pipeline(1).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[("hang", HandlerKind::Echo)],
        );
        settings.processors[0].drain_timeout_ms = 1_000;
        let dropped = Arc::new(AtomicBool::new(false));
        let hang = Arc::new(Hang {
            first: AtomicBool::new(true),
            dropped: dropped.clone(),
        });
        let sent = requests("hang", "{}", 3);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let registry = registry_with(&settings, "hang", hang.clone());
        let worker = InProcessWorker::start(&settings, "worker-1", Some(registry.clone()));
        wait_until("the first task runs", LONG, || {
            !hang.first.load(AtomicOrdering::SeqCst) && worker.status.in_flight() >= 1
        })
        .await;
        worker.stop().await;
        assert!(
            dropped.load(AtomicOrdering::SeqCst),
            "the hanging handler's future was dropped at the deadline"
        );
        assert_eq!(
            kafka
                .committed(&pipeline.group, &pipeline.input)
                .get(&0)
                .copied()
                .unwrap_or(0),
            0,
            "the cancelled task's offset was not committed"
        );
        let worker = InProcessWorker::start(&settings, "worker-2", Some(registry));
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        kafka.wait_committed(&pipeline, 3, LONG).await;
        worker.stop().await;
        for task in &sent {
            let r = &results.by_id[&task.id];
            assert_eq!(
                r.len(),
                1,
                "one result: the cancelled attempt produced none"
            );
            assert_eq!(r[0].worker, "worker-2");
        }
    }
}

/// Answers every task but the first at once; the first (offset 0) only
/// once released, so the commits carry finished offsets above it.
struct Held {
    first: AtomicBool,
    release: Arc<tokio::sync::Notify>,
}

impl Handler for Held {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            if self.first.swap(false, AtomicOrdering::SeqCst) {
                self.release.notified().await;
            }
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

/// A broker that refuses the commits' metadata as too large: the committed
/// offset still advances, the metadata shrinks, and the refusals are
/// counted (fault injection: mock cluster only).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_commit_metadata_shrinks_and_the_committed_offset_still_advances() {
    common::init_logs();
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let kafka = TestKafka::mock();
    let cluster = kafka.mock_cluster().unwrap();
    let pipeline = kafka.pipeline(1).await;
    let mut settings =
        kafka.worker_settings(&pipeline, Ordering::None, &[("held", HandlerKind::Echo)]);
    settings.processors[0].max_in_flight_per_partition = 64;
    settings.processors[0].max_uncommitted_per_partition = 10_000;
    let release = Arc::new(tokio::sync::Notify::new());
    let held = Arc::new(Held {
        first: AtomicBool::new(true),
        release: release.clone(),
    });
    // Alternate finished and unfinished offsets would need many ranges;
    // one held head and a run behind it need one: enough to see metadata.
    let sent = requests("held", "{}", 200);
    kafka.produce_requests(&pipeline.input, &sent).await;
    // The broker refuses the first three commits' metadata as too large.
    let too_large = RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE;
    cluster.request_errors(RDKafkaApiKey::OffsetCommit, &[too_large; 3]);
    let worker = InProcessWorker::start(
        &settings,
        "worker",
        Some(registry_with(&settings, "held", held.clone())),
    );
    wait_until("every task but the head finished", LONG, || {
        worker.status.finished() == sent.len() - 1
    })
    .await;
    let metrics = worker.metrics.clone();
    let refused = || {
        metrics
            .commit_metadata_refused
            .with_label_values(&["test"])
            .get()
    };
    wait_until("a commit with metadata taken", LONG, || {
        kafka
            .committed_with_metadata(&pipeline.group, &pipeline.input)
            .get(&0)
            .is_some_and(|(offset, metadata)| *offset == 0 && metadata.starts_with("cv1."))
    })
    .await;
    let (_, metadata) = kafka.committed_with_metadata(&pipeline.group, &pipeline.input)[&0].clone();
    assert_eq!(
        refused(),
        3,
        "each refusal halved the budget once: 4000 -> 500"
    );
    assert!(
        metadata.len() <= 500,
        "{} characters of metadata",
        metadata.len()
    );
    release.notify_one();
    kafka.wait_committed(&pipeline, sent.len(), LONG).await;
    worker.stop().await;
    common::announce(&format!(
        "metadata refused {} times; committed {:?}",
        refused(),
        kafka.committed(&pipeline.group, &pipeline.input)
    ));
}

/// With `kafka.commit_metadata_bytes = 0` no metadata is written at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_metadata_can_be_turned_off() {
    for kafka in TestKafka::all("commit_metadata_can_be_turned_off") {
        let pipeline = kafka.pipeline(1).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("held", HandlerKind::Echo)]);
        settings.kafka.commit_metadata_bytes = 0;
        let release = Arc::new(tokio::sync::Notify::new());
        let held = Arc::new(Held {
            first: AtomicBool::new(true),
            release: release.clone(),
        });
        let sent = requests("held", "{}", 20);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let worker = InProcessWorker::start(
            &settings,
            "worker",
            Some(registry_with(&settings, "held", held.clone())),
        );
        wait_until("every task but the head finished", LONG, || {
            worker.status.finished() == sent.len() - 1
        })
        .await;
        wait_until("a commit of the stuck head", LONG, || {
            kafka.committed(&pipeline.group, &pipeline.input).get(&0) == Some(&0)
        })
        .await;
        let metadata = kafka.committed_with_metadata(&pipeline.group, &pipeline.input);
        assert_eq!(metadata[&0].1, "", "no progress metadata");
        release.notify_one();
        kafka.wait_committed(&pipeline, sent.len(), LONG).await;
        worker.stop().await;
    }
}

/// A produce error `UNKNOWN_TOPIC_OR_PARTITION` that clears by itself
/// (metadata lagging a leader move) does not stop the worker, and nothing
/// is lost (fault injection: mock cluster only).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_topic_error_on_produce_that_clears_loses_nothing() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let kafka = TestKafka::mock();
    let cluster = kafka.mock_cluster().unwrap();
    let pipeline = kafka.pipeline(2).await;
    let settings = kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
    let worker = InProcessWorker::start(&settings, "worker", None);
    wait_until(
        "the worker owns its partitions (input and retry topic)",
        LONG,
        || worker.status.assigned_partitions() == 4,
    )
    .await;
    let unknown = RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
    cluster.request_errors(RDKafkaApiKey::Produce, &[unknown; 20]);
    let sent = requests("echo", "{}", 200);
    kafka.produce_requests(&pipeline.input, &sent).await;
    let results = kafka
        .collect_results(&pipeline.output, &ids(&sent), LONG)
        .await;
    kafka.wait_committed(&pipeline, sent.len(), LONG).await;
    assert!(!worker.status.failed(), "the worker kept running");
    worker.stop().await;
    assert_eq!(results.by_id.len(), sent.len());
    assert!(results.all().all(|r| r.status == TaskStatus::Succeeded));
}

/// A retry too large for the retry topic becomes a dead letter with the
/// same headers as every other: the task's origin, attempts, trace context.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_too_large_to_park_is_dead_lettered_with_its_origin() {
    for kafka in TestKafka::all("a_retry_too_large_to_park_is_dead_lettered_with_its_origin") {
        let pipeline = kafka.pipeline(1).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("flaky", HandlerKind::Echo)]);
        settings
            .kafka
            .options
            .insert("message.max.bytes".into(), "2000".into());
        let p = &mut settings.processors[0];
        p.initial_backoff_ms = 5_000;
        p.max_backoff_ms = 5_000;
        p.retry_topic_threshold_ms = 1_000;
        let flaky = Arc::new(FailOnce {
            attempts: Mutex::new(HashMap::new()),
        });
        let mut big = requests("flaky", &"x".repeat(3_000), 1);
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        big[0].id = uuid::Uuid::new_v4();
        let codec = Codec::default();
        let mut value = Vec::new();
        codec.encode_request(&big[0], &mut value);
        let producer = kafka.producer();
        let delivery = {
            use rdkafka::message::{Header, OwnedHeaders};
            use rdkafka::producer::FutureRecord;
            let record = FutureRecord::to(&pipeline.input)
                .key("k")
                .payload(&value)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "traceparent",
                    value: Some(traceparent),
                }));
            producer.send_result(record).map_err(|(e, _)| e).unwrap()
        };
        let at = delivery.await.unwrap().unwrap().offset;
        let worker = InProcessWorker::start(
            &settings,
            "worker",
            Some(registry_with(&settings, "flaky", flaky.clone())),
        );
        let results = kafka
            .collect_results(&pipeline.output, &ids(&big), LONG)
            .await;
        let letters = kafka.read_records(&pipeline.dead_letter, 1, LONG).await;
        kafka.wait_committed(&pipeline, 1, LONG).await;
        worker.stop().await;
        let result = &results.by_id[&big[0].id][0];
        assert_eq!(result.status, TaskStatus::Failed);
        assert_eq!(result.error.as_ref().unwrap().kind, "output_too_large");
        assert_eq!(letters.len(), 1);
        let letter = &letters[0];
        let get = |name| header(letter, name).unwrap_or_else(|| panic!("header {name} missing"));
        assert_eq!(get(h::ERROR_KIND), "output_too_large");
        assert_eq!(get(h::ORIGINAL_TOPIC), pipeline.input);
        assert_eq!(get(h::ORIGINAL_PARTITION), "0");
        assert_eq!(get(h::ORIGINAL_OFFSET), at.to_string());
        assert_eq!(get(h::ATTEMPTS), "1", "one attempt ran before the park");
        assert_eq!(get(h::TRACEPARENT), traceparent);
        assert_eq!(get(h::PROCESSOR), "test");
        assert_eq!(get(h::WORKER), "worker");
        assert!(letter.payload().is_some());
    }
}
