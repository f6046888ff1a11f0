//! Delayed tasks (#26): submitted through the gateway with `delay` or
//! `run_at`, they wait in the delay tier topics (moved by the workers'
//! mover) and start no earlier than asked; a long delay holds up no short
//! one; a stopped mover loses nothing. Mock cluster, and the external
//! broker when `CONVEYOR_TEST_BROKERS` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{InProcessWorker, Pipeline, TestGateway, TestKafka};
use conveyor::codec::{now_millis, TaskRequest};
use conveyor::delay::MoverSpec;
use conveyor::handlers::{Handler, HandlerError, Output, Registry, TaskContext};
use conveyor::settings::{HandlerKind, Ordering, Settings};
use conveyor::shutdown::CancellationToken;
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(90);

/// Records when each task started (ms since the epoch), by id.
#[derive(Default)]
struct Starts(Mutex<HashMap<Uuid, Vec<i64>>>);

impl Handler for Starts {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            self.0
                .lock()
                .unwrap()
                .entry(task.id)
                .or_default()
                .push(now_millis());
            Ok(Output {
                bytes: b"{}".to_vec(),
                content_type: "application/json".into(),
            })
        }
        .boxed()
    }
}

/// A worker (the `record` handler: `starts`) and a mover on `settings`.
struct Running {
    worker: InProcessWorker,
    mover: tokio::task::JoinHandle<Result<(), conveyor::delay::MoverError>>,
    mover_stop: CancellationToken,
}

fn start(settings: &Settings, starts: &Arc<Starts>) -> Running {
    let mut registry = Registry::from_settings(&settings.processors[0]).unwrap();
    registry.register("record", starts.clone());
    let worker = InProcessWorker::start(settings, "worker", Some(registry));
    let mover_stop = CancellationToken::new();
    let mover = tokio::spawn(conveyor::delay::run(
        MoverSpec {
            settings: settings.clone(),
            metrics: worker.metrics.clone(),
        },
        mover_stop.clone(),
    ));
    Running {
        worker,
        mover,
        mover_stop,
    }
}

impl Running {
    async fn stop(self) {
        self.mover_stop.cancel();
        self.mover
            .await
            .expect("the mover did not panic")
            .expect("the mover stopped cleanly");
        self.worker.stop().await;
    }
}

async fn post(http: &reqwest::Client, base: &str, path: &str, body: Value) -> (u16, Value) {
    let response = http
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST answered");
    let status = response.status().as_u16();
    let text = response.text().await.expect("a body");
    (status, serde_json::from_str(&text).expect("a JSON answer"))
}

async fn get(http: &reqwest::Client, base: &str, path: &str) -> Value {
    let text = http
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("GET answered")
        .text()
        .await
        .expect("a body");
    serde_json::from_str(&text).expect("a JSON answer")
}

