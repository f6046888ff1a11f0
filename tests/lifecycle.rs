//! A task while it lives (#27): its events (started, progress) folded into
//! `GET /v1/tasks/{id}` and streamed by `GET /v1/tasks/{id}/events`, and
//! cancellation before start, while running and after the end. Mock
//! cluster, and the external broker when `CONVEYOR_TEST_BROKERS` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{with_lifecycle, InProcessWorker, TestGateway, TestKafka};
use conveyor::codec::TaskRequest;
use conveyor::handlers::{Handler, HandlerError, Output, ProgressError, Registry, TaskContext};
use conveyor::settings::{HandlerKind, Ordering, Settings};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

/// Reports progress `{"n": 1}`, `{"n": 2}`, `{"n": 3}`, each after taking
/// a permit of `gate` (the first at once), then one more permit to end.
struct Reporter {
    gate: Arc<Semaphore>,
    oversized: Mutex<Option<ProgressError>>,
}

impl Handler for Reporter {
    fn handle<'a>(
        &'a self,
        _task: &'a TaskRequest,
        context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            // Too large for events.progress_max_bytes: refused, by name.
            let big = json!({"blob": "x".repeat(2_000)});
            *self.oversized.lock().unwrap() = context.progress(&big).err();
            for n in 1..=3 {
                if n > 1 {
                    self.gate.acquire().await.unwrap().forget();
                }
                context
                    .progress(&json!({"n": n}))
                    .map_err(|e| HandlerError::Permanent(e.to_string()))?;
            }
            self.gate.acquire().await.unwrap().forget();
            Ok(Output::json(b"{\"done\":true}".to_vec()))
        }
        .boxed()
    }
}

/// Waits for cancellation (noting that it saw it) and stops with an error;
/// counts the tasks it ran, by id.
#[derive(Default)]
struct Stoppable {
    ran: Mutex<HashMap<Uuid, usize>>,
    saw_cancel: AtomicBool,
    running: AtomicUsize,
}

impl Handler for Stoppable {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            *self.ran.lock().unwrap().entry(task.id).or_default() += 1;
            if task.payload.as_slice() == b"\"quick\"" {
                return Ok(Output::json(b"1".to_vec()));
            }
            self.running.fetch_add(1, AtomicOrdering::SeqCst);
            context.cancelled().await;
            self.saw_cancel.store(true, AtomicOrdering::SeqCst);
            Err(HandlerError::Permanent(
                "stopped: the task was cancelled".into(),
            ))
        }
        .boxed()
    }
}

/// A pipeline's settings with events and cancellation on, a progress
/// bound of 1 KiB and no coalescing.
async fn lifecycle_settings(kafka: &TestKafka, task_type: &str) -> Settings {
    let pipeline = kafka.pipeline(2).await;
    let mut settings = kafka.worker_settings(
        &pipeline,
        Ordering::Partition,
        &[(task_type, HandlerKind::Echo)],
    );
    with_lifecycle(kafka, &mut settings, 2).await;
    settings.events.progress_max_bytes = 1024;
    settings.events.progress_interval_ms = 0;
    settings.cancel.grace_ms = 2_000;
    settings.gateway.task_types = vec![task_type.to_owned()];
    settings.fill_derived();
    settings.validate().expect("valid");
    settings
}

async fn submit(client: &reqwest::Client, base: &str, task_type: &str, payload: Value) -> Uuid {
    let body = json!({"type": task_type, "payload": payload});
    let (_, answer) = common::post_json(client, &format!("{base}/v1/tasks"), &body).await;
    answer["id"].as_str().unwrap().parse().unwrap()
}

async fn get(client: &reqwest::Client, base: &str, id: Uuid, wait: &str) -> Value {
    let url = format!("{base}/v1/tasks/{id}?wait={wait}");
    body_of(client.get(url).send().await.unwrap()).await
}

async fn body_of(response: reqwest::Response) -> Value {
    common::json_answer(response).await.1
}

