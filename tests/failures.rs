//! Failure handling against a real broker: retries with growing backoff,
//! permanent errors and dead letters, garbage mixed with good tasks, the
//! retry topic, the poison-pill breaker, and (mock cluster only) injected
//! broker faults. Workers run in this process with test handlers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{header, ids, requests, wait_until, InProcessWorker, Pipeline, TestKafka};
use conveyor::codec::{now_millis, Codec, TaskRequest, TaskStatus};
use conveyor::handlers::{Handler, HandlerError, Output, Registry, TaskContext};
use conveyor::processor::headers as h;
use conveyor::settings::{HandlerKind, Ordering, Settings};
use futures::future::BoxFuture;
use futures::FutureExt;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(120);

/// Fails the first `failures` attempts of every task, then echoes; payload
/// `"permanent"` fails every attempt with a permanent error. Records when
/// each attempt started (ms since the epoch).
struct Flaky {
    failures: i32,
    attempts: Mutex<HashMap<Uuid, Vec<i64>>>,
}

impl Flaky {
    fn new(failures: i32) -> Arc<Self> {
        Arc::new(Flaky {
            failures,
            attempts: Mutex::new(HashMap::new()),
        })
    }

    fn attempts_of(&self, id: Uuid) -> Vec<i64> {
        self.attempts
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }
}