fn id_of(answer: &Value) -> Uuid {
    answer["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("an id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delayed_task_waits_its_time_and_a_long_delay_holds_up_no_short_one() {
    for kafka in
        TestKafka::all("a_delayed_task_waits_its_time_and_a_long_delay_holds_up_no_short_one")
    {
        let pipeline: Pipeline = kafka.pipeline(2).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[("record", HandlerKind::Echo)],
        );
        common::with_delay_tiers(&kafka, &mut settings, 2).await;
        let starts = Arc::new(Starts::default());
        let mut running = start(&settings, &starts);
        let gateway = TestGateway::start(&settings, running.worker.metrics.clone()).await;
        let http = reqwest::Client::new();
        let base = gateway.base.clone();

        // An hour first, then two seconds, then a time two seconds ahead,
        // then one without a delay.
        let (status, long) = post(
            &http,
            &base,
            "/v1/tasks",
            json!({"type": "record", "payload": 1, "delay": "1h"}),
        )
        .await;
        assert_eq!(status, 202, "{long}");
        assert_eq!(long["status"], "scheduled", "{long}");
        let submitted = now_millis();
        let (status, short) = post(
            &http,
            &base,
            "/v1/tasks",
            json!({"type": "record", "payload": 2, "delay": "2s"}),
        )
        .await;
        assert_eq!(status, 202, "{short}");
        let at = chrono::DateTime::from_timestamp_millis(submitted + 2_000)
            .unwrap()
            .with_timezone(&chrono::FixedOffset::east_opt(3600).unwrap())
            .to_rfc3339();
        let (status, timed) = post(
            &http,
            &base,
            "/v1/tasks",
            json!({"type": "record", "payload": 3, "run_at": at}),
        )
        .await;
        assert_eq!(status, 202, "{timed}");
        assert_eq!(timed["status"], "scheduled", "{timed}");
        let (status, now) = post(
            &http,
            &base,
            "/v1/tasks",
            json!({"type": "record", "payload": 4}),
        )
        .await;
        assert_eq!(status, 202, "{now}");
        assert_eq!(now["status"], "queued", "{now}");

        let (long, short, timed, now) = (id_of(&long), id_of(&short), id_of(&timed), id_of(&now));
        let expected: HashSet<Uuid> = [short, timed, now].into_iter().collect();
        let results = running
            .worker
            .alongside(kafka.collect_results(&pipeline.output, &expected, LONG))
            .await;
        let view = get(&http, &base, &format!("/v1/tasks/{long}")).await;
        let first_start = |id: &Uuid| {
            starts
                .0
                .lock()
                .unwrap()
                .get(id)
                .and_then(|s| s.first().copied())
        };
        common::announce(&format!(
            "{}: 2 s delay started after {} ms, run_at 2 s ahead after {} ms (submitted at {submitted}); \
             the 1 h task: {view}",
            kafka.describe(),
            first_start(&short).unwrap_or(0) - submitted,
            first_start(&timed).unwrap_or(0) - submitted,
        ));
        assert_eq!(results.by_id.len(), 3, "the three due tasks ran");
        for id in [short, timed] {
            let started = first_start(&id).expect("it started");
            assert!(
                started >= submitted + 2_000,
                "task {id} started {} ms after it was submitted, asked for 2,000",
                started - submitted
            );
        }
        assert!(first_start(&long).is_none(), "the 1 h task has not started");
        assert_eq!(view["status"], "scheduled", "{view}");
        let run_at = view["run_at"].as_i64().expect("run_at");
        assert!(
            (submitted - 1_000 + 3_600_000..=now_millis() + 3_600_000).contains(&run_at),
            "run_at {run_at} is an hour after submission ({submitted})"
        );
        let moved = running
            .worker
            .metrics
            .delay_moves
            .with_label_values(&["task"])
            .get();
        assert!(moved >= 2, "{moved} moves to the task topic");

        // A retry waiting out its backoff in a tier (bound for the retry
        // topic) is not a task scheduled for later: the view skips it. A
        // task scheduled after it in the same tier partition shows that
        // the view has read that far.
        let tier = settings.delays.tier_topics()[4].1.clone();
        let codec = conveyor::codec::Codec::default();
        let producer = kafka.producer();
        let mut ids = Vec::new();
        for destination in [format!("{}.retry", pipeline.input), pipeline.input.clone()] {
            let task = TaskRequest::new("record", b"{}".to_vec());
            let mut value = Vec::new();
            codec.encode_request(&task, &mut value);
            let headers = conveyor::codec::wire::build([
                (
                    conveyor::codec::wire::RUN_AT,
                    Some((now_millis() + 3_600_000).to_string()),
                ),
                (conveyor::codec::wire::DELAY_DESTINATION, Some(destination)),
            ]);
            producer
                .send(
                    rdkafka::producer::FutureRecord::to(&tier)
                        .key("same partition")
                        .payload(&value)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .expect("produced");
            ids.push(task.id);
        }
        let deadline = std::time::Instant::now() + LONG;
        loop {
            let view = get(&http, &base, &format!("/v1/tasks/{}", ids[1])).await;
            if view["status"] == "scheduled" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{view}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let retry = get(&http, &base, &format!("/v1/tasks/{}", ids[0])).await;
        assert_eq!(
            retry["error"]["code"], "unknown_task",
            "a retry bound for its retry topic is not shown as scheduled: {retry}"
        );

        gateway.stop().await;
        running.stop().await;
    }
}
