//! The real `conveyor worker` binary as a child process: killed with
//! SIGKILL mid-run (nothing lost, duplicates within the bound), stopped with
//! SIGTERM mid-run (no duplicates at all), and its memory under a large
//! backlog. Against the mock cluster and, when configured, the external
//! broker.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ids, requests, wait_until, Pipeline, TestKafka};
use conveyor::codec::{now_millis, TaskStatus};
use conveyor::settings::{HandlerKind, Ordering, Settings, StepSettings, WorkflowSettings};

const LONG: Duration = Duration::from_secs(180);
/// How many times [`Worker::collect`] restarts a worker whose producer
/// failed for good.
const SUPERVISED_RESTARTS: usize = 2;

struct Worker {
    child: Child,
    log: PathBuf,
    config: PathBuf,
}

impl Worker {
    fn start(config: &Path) -> Worker {
        Worker::start_logging(config, "info")
    }

    /// Starts a worker whose `RUST_LOG` is `filter`.
    fn start_logging(config: &Path, filter: &str) -> Worker {
        let log = config.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(["worker", "--config"])
            .arg(config)
            .env("RUST_LOG", filter)
            .env_remove("CONVEYOR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start conveyor worker");
        Worker {
            child,
            log,
            config: config.to_owned(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; panics with its log after `timeout`.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "worker did not exit within {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and asserts the worker exits 0 within 30 s (it drains
    /// and commits first).
    fn stop_cleanly(&mut self) {
        self.signal("TERM");
        let status = self.wait(Duration::from_secs(30));
        assert!(
            status.success(),
            "exit after SIGTERM: {status}; log:\n{}",
            self.log_tail()
        );
    }

    /// Collects the results of `expected` from `topic` like
    /// [`TestKafka::collect_results`], watching the worker meanwhile.
    ///
    /// A worker whose idempotent producer failed for good exits 1 by design
    /// ("restart the worker"): it is restarted here as its supervisor would,
    /// at most [`SUPERVISED_RESTARTS`] times, each announced (nisshi has
    /// answered a connection's produce requests out of order under load,
    /// which librdkafka treats as fatal). Any other exit fails the test at
    /// once with the worker's log, rather than as results missing after
    /// the timeout.
    async fn collect(
        &mut self,
        kafka: &TestKafka,
        topic: &str,
        expected: &std::collections::HashSet<uuid::Uuid>,
        timeout: Duration,
    ) -> common::Results {
        let collecting = kafka.collect_results(topic, expected, timeout);
        tokio::pin!(collecting);
        let mut restarts = 0;
        loop {
            tokio::select! {
                results = &mut collecting => return results,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    let Some(status) = self.child.try_wait().expect("try_wait") else {
                        continue;
                    };
                    let log = self.log_tail();
                    if log.contains("the producer failed for good") && restarts < SUPERVISED_RESTARTS {
                        restarts += 1;
                        common::announce(&format!(
                            "{}: the worker exited ({status}) with its producer failed for good; \
                             restarting it as a supervisor would ({restarts} of {SUPERVISED_RESTARTS})",
                            kafka.describe()
                        ));
                        let config = self.config.clone();
                        *self = Worker::start(&config);
                        continue;
                    }
                    panic!(
                        "{}: the worker exited ({status}) before every result was written; log:\n{log}",
                        kafka.describe()
                    );
                }
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Resident set size in bytes, from /proc.
    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("process status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmRSS line")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sleep_settings(kafka: &TestKafka, pipeline: &Pipeline) -> Settings {
    kafka.worker_settings(pipeline, Ordering::None, &[("sleep", HandlerKind::Sleep)])
}

/// Results written so far (duplicates included): the sum of end offsets.
fn results_written(kafka: &TestKafka, pipeline: &Pipeline) -> i64 {
    kafka.end_offsets(&pipeline.output).values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_duplicates_stay_bounded() {
    const TASKS: usize = 6_000;
    for kafka in TestKafka::all("sigkill_mid_run_loses_nothing_and_duplicates_stay_bounded") {
        let pipeline = kafka.pipeline(4).await;
        let settings = sleep_settings(&kafka, &pipeline);
        let processor = &settings.processors[0];
        let (window, interval) = (processor.max_in_flight, processor.commit_interval_ms);
        let config = common::config_file(&settings);
        let sent = requests("sleep", r#"{"ms":20}"#, TASKS);
        kafka.produce_requests(&pipeline.input, &sent).await;

        let mut first = Worker::start(&config);
        let first_worker_prefix = format!("-{}", first.pid());
        wait_until("the first worker wrote 1,500 results", LONG, || {
            results_written(&kafka, &pipeline) >= 1_500
        })
        .await;
        first.signal("KILL");
        let killed_at = now_millis();
        first.wait(Duration::from_secs(10));
        assert!(
            results_written(&kafka, &pipeline) < TASKS as i64,
            "the run ended before the kill; make it longer"
        );

        let mut second = Worker::start(&config);
        let results = second
            .collect(&kafka, &pipeline.output, &ids(&sent), LONG)
            .await;
        second.stop_cleanly();

        assert_eq!(results.by_id.len(), TASKS, "every task has a result");
        assert!(results.all().all(|r| r.status == TaskStatus::Succeeded));
        // What at-least-once allows to be redone: the tasks in flight at the
        // kill, plus those finished since the last commit. The latter are
        // the first worker's results of the last commit interval (plus
        // half a second for storing and committing to happen).
        let recent = results
            .all()
            .filter(|r| r.worker.ends_with(&first_worker_prefix))
            .filter(|r| r.finished_at >= killed_at - interval as i64 - 500)
            .count();
        let bound = window + recent;
        let duplicates = results.duplicates();
        common::announce(&format!(
            "SIGKILL on {}: {duplicates} duplicates of {TASKS} (bound: {window} in flight + {recent} finished in the last commit interval = {bound})",
            kafka.describe()
        ));
        assert!(
            duplicates <= bound,
            "{duplicates} duplicates exceed the bound {bound}"
        );
        let _ = std::fs::remove_file(&config);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_fan_out_then_restart_completes_the_workflow_exactly_once() {
    const CHILDREN: usize = 8_000;
    for kafka in
        TestKafka::all("sigkill_mid_fan_out_then_restart_completes_the_workflow_exactly_once")
    {
        // One partition, one lane: the children run one after the other, so
        // the kill lands mid fan-out. The join has its own topic and
        // processor, so it gathers (and commits) contributions meanwhile:
        // after the restart, those are known only from its changelog.
        let pipeline = kafka.pipeline(1).await;
        let joins_topic = kafka.create_topic("joins", 2).await;
        let changelog = format!("{joins_topic}{}", conveyor::workflow::JOINS_SUFFIX);
        kafka.create_named_topic(&changelog, 2).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[
                ("split", HandlerKind::SplitLines),
                ("count", HandlerKind::WordCount),
            ],
        );
        let mut joiner = settings.processors[0].clone();
        joiner.name = "joiner".into();
        joiner.group_id = Some(format!("{}-joins", pipeline.group));
        joiner.input_topics = vec![joins_topic.clone()];
        joiner.retry_topic_threshold_ms = 0;
        joiner.ordering = Ordering::None;
        joiner.tasks = [(
            "total".to_owned(),
            conveyor::settings::TaskSettings::new(HandlerKind::Sum),
        )]
        .into_iter()
        .collect();
        settings.processors.push(joiner);
        settings.workflows = vec![WorkflowSettings {
            name: "wc".into(),
            steps: vec![
                StepSettings {
                    task: "split".into(),
                    fan_out: true,
                    join: false,
                },
                StepSettings {
                    task: "count".into(),
                    fan_out: false,
                    join: false,
                },
                StepSettings {
                    task: "total".into(),
                    fan_out: false,
                    join: true,
                },
            ],
            timeout_ms: 0,
            max_fan_out: conveyor::settings::DEFAULT_MAX_FAN_OUT,
        }];
        settings.validate().expect("valid settings");
        let config = common::config_file(&settings);
        // Line i has (i mod 5) + 1 words.
        let lines: Vec<String> = (0..CHILDREN)
            .map(|i| vec!["word"; i % 5 + 1].join(" "))
            .collect();
        let expected_words: usize = (0..CHILDREN).map(|i| i % 5 + 1).sum();
        let payload = serde_json::json!({ "text": lines.join("\n") }).to_string();
        let workflows = conveyor::workflow::Workflows::from_settings(&settings);
        let (topic, first_request) = workflows
            .start(
                "wc",
                payload.into_bytes(),
                "application/json".into(),
                Default::default(),
            )
            .expect("workflow defined");
        let run = first_request.workflow.as_ref().expect("workflow ref").id;
        kafka
            .produce_requests(&topic, std::slice::from_ref(&first_request))
            .await;

        let mut first = Worker::start(&config);
        wait_until("the first worker finished 300 children", LONG, || {
            results_written(&kafka, &pipeline) >= 300
        })
        .await;
        // Half a second more: the joiner commits what it gathered so far.
        tokio::time::sleep(Duration::from_millis(
            settings.processors[1].commit_interval_ms + 200,
        ))
        .await;
        first.signal("KILL");
        first.wait(Duration::from_secs(10));
        let at_kill = results_written(&kafka, &pipeline);
        let gathered: i64 = kafka.end_offsets(&changelog).values().sum();
        assert!(gathered > 0, "nothing was gathered before the kill");
        assert!(
            at_kill < CHILDREN as i64,
            "the fan-out ended before the kill ({at_kill} results); make it longer"
        );

        let mut second = Worker::start(&config);
        // The join's result and the run's are written side by side.
        let expected = [run, conveyor::workflow::step_id(run, 2, None)]
            .into_iter()
            .collect();
        let results = second
            .collect(&kafka, &pipeline.output, &expected, LONG)
            .await;
        second.stop_cleanly();

        let describe = kafka.describe();
        let outcome = &results.by_id[&run];
        assert_eq!(outcome.len(), 1, "{describe}: one result for the workflow");
        assert_eq!(
            outcome[0].status,
            TaskStatus::Succeeded,
            "{:?}",
            outcome[0].error
        );
        let total: serde_json::Value =
            serde_json::from_slice(outcome[0].output.as_deref().unwrap_or_default()).unwrap();
        assert_eq!(
            total,
            serde_json::json!(expected_words),
            "{describe}: every child counted once"
        );
        let step_id = conveyor::workflow::step_id;
        for child in 0..CHILDREN as i32 {
            assert!(
                results.by_id.contains_key(&step_id(run, 1, Some(child))),
                "{describe}: child {child} has no result"
            );
        }
        let join = step_id(run, 2, None);
        assert_eq!(
            results.by_id[&join].len(),
            1,
            "{describe}: the join ran once"
        );
        common::announce(&format!(
            "SIGKILL mid fan-out on {describe}: killed after {at_kill} results and {gathered} changelog records; {} child results in all for {CHILDREN} children",
            (0..CHILDREN as i32)
                .map(|c| results.by_id[&step_id(run, 1, Some(c))].len())
                .sum::<usize>()
        ));
        let _ = std::fs::remove_file(&config);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_then_restart_gives_no_duplicates() {
    const TASKS: usize = 4_000;
    for kafka in TestKafka::all("sigterm_mid_run_then_restart_gives_no_duplicates") {
        let pipeline = kafka.pipeline(4).await;
        let settings = sleep_settings(&kafka, &pipeline);
        let config = common::config_file(&settings);
        let sent = requests("sleep", r#"{"ms":20}"#, TASKS);
        kafka.produce_requests(&pipeline.input, &sent).await;

        let mut first = Worker::start(&config);
        wait_until("the first worker wrote 1,000 results", LONG, || {
            results_written(&kafka, &pipeline) >= 1_000
        })
        .await;
        first.stop_cleanly();
        let written = results_written(&kafka, &pipeline);
        assert!(
            written < TASKS as i64,
            "the run ended before the stop; make it longer"
        );

        let mut second = Worker::start(&config);
        let results = second
            .collect(&kafka, &pipeline.output, &ids(&sent), LONG)
            .await;
        second.stop_cleanly();

        assert_eq!(results.by_id.len(), TASKS, "every task has a result");
        assert_eq!(
            results.duplicates(),
            0,
            "{}: a clean stop committed everything it finished",
            kafka.describe()
        );
        let _ = std::fs::remove_file(&config);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_a_large_backlog() {
    const BACKLOG: usize = 200_000;
    const CEILING: u64 = 200 * 1024 * 1024;
    for kafka in TestKafka::all("memory_stays_bounded_under_a_large_backlog") {
        // The mock cluster keeps at most 5 MiB per partition: 16 partitions
        // hold the ~25 MB backlog.
        let pipeline = kafka.pipeline(16).await;
        let settings = sleep_settings(&kafka, &pipeline);
        let config = common::config_file(&settings);
        let backlog = requests("sleep", r#"{"ms":50}"#, BACKLOG);
        kafka.produce_requests(&pipeline.input, &backlog).await;

        let mut worker = Worker::start(&config);
        wait_until("the worker is processing the backlog", LONG, || {
            results_written(&kafka, &pipeline) >= 200
        })
        .await;
        let mut peak = 0;
        for _ in 0..40 {
            peak = peak.max(worker.rss_bytes());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        worker.stop_cleanly();
        common::announce(&format!(
            "memory on {}: peak RSS {:.1} MiB with a backlog of {BACKLOG} (ceiling {} MiB)",
            kafka.describe(),
            peak as f64 / 1048576.0,
            CEILING / 1048576
        ));
        assert!(peak < CEILING, "peak RSS {peak} bytes is over the ceiling");
        let _ = std::fs::remove_file(&config);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_input_topic_stops_the_worker_saying_what_to_fix() {
    for kafka in TestKafka::all("a_missing_input_topic_stops_the_worker_saying_what_to_fix") {
        let mut pipeline = kafka.pipeline(1).await;
        pipeline.input = common::unique("never-created");
        let settings = sleep_settings(&kafka, &pipeline);
        let config = common::config_file(&settings);
        let mut worker = Worker::start(&config);
        let status = worker.wait(Duration::from_secs(60));
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        assert_eq!(status.code(), Some(1), "{}: {log}", kafka.describe());
        assert!(
            log.contains(&format!(
                "these topics do not exist: {0}, {0}.retry; create them",
                pipeline.input
            )),
            "{log}"
        );
        let _ = std::fs::remove_file(&config);
    }
}

/// Receives OTLP/HTTP export requests and keeps their bodies.
async fn start_collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("collector listener");
    let address = listener.local_addr().expect("collector address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/v1/traces"), bodies)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_spans_are_exported_over_otlp_as_children_of_the_request_traceparent() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    // Span export does not depend on the broker: the mock cluster suffices.
    let kafka = TestKafka::mock();
    let pipeline = kafka.pipeline(1).await;
    let (endpoint, bodies) = start_collector().await;
    let mut settings =
        kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
    settings.otlp.endpoint = endpoint;
    settings.otlp.service_name = "conveyor-otlp-test".into();
    let config = common::config_file(&settings);

    let sent = requests("echo", r#"{"n":1}"#, 1);
    let mut value = Vec::new();
    conveyor::codec::Codec::default().encode_request(&sent[0], &mut value);
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: "traceparent",
        value: Some(traceparent.as_str()),
    });
    let producer = kafka.producer();
    let key = sent[0].id.to_string();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&pipeline.input)
                .key(&key)
                .payload(&value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("task request acknowledged");

    let mut worker = Worker::start(&config);
    let results = worker
        .collect(&kafka, &pipeline.output, &ids(&sent), LONG)
        .await;
    assert_eq!(results.by_id.len(), 1);
    // A clean stop sends the spans still buffered.
    worker.stop_cleanly();

    let bodies = bodies.lock().unwrap().clone();
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    // In OTLP's protobuf a span carries its trace id (16 bytes) and its
    // parent's span id (8 bytes) raw, and attributes as strings.
    let task_span = bodies.iter().find(|b| {
        contains(b, &hex(TRACE)) && contains(b, &hex(PARENT)) && contains(b, key.as_bytes())
    });
    assert!(
        task_span.is_some(),
        "no exported span carries trace {TRACE}, parent {PARENT} and task id {key} \
         ({} export requests received); log:\n{}",
        bodies.len(),
        worker.log_tail()
    );
    let body = task_span.unwrap_or(&bodies[0]);
    assert!(
        contains(body, b"conveyor-otlp-test"),
        "service.name missing"
    );
    assert!(contains(body, b"task"), "span name missing");
    let _ = std::fs::remove_file(&config);
}

/// At the default `info` a worker makes no span per task (it cost about as
/// many instructions as the rest of the task's work, see BENCHMARKS.md): a
/// task's log line names the task by its own fields. The span comes back,
/// with the record's place, under `conveyor::task_span=debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_log_lines_carry_the_task_span_only_when_its_target_is_enabled() {
    // What is logged does not depend on the broker.
    let kafka = TestKafka::mock();
    for (filter, with_span) in [("info", false), ("info,conveyor::task_span=debug", true)] {
        let pipeline = kafka.pipeline(1).await;
        let settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        let config = common::config_file(&settings);
        // No handler for this type: the task logs a warning and is
        // dead-lettered.
        let sent = requests("no-such-type", "{}", 1);
        kafka.produce_requests(&pipeline.input, &sent).await;
        let id = sent[0].id.to_string();
        let mut worker = Worker::start_logging(&config, filter);
        let mut line = None;
        wait_until("the task's warning is logged", LONG, || {
            let text = std::fs::read_to_string(&worker.log).unwrap_or_default();
            line = text
                .lines()
                .find(|l| l.contains("no handler for this task type"))
                .map(str::to_owned);
            line.is_some()
        })
        .await;
        worker.stop_cleanly();
        let line = line.unwrap_or_default();
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in a log file: {line:?}"
        );
        assert!(line.contains(&format!("task_id={id}")), "{filter}: {line}");
        let span = format!(
            "task{{processor=test topic={} partition=0 offset=0 task_id={id}",
            pipeline.input
        );
        if with_span {
            assert!(line.contains(&span), "{filter}: no task span in {line}");
        } else {
            assert!(!line.contains("task{"), "{filter}: a task span in {line}");
        }
        let _ = std::fs::remove_file(&config);
        let _ = std::fs::remove_file(config.with_extension("log"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_behind_a_stuck_head_reruns_only_unfinished_work_where_the_broker_keeps_metadata() {
    const BEHIND: usize = 2_000;
    const HEAD_MS: u64 = 15_000;
    for kafka in TestKafka::all(
        "sigkill_behind_a_stuck_head_reruns_only_unfinished_work_where_the_broker_keeps_metadata",
    ) {
        // One partition: a slow task at its head, fast ones behind it.
        let pipeline = kafka.pipeline(1).await;
        let settings = sleep_settings(&kafka, &pipeline);
        let window = settings.processors[0].max_in_flight;
        let config = common::config_file(&settings);
        let head = requests("sleep", &format!(r#"{{"ms":{HEAD_MS}}}"#), 1);
        let behind = requests("sleep", r#"{"ms":1}"#, BEHIND);
        kafka.produce_requests(&pipeline.input, &head).await;
        kafka.produce_requests(&pipeline.input, &behind).await;

        let mut first = Worker::start(&config);
        wait_until("every fast task behind the head has a result", LONG, || {
            results_written(&kafka, &pipeline) >= BEHIND as i64
        })
        .await;
        // Then a commit at the head's offset: on a broker that keeps it,
        // with every finished offset in its metadata.
        // (conveyor always writes metadata: an empty one was dropped.)
        wait_until(
            "a commit at the head since the fast tasks finished",
            LONG,
            || match kafka
                .committed_with_metadata(&pipeline.group, &pipeline.input)
                .remove(&0)
            {
                Some((0, metadata)) if metadata.is_empty() => true,
                Some((0, metadata)) => conveyor::progress::decode(0, &metadata)
                    .is_ok_and(|r| r.iter().map(|(s, e)| e - s).sum::<i64>() == BEHIND as i64),
                _ => false,
            },
        )
        .await;
        let (_, metadata) = kafka
            .committed_with_metadata(&pipeline.group, &pipeline.input)
            .remove(&0)
            .unwrap_or_default();
        first.signal("KILL");
        first.wait(Duration::from_secs(10));
        assert_eq!(
            results_written(&kafka, &pipeline),
            BEHIND as i64,
            "the head had not finished at the kill"
        );

        let mut second = Worker::start(&config);
        let mut all = ids(&head);
        all.extend(ids(&behind));
        // Results are written before their offset is committed, so once the
        // whole partition is committed every re-run's result is in the topic
        // (reading them at the first sight of every id could stop before
        // re-runs that waited behind the head's window were written).
        wait_until("everything committed", LONG, || {
            kafka.committed(&pipeline.group, &pipeline.input).get(&0) == Some(&(BEHIND as i64 + 1))
        })
        .await;
        let results = kafka.collect_results(&pipeline.output, &all, LONG).await;
        second.stop_cleanly();
        let log = std::fs::read_to_string(&second.log).unwrap_or_default();
        let rerun = behind
            .iter()
            .filter(|r| results.by_id.get(&r.id).map_or(0, Vec::len) > 1)
            .count();
        assert_eq!(results.by_id.len(), BEHIND + 1, "nothing lost");
        common::announce(&format!(
            "stuck head + SIGKILL on {}: {rerun} of {BEHIND} finished tasks behind the head ran again \
             (commit metadata {} bytes read back: {})",
            kafka.describe(),
            metadata.len(),
            if metadata.is_empty() { "dropped by the broker, fallback to the watermark" } else { "kept" }
        ));
        if metadata.is_empty() {
            // The broker dropped the metadata: the watermark alone holds,
            // every finished task above it runs again, and the worker says so.
            assert_eq!(
                rerun, BEHIND,
                "the fallback re-runs them, never skips wrongly"
            );
            assert!(
                log.contains("carries no progress metadata"),
                "the fallback is reported; log:\n{}",
                second.log_tail()
            );
        } else {
            assert!(
                rerun <= window,
                "{rerun} re-runs exceed the in-flight window {window}"
            );
            assert!(
                log.contains("skipping records above the committed offset that finished before"),
                "log:\n{}",
                second.log_tail()
            );
        }
        let _ = std::fs::remove_file(&config);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_topic_refusing_authorization_stops_the_worker_with_exit_1_and_no_unsafe_commit()
{
    // Fault injection is a mock-cluster feature.
    let kafka = TestKafka::mock();
    common::announce(&format!(
        "an_output_topic_refusing_authorization_stops_the_worker_with_exit_1_and_no_unsafe_commit: runs against {}",
        kafka.describe()
    ));
    let pipeline = kafka.pipeline(2).await;
    let settings = sleep_settings(&kafka, &pipeline);
    let config = common::config_file(&settings);
    let sent = requests("sleep", r#"{"ms":5}"#, 4_000);
    kafka.produce_requests(&pipeline.input, &sent).await;
    let mut worker = Worker::start(&config);
    wait_until("the worker wrote 200 results", LONG, || {
        results_written(&kafka, &pipeline) >= 200
    })
    .await;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = kafka.mock_cluster().expect("mock cluster");
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 500],
    );
    let refused_at = Instant::now();
    let status = worker.wait(Duration::from_secs(60));
    let took = refused_at.elapsed();
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
    common::announce(&format!(
        "authorization refused: worker exited {status} {:.1} s after the fault",
        took.as_secs_f64()
    ));
    assert_eq!(
        status.code(),
        Some(1),
        "exit status; log:\n{}",
        worker.log_tail()
    );
    assert!(
        log.contains("cannot produce to topic `")
            && log.contains("grant WRITE on the topic to this principal"),
        "the log names the topic and the fix:\n{}",
        worker.log_tail()
    );
    // No offset is committed past a task whose result is not written: every
    // request below each committed offset has its result.
    let committed = kafka.committed(&pipeline.group, &pipeline.input);
    let records = kafka.read_records(&pipeline.input, sent.len(), LONG).await;
    let codec = conveyor::codec::Codec::default();
    let written = results_written(&kafka, &pipeline) as usize;
    let results = kafka.read_records(&pipeline.output, written, LONG).await;
    let with_result: std::collections::HashSet<uuid::Uuid> = results
        .iter()
        .filter_map(|r| {
            use rdkafka::message::Message;
            codec.decode_result(r.payload()?).ok().map(|r| r.id)
        })
        .collect();
    let mut checked = 0;
    for record in &records {
        use rdkafka::message::Message;
        let below = committed
            .get(&record.partition())
            .is_some_and(|&c| record.offset() < c);
        if below {
            let request = codec
                .decode_request(record.payload().unwrap_or_default())
                .expect("request");
            assert!(
                with_result.contains(&request.id),
                "offset {} of partition {} is committed without its result",
                record.offset(),
                record.partition()
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "something was committed before the fault");
    let _ = std::fs::remove_file(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_over_200_000_dead_letters_runs_in_bounded_memory() {
    const LETTERS: usize = 200_000;
    const CEILING_MIB: u64 = 128;
    // Reading does not depend on the broker's behaviour: the mock cluster.
    let kafka = TestKafka::mock();
    common::announce(&format!(
        "dlq_list_over_200_000_dead_letters_runs_in_bounded_memory: runs against {}",
        kafka.describe()
    ));
    // The mock cluster keeps at most 5 MiB per partition: spread them.
    let topic = kafka.create_topic("dlq", 32).await;
    let codec = conveyor::codec::Codec::default();
    let producer = kafka.producer();
    let mut pending = Vec::new();
    for (i, request) in requests("echo", &"p".repeat(200), LETTERS)
        .iter()
        .enumerate()
    {
        let mut value = Vec::new();
        codec.encode_request(request, &mut value);
        let key = request.id.to_string();
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header {
                key: "conveyor.error.kind",
                value: Some("permanent"),
            })
            .insert(rdkafka::message::Header {
                key: "conveyor.error.message",
                value: Some("this task can never work"),
            });
        loop {
            let record = rdkafka::producer::FutureRecord::to(&topic)
                .key(&key)
                .payload(&value)
                .headers(headers.clone());
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err((e, _)) => panic!("producing dead letters: {e}"),
            }
        }
        if i % 10_000 == 9_999 {
            for delivery in pending.drain(..) {
                delivery.await.expect("delivered").expect("acknowledged");
            }
        }
    }
    for delivery in pending.drain(..) {
        delivery.await.expect("delivered").expect("acknowledged");
    }
    let settings = kafka.settings();
    let config = common::config_file(&settings);
    let out = std::env::temp_dir().join(format!("{}.jsonl", common::unique("dlq-list")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["dlq", "list", "--topic", &topic, "--config"])
        .arg(&config)
        .env_remove("CONVEYOR_CONFIG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("output file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start conveyor dlq list");
    // VmHWM is the peak so far; the last reading before exit is the peak.
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let listed = std::fs::read_to_string(&out).expect("output");
    let lines = listed.lines().count();
    common::announce(&format!(
        "dlq list: {lines} dead letters listed, peak RSS {:.1} MiB (ceiling {CEILING_MIB} MiB)",
        peak_kib as f64 / 1024.0
    ));
    assert!(status.success(), "dlq list exited {status}");
    assert_eq!(lines, LETTERS, "one line per dead letter");
    assert!(
        peak_kib / 1024 < CEILING_MIB,
        "peak RSS {peak_kib} KiB over the ceiling"
    );
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&out);
}

/// The rebalance stress test (#25): a backlog of 100,000 keyed tasks over
/// 8 partitions, preloaded before any worker starts, drains while real
/// `conveyor worker` processes join, leave with SIGTERM and die with
/// SIGKILL (twelve membership changes, each a rebalance); every task has a
/// result, compared as an exact set, and the counts are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_through_a_dozen_rebalances_of_real_workers_losing_nothing() {
    const TASKS: usize = 100_000;
    const EVENTS: usize = 12;
    for kafka in
        TestKafka::all("a_backlog_drains_through_a_dozen_rebalances_of_real_workers_losing_nothing")
    {
        let mut pipeline = kafka.pipeline(8).await;
        // 100,000 results and their duplicates in 16 partitions: ~1.3 MB
        // each. librdkafka's mock cluster keeps 5 MiB per partition and
        // drops the oldest records past it (rdkafka_mock.c): in the
        // pipeline's 4 partitions the results sat at that edge, and a run
        // with more duplicates than usual lost its oldest results to the
        // cluster before they were read (seen once in a CI run here).
        pipeline.output = kafka.create_topic("results", 16).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::Key, &[("sleep", HandlerKind::Sleep)]);
        let p = &mut settings.processors[0];
        p.max_in_flight = 64;
        p.max_in_flight_per_partition = 16;
        p.retry_topic_threshold_ms = 0;
        let config = common::config_file(&settings);
        let mut sent = requests("sleep", r#"{"ms":2}"#, TASKS);
        for (i, request) in sent.iter_mut().enumerate() {
            request.key = Some(format!("key-{}", i % 1_000));
        }
        kafka.produce_requests(&pipeline.input, &sent).await;

        let mut workers = vec![Worker::start(&config), Worker::start(&config)];
        let (mut joined, mut stopped, mut killed) = (0, 0, 0);
        // The changes are spread over the drain: change k once k/13 of the
        // tasks have results.
        for event in 0..EVENTS {
            let due = (TASKS * (event + 1) / (EVENTS + 1)) as i64;
            wait_until("the backlog drains on to the next change", LONG, || {
                results_written(&kafka, &pipeline) >= due
            })
            .await;
            // join, join, SIGTERM, SIGKILL: two to four members at a time.
            match event % 4 {
                0 | 1 => {
                    workers.push(Worker::start(&config));
                    joined += 1;
                }
                2 => {
                    let mut worker = workers.remove(0);
                    worker.stop_cleanly();
                    stopped += 1;
                }
                _ => {
                    let mut worker = workers.remove(0);
                    worker.signal("KILL");
                    worker.wait(Duration::from_secs(10));
                    killed += 1;
                }
            }
        }
        let written_during = results_written(&kafka, &pipeline);
        let expected = ids(&sent);
        let results = kafka
            .collect_results(&pipeline.output, &expected, Duration::from_secs(600))
            .await;
        for worker in &mut workers {
            worker.stop_cleanly();
        }
        let stray = results
            .by_id
            .keys()
            .filter(|id| !expected.contains(id))
            .count();
        let failed = results
            .all()
            .filter(|r| r.status != TaskStatus::Succeeded)
            .count();
        common::announce(&format!(
            "rebalance stress on {}: {TASKS} tasks, {} with a result, {} results in all \
             ({} duplicates), {stray} stray, {failed} failed; {joined} joined, {stopped} \
             stopped with SIGTERM, {killed} killed with SIGKILL; {written_during} results \
             written by the last change",
            kafka.describe(),
            results.by_id.len(),
            results.all().count(),
            results.duplicates(),
        ));
        assert_eq!(results.by_id.len(), TASKS, "every task has a result");
        assert_eq!(stray, 0, "no result for a task never sent");
        assert_eq!(failed, 0, "every result is a success");
        let _ = std::fs::remove_file(&config);
    }
}

/// Delayed tasks wait in the tier topics, not in the worker: 100,000
/// delayed an hour leave its memory where it was idle; 20,000 delayed a
/// few seconds survive a SIGKILL while they wait and each runs once when
/// due; none of the hour's runs early. (A kill in the midst of moves
/// repeats the moves not yet committed: duplicates, measured in
/// BENCHMARKS.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_tasks_wait_in_the_tiers_not_in_memory_and_a_sigkill_loses_none() {
    const WAITING: u32 = 100_000;
    const SHORT: u32 = 20_000;
    const GROWTH_CEILING: u64 = 16 * 1024 * 1024;
    for kafka in
        TestKafka::all("delayed_tasks_wait_in_the_tiers_not_in_memory_and_a_sigkill_loses_none")
    {
        let pipeline = kafka.pipeline(4).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        // The mock cluster keeps at most 5 MiB per partition.
        common::with_delay_tiers(&kafka, &mut settings, 8).await;
        let (config, port) = on_own_port(&settings);
        let mut worker = serving(&config, port).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = worker.rss_bytes();

        let submission = |count, run_at| conveyor::tools::Submission {
            task_type: "echo".into(),
            payload: "{}".into(),
            key: None,
            count,
            topic: Some(pipeline.input.clone()),
            run_at: Some(run_at),
        };
        let hour =
            conveyor::tools::submit(&settings, &submission(WAITING, now_millis() + 3_600_000))
                .await
                .expect("submitted");
        // Every 1 h tier partition holding records is paused on its first.
        let deadline = Instant::now() + LONG;
        while common::metric(port, "conveyor_delay_partitions_waiting").await < Some(8.0) {
            assert!(
                Instant::now() < deadline,
                "the mover did not take up the hour's tier; log:\n{}",
                worker.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut waiting = 0;
        for _ in 0..20 {
            waiting = waiting.max(worker.rss_bytes());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The tiers' lag counts them: all but those the mover read and
        // holds (the first of each partition, and the few read before the
        // pause took hold).
        let deadline = Instant::now() + LONG;
        let mut lag = 0.0;
        while lag < f64::from(WAITING - WAITING / 100) {
            assert!(
                Instant::now() < deadline,
                "tier lag {lag}, {WAITING} waiting"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            lag = common::metric_sum(port, "conveyor_delay_tier_lag_messages").await;
        }
        assert!(
            lag <= f64::from(WAITING),
            "tier lag {lag}, {WAITING} waiting"
        );

        // Delayed 12 s, they wait in the 10 s tier: killed while they wait
        // there, before any of them moves on.
        let submitted = Instant::now();
        let due_at = now_millis() + 12_000;
        let short = conveyor::tools::submit(&settings, &submission(SHORT, due_at))
            .await
            .expect("submitted");
        tokio::time::sleep(Duration::from_millis(4_000).saturating_sub(submitted.elapsed())).await;
        let moves_before_kill = common::metric_sum(port, "conveyor_delay_moves_total").await;
        worker.signal("KILL");
        worker.wait(Duration::from_secs(10));
        let mut worker = Worker::start(&config);
        let expected = short.iter().copied().collect();
        let results = worker
            .collect(&kafka, &pipeline.output, &expected, LONG)
            .await;
        worker.stop_cleanly();
        let ran_early = hour
            .iter()
            .filter(|id| results.by_id.contains_key(id))
            .count();
        let earliest = results
            .all()
            .map(|r| r.started_at)
            .min()
            .unwrap_or_default();
        common::announce(&format!(
            "delays on {}: RSS idle {:.1} MiB, with {WAITING} tasks waiting an hour {:.1} MiB; \
             tier lag {lag}; {SHORT} tasks delayed 12 s, SIGKILL 4 s in ({} moves made): {} results, {} duplicates, first started {} ms after due",
            kafka.describe(),
            idle as f64 / 1048576.0,
            waiting as f64 / 1048576.0,
            moves_before_kill as u64,
            results.by_id.len(),
            results.duplicates(),
            earliest - due_at
        ));
        assert_eq!(
            results.by_id.len(),
            SHORT as usize,
            "every short task ran, none of the hour's"
        );
        assert_eq!(moves_before_kill, 0.0, "killed before any task moved");
        assert_eq!(results.duplicates(), 0, "nothing had moved: each ran once");
        assert_eq!(ran_early, 0, "no task delayed an hour ran");
        assert!(
            earliest >= due_at,
            "a task started {} ms before its time",
            due_at - earliest
        );
        assert!(
            waiting.saturating_sub(idle) < GROWTH_CEILING,
            "{WAITING} waiting tasks grew the worker by {} bytes",
            waiting.saturating_sub(idle)
        );
        let _ = std::fs::remove_file(&config);
    }
}

/// An HTTP endpoint for the `http` handler that fails every first attempt
/// (503: retryable) and answers every later one with the payload; a
/// payload of `warm up` succeeds at once.
async fn fail_first_attempts() -> String {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(|headers: HeaderMap, body: axum::body::Bytes| async move {
            let attempt = headers
                .get("conveyor-attempt")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if attempt == "1" && &body[..] != b"warm up" {
                (StatusCode::SERVICE_UNAVAILABLE, Vec::new())
            } else {
                (StatusCode::OK, body.to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test endpoint");
    let url = format!("http://{}/", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Retries with a long backoff wait in the delay tiers, not in a worker's
/// memory, and a SIGKILL while they wait loses none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_backing_off_a_minute_wait_in_the_tiers_and_a_sigkill_loses_none() {
    const TASKS: usize = 20_000;
    const BACKOFF_MS: u64 = 60_000;
    const GROWTH_CEILING: u64 = 16 * 1024 * 1024;
    for kafka in
        TestKafka::all("retries_backing_off_a_minute_wait_in_the_tiers_and_a_sigkill_loses_none")
    {
        let url = fail_first_attempts().await;
        let pipeline = kafka.pipeline(4).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("web", HandlerKind::Echo)]);
        common::with_delay_tiers(&kafka, &mut settings, 4).await;
        let p = &mut settings.processors[0];
        p.initial_backoff_ms = BACKOFF_MS;
        p.max_backoff_ms = BACKOFF_MS;
        p.backoff_jitter = 0.0;
        p.retry_topic_threshold_ms = 1_000;
        p.tasks.insert(
            "web".into(),
            conveyor::settings::TaskSettings {
                url: Some(url),
                ..conveyor::settings::TaskSettings::new(HandlerKind::Http)
            },
        );
        let (config, port) = on_own_port(&settings);
        let mut worker = serving(&config, port).await;
        // As many tasks as below, succeeding at once: the worker's idle
        // size after it, against which the waiting retries are measured,
        // includes what running that many tasks leaves behind.
        let warm = requests("web", "warm up", TASKS);
        kafka.produce_requests(&pipeline.input, &warm).await;
        kafka
            .collect_results(&pipeline.output, &ids(&warm), LONG)
            .await;
        kafka.wait_committed(&pipeline, TASKS, LONG).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = worker.rss_bytes();

        let sent = requests("web", "retry me", TASKS);
        let first_attempts_from = now_millis();
        kafka.produce_requests(&pipeline.input, &sent).await;
        // Every first attempt failed and was handed on: the input is
        // committed to its end, with no result yet.
        kafka.wait_committed(&pipeline, 2 * TASKS, LONG).await;
        let deadline = Instant::now() + LONG;
        let mut waiting_in_tiers = 0.0;
        while waiting_in_tiers < (TASKS - TASKS / 100) as f64 {
            assert!(
                Instant::now() < deadline,
                "{waiting_in_tiers} of {TASKS} retries waiting in the tiers; log:\n{}",
                worker.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            waiting_in_tiers = common::metric_sum(port, "conveyor_delay_tier_lag_messages").await;
        }
        let mut waiting = 0;
        for _ in 0..20 {
            waiting = waiting.max(worker.rss_bytes());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // None went straight to the retry topic (whose records wait in
        // the worker's memory).
        let in_retry_topic: i64 = kafka
            .end_offsets(&format!("{}.retry", pipeline.input))
            .values()
            .sum();
        let moves_before_kill = common::metric_sum(port, "conveyor_delay_moves_total").await;
        let killed_after = now_millis() - first_attempts_from;
        worker.signal("KILL");
        worker.wait(Duration::from_secs(10));

        let mut worker = Worker::start(&config);
        let results = worker
            .collect(&kafka, &pipeline.output, &ids(&sent), LONG + LONG)
            .await;
        worker.stop_cleanly();
        let retried: Vec<_> = results
            .all()
            .filter(|r| r.output.as_deref() != Some(&b"warm up"[..]))
            .collect();
        let earliest = retried
            .iter()
            .map(|r| r.started_at)
            .min()
            .unwrap_or_default();
        common::announce(&format!(
            "retries through the tiers on {}: RSS idle {:.1} MiB, with {TASKS} retries waiting {} s {:.1} MiB \
             ({waiting_in_tiers} in the tiers, {in_retry_topic} in the retry topic); SIGKILL {killed_after} ms after the first attempts began, while they waited \
             ({moves_before_kill} moves made): {} results, {} duplicates, the first retry started {} ms after the first attempts began",
            kafka.describe(),
            idle as f64 / 1048576.0,
            BACKOFF_MS / 1000,
            waiting as f64 / 1048576.0,
            results.by_id.len(),
            results.duplicates(),
            earliest - first_attempts_from
        ));
        assert_eq!(results.by_id.len(), 2 * TASKS, "every task ran");
        // Killed while they wait (normally before any is due: no move, no
        // duplicate). On a slow machine the first attempts can take long
        // enough for the earliest retries to come due before the kill:
        // then only a move repeated after the kill can make a duplicate.
        assert!(
            results.duplicates() as f64 <= moves_before_kill,
            "{} duplicates, {moves_before_kill} moves made before the kill",
            results.duplicates()
        );
        assert!(
            in_retry_topic as f64 <= moves_before_kill,
            "every retry waited in a tier: {in_retry_topic} in the retry topic, {moves_before_kill} moved there"
        );
        assert_eq!(retried.len(), TASKS);
        assert!(
            retried
                .iter()
                .all(|r| r.status == TaskStatus::Succeeded && r.attempts == 2),
            "every retried task succeeded at its second attempt"
        );
        assert!(
            earliest >= first_attempts_from + BACKOFF_MS as i64,
            "a retry started {} ms before its backoff ended",
            first_attempts_from + BACKOFF_MS as i64 - earliest
        );
        assert!(
            waiting.saturating_sub(idle) < GROWTH_CEILING,
            "{TASKS} waiting retries grew the worker by {} bytes",
            waiting.saturating_sub(idle)
        );
        let _ = std::fs::remove_file(&config);
    }
}

/// A schedule firing every second for `tasks`' type, recorded in its own
/// schedule topic, with `misfire` and `grace_ms`.
async fn every_second(
    kafka: &TestKafka,
    settings: &mut Settings,
    misfire: conveyor::settings::Misfire,
    grace_ms: u64,
) {
    settings.scheduler.topic = common::unique("schedules");
    settings.scheduler.group_id = common::unique("scheduler");
    // As the test processors': a killed owner is replaced quickly.
    settings.scheduler.session_timeout_ms = 6_000;
    kafka.create_named_topic(&settings.scheduler.topic, 1).await;
    settings
        .schedules
        .push(conveyor::settings::ScheduleSettings {
            name: "every-second".into(),
            cron: "* * * * * *".into(),
            timezone: "UTC".into(),
            task_type: "echo".into(),
            payload: r#"{"from": "a schedule"}"#.into(),
            key: None,
            misfire,
            misfire_grace_ms: grace_ms,
            max_catch_up: 100,
            jitter_ms: 0,
        });
    settings.validate().expect("schedule settings are valid");
}

/// The same settings serving metrics on a port of their own: their file
/// and the port.
fn on_own_port(settings: &Settings) -> (PathBuf, u16) {
    let mut settings = settings.clone();
    let port = common::free_port();
    settings.metrics.listen = format!("127.0.0.1:{port}");
    (common::config_file(&settings), port)
}

/// A worker started on `config` once it serves its metrics on `port`.
async fn serving(config: &Path, port: u16) -> Worker {
    let worker = Worker::start(config);
    wait_until("the worker serves its metrics", LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    worker
}

/// The schedule's tasks in `topic`: each tick (from the task's metadata)
/// with how many records carried it, and whether every id is the one
/// derived from (schedule, tick).
fn fired_ticks(settings: &Settings, topic: &str) -> (std::collections::BTreeMap<i64, usize>, bool) {
    let schedule = conveyor::schedule::Schedule::all(settings)
        .expect("schedules")
        .pop()
        .expect("one schedule");
    let codec = conveyor::codec::Codec::default();
    let mut ticks = std::collections::BTreeMap::new();
    let mut ids_derived = true;
    for record in conveyor::tools::read_topic(settings, topic).expect("read the task topic") {
        use rdkafka::Message;
        let Ok(task) = codec.decode_request(record.payload().unwrap_or_default()) else {
            continue;
        };
        if task.metadata.get(conveyor::schedule::META_SCHEDULE) != Some(&schedule.settings.name) {
            continue;
        }
        let Some(tick) = task
            .metadata
            .get(conveyor::schedule::META_TICK)
            .and_then(|t| t.parse::<i64>().ok())
        else {
            continue;
        };
        ids_derived &= task.id == schedule.task_id(tick);
        *ticks.entry(tick).or_insert(0) += 1;
    }
    (ticks, ids_derived)
}

/// Seconds between consecutive ticks that are not one apart.
fn gaps(ticks: &std::collections::BTreeMap<i64, usize>) -> Vec<(i64, i64)> {
    let keys: Vec<i64> = ticks.keys().copied().collect();
    keys.windows(2)
        .filter(|w| w[1] - w[0] != 1_000)
        .map(|w| (w[0], w[1]))
        .collect()
}

/// A worker started on `config` once it has fired three ticks (its
/// metrics on `port`).
async fn firing(config: &Path, port: u16) -> Worker {
    let worker = Worker::start(config);
    let deadline = Instant::now() + LONG;
    while common::metric_sum(port, "conveyor_schedule_fires_total").await < 3.0 {
        assert!(
            Instant::now() < deadline,
            "no ticks fired; log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker
}

async fn schedule_owner(ports: &[u16]) -> Option<usize> {
    for (i, port) in ports.iter().enumerate() {
        if common::metric(*port, "conveyor_schedule_owner").await == Some(1.0) {
            return Some(i);
        }
    }
    None
}

/// A schedule firing every second, two workers, the one firing killed
/// mid-way: every tick produced once (by task id), none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_every_tick_once_across_workers_when_the_one_firing_is_killed() {
    for kafka in TestKafka::all(
        "a_schedule_fires_every_tick_once_across_workers_when_the_one_firing_is_killed",
    ) {
        let pipeline = kafka.pipeline(1).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        every_second(&kafka, &mut settings, Default::default(), 60_000).await;
        let (config_a, port_a) = on_own_port(&settings);
        let (config_b, port_b) = on_own_port(&settings);
        let started = Instant::now();
        let mut workers = [Worker::start(&config_a), Worker::start(&config_b)];
        let ports = [port_a, port_b];
        // Let both join, then kill whichever fires, 15 s in.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let mut owner = schedule_owner(&ports).await;
        let deadline = Instant::now() + LONG;
        while owner.is_none() {
            assert!(Instant::now() < deadline, "no worker fires the schedules");
            tokio::time::sleep(Duration::from_millis(200)).await;
            owner = schedule_owner(&ports).await;
        }
        let killed = owner.unwrap_or(0);
        let fired_before_kill =
            common::metric_sum(ports[killed], "conveyor_schedule_fires_total").await;
        workers[killed].signal("KILL");
        workers[killed].wait(Duration::from_secs(10));
        let survivor = 1 - killed;
        let took_over = Instant::now();
        let deadline = took_over + LONG;
        while schedule_owner(&ports[survivor..=survivor]).await.is_none() {
            assert!(
                Instant::now() < deadline,
                "the surviving worker did not take the schedules over; log:\n{}",
                workers[survivor].log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let failover = took_over.elapsed();
        tokio::time::sleep(Duration::from_secs(30).saturating_sub(started.elapsed())).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        workers[survivor].stop_cleanly();
        let (ticks, ids_derived) = fired_ticks(&settings, &pipeline.input);
        let duplicated: Vec<(&i64, &usize)> = ticks.iter().filter(|(_, n)| **n > 1).collect();
        let holes = gaps(&ticks);
        common::announce(&format!(
            "schedule every second on {}: {} ticks fired over {:.0} s ({} by the killed worker), {} duplicated {duplicated:?}, gaps {holes:?}; \
             the survivor fired {:.1} s after the kill",
            kafka.describe(),
            ticks.len(),
            started.elapsed().as_secs_f64(),
            fired_before_kill,
            duplicated.len(),
            failover.as_secs_f64(),
        ));
        assert!(ticks.len() >= 20, "{} ticks in 30 s", ticks.len());
        assert!(fired_before_kill >= 1.0, "the killed worker had fired");
        assert!(holes.is_empty(), "ticks skipped: {holes:?}");
        assert!(
            ids_derived,
            "each task's id is derived from (schedule, tick)"
        );
        // A kill between a tick's task and its record fires that tick
        // again, with the same id: at most the one tick in hand.
        assert!(
            duplicated.len() <= 1 && duplicated.iter().all(|(_, n)| **n == 2),
            "duplicated ticks: {duplicated:?}"
        );
        let _ = std::fs::remove_file(&config_a);
        let _ = std::fs::remove_file(&config_b);
    }
}

/// Ticks missed while no worker ran are fired by the misfire policy when
/// one starts again: `fire_once` fires the latest of them, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_after_an_outage_fires_missed_ticks_by_the_misfire_policy() {
    for kafka in
        TestKafka::all("a_worker_started_after_an_outage_fires_missed_ticks_by_the_misfire_policy")
    {
        let pipeline = kafka.pipeline(1).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        every_second(
            &kafka,
            &mut settings,
            conveyor::settings::Misfire::FireOnce,
            1_000,
        )
        .await;
        let (config, port) = on_own_port(&settings);
        let mut worker = firing(&config, port).await;
        worker.stop_cleanly();
        let (before, _) = fired_ticks(&settings, &pipeline.input);
        let last_before = before.keys().last().copied().unwrap_or_default();
        // The outage.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let mut worker = firing(&config, port).await;
        let misfires = common::metric_sum(port, "conveyor_schedule_misfires_total").await;
        worker.stop_cleanly();
        let (ticks, ids_derived) = fired_ticks(&settings, &pipeline.input);
        let after: Vec<i64> = ticks.range(last_before + 1..).map(|(t, _)| *t).collect();
        let first_after = after.first().copied().unwrap_or_default();
        let skipped = (first_after - last_before) / 1_000 - 1;
        common::announce(&format!(
            "misfire fire_once on {}: last tick before the outage {}, first after it {} ({skipped} ticks skipped, misfires counted {misfires}); \
             {} ticks after",
            kafka.describe(),
            conveyor::schedule::rfc3339(last_before),
            conveyor::schedule::rfc3339(first_after),
            after.len()
        ));
        assert!(ids_derived);
        assert!(ticks.values().all(|n| *n == 1), "no tick fired twice");
        assert!(
            skipped >= 5,
            "an 8 s outage skips at least 5 ticks, not {skipped}"
        );
        assert_eq!(
            skipped as f64, misfires,
            "each tick skipped is counted as a misfire"
        );
        assert!(
            gaps(&ticks.range(first_after..).map(|(t, n)| (*t, *n)).collect()).is_empty(),
            "after the missed ticks' one task, every tick fires"
        );

        // Removed from the configuration (another schedule in its place),
        // it fires no more.
        let mut replaced = settings.clone();
        replaced.schedules[0].name = "another".into();
        let (replaced_config, port) = on_own_port(&replaced);
        let removed_at = now_millis();
        let mut worker = firing(&replaced_config, port).await;
        worker.stop_cleanly();
        let (still, _) = fired_ticks(&settings, &pipeline.input);
        assert_eq!(
            still.range(removed_at..).count(),
            0,
            "a removed schedule fired"
        );
        let (others, _) = fired_ticks(&replaced, &pipeline.input);
        assert!(others.len() >= 3, "the schedule in its place fired");
        let _ = std::fs::remove_file(&replaced_config);
        let _ = std::fs::remove_file(&config);
    }
}

/// An `http` handler endpoint that holds each task's request until the
/// test releases it, recording every request by task id.
#[derive(Default)]
struct Holding {
    seen: Mutex<Vec<uuid::Uuid>>,
    released: Mutex<std::collections::HashSet<uuid::Uuid>>,
    changed: tokio::sync::Notify,
}

impl Holding {
    fn times(&self, id: uuid::Uuid) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == id)
            .count()
    }

    fn release(&self, id: uuid::Uuid) {
        self.released.lock().unwrap().insert(id);
        self.changed.notify_waiters();
    }
}

async fn holding_endpoint() -> (String, Arc<Holding>) {
    use axum::extract::State;
    use axum::http::HeaderMap;
    let holding = Arc::new(Holding::default());
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::post(
                |State(h): State<Arc<Holding>>, headers: HeaderMap| async move {
                    let id: uuid::Uuid = headers
                        .get("conveyor-task-id")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .expect("a task id header");
                    h.seen.lock().unwrap().push(id);
                    loop {
                        let changed = h.changed.notified();
                        if h.released.lock().unwrap().contains(&id) {
                            return "{}";
                        }
                        changed.await;
                    }
                },
            ),
        )
        .with_state(holding.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test endpoint");
    let url = format!("http://{}/", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, holding)
}

/// Cancellations survive a SIGKILL of the worker: a task cancelled before
/// it started is not run by the partition's next owner, a task cancelled
/// while running (the worker killed right after) ends cancelled and runs no
/// more, and a finished task's cancel answers 409 after the kill too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_survive_a_sigkill_of_the_worker() {
    for kafka in TestKafka::all("cancellations_survive_a_sigkill_of_the_worker") {
        let (url, endpoint) = holding_endpoint().await;
        let pipeline = kafka.pipeline(1).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::Key, &[("held", HandlerKind::Echo)]);
        common::with_lifecycle(&kafka, &mut settings, 1).await;
        settings.cancel.grace_ms = 1_000;
        let mut task = conveyor::settings::TaskSettings::new(HandlerKind::Http);
        task.url = Some(url);
        task.timeout_ms = 120_000;
        settings.processors[0].tasks.insert("held".into(), task);
        settings.gateway.task_types = vec!["held".into()];
        settings.fill_derived();
        settings.validate().expect("valid settings");
        let gateway =
            common::TestGateway::start(&settings, Arc::new(conveyor::metrics::Metrics::new()))
                .await;
        let client = reqwest::Client::new();
        let base = gateway.base.clone();
        let submit = |key: &'static str| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let body = serde_json::json!({"type": "held", "payload": {}, "key": key});
                let (_, answer) =
                    common::post_json(&client, &format!("{base}/v1/tasks"), &body).await;
                answer["id"]
                    .as_str()
                    .unwrap()
                    .parse::<uuid::Uuid>()
                    .unwrap()
            }
        };
        let status = |id: uuid::Uuid, wait: &'static str| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let url = format!("{base}/v1/tasks/{id}?wait={wait}");
                common::json_answer(client.get(url).send().await.unwrap())
                    .await
                    .1
            }
        };
        let cancel = |id: uuid::Uuid| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let url = format!("{base}/v1/tasks/{id}:cancel");
                common::json_answer(client.post(url).send().await.unwrap()).await
            }
        };
        // One key: `head` runs, `queued` waits behind it in the key's lane.
        let head = submit("k").await;
        let queued = submit("k").await;
        let config = common::config_file(&settings);
        let first = Worker::start(&config);
        wait_until("the head task reaches the endpoint", LONG, || {
            endpoint.times(head) == 1
        })
        .await;
        let (code, answer) = cancel(queued).await;
        assert_eq!(code, 202, "{answer}");
        let mut first = first;
        first.signal("KILL");
        first.wait(Duration::from_secs(10));

        // The next owner runs the head again (at least once), never `queued`.
        let second = Worker::start(&config);
        wait_until("the head runs again on the next owner", LONG, || {
            endpoint.times(head) == 2
        })
        .await;
        endpoint.release(head);
        let done = status(queued, "60s").await;
        assert_eq!(done["status"], "cancelled", "{done}");
        assert_eq!(done["error"]["message"], "cancelled before it started");
        assert_eq!(endpoint.times(queued), 0, "the cancelled task never ran");
        assert_eq!(status(head, "60s").await["status"], "succeeded");

        // Cancelled while running, the worker killed at once.
        let running = submit("k").await;
        wait_until("the task runs", LONG, || endpoint.times(running) == 1).await;
        let (code, answer) = cancel(running).await;
        assert_eq!(code, 202, "{answer}");
        let mut second = second;
        second.signal("KILL");
        second.wait(Duration::from_secs(10));
        let mut third = Worker::start(&config);
        let ended = status(running, "60s").await;
        assert_eq!(ended["status"], "cancelled", "{ended}");
        let message = ended["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message == "cancelled before it started"
                || message.starts_with("cancelled while running"),
            "{message}"
        );
        assert_eq!(
            endpoint.times(running),
            1,
            "not run again by the next owner"
        );

        // After the end, and after the kills: 409 with the status.
        let (code, answer) = cancel(head).await;
        assert_eq!(
            (code, &answer["status"]),
            (409, &serde_json::json!("succeeded"))
        );
        common::announce(&format!(
            "{}: cancelled before start: never run across a SIGKILL; cancelled while running then SIGKILL: \"{message}\", ran once",
            kafka.describe()
        ));
        third.stop_cleanly();
        gateway.stop().await;
    }
}