/// Polls the task until `check` holds.
async fn get_until(
    client: &reqwest::Client,
    base: &str,
    id: Uuid,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let task = get(client, base, id, "0s").await;
        if check(&task) {
            return task;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: {task}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// Reads a `text/event-stream` response event by event.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(client: &reqwest::Client, base: &str, id: Uuid, last: Option<&str>) -> Self {
        let mut request = client.get(format!("{base}/v1/tasks/{id}/events"));
        if let Some(last) = last {
            request = request.header("Last-Event-ID", last);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "the stream opens");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(Sse {
                    event,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout(LONG, self.response.chunk())
                .await
                .expect("an event in time")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// Progress reported three times is seen through GET and through the event
/// stream, in order; a stream resumed with Last-Event-ID misses nothing; a
/// value over `events.progress_max_bytes` is refused to the handler by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_is_seen_in_order_through_get_and_a_resumed_event_stream() {
    for kafka in TestKafka::all("progress_is_seen_in_order_through_get_and_a_resumed_event_stream")
    {
        let settings = lifecycle_settings(&kafka, "report").await;
        let reporter = Arc::new(Reporter {
            gate: Arc::new(Semaphore::new(0)),
            oversized: Mutex::new(None),
        });
        let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
        registry.register("report", reporter.clone());
        let mut worker = InProcessWorker::start(&settings, "worker-a", Some(registry));
        let gateway = TestGateway::start(&settings, worker.metrics.clone()).await;
        let client = reqwest::Client::new();
        let base = gateway.base.clone();

        let id = submit(&client, &base, "report", json!({})).await;
        let mut stream = SseReader::open(&client, &base, id, None).await;
        let first = worker.alongside(stream.next()).await.unwrap();
        assert_eq!(first.event, "status");
        assert_eq!(first.id, None);
        let mut seen = vec![first];
        while seen.last().unwrap().event != "progress" {
            seen.push(worker.alongside(stream.next()).await.unwrap());
        }
        let kinds: Vec<&str> = seen.iter().map(|e| e.event.as_str()).collect();
        assert!(
            kinds == ["status", "started", "progress"],
            "the stream so far: {seen:?}"
        );
        assert_eq!(seen[2].data["progress"], json!({"n": 1}));
        let task = get_until(&client, &base, id, "progress 1 shows", |t| {
            t["progress"] == json!({"n": 1})
        })
        .await;
        assert_eq!(task["status"], "running", "{task}");
        assert_eq!(task["attempt"], 1);
        assert_eq!(task["worker"], "worker-a");
        assert!(task["started_at"].as_i64().is_some(), "{task}");
        let refused = reporter.oversized.lock().unwrap().clone();
        assert!(
            matches!(refused, Some(ProgressError::TooLarge { max: 1024, .. })),
            "{refused:?}"
        );
        assert!(refused
            .unwrap()
            .to_string()
            .contains("events.progress_max_bytes allows 1024"));

        // The gateway's progress route refuses, naming what is wrong: no
        // token, an oversized value, a token not the running attempt's.
        let post = |token: Option<&str>, body: String| {
            let mut request = client
                .post(format!("{base}/v1/tasks/{id}/progress"))
                .header("content-type", "application/json")
                .body(body);
            if let Some(token) = token {
                request = request.header("Conveyor-Progress-Token", token);
            }
            async move {
                let response = request.send().await.unwrap();
                (response.status().as_u16(), body_of(response).await)
            }
        };
        let (code, body) = post(None, "{}".into()).await;
        assert_eq!(
            (code, &body["error"]["field"]),
            (401, &json!("Conveyor-Progress-Token"))
        );
        let big = json!({"blob": "x".repeat(2_000)}).to_string();
        let (code, body) = post(Some("0123"), big).await;
        assert_eq!(code, 413, "{body}");
        assert_eq!(body["error"]["field"], "body");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("events.progress_max_bytes allows 1024"));
        let (code, body) = post(Some("not-the-token"), "{\"n\": 9}".into()).await;
        assert_eq!(code, 403, "{body}");
        assert_eq!(body["error"]["code"], "wrong_progress_token");

        // Progress 2 on the stream; then the client goes away.
        reporter.gate.add_permits(1);
        let second = worker.alongside(stream.next()).await.unwrap();
        assert_eq!(
            (second.event.as_str(), &second.data["progress"]),
            ("progress", &json!({"n": 2}))
        );
        let resume_from = second.id.clone().expect("progress has an id");
        drop(stream);
        get_until(&client, &base, id, "progress 2 shows", |t| {
            t["progress"] == json!({"n": 2})
        })
        .await;

        // Progress 3 while nobody listens; the resumed stream starts there.
        reporter.gate.add_permits(1);
        get_until(&client, &base, id, "progress 3 shows", |t| {
            t["progress"] == json!({"n": 3})
        })
        .await;
        let mut resumed = SseReader::open(&client, &base, id, Some(&resume_from)).await;
        let third = worker.alongside(resumed.next()).await.unwrap();
        assert_eq!(
            (third.event.as_str(), &third.data["progress"]),
            ("progress", &json!({"n": 3}))
        );
        assert!(
            third.id.as_deref().unwrap().parse::<i64>().unwrap()
                > resume_from.parse::<i64>().unwrap()
        );
        reporter.gate.add_permits(1);
        let end = worker.alongside(resumed.next()).await.unwrap();
        assert_eq!(end.event, "succeeded");
        assert_eq!(end.id.as_deref(), Some("end"));
        assert_eq!(end.data["result"], json!({"done": true}));
        assert_eq!(
            end.data["progress"],
            json!({"n": 3}),
            "the last progress stays"
        );
        assert_eq!(
            worker.alongside(resumed.next()).await,
            None,
            "the stream closes"
        );
        common::announce(&format!(
            "{}: events seen live {:?}, then after resuming: progress 3, succeeded",
            kafka.describe(),
            kinds
        ));

        // Resuming after the end: nothing more.
        let after_end = client
            .get(format!("{base}/v1/tasks/{id}/events"))
            .header("Last-Event-ID", "end")
            .send()
            .await
            .unwrap();
        assert_eq!(after_end.status(), 204);
        let bad = client
            .get(format!("{base}/v1/tasks/{id}/events"))
            .header("Last-Event-ID", "yesterday")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        let body = body_of(bad).await;
        assert_eq!(body["error"]["field"], "Last-Event-ID");
        let malformed = client
            .get(format!("{base}/v1/tasks/not-a-uuid/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(malformed.status(), 400);

        gateway.stop().await;
        worker.stop().await;
    }
}

/// Cancelled before it started: never run, status `cancelled`, counted;
/// while running: the handler sees it, the outcome says it stopped; after
/// success: 409 with the status; unknown: 404; malformed: 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_before_start_while_running_and_after_the_end() {
    for kafka in TestKafka::all("cancel_before_start_while_running_and_after_the_end") {
        let settings = lifecycle_settings(&kafka, "stoppable").await;
        let handler = Arc::new(Stoppable::default());
        let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
        registry.register("stoppable", handler.clone());
        // The gateway first, alone: a task submitted now waits.
        let metrics = Arc::new(conveyor::metrics::Metrics::new());
        let gateway = TestGateway::start(&settings, metrics).await;
        let client = reqwest::Client::new();
        let base = gateway.base.clone();
        let before = submit(&client, &base, "stoppable", json!("quick")).await;
        let cancel = |id: Uuid| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let url = format!("{base}/v1/tasks/{id}:cancel");
                common::json_answer(client.post(url).send().await.unwrap()).await
            }
        };
        let (status, answer) = cancel(before).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["cancel_requested"], true);
        assert_eq!(answer["status"], "queued");

        let mut worker = InProcessWorker::start(&settings, "worker-a", Some(registry));
        let task = worker.alongside(get(&client, &base, before, "20s")).await;
        assert_eq!(task["status"], "cancelled", "{task}");
        assert_eq!(task["error"]["kind"], "cancelled");
        assert_eq!(task["error"]["message"], "cancelled before it started");
        assert_eq!(task["attempts"], 0);
        assert_eq!(handler.ran.lock().unwrap().get(&before), None, "never ran");
        let worker_metrics = worker.metrics.clone();
        let cancelled = |stage: &str| {
            worker_metrics
                .tasks_cancelled
                .with_label_values(&["test", "stoppable", stage])
                .get()
        };
        assert_eq!(cancelled("before_start"), 1);

        // While running: the handler sees it and stops.
        let running = submit(&client, &base, "stoppable", json!("wait")).await;
        worker
            .alongside(get_until(&client, &base, running, "it runs", |t| {
                t["status"] == "running"
            }))
            .await;
        let (status, answer) = cancel(running).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["status"], "running");
        let task = worker.alongside(get(&client, &base, running, "20s")).await;
        assert_eq!(task["status"], "cancelled", "{task}");
        assert_eq!(
            task["error"]["message"],
            "cancelled while running; the handler stopped: stopped: the task was cancelled"
        );
        assert_eq!(task["attempts"], 1);
        assert!(handler.saw_cancel.load(AtomicOrdering::SeqCst));
        assert_eq!(cancelled("running"), 1);

        // After the end: 409 with the status; unknown: 404; malformed: 400.
        let done = submit(&client, &base, "stoppable", json!("quick")).await;
        let task = worker.alongside(get(&client, &base, done, "20s")).await;
        assert_eq!(task["status"], "succeeded");
        let (status, answer) = cancel(done).await;
        assert_eq!(status, 409, "{answer}");
        assert_eq!(answer["status"], "succeeded");
        assert_eq!(answer["error"]["code"], "task_finished");
        let (status, answer) = cancel(before).await;
        assert_eq!((status, &answer["status"]), (409, &json!("cancelled")));
        let (status, answer) = cancel(Uuid::new_v4()).await;
        assert_eq!(status, 404, "{answer}");
        let response = client
            .post(format!("{base}/v1/tasks/12345:cancel"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body = body_of(response).await;
        assert_eq!(body["error"]["field"], "id", "{body}");
        let response = client
            .post(format!("{base}/v1/tasks/{done}:stop"))
            .send()
            .await
            .unwrap();
        // Not an action: the path is a task's, which takes GET.
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()["allow"], "GET,HEAD");
        assert_eq!(
            *handler.ran.lock().unwrap(),
            HashMap::from([(running, 1), (done, 1)]),
            "what ran, once each"
        );
        common::announce(&format!(
            "{}: cancelled before start (never ran), while running (the handler stopped), 409 after success",
            kafka.describe()
        ));
        gateway.stop().await;
        worker.stop().await;
    }
}

