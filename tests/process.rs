//! The real `conveyor worker` binary as a child process: killed with
//! SIGKILL mid-run (nothing lost, duplicates within the bound), stopped with
//! SIGTERM mid-run (no duplicates at all), and its memory under a large
//! backlog. Against the mock cluster and, when configured, the external
//! broker.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ids, requests, wait_until, Pipeline, TestKafka};
use conveyor::codec::{now_millis, TaskStatus};
use conveyor::settings::{HandlerKind, Ordering, Settings, StepSettings, WorkflowSettings};

const LONG: Duration = Duration::from_secs(180);

struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(config: &Path) -> Worker {
        let log = config.with_extension("log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("worker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(["worker", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("CONVEYOR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start conveyor worker");
        Worker { child, log }
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
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
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
    const CHILDREN: usize = 1_000;
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
        let results = kafka
            .collect_results(&pipeline.output, &expected, LONG)
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
        let results = kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
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
    let results = kafka
        .collect_results(&pipeline.output, &ids(&sent), LONG)
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
