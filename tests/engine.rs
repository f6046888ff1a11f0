//! The processor engine against a real broker: no loss with several
//! members, order per key, bad input, rebalances. Every test runs against
//! the mock cluster and, when `CONVEYOR_TEST_BROKERS` is set, the external
//! broker. Workers run in this process here; `tests/process.rs` kills the
//! real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ids, requests, wait_until, InProcessWorker, TestKafka};
use conveyor::codec::{Codec, TaskRequest, TaskStatus};
use conveyor::handlers::{Handler, HandlerError, Output, Registry, TaskContext};
use conveyor::settings::{HandlerKind, Ordering};
use futures::future::BoxFuture;
use futures::FutureExt;

const LONG: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_loss_with_two_workers_in_one_group() {
    const TASKS: usize = 10_000;
    for kafka in TestKafka::all("no_loss_with_two_workers_in_one_group") {
        let pipeline = kafka.pipeline(8).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        // Retry topics off: the split of partitions between the two members is
        // then a split of the input, so both get work.
        settings.processors[0].retry_topic_threshold_ms = 0;
        let a = InProcessWorker::start(&settings, "worker-a", None);
        let b = InProcessWorker::start(&settings, "worker-b", None);
        wait_until("both workers own partitions", LONG, || {
            a.status.assigned_partitions() > 0
                && b.status.assigned_partitions() > 0
                && a.status.assigned_partitions() + b.status.assigned_partitions() == 8
        })
        .await;

        let sent = requests("echo", r#"{"n":1}"#, TASKS);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;

        assert_eq!(
            results.by_id.len(),
            TASKS,
            "one result per task, no stray ids"
        );
        assert!(results.all().all(|r| r.status == TaskStatus::Succeeded));
        assert!(results
            .all()
            .all(|r| r.output.as_deref() == Some(&br#"{"n":1}"#[..])));
        let per_worker = results
            .all()
            .fold(HashMap::<&str, usize>::new(), |mut m, r| {
                *m.entry(r.worker.as_str()).or_default() += 1;
                m
            });
        assert_eq!(per_worker.len(), 2, "both workers did work: {per_worker:?}");
        // Nothing rebalanced after the tasks were produced.
        assert_eq!(results.duplicates(), 0, "{}", kafka.describe());
        // One at a time, letting the group settle in between: the mock
        // cluster refuses commits while a rebalance is in progress, so a
        // member stopping during the other's departure could not commit its
        // last offsets (duplicates after a restart, never loss).
        a.stop().await;
        wait_until("b owns every partition", LONG, || {
            b.status.assigned_partitions() == 8
        })
        .await;
        b.stop().await;
        // Every input offset was committed on the way out.
        assert_eq!(
            kafka.committed(&pipeline.group, &pipeline.input),
            kafka.end_offsets(&pipeline.input),
            "{}",
            kafka.describe()
        );
    }
}

/// Records, per key, how many tasks run at once and in which order they
/// ran, and the most tasks running at once overall.
#[derive(Default)]
struct Recorder {
    state: Mutex<RecorderState>,
}

#[derive(Default)]
struct RecorderState {
    running_per_key: HashMap<String, usize>,
    worst_per_key: usize,
    running: usize,
    most_running: usize,
    order: HashMap<String, Vec<u64>>,
}

impl Handler for Recorder {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            let key = task.key.clone().unwrap_or_default();
            let seq: u64 = std::str::from_utf8(&task.payload)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| HandlerError::Permanent("payload is not a number".into()))?;
            {
                let mut s = self.state.lock().unwrap();
                let on_key = s.running_per_key.entry(key.clone()).or_default();
                *on_key += 1;
                let on_key = *on_key;
                s.worst_per_key = s.worst_per_key.max(on_key);
                s.running += 1;
                s.most_running = s.most_running.max(s.running);
                s.order.entry(key.clone()).or_default().push(seq);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut s = self.state.lock().unwrap();
            s.running -= 1;
            if let Some(n) = s.running_per_key.get_mut(&key) {
                *n -= 1;
            }
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

/// `per_key` `ordered` requests for each of `keys` keys, interleaved; the
/// payload is the request's place in its key's sequence.
fn keyed_requests(keys: usize, per_key: u64) -> Vec<TaskRequest> {
    let mut sent = Vec::new();
    for seq in 0..per_key {
        for k in 0..keys {
            let mut r = TaskRequest::new("ordered", seq.to_string().into_bytes());
            r.key = Some(format!("key-{k}"));
            sent.push(r);
        }
    }
    sent
}

/// Writes `sent` to a fresh two-partition pipeline and starts a worker
/// running [`Recorder`] as `ordered` with `ordering` and the librdkafka
/// property `option`.
async fn recorded_run(
    kafka: &TestKafka,
    ordering: Ordering,
    option: (&str, &str),
    sent: Vec<TaskRequest>,
) -> (
    common::Pipeline,
    Arc<Recorder>,
    Vec<TaskRequest>,
    InProcessWorker,
) {
    let pipeline = kafka.pipeline(2).await;
    let mut settings =
        kafka.worker_settings(&pipeline, ordering, &[("ordered", HandlerKind::Echo)]);
    settings
        .kafka
        .options
        .insert(option.0.into(), option.1.into());
    let recorder = Arc::new(Recorder::default());
    let mut registry = Registry::new();
    registry.register("ordered", recorder.clone());
    kafka.produce_requests(&pipeline.input, &sent).await;
    let worker = InProcessWorker::start(&settings, "worker", Some(registry));
    (pipeline, recorder, sent, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_ordering_runs_each_key_in_order_and_keys_concurrently() {
    const KEYS: usize = 12;
    const PER_KEY: u64 = 30;
    for kafka in TestKafka::all("key_ordering_runs_each_key_in_order_and_keys_concurrently") {
        // Two partitions: several keys share each one, so only key ordering
        // (not partition ordering) can explain any overlap.
        let pipeline = kafka.pipeline(2).await;
        let settings =
            kafka.worker_settings(&pipeline, Ordering::Key, &[("ordered", HandlerKind::Echo)]);
        let recorder = Arc::new(Recorder::default());
        let mut registry = Registry::new();
        registry.register("ordered", recorder.clone());

        let sent = keyed_requests(KEYS, PER_KEY);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let worker = InProcessWorker::start(&settings, "worker", Some(registry));
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        worker.stop().await;

        assert_eq!(results.by_id.len(), sent.len());
        let s = recorder.state.lock().unwrap();
        assert_eq!(s.worst_per_key, 1, "two tasks of one key ran at once");
        assert!(
            s.most_running > 1,
            "different keys never overlapped (most running at once: {})",
            s.most_running
        );
        assert_eq!(s.order.len(), KEYS);
        for (key, order) in &s.order {
            let expected: Vec<u64> = (0..PER_KEY).collect();
            assert_eq!(order, &expected, "tasks of {key} ran out of submit order");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_fails_alone_and_is_committed() {
    for kafka in TestKafka::all("bad_input_fails_alone_and_is_committed") {
        let pipeline = kafka.pipeline(1).await;
        let settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[("echo", HandlerKind::Echo)],
        );
        let codec = Codec::default();
        let producer = kafka.producer();

        // In one partition, in this order: garbage, a request cut short after
        // its id and type, a request of an unknown type, a good request.
        let truncated = TaskRequest::new("echo", b"{}".to_vec());
        let mut truncated_bytes = Vec::new();
        codec.encode_request(&truncated, &mut truncated_bytes);
        truncated_bytes.truncate(45);
        let unknown = TaskRequest::new("no_such_type", b"{}".to_vec());
        let mut unknown_bytes = Vec::new();
        codec.encode_request(&unknown, &mut unknown_bytes);
        let good = TaskRequest::new("echo", br#"{"ok":true}"#.to_vec());
        let mut good_bytes = Vec::new();
        codec.encode_request(&good, &mut good_bytes);
        for (key, value) in [
            (&b"garbage"[..], &b"\xff\xfe not avro at all"[..]),
            (b"truncated", &truncated_bytes),
            (b"unknown", &unknown_bytes),
            (b"good", &good_bytes),
        ] {
            let delivery = kafka
                .send(&producer, &pipeline.input, key, value, Some(0))
                .await;
            delivery.await.expect("delivered").expect("acknowledged");
        }

        let worker = InProcessWorker::start(&settings, "worker", None);
        let expected: HashSet<_> = [truncated.id, unknown.id, good.id].into();
        let results = kafka
            .collect_results(&pipeline.output, &expected, LONG)
            .await;
        wait_until("all four records finished", LONG, || {
            worker.status.finished() == 4
        })
        .await;
        worker.stop().await;

        assert_eq!(
            results.by_id.len(),
            3,
            "the garbage record has no id to report"
        );
        let kind = |id| {
            let r = &results.by_id[&id][0];
            (r.status, r.error.as_ref().map(|e| e.kind.clone()))
        };
        assert_eq!(
            kind(truncated.id),
            (TaskStatus::Failed, Some("decode".into()))
        );
        assert_eq!(
            kind(unknown.id),
            (TaskStatus::Failed, Some("unknown_type".into()))
        );
        assert_eq!(kind(good.id), (TaskStatus::Succeeded, None));
        assert_eq!(results.by_id[&truncated.id][0].task_type, "echo");
        assert!(results.by_id[&unknown.id][0]
            .error
            .as_ref()
            .is_some_and(|e| e.message.contains("no_such_type")));
        assert_eq!(
            kafka.committed(&pipeline.group, &pipeline.input),
            HashMap::from([(0, 4)]),
            "{}: all four offsets committed",
            kafka.describe()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_joining_and_leaving_mid_run_loses_nothing() {
    join_and_leave("a_member_joining_and_leaving_mid_run_loses_nothing", None).await;
}

/// The same under the eager protocol, where a revoke and the following
/// assign can be served within one poll and librdkafka re-forwards the
/// partitions' queues: nothing may be lost or left unread. (The duplicate
/// bound is checked only when every drain-time commit was accepted: the
/// mock cluster refuses the revoke-time commit during an eager rebalance.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_joining_and_leaving_under_the_eager_protocol_loses_nothing() {
    join_and_leave(
        "a_member_joining_and_leaving_under_the_eager_protocol_loses_nothing",
        Some("range"),
    )
    .await;
}

async fn join_and_leave(test: &str, strategy: Option<&str>) {
    const TASKS: usize = 4_000;
    common::init_logs();
    for kafka in TestKafka::all(test) {
        let pipeline = kafka.pipeline(8).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[("sleep", HandlerKind::Sleep)],
        );
        if let Some(strategy) = strategy {
            settings
                .kafka
                .options
                .insert("partition.assignment.strategy".into(), strategy.into());
        }
        // Retry topics off: every partition b takes over is an input one.
        settings.processors[0].retry_topic_threshold_ms = 0;
        let max_in_flight = settings.processors[0].max_in_flight;
        // 10 ms each, one at a time per partition: about 5 s over 8
        // partitions, long enough to rebalance mid-run.
        let sent = requests("sleep", r#"{"ms":10}"#, TASKS);
        kafka.produce_requests(&pipeline.input, &sent).await;

        let a = InProcessWorker::start(&settings, "worker-a", None);
        wait_until("worker a is working", LONG, || a.status.finished() >= 200).await;
        let b = InProcessWorker::start(&settings, "worker-b", None);
        wait_until("worker b owns partitions", LONG, || {
            b.status.assigned_partitions() > 0
        })
        .await;
        let done_before_b_leaves = a.status.finished() + b.status.finished();
        wait_until("worker b did some work", LONG, || b.status.finished() >= 50).await;
        let (b_metrics, b_status) = (b.metrics.clone(), b.status.clone());
        b.stop().await;
        assert!(
            done_before_b_leaves < TASKS,
            "the run ended before the rebalance; make it longer"
        );
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        // Drain-time commits the broker refused, and assignments lost (a
        // session that expired, e.g. on a starved machine).
        let lost = |m: &conveyor::metrics::Metrics| {
            m.rebalance_events
                .with_label_values(&["test", "lost"])
                .get()
        };
        let lost = lost(&a.metrics) + lost(&b_metrics);
        let refused = a.status.drain_commit_failures() + b_status.drain_commit_failures();
        a.stop().await;

        assert_eq!(
            results.by_id.len(),
            TASKS,
            "{}: every task has a result",
            kafka.describe()
        );
        let duplicates = results.duplicates();
        common::announce(&format!(
            "rebalance on {}: {duplicates} duplicate results of {TASKS} ({refused} drain commits refused, {lost} assignments lost)",
            kafka.describe()
        ));
        // Two rebalances, each drained and committed: at most one in-flight
        // window each, even if a drain deadline were missed. A refused
        // drain commit (some brokers refuse them mid-rebalance) or a lost
        // assignment voids the premise: then only "nothing lost" holds.
        if refused == 0 && lost == 0 {
            assert!(
                duplicates <= 2 * max_in_flight,
                "{duplicates} duplicates exceed two in-flight windows ({max_in_flight} each)"
            );
        }
    }
}

struct Panics;

impl Handler for Panics {
    fn handle<'a>(
        &'a self,
        _task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move { panic!("handler bug") }.boxed()
    }
}

struct Hangs;

impl Handler for Hangs {
    fn handle<'a>(
        &'a self,
        _task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        futures::future::pending().boxed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_or_a_timeout_fails_the_task_not_the_worker() {
    for kafka in TestKafka::all("a_panic_or_a_timeout_fails_the_task_not_the_worker") {
        let pipeline = kafka.pipeline(1).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[
                ("panics", HandlerKind::Echo),
                ("hangs", HandlerKind::Echo),
                ("echo", HandlerKind::Echo),
            ],
        );
        if let Some(hangs) = settings.processors[0].tasks.get_mut("hangs") {
            hangs.timeout_ms = 200;
        }
        let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
        registry.register("panics", Arc::new(Panics));
        registry.register("hangs", Arc::new(Hangs));
        // One partition, partition ordering: the echo task runs only after
        // the other two ended.
        let sent = vec![
            TaskRequest::new("panics", b"{}".to_vec()),
            TaskRequest::new("hangs", b"{}".to_vec()),
            TaskRequest::new("echo", b"{}".to_vec()),
        ];
        kafka.produce_requests(&pipeline.input, &sent).await;
        let worker = InProcessWorker::start(&settings, "worker", Some(registry));
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        worker.stop().await;

        let outcome = |i: usize| {
            let r = &results.by_id[&sent[i].id][0];
            (
                r.status,
                r.error
                    .as_ref()
                    .map(|e| (e.kind.clone(), e.message.clone())),
            )
        };
        assert_eq!(
            outcome(0),
            (
                TaskStatus::Failed,
                Some((
                    "panic".into(),
                    "after 3 attempts: handler panicked: handler bug".into()
                ))
            )
        );
        assert_eq!(
            outcome(1),
            (
                TaskStatus::Failed,
                Some((
                    "timeout".into(),
                    "after 3 attempts: no answer within 200 ms".into()
                ))
            )
        );
        // Both are retryable: each ran all three attempts before failing.
        assert_eq!(results.by_id[&sent[0].id][0].attempts, 3);
        assert_eq!(results.by_id[&sent[1].id][0].attempts, 3);
        assert_eq!(outcome(2), (TaskStatus::Succeeded, None));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_in_flight_bounds_by_count_and_by_bytes_hold() {
    for kafka in TestKafka::all("the_in_flight_bounds_by_count_and_by_bytes_hold") {
        let record_bytes = {
            let mut bytes = Vec::new();
            Codec::default().encode_request(&requests("overlap", "0", 1)[0], &mut bytes);
            bytes.len()
        };
        // (max_in_flight, max_in_flight_bytes, the most that may run at once)
        let cases = [
            (7, 64 << 20, 7),
            (64, 5 * record_bytes, 5),
            (64, 5 * record_bytes - 1, 5),
        ];
        for (count, bytes, most) in cases {
            let pipeline = kafka.pipeline(2).await;
            let mut settings =
                kafka.worker_settings(&pipeline, Ordering::None, &[("overlap", HandlerKind::Echo)]);
            let p = &mut settings.processors[0];
            (p.max_in_flight, p.max_in_flight_per_partition) = (count, count);
            p.max_in_flight_bytes = bytes;
            let recorder = Arc::new(Recorder::default());
            let mut registry = Registry::new();
            registry.register("overlap", recorder.clone());
            let worker = InProcessWorker::start(&settings, "worker", Some(registry));
            // Records produced once the partitions are owned all come
            // through the partitions' own queues, which the bounds govern.
            // Two of the input topic, two of its retry topic.
            wait_until("partitions read through their own queues", LONG, || {
                worker.status.assigned_partitions() == 4 && worker.status.reading_partitions() == 4
            })
            .await;
            // The recorder's tasks are numbers.
            let sent = requests("overlap", "0", 60);
            // A record larger than the byte bound (when that is small) still
            // runs, alone.
            let big = requests("overlap", &"0".repeat(bytes.min(100_000)), 1);
            kafka.produce_requests(&pipeline.input, &sent).await;
            kafka.produce_requests(&pipeline.input, &big).await;
            let mut expected = ids(&sent);
            expected.extend(ids(&big));
            let results = kafka
                .collect_results(&pipeline.output, &expected, LONG)
                .await;
            worker.stop().await;
            assert_eq!(results.by_id.len(), 61, "every task ran");
            assert!(
                results.all().all(|r| r.status == TaskStatus::Succeeded),
                "every task succeeded"
            );
            assert_eq!(
                recorder.state.lock().unwrap().most_running,
                most,
                "max_in_flight {count}, max_in_flight_bytes {bytes} ({record_bytes}-byte records): \
                 most tasks running at once"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_per_key_and_partition_holds_when_outputs_fail_and_are_produced_again() {
    // Lanes start their next record once the previous one's outputs are
    // with the producer, not once acknowledged: a broker outage (mock
    // fault injection) that fails deliveries, which the engine produces
    // again, must not reorder a lane's handlers nor lose a result.
    const KEYS: usize = 4;
    const PER_KEY: u64 = 250;
    for ordering in [Ordering::Key, Ordering::Partition] {
        let kafka = TestKafka::mock();
        common::announce(&format!(
            "order_per_key_and_partition_holds_when_outputs_fail_and_are_produced_again ({ordering:?}): runs against {}",
            kafka.describe()
        ));
        let (pipeline, recorder, sent, worker) = recorded_run(
            &kafka,
            ordering,
            ("message.timeout.ms", "1000"),
            keyed_requests(KEYS, PER_KEY),
        )
        .await;
        wait_until("work started", LONG, || worker.status.finished() >= 40).await;
        let cluster = kafka.mock_cluster().expect("mock cluster");
        cluster.broker_down(1).expect("broker down");
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.broker_up(1).expect("broker up");
        assert!(
            worker.status.finished() < sent.len(),
            "the outage hit mid-run"
        );
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        kafka.wait_committed(&pipeline, sent.len(), LONG).await;
        let retried = worker
            .metrics
            .produce_retries
            .with_label_values(&["test"])
            .get();
        worker.stop().await;
        common::announce(&format!(
            "{ordering:?}: {retried} deliveries produced again, {} duplicate results",
            results.duplicates()
        ));
        assert!(
            retried > 0,
            "some deliveries failed (else this tests nothing)"
        );
        assert_eq!(results.by_id.len(), sent.len(), "every task has a result");
        let s = recorder.state.lock().unwrap();
        assert_eq!(s.worst_per_key, 1, "two tasks of one key ran at once");
        for (key, order) in &s.order {
            // The outage may make the group reassign partitions, which
            // replays from the committed offset (at least once). What must
            // hold: no task ran before every earlier task of its key had
            // run, and every task ran.
            let mut highest: Option<u64> = None;
            for &seq in order {
                assert!(
                    seq <= highest.map_or(0, |h| h + 1),
                    "tasks of {key} ran out of order: {seq} after {highest:?} ({order:?})"
                );
                highest = Some(highest.map_or(seq, |h| h.max(seq)));
            }
            assert_eq!(highest, Some(PER_KEY - 1), "every task of {key} ran");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_producer_queue_holds_intake_and_loses_nothing_in_order() {
    // A producer queue of 4 records: most tasks find it full, wait for
    // room (holding intake) and hand their outputs over later. Every task
    // must still run once, in order per key, and have its result.
    const KEYS: usize = 8;
    const PER_KEY: u64 = 60;
    for kafka in TestKafka::all("a_full_producer_queue_holds_intake_and_loses_nothing_in_order") {
        let (pipeline, recorder, sent, worker) = recorded_run(
            &kafka,
            Ordering::Key,
            ("queue.buffering.max.messages", "4"),
            keyed_requests(KEYS, PER_KEY),
        )
        .await;
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        kafka.wait_committed(&pipeline, sent.len(), LONG).await;
        let waits = worker.status.producer_waits();
        worker.stop().await;
        common::announce(&format!(
            "{} records waited for room in the producer's queue",
            waits
        ));
        assert!(
            waits > 0,
            "the producer's queue was never full: this tests nothing"
        );
        assert_eq!(results.by_id.len(), sent.len(), "every task has a result");
        assert_eq!(
            results.duplicates(),
            0,
            "no task's result was written twice"
        );
        let s = recorder.state.lock().unwrap();
        assert_eq!(s.worst_per_key, 1, "two tasks of one key ran at once");
        for (key, order) in &s.order {
            let expected: Vec<u64> = (0..PER_KEY).collect();
            assert_eq!(
                order, &expected,
                "tasks of {key} ran out of order, or again"
            );
        }
    }
}