/// Resident set size of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Allows this process (and the gateway it starts) `wanted` open files,
/// within the hard limit: a thousand streams need two thousand sockets.
#[allow(unsafe_code)] // setrlimit through libc
fn allow_open_files(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// 1,000 event streams open on one `conveyor gateway` process (memory
/// measured and printed); the next one is answered 503 naming
/// `gateway.max_event_streams`; a closed one frees its place. Mock cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_event_streams_fit_and_the_next_is_refused_naming_the_limit() {
    const STREAMS: usize = 1_000;
    allow_open_files(4 * STREAMS as u64);
    let kafka = TestKafka::mock();
    // The processor's configuration tells the gateway where `idle` tasks
    // go; no worker runs them.
    let mut settings = lifecycle_settings(&kafka, "idle").await;
    settings.gateway.max_event_streams = STREAMS;
    let port = common::free_port();
    settings.gateway.listen = format!("127.0.0.1:{port}");
    let config = common::config_file(&settings);
    let mut gateway = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["gateway", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(config.with_extension("log")).expect("log file"))
        .spawn()
        .expect("start conveyor gateway");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + LONG;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = gateway.try_wait() {
            panic!(
                "the gateway exited ({status}): {}",
                std::fs::read_to_string(config.with_extension("log")).unwrap_or_default()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never listened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A task no worker runs: its streams stay open.
    let id = submit(&client, &base, "idle", json!({})).await;
    let before = rss_kib(gateway.id());
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let mut stream = SseReader::open(&client, &base, id, None).await;
        let first = stream.next().await.expect("the status event");
        assert_eq!(first.event, "status");
        streams.push(stream);
    }
    let after = rss_kib(gateway.id());
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("conveyor_gateway_event_streams {STREAMS}")),
        "the gauge counts the open streams"
    );
    let refused = client
        .get(format!("{base}/v1/tasks/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body = body_of(refused).await;
    assert_eq!(body["error"]["code"], "too_many_streams");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gateway.max_event_streams (1000)"),
        "{body}"
    );
    common::announce(&format!(
        "{STREAMS} open event streams: gateway RSS {before} KiB before, {after} KiB with them open \
         ({:.1} KiB a stream)",
        (after.saturating_sub(before)) as f64 / STREAMS as f64
    ));
    // A stream closed by its client frees its place (once the gateway
    // notices: at its next keep-alive at the latest).
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let response = client
            .get(format!("{base}/v1/tasks/{id}/events"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no place freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(streams);
    let _ = gateway.kill();
    let _ = gateway.wait();
}

/// Cancelling a workflow run stops its running step (the handler sees it)
/// and starts no further step; the run ends `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_workflow_run_starts_no_further_step() {
    use conveyor::settings::{StepSettings, WorkflowSettings};
    for kafka in TestKafka::all("cancelling_a_workflow_run_starts_no_further_step") {
        let mut settings = lifecycle_settings(&kafka, "stoppable").await;
        settings.processors[0].tasks.insert(
            "after".into(),
            conveyor::settings::TaskSettings::new(HandlerKind::Echo),
        );
        let step = |task: &str| StepSettings {
            task: task.into(),
            fan_out: false,
            join: false,
        };
        settings.workflows.push(WorkflowSettings {
            name: "two".into(),
            steps: vec![step("stoppable"), step("after")],
            timeout_ms: 0,
            max_fan_out: conveyor::settings::DEFAULT_MAX_FAN_OUT,
        });
        settings.fill_derived();
        settings.validate().expect("valid");
        let handler = Arc::new(Stoppable::default());
        let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
        registry.register("stoppable", handler.clone());
        let mut worker = InProcessWorker::start(&settings, "worker-a", Some(registry));
        let gateway = TestGateway::start(&settings, worker.metrics.clone()).await;
        let client = reqwest::Client::new();
        let base = gateway.base.clone();
        let response = client
            .post(format!("{base}/v1/workflows/two"))
            .header("content-type", "application/json")
            .body(json!({"payload": "wait"}).to_string())
            .send()
            .await
            .unwrap();
        let run: Uuid = body_of(response).await["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let deadline = tokio::time::Instant::now() + LONG;
        while handler.running.load(AtomicOrdering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "step 0 never ran");
            worker
                .alongside(tokio::time::sleep(Duration::from_millis(20)))
                .await;
        }
        // The gateway learns of the run from its first step's request.
        let answer = worker
            .alongside(async {
                loop {
                    let response = client
                        .post(format!("{base}/v1/tasks/{run}:cancel"))
                        .send()
                        .await
                        .unwrap();
                    let code = response.status().as_u16();
                    let body = body_of(response).await;
                    if code != 404 {
                        return (code, body);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        assert_eq!(answer.0, 202, "{}", answer.1);
        assert_eq!(answer.1["workflow_run"], true);
        // The run's result and its step's are read independently: wait
        // until both are in.
        let ended = worker
            .alongside(async {
                let deadline = tokio::time::Instant::now() + LONG;
                loop {
                    let run = body_of(
                        client
                            .get(format!("{base}/v1/workflows/{run}?wait=20s"))
                            .send()
                            .await
                            .unwrap(),
                    )
                    .await;
                    if run["steps"][0]["status"] != "running"
                        || tokio::time::Instant::now() > deadline
                    {
                        return run;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        assert_eq!(ended["status"], "cancelled", "{ended}");
        assert_eq!(ended["error"]["kind"], "cancelled", "{ended}");
        assert_eq!(ended["steps"][0]["status"], "cancelled", "{ended}");
        assert_eq!(
            ended["steps"][1]["status"], "pending",
            "no further step: {ended}"
        );
        assert!(handler.saw_cancel.load(AtomicOrdering::SeqCst));
        gateway.stop().await;
        worker.stop().await;
    }
}

/// Fails every attempt with a retryable error.
struct AlwaysRetry;

impl Handler for AlwaysRetry {
    fn handle<'a>(
        &'a self,
        _task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            tokio::task::yield_now().await;
            Err(HandlerError::Retryable("the provider is down".into()))
        }
        .boxed()
    }
}

/// A task waiting for another attempt shows `retrying` with its due time,
/// the `retrying` event on its stream, and a cancel ends it where it waits,
/// long before the backoff is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retrying_task_is_shown_and_cancelled_where_it_waits() {
    for kafka in TestKafka::all("a_retrying_task_is_shown_and_cancelled_where_it_waits") {
        let mut settings = lifecycle_settings(&kafka, "flaky").await;
        let p = &mut settings.processors[0];
        p.max_attempts = 5;
        p.initial_backoff_ms = 120_000;
        p.max_backoff_ms = 120_000;
        p.retry_topic_threshold_ms = 0; // waits in place
        let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
        registry.register("flaky", Arc::new(AlwaysRetry));
        let mut worker = InProcessWorker::start(&settings, "worker-a", Some(registry));
        let gateway = TestGateway::start(&settings, worker.metrics.clone()).await;
        let client = reqwest::Client::new();
        let base = gateway.base.clone();
        let id = submit(&client, &base, "flaky", json!({})).await;
        let task = worker
            .alongside(get_until(&client, &base, id, "it retries", |t| {
                t["status"] == "retrying"
            }))
            .await;
        let retry_at = task["retry_at"].as_i64().expect("retry_at");
        assert!(retry_at > conveyor::codec::now_millis() + 60_000, "{task}");
        let mut stream = SseReader::open(&client, &base, id, None).await;
        let mut kinds = Vec::new();
        while kinds.last().map(String::as_str) != Some("retrying") {
            let event = worker.alongside(stream.next()).await.unwrap();
            if event.event == "retrying" {
                assert_eq!(event.data["due"], json!(retry_at));
                assert_eq!(event.data["message"], "the provider is down");
            }
            kinds.push(event.event);
        }
        assert_eq!(kinds, ["status", "started", "retrying"]);
        let response = client
            .post(format!("{base}/v1/tasks/{id}:cancel"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let ended = worker.alongside(get(&client, &base, id, "20s")).await;
        assert_eq!(ended["status"], "cancelled", "{ended}");
        assert_eq!(
            ended["error"]["message"],
            "cancelled while it waited for another attempt"
        );
        assert_eq!(ended["attempts"], 1);
        let mut rest = Vec::new();
        while let Some(event) = worker.alongside(stream.next()).await {
            rest.push(event.event);
        }
        assert_eq!(
            rest,
            ["cancelled", "cancelled"],
            "the cancelled event, then the end"
        );
        assert_eq!(
            worker
                .metrics
                .tasks_cancelled
                .with_label_values(&["test", "flaky", "waiting"])
                .get(),
            1
        );
        gateway.stop().await;
        worker.stop().await;
    }
}