impl Handler for Flaky {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            let n = {
                let mut attempts = self.attempts.lock().unwrap();
                let list = attempts.entry(task.id).or_default();
                list.push(now_millis());
                list.len() as i32
            };
            if task.payload == b"permanent" {
                return Err(HandlerError::Permanent("this task can never work".into()));
            }
            if n <= self.failures {
                return Err(HandlerError::Retryable(format!("flaky: attempt {n} fails")));
            }
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

fn settings_with(kafka: &TestKafka, pipeline: &Pipeline, ordering: Ordering) -> Settings {
    kafka.worker_settings(
        pipeline,
        ordering,
        &[("flaky", HandlerKind::Echo), ("echo", HandlerKind::Echo)],
    )
}

fn registry(settings: &Settings, flaky: Arc<Flaky>) -> Registry {
    let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
    registry.register("flaky", flaky);
    registry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_twice_then_succeeding_gives_one_result_after_growing_backoffs() {
    for kafka in
        TestKafka::all("failing_twice_then_succeeding_gives_one_result_after_growing_backoffs")
    {
        let pipeline = kafka.pipeline(1).await;
        let mut settings = settings_with(&kafka, &pipeline, Ordering::Partition);
        let p = &mut settings.processors[0];
        p.max_attempts = 5;
        p.initial_backoff_ms = 200;
        p.max_backoff_ms = 5_000;
        p.backoff_jitter = 0.2;
        let flaky = Flaky::new(2);
        let sent = requests("flaky", "hello", 1);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let worker = InProcessWorker::start(
            &settings,
            "worker",
            Some(registry(&settings, flaky.clone())),
        );
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        worker.stop().await;

        let all = &results.by_id[&sent[0].id];
        assert_eq!(all.len(), 1, "exactly one result");
        assert_eq!(all[0].status, TaskStatus::Succeeded);
        assert_eq!(all[0].attempts, 3);
        let starts = flaky.attempts_of(sent[0].id);
        assert_eq!(starts.len(), 3);
        let (first_gap, second_gap) = (starts[1] - starts[0], starts[2] - starts[1]);
        // 200 ms then 400 ms, each ±20%: generous bounds, and growth.
        assert!(
            (150..5_000).contains(&first_gap),
            "first backoff {first_gap} ms"
        );
        assert!(
            (300..5_000).contains(&second_gap),
            "second backoff {second_gap} ms"
        );
        assert!(
            second_gap > first_gap,
            "backoff grew: {first_gap} then {second_gap} ms"
        );
        // Nothing was dead-lettered.
        assert_eq!(
            kafka
                .end_offsets(&pipeline.dead_letter)
                .values()
                .sum::<i64>(),
            0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_error_is_dead_lettered_once_with_its_context() {
    for kafka in TestKafka::all("a_permanent_error_is_dead_lettered_once_with_its_context") {
        let pipeline = kafka.pipeline(1).await;
        let settings = settings_with(&kafka, &pipeline, Ordering::Partition);
        let codec = Codec::default();
        let producer = kafka.producer();
        let mut doomed = TaskRequest::new("flaky", b"permanent".to_vec());
        doomed.key = Some("customer-9".into());
        let after = requests("echo", "{}", 2);
        let mut doomed_bytes = Vec::new();
        codec.encode_request(&doomed, &mut doomed_bytes);
        let delivery = kafka
            .send(
                &producer,
                &pipeline.input,
                b"customer-9",
                &doomed_bytes,
                Some(0),
            )
            .await;
        let doomed_at = delivery.await.unwrap().unwrap();
        kafka.produce_requests(&pipeline.input, &after).await;

        let worker = InProcessWorker::start(
            &settings,
            "worker-p",
            Some(registry(&settings, Flaky::new(0))),
        );
        let mut expected = ids(&after);
        expected.insert(doomed.id);
        let results = kafka
            .collect_results(&pipeline.output, &expected, LONG)
            .await;
        let letters = kafka.read_records(&pipeline.dead_letter, 1, LONG).await;
        worker.stop().await;

        assert_eq!(letters.len(), 1, "exactly one dead letter");
        let letter = &letters[0];
        use rdkafka::message::Message;
        assert_eq!(
            letter.payload(),
            Some(&doomed_bytes[..]),
            "original bytes unchanged"
        );
        assert_eq!(
            letter.key(),
            Some(&b"customer-9"[..]),
            "original key unchanged"
        );
        let get = |name| header(letter, name).unwrap_or_else(|| panic!("header {name} missing"));
        assert_eq!(get(h::ERROR_KIND), "permanent");
        assert_eq!(get(h::ERROR_MESSAGE), "this task can never work");
        assert_eq!(get(h::ATTEMPTS), "1", "permanent errors are not retried");
        assert_eq!(get(h::ORIGINAL_TOPIC), pipeline.input);
        assert_eq!(get(h::ORIGINAL_PARTITION), "0");
        assert_eq!(get(h::ORIGINAL_OFFSET), doomed_at.offset.to_string());
        assert!(get(h::ORIGINAL_TIMESTAMP).parse::<i64>().is_ok());
        assert_eq!(get(h::PROCESSOR), "test");
        assert_eq!(get(h::WORKER), "worker-p");
        let first: i64 = get(h::FIRST_FAILURE_AT).parse().unwrap();
        let last: i64 = get(h::LAST_FAILURE_AT).parse().unwrap();
        assert!(first <= last && first > 0);

        let r = &results.by_id[&doomed.id];
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, TaskStatus::Failed);
        assert_eq!(
            r[0].error.as_ref().map(|e| e.kind.as_str()),
            Some("permanent")
        );
        for task in &after {
            assert_eq!(
                results.by_id[&task.id][0].status,
                TaskStatus::Succeeded,
                "later tasks ran"
            );
        }
        assert_eq!(
            kafka.committed(&pipeline.group, &pipeline.input),
            HashMap::from([(0, 3)])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_mixed_into_good_tasks_is_dead_lettered_and_the_rest_runs() {
    const GOOD: usize = 5_000;
    const GARBAGE: usize = 500;
    for kafka in TestKafka::all("garbage_mixed_into_good_tasks_is_dead_lettered_and_the_rest_runs")
    {
        let pipeline = kafka.pipeline(8).await;
        let settings = settings_with(&kafka, &pipeline, Ordering::None);
        let codec = Codec::default();
        let producer = kafka.producer();
        let good = requests("echo", r#"{"ok":1}"#, GOOD);
        let mut pending = Vec::new();
        let mut value = Vec::new();
        for (i, request) in good.iter().enumerate() {
            value.clear();
            codec.encode_request(request, &mut value);
            pending.push(
                kafka
                    .send(
                        &producer,
                        &pipeline.input,
                        request.id.as_bytes(),
                        &value,
                        None,
                    )
                    .await,
            );
            if i % 10 == 0 {
                let junk = format!("\u{1}not avro {i}");
                pending.push(
                    kafka
                        .send(
                            &producer,
                            &pipeline.input,
                            junk.as_bytes(),
                            junk.as_bytes(),
                            None,
                        )
                        .await,
                );
            }
        }
        for p in pending {
            p.await.unwrap().unwrap();
        }
        let worker = InProcessWorker::start(&settings, "worker", None);
        let results = kafka
            .collect_results(&pipeline.output, &ids(&good), LONG)
            .await;
        let letters = kafka
            .read_records(&pipeline.dead_letter, GARBAGE, LONG)
            .await;
        wait_until("every record finished", LONG, || {
            worker.status.finished() == GOOD + GARBAGE
        })
        .await;
        assert!(
            !worker.status.breaker_open(),
            "10% failures must not trip the breaker"
        );
        worker.stop().await;

        assert_eq!(results.by_id.len(), GOOD);
        assert!(results.all().all(|r| r.status == TaskStatus::Succeeded));
        assert_eq!(letters.len(), GARBAGE, "one dead letter per garbage record");
        assert!(letters
            .iter()
            .all(|l| header(l, h::ERROR_KIND).as_deref() == Some("decode")));
        assert_eq!(
            kafka.committed(&pipeline.group, &pipeline.input),
            kafka.end_offsets(&pipeline.input),
            "everything committed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_backoff_goes_through_the_retry_topic_without_holding_up_fresh_tasks() {
    common::init_logs();
    for kafka in
        TestKafka::all("a_long_backoff_goes_through_the_retry_topic_without_holding_up_fresh_tasks")
    {
        let pipeline = kafka.pipeline(1).await;
        let mut settings = settings_with(&kafka, &pipeline, Ordering::Partition);
        let p = &mut settings.processors[0];
        p.initial_backoff_ms = 3_000;
        p.max_backoff_ms = 3_000;
        p.backoff_jitter = 0.0;
        p.retry_topic_threshold_ms = 1_000;
        let flaky = Flaky::new(1);
        // Same partition, partition ordering: the fresh task is behind the
        // flaky one.
        let mut sent = requests("flaky", "retry me", 1);
        sent.extend(requests("echo", "{}", 1));
        kafka.produce_requests(&pipeline.input, &sent).await;
        let worker = InProcessWorker::start(
            &settings,
            "worker",
            Some(registry(&settings, flaky.clone())),
        );
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        let parked = kafka
            .read_records(&format!("{}.retry", pipeline.input), 1, LONG)
            .await;
        worker.stop().await;

        let retried = &results.by_id[&sent[0].id];
        let fresh = &results.by_id[&sent[1].id];
        assert_eq!(retried.len(), 1);
        assert_eq!(retried[0].status, TaskStatus::Succeeded);
        assert_eq!(
            retried[0].attempts, 2,
            "the attempt number travelled with the task"
        );
        let starts = flaky.attempts_of(sent[0].id);
        assert_eq!(starts.len(), 2);
        assert!(
            starts[1] - starts[0] >= 3_000,
            "the retry waited its backoff"
        );
        assert!(
            fresh[0].finished_at < starts[0] + 3_000,
            "the fresh task finished {} ms after the first failure, not held up by the 3 s backoff",
            fresh[0].finished_at - starts[0]
        );
        assert_eq!(parked.len(), 1, "one record went through the retry topic");
        let due: i64 = header(&parked[0], h::NOT_BEFORE).unwrap().parse().unwrap();
        assert!(due >= starts[0] + 3_000);
        assert_eq!(
            header(&parked[0], h::ORIGINAL_TOPIC).as_deref(),
            Some(pipeline.input.as_str())
        );
        assert!(starts[1] >= due, "it ran when due, not before");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_failing_everything_trips_the_breaker_before_the_topic_drains() {
    const TASKS: usize = 60;
    for kafka in
        TestKafka::all("a_handler_failing_everything_trips_the_breaker_before_the_topic_drains")
    {
        let pipeline = kafka.pipeline(1).await;
        let mut settings = settings_with(&kafka, &pipeline, Ordering::Partition);
        let p = &mut settings.processors[0];
        p.breaker.window = 20;
        p.breaker.failure_ratio = 0.5;
        let threshold = 10;
        let sent = requests("flaky", "permanent", TASKS);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let worker = InProcessWorker::start(
            &settings,
            "worker",
            Some(registry(&settings, Flaky::new(0))),
        );
        wait_until("the breaker opened", LONG, || worker.status.breaker_open()).await;
        wait_until("the failures before it finished", LONG, || {
            worker.status.finished() >= threshold - 1
        })
        .await;
        let letters = kafka
            .read_records(&pipeline.dead_letter, threshold - 1, LONG)
            .await;
        assert!(
            worker.status.breaker_open(),
            "still open during the cool-down"
        );
        worker.stop().await;

        assert_eq!(
            letters.len(),
            threshold - 1,
            "fewer dead letters than the threshold ({threshold}) before it tripped"
        );
        assert_eq!(
            worker_finished_offsets(&kafka, &pipeline),
            threshold as i64 - 1,
            "nothing past the held task committed"
        );
    }
}

fn worker_finished_offsets(kafka: &TestKafka, pipeline: &Pipeline) -> i64 {
    kafka
        .committed(&pipeline.group, &pipeline.input)
        .values()
        .sum()
}

/// Tasks of the fault tests.
const FAULT_TASKS: usize = 2_000;

/// For tests that inject faults (a mock-cluster feature: they have nothing
/// to run against an external broker): `FAULT_TASKS` 1 ms `sleep` tasks
/// over 4 partitions, and a worker (with these librdkafka `options`) that
/// has finished 100 of them.
async fn sleep_tasks_under_way(
    test: &str,
    options: &[(&str, &str)],
) -> (TestKafka, Pipeline, Vec<TaskRequest>, InProcessWorker) {
    let kafka = TestKafka::mock();
    common::announce(&format!("{test}: runs against {}", kafka.describe()));
    let pipeline = kafka.pipeline(4).await;
    let mut settings =
        kafka.worker_settings(&pipeline, Ordering::None, &[("sleep", HandlerKind::Sleep)]);
    for (key, value) in options {
        settings
            .kafka
            .options
            .insert((*key).to_owned(), (*value).to_owned());
    }
    let sent = requests("sleep", r#"{"ms":1}"#, FAULT_TASKS);
    kafka.produce_requests(&pipeline.input, &sent).await;
    let worker = InProcessWorker::start(&settings, "worker", None);
    wait_until("work started", LONG, || worker.status.finished() >= 100).await;
    (kafka, pipeline, sent, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injected_broker_faults_lose_nothing() {
    const TASKS: usize = FAULT_TASKS;
    let (kafka, pipeline, sent, worker) =
        sleep_tasks_under_way("injected_broker_faults_lose_nothing", &[]).await;
    let cluster = kafka.mock_cluster().expect("mock cluster");

    // Produce requests fail with retriable errors for a while, then the
    // only broker goes down for two seconds.
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT],
    );
    let finished_before = worker.status.finished();
    cluster.broker_down(1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(1).expect("broker up");
    assert!(finished_before < TASKS, "the faults hit mid-run");

    let results = kafka
        .collect_results(&pipeline.output, &ids(&sent), LONG)
        .await;
    worker.stop().await;
    assert_eq!(results.by_id.len(), TASKS, "every task has a result");
    let unique: HashSet<Uuid> = results.all().map(|r| r.id).collect();
    assert_eq!(unique, ids(&sent));
    common::announce(&format!(
        "injected faults: {} duplicate results of {TASKS}",
        results.duplicates()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_whose_delivery_fails_are_produced_again_and_nothing_is_lost() {
    const TASKS: usize = FAULT_TASKS;
    // Outputs not acknowledged within a second fail their delivery: with
    // the broker down for three, the engine itself must produce them again.
    let (kafka, pipeline, sent, worker) = sleep_tasks_under_way(
        "results_whose_delivery_fails_are_produced_again_and_nothing_is_lost",
        &[("message.timeout.ms", "1000")],
    )
    .await;
    let cluster = kafka.mock_cluster().expect("mock cluster");
    cluster.broker_down(1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(1).expect("broker up");
    let finished_then = worker.status.finished();
    assert!(finished_then < TASKS, "the outage hit mid-run");

    let results = kafka
        .collect_results(&pipeline.output, &ids(&sent), LONG)
        .await;
    wait_until("every offset committed", LONG, || {
        worker_finished_offsets(&kafka, &pipeline) == TASKS as i64
    })
    .await;
    let failed_deliveries = worker
        .metrics
        .produce_retries
        .with_label_values(&["test"])
        .get();
    worker.stop().await;
    assert!(
        failed_deliveries > 0,
        "some deliveries failed and were produced again (else this test tests nothing)"
    );
    assert_eq!(results.by_id.len(), TASKS, "every task has a result");
    assert!(
        results.all().all(|r| r.status == TaskStatus::Succeeded),
        "every result is the task's own"
    );
    common::announce(&format!(
        "{failed_deliveries} failed deliveries produced again; {} duplicate results of {TASKS}",
        results.duplicates()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_too_large_for_the_producer_becomes_a_failed_result_saying_so() {
    for kafka in
        TestKafka::all("a_result_too_large_for_the_producer_becomes_a_failed_result_saying_so")
    {
        let pipeline = kafka.pipeline(2).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        settings
            .kafka
            .options
            .insert("message.max.bytes".into(), "2000".into());
        let big = "x".repeat(3_000);
        let oversized = requests("echo", &big, 3);
        let fine = requests("echo", "{}", 5);
        kafka.produce_requests(&pipeline.input, &oversized).await;
        kafka.produce_requests(&pipeline.input, &fine).await;
        let worker = InProcessWorker::start(&settings, "worker", None);
        let mut expected = ids(&oversized);
        expected.extend(ids(&fine));
        let results = kafka
            .collect_results(&pipeline.output, &expected, LONG)
            .await;
        wait_until("every offset committed", LONG, || {
            worker_finished_offsets(&kafka, &pipeline) == 8
        })
        .await;
        worker.stop().await;
        for task in &oversized {
            let r = &results.by_id[&task.id][0];
            assert_eq!(r.status, TaskStatus::Failed);
            assert_eq!(r.output, None);
            let error = r.error.as_ref().expect("an error");
            assert_eq!(error.kind, "output_too_large");
            assert!(
                error.message.starts_with("the result (")
                    && error
                        .message
                        .contains("bytes) is larger than the broker accepts"),
                "{}",
                error.message
            );
        }
        for task in &fine {
            let r = &results.by_id[&task.id][0];
            assert_eq!(r.status, TaskStatus::Succeeded);
            assert_eq!(r.output.as_deref(), Some(&b"{}"[..]));
        }
    }
}

/// Fails every task permanently until fixed.
struct Switch {
    fixed: std::sync::atomic::AtomicBool,
}

impl Handler for Switch {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            if !self.fixed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(HandlerError::Permanent("handler bug".into()));
            }
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

fn dlq_command(
    kafka: &TestKafka,
    pipeline: &Pipeline,
    args: &[&str],
) -> (i32, Vec<serde_json::Value>) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("dlq")
        .args(args)
        .args([
            "--brokers",
            kafka.brokers(),
            "--topic",
            &pipeline.dead_letter,
        ])
        .env_remove("CONVEYOR_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run conveyor dlq");
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (output.status.code().unwrap_or(-1), lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_replayed_after_a_fix_succeed_and_a_dry_run_changes_nothing() {
    const TASKS: usize = 5;
    for kafka in
        TestKafka::all("dead_letters_replayed_after_a_fix_succeed_and_a_dry_run_changes_nothing")
    {
        let pipeline = kafka.pipeline(2).await;
        let settings = settings_with(&kafka, &pipeline, Ordering::Partition);
        let switch = Arc::new(Switch {
            fixed: std::sync::atomic::AtomicBool::new(false),
        });
        let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
        registry.register("flaky", switch.clone());
        let sent = requests("flaky", "payload", TASKS);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let worker = InProcessWorker::start(&settings, "worker", Some(registry));
        let first = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        assert!(first.all().all(|r| r.status == TaskStatus::Failed));
        kafka.read_records(&pipeline.dead_letter, TASKS, LONG).await;

        let (code, listed) = dlq_command(&kafka, &pipeline, &["list", "--kind", "permanent"]);
        assert_eq!(code, 0);
        assert_eq!(listed.len(), TASKS);
        assert!(listed
            .iter()
            .all(|l| l["type"] == "flaky" && l["error"] == "handler bug"));
        // A bounded read (the dashboard's): all of them before the
        // deadline, none past it, and it says which.
        let filter = conveyor::dlq::Filter::default();
        let mut letters =
            conveyor::dlq::Letters::open(&settings, &pipeline.dead_letter, &filter).unwrap();
        letters.stop_at(std::time::Instant::now() + LONG);
        let mut read = 0;
        while letters.next_letter().unwrap().is_some() {
            read += 1;
        }
        assert_eq!((read, letters.cut_short()), (TASKS, false));
        let mut late =
            conveyor::dlq::Letters::open(&settings, &pipeline.dead_letter, &filter).unwrap();
        late.stop_at(std::time::Instant::now());
        assert!(late.next_letter().unwrap().is_none());
        assert!(late.cut_short());

        let input_before = kafka.end_offsets(&pipeline.input);
        let (code, planned) = dlq_command(&kafka, &pipeline, &["replay", "--dry-run"]);
        assert_eq!(code, 0);
        assert_eq!(planned.len(), TASKS);
        assert!(planned
            .iter()
            .all(|l| l["status"] == "would replay" && l["to"] == pipeline.input.as_str()));
        assert_eq!(
            kafka.end_offsets(&pipeline.input),
            input_before,
            "a dry run produced nothing"
        );

        switch
            .fixed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (code, replayed) = dlq_command(&kafka, &pipeline, &["replay", "--type", "flaky"]);
        assert_eq!(code, 0);
        assert_eq!(
            replayed
                .iter()
                .filter(|l| l["status"] == "replayed")
                .count(),
            TASKS
        );
        let input_after: i64 = kafka.end_offsets(&pipeline.input).values().sum();
        assert_eq!(
            input_after,
            input_before.values().sum::<i64>() + TASKS as i64
        );

        // Finished means its result was acknowledged: read them all after.
        wait_until("the replayed tasks finished", LONG, || {
            worker.status.finished() == 2 * TASKS
        })
        .await;
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        worker.stop().await;
        for task in &sent {
            let outcomes: Vec<_> = results.by_id[&task.id]
                .iter()
                .map(|r| (r.status, r.attempts))
                .collect();
            assert!(
                outcomes.contains(&(TaskStatus::Succeeded, 1)),
                "task {} after replay: {outcomes:?}",
                task.id
            );
        }
    }
}
