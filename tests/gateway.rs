//! The HTTP gateway against a real broker: submit → wait → result, failed
//! tasks, 404s, every refusal with its status and field, idempotency across
//! replicas, auth on and off, 503 with the broker down and nothing written,
//! the OpenAPI document against the served routes, graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{header, init_logs, InProcessWorker, Pipeline, TestGateway, TestKafka};
use conveyor::gateway::{self, ROUTES};
use conveyor::metrics::Metrics;
use conveyor::settings::{HandlerKind, Ordering, Settings};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(60);

struct RunningGateway {
    gateway: TestGateway,
    base: String,
    http: reqwest::Client,
}

impl RunningGateway {
    async fn start(settings: &Settings) -> RunningGateway {
        let gateway = TestGateway::start(settings, Arc::new(Metrics::new())).await;
        let running = RunningGateway {
            base: gateway.base.clone(),
            gateway,
            http: reqwest::Client::new(),
        };
        // Ready: the broker answers and the view caught up.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (status, body) = running.get("/readyz").await;
            if status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway not ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        running
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET answered");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("POST answered");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn submit(&self, body: Value) -> String {
        let (status, answer, _) = self.post("/v1/tasks", &body.to_string(), &[]).await;
        assert_eq!(status, 202, "{answer}");
        answer["id"].as_str().expect("an id").to_owned()
    }

    async fn stop(self) {
        self.gateway.stop().await;
    }
}

/// A pipeline whose processor runs `echo` and `sleep`, and its settings.
async fn setup(kafka: &TestKafka) -> (Pipeline, Settings) {
    let pipeline = kafka.pipeline(4).await;
    let mut settings = kafka.worker_settings(
        &pipeline,
        Ordering::None,
        &[("echo", HandlerKind::Echo), ("sleep", HandlerKind::Sleep)],
    );
    settings.topics.results = pipeline.output.clone();
    settings.topics.dead_letter = pipeline.dead_letter.clone();
    settings.processors[0].max_attempts = 1;
    (pipeline, settings)
}

fn error_of(answer: &Value) -> (String, Option<String>) {
    (
        answer["error"]["code"].as_str().unwrap_or("").to_owned(),
        answer["error"]["field"].as_str().map(str::to_owned),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_then_wait_gives_the_result_or_the_error() {
    init_logs();
    for kafka in TestKafka::all("submit_then_wait_gives_the_result_or_the_error") {
        let (pipeline, settings) = setup(&kafka).await;
        let worker = InProcessWorker::start(&settings, "gateway-test", None);
        let gw = RunningGateway::start(&settings).await;

        // Succeeds, with the handler's output; the caller's trace context
        // travels to the result record unchanged.
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (status, answer, headers) = gw
            .post(
                "/v1/tasks",
                r#"{"type": "echo", "payload": {"n": 1, "s": "é"}}"#,
                &[("traceparent", traceparent)],
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["status"], "queued");
        let id = answer["id"].as_str().expect("id").to_owned();
        assert_eq!(answer["status_url"], format!("/v1/tasks/{id}"));
        assert_eq!(
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(traceparent)
        );
        let (status, task) = gw.get(&format!("/v1/tasks/{id}?wait=30s")).await;
        assert_eq!(status, 200, "{task}");
        assert_eq!(task["status"], "succeeded", "{task}");
        assert_eq!(task["result"], json!({"n": 1, "s": "é"}));
        assert_eq!(task["attempts"], 1);
        assert_eq!(task["type"], "echo");
        assert!(task["finished_at"].as_i64() >= task["submitted_at"].as_i64());

        // Without a traceparent the gateway makes one, and it too reaches
        // the result.
        let (_, answer, headers) = gw
            .post("/v1/tasks", r#"{"type": "echo", "payload": 2}"#, &[])
            .await;
        let made = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .expect("a traceparent is made")
            .to_owned();
        let second = answer["id"].as_str().expect("id").to_owned();
        let (_, task) = gw.get(&format!("/v1/tasks/{second}?wait=30s")).await;
        assert_eq!(task["result"], json!(2));

        // Fails for good: failed, with the handler's error.
        let failing = gw
            .submit(json!({"type": "sleep", "payload": {"msec": 5}}))
            .await;
        let (status, task) = gw.get(&format!("/v1/tasks/{failing}?wait=30s")).await;
        assert_eq!(status, 200);
        assert_eq!(task["status"], "failed", "{task}");
        assert_eq!(task["error"]["kind"], "permanent");
        assert!(
            task["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("msec")),
            "{task}"
        );

        // A batch: every task acknowledged, every one succeeds.
        let (status, answer, _) = gw
            .post(
                "/v1/tasks:batch",
                &json!({"tasks": [
                    {"type": "echo", "payload": "a"},
                    {"type": "echo", "payload": "b", "key": "k"},
                    {"type": "sleep", "payload": {"ms": 1}, "deadline": "60s"}]})
                .to_string(),
                &[],
            )
            .await;
        assert_eq!(status, 202, "{answer}");
        let batch: Vec<String> = answer["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| t["id"].as_str().expect("id").to_owned())
            .collect();
        assert_eq!(batch.len(), 3);
        let mut outputs = Vec::new();
        for id in &batch {
            let (_, task) = gw.get(&format!("/v1/tasks/{id}?wait=30s")).await;
            assert_eq!(task["status"], "succeeded", "{task}");
            outputs.push(task["result"].clone());
        }
        assert_eq!(outputs, [json!("a"), json!("b"), json!({"slept_ms": 1})]);

        // Unknown and malformed ids.
        let (status, answer) = gw
            .get("/v1/tasks/00000000-0000-4000-8000-000000000000")
            .await;
        assert_eq!(
            (status, error_of(&answer).0.as_str()),
            (404, "unknown_task")
        );
        let (status, answer) = gw.get("/v1/tasks/not-a-uuid").await;
        assert_eq!(status, 400);
        assert_eq!(error_of(&answer).1.as_deref(), Some("id"));

        // The results topic holds exactly one result per task, and the
        // trace ids are the ones the gateway answered with.
        let records = kafka.read_records(&pipeline.output, 6, TIMEOUT).await;
        assert_eq!(records.len(), 6);
        let codec = conveyor::Codec::default();
        let trace_of = |id: &str| {
            records
                .iter()
                .find(|r| {
                    codec
                        .decode_result(rdkafka::Message::payload(*r).unwrap_or_default())
                        .is_ok_and(|res| res.id.to_string() == id)
                })
                .and_then(|r| header(r, "traceparent"))
        };
        assert_eq!(trace_of(&id).as_deref(), Some(traceparent));
        assert_eq!(trace_of(&second), Some(made));

        gw.stop().await;
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_its_status_and_field_and_nothing_is_produced() {
    init_logs();
    let kafka = TestKafka::mock();
    let (pipeline, mut settings) = setup(&kafka).await;
    settings.gateway.max_payload_bytes = 64;
    settings.gateway.max_body_bytes = 1024;
    settings.gateway.max_batch = 2;
    let gw = RunningGateway::start(&settings).await;
    let big = "x".repeat(100);
    let huge = "y".repeat(2000);
    let cases: Vec<(&str, String, u16, &str, Option<&str>)> = vec![
        ("/v1/tasks", "{".into(), 400, "invalid_json", Some("body")),
        (
            "/v1/tasks",
            "[1]".into(),
            422,
            "invalid_field",
            Some("body"),
        ),
        (
            "/v1/tasks",
            r#"{"payload": 1}"#.into(),
            422,
            "invalid_field",
            Some("type"),
        ),
        (
            "/v1/tasks",
            r#"{"type": "nope", "payload": 1}"#.into(),
            422,
            "invalid_field",
            Some("type"),
        ),
        (
            "/v1/tasks",
            r#"{"type": "echo"}"#.into(),
            422,
            "invalid_field",
            Some("payload"),
        ),
        (
            "/v1/tasks",
            format!(r#"{{"type": "echo", "payload": "{big}"}}"#),
            413,
            "payload_too_large",
            Some("payload"),
        ),
        (
            "/v1/tasks",
            format!(r#"{{"type": "echo", "payload": "{huge}"}}"#),
            413,
            "body_too_large",
            Some("body"),
        ),
        (
            "/v1/tasks",
            r#"{"type": "echo", "payload": 1, "priority": 9}"#.into(),
            422,
            "invalid_field",
            Some("priority"),
        ),
        (
            "/v1/tasks",
            r#"{"type": "echo", "payload": 1, "deadline": -5}"#.into(),
            422,
            "invalid_field",
            Some("deadline"),
        ),
        (
            "/v1/tasks:batch",
            r#"{"tasks": [{"type": "echo", "payload": 1}, {"type": "x", "payload": 1}]}"#.into(),
            422,
            "invalid_field",
            Some("tasks[1].type"),
        ),
        (
            "/v1/tasks:batch",
            r#"{"tasks": [{"type": "echo", "payload": 1}, {"type": "echo", "payload": 2},
                          {"type": "echo", "payload": 3}]}"#
                .into(),
            413,
            "batch_too_large",
            Some("tasks"),
        ),
        // (A key repeated within a batch is no longer refused: the later
        // task is answered as a replay of the first, which no schema could
        // forbid; see an_idempotency_key_answers_the_first_task_on_every_replica.)
    ];
    for (path, body, status, code, field) in cases {
        let (got, answer, _) = gw.post(path, &body, &[]).await;
        assert_eq!(got, status, "{path} {body:.80}: {answer}");
        let (got_code, got_field) = error_of(&answer);
        assert_eq!(got_code, code, "{body:.80}: {answer}");
        assert_eq!(got_field.as_deref(), field, "{body:.80}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    for (query, field) in [("?wait=soon", "wait"), ("?timeout=1s", "timeout")] {
        let (status, answer) = gw
            .get(&format!(
                "/v1/tasks/00000000-0000-4000-8000-000000000000{query}"
            ))
            .await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(error_of(&answer).1.as_deref(), Some(field));
    }
    // Nothing was produced.
    let written: i64 = kafka.end_offsets(&pipeline.input).values().sum();
    assert_eq!(written, 0, "refused requests produced records");

    // The served document is the one in the repository with this
    // gateway's task types, workflows and batch size filled in, and every
    // route it lists is served (no route answers the fallback's no_route,
    // and no documented method is refused).
    let (status, served) = gw.get("/openapi.json").await;
    assert_eq!(status, 200);
    let types: Vec<String> = settings.gateway_task_topics().into_keys().collect();
    let workflows: Vec<String> = settings.workflows.iter().map(|w| w.name.clone()).collect();
    let kept: Value = serde_json::from_str(&gateway::openapi_for(
        &types,
        &workflows,
        settings.gateway.max_batch,
    ))
    .expect("JSON");
    assert_eq!(served, kept);
    assert_eq!(
        served["components"]["schemas"]["NewTask"]["properties"]["type"]["enum"],
        json!(types)
    );
    let documented: Vec<(String, String)> = kept["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("item")
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    assert_eq!(documented.len(), ROUTES.len());
    for (method, path) in &documented {
        let path = path.replace("{id}", "00000000-0000-4000-8000-000000000000");
        let (status, answer) = if method == "get" {
            gw.get(&path).await
        } else {
            let (s, a, _) = gw.post(&path, "{}", &[]).await;
            (s, a)
        };
        let code = error_of(&answer).0;
        assert!(
            code != "no_route" && code != "method_not_allowed" && status != 405,
            "{method} {path} is documented but not served: {status} {answer}"
        );
    }
    let (status, answer) = gw.get("/v1/nothing").await;
    assert_eq!((status, error_of(&answer).0.as_str()), (404, "no_route"));

    // Graceful shutdown: a long poll in flight is answered at once with
    // the current status, then the gateway stops cleanly.
    let id = gw.submit(json!({"type": "echo", "payload": 1})).await;
    let waiting = {
        let http = gw.http.clone();
        let url = format!("{}/v1/tasks/{id}?wait=20s", gw.base);
        tokio::spawn(async move {
            let response = http.get(url).send().await.expect("answered");
            let status = response.status().as_u16();
            let text = response.text().await.expect("body");
            (status, serde_json::from_str::<Value>(&text).expect("JSON"))
        })
    };
    // Stop once the long poll waits (the gauge counts it).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let scrape = gw
            .http
            .get(format!("{}/metrics", gw.base))
            .send()
            .await
            .expect("metrics answered")
            .text()
            .await
            .expect("metrics text");
        if scrape.lines().any(|l| l == "conveyor_gateway_long_polls 1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the long poll never waited: {scrape}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    gw.stop().await;
    let (status, task) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the long poll is answered when the gateway stops")
        .expect("joined");
    assert_eq!((status, task["status"].as_str()), (200, Some("queued")));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "stopping waited out the long poll"
    );
    // The task submitted before the stop was flushed and is on the topic.
    let written: i64 = kafka.end_offsets(&pipeline.input).values().sum();
    assert_eq!(written, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_answers_the_first_task_on_every_replica() {
    init_logs();
    for kafka in TestKafka::all("an_idempotency_key_answers_the_first_task_on_every_replica") {
        let (pipeline, settings) = setup(&kafka).await;
        let worker = InProcessWorker::start(&settings, "gateway-test", None);
        let first_gw = RunningGateway::start(&settings).await;
        let body = json!({"type": "echo", "payload": {"order": 7}, "idempotency_key": "order-7"});
        let (status, first, _) = first_gw.post("/v1/tasks", &body.to_string(), &[]).await;
        assert_eq!(status, 202, "{first}");
        assert!(first.get("idempotent_replay").is_none());
        let id = first["id"].as_str().expect("id").to_owned();
        let (status, again, _) = first_gw.post("/v1/tasks", &body.to_string(), &[]).await;
        assert_eq!(status, 202);
        assert_eq!(again["id"], id.as_str());
        assert_eq!(again["idempotent_replay"], true);
        // Another key is another task.
        let other = first_gw
            .submit(json!({"type": "echo", "payload": 8, "idempotency_key": "order-8"}))
            .await;
        assert_ne!(other, id);

        // A second replica learns the key and the result from the topics.
        let second_gw = RunningGateway::start(&settings).await;
        let (status, replayed, _) = second_gw
            .post(
                "/v1/tasks:batch",
                &json!({"tasks": [
                    body,
                    {"type": "echo", "payload": 9},
                    {"type": "echo", "payload": 10, "idempotency_key": "order-10"},
                    {"type": "echo", "payload": 11, "idempotency_key": "order-10"},
                ]})
                .to_string(),
                &[],
            )
            .await;
        assert_eq!(status, 202, "{replayed}");
        assert_eq!(replayed["tasks"][0]["id"], id.as_str());
        assert_eq!(replayed["tasks"][0]["idempotent_replay"], true);
        // A key repeated within the batch answers its first task there.
        let tenth = replayed["tasks"][2]["id"].as_str().expect("id").to_owned();
        assert!(replayed["tasks"][2].get("idempotent_replay").is_none());
        assert_eq!(replayed["tasks"][3]["id"], tenth.as_str());
        assert_eq!(replayed["tasks"][3]["idempotent_replay"], true);
        let (_, task) = second_gw.get(&format!("/v1/tasks/{id}?wait=30s")).await;
        assert_eq!(task["status"], "succeeded");
        assert_eq!(task["result"], json!({"order": 7}));

        // Four tasks were produced in all: order-7 once, order-8, the
        // batch's second, and order-10 once.
        let records = kafka.read_records(&pipeline.input, 4, TIMEOUT).await;
        assert_eq!(records.len(), 4);
        first_gw.stop().await;
        second_gw.stop().await;
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_stop_signal_the_gateway_serves_through_its_shutdown_delay_while_not_ready() {
    init_logs();
    let kafka = TestKafka::mock();
    let (pipeline, mut settings) = setup(&kafka).await;
    settings.gateway.shutdown_delay_ms = 5_000;
    let gateway = RunningGateway::start(&settings).await;
    let body = r#"{"type": "echo", "payload": 1}"#;
    gateway.gateway.signal();
    // Not ready from the signal on (a Service drops it from its endpoints)...
    let (mut status, mut answer) = gateway.get("/readyz").await;
    while status == 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        (status, answer) = gateway.get("/readyz").await;
    }
    assert_eq!(status, 503, "{answer}");
    assert!(answer.to_string().contains("shutdown_delay_ms"), "{answer}");
    // ...while every route still serves what reaches it.
    let (status, answer, _) = gateway.post("/v1/tasks", body, &[]).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(gateway.get("/healthz").await.0, 200);
    let base = gateway.base.clone();
    gateway.stop().await;
    // Then the listener closed.
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err());
    let written: i64 = kafka.end_offsets(&pipeline.input).values().sum();
    assert_eq!(written, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_tokens_guard_the_api_when_configured() {
    init_logs();
    let kafka = TestKafka::mock();
    let (pipeline, mut settings) = setup(&kafka).await;
    let body = r#"{"type": "echo", "payload": 1}"#;

    // Off: no header needed.
    let open = RunningGateway::start(&settings).await;
    let (status, _, _) = open.post("/v1/tasks", body, &[]).await;
    assert_eq!(status, 202);
    open.stop().await;

    settings.gateway.auth_tokens = vec![
        "first-token-0123456789".into(),
        "second-token-0123456789".into(),
    ];
    let guarded = RunningGateway::start(&settings).await;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-token-0123456789")],
        vec![("authorization", "Basic Zmlyc3QtdG9rZW4=")],
        vec![("authorization", "Bearer first-token-012345678")],
    ] {
        let (status, answer, response_headers) = guarded.post("/v1/tasks", body, &headers).await;
        assert_eq!(status, 401, "{headers:?}: {answer}");
        assert_eq!(error_of(&answer).0, "unauthorized");
        assert_eq!(
            response_headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
    }
    let (status, answer) = guarded
        .get("/v1/tasks/00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!(status, 401, "{answer}");
    for token in ["first-token-0123456789", "second-token-0123456789"] {
        let bearer = format!("Bearer {token}");
        let (status, answer, _) = guarded
            .post("/v1/tasks", body, &[("authorization", bearer.as_str())])
            .await;
        assert_eq!(status, 202, "{answer}");
    }
    // Probes and metrics stay open.
    assert_eq!(guarded.get("/healthz").await.0, 200);
    assert_eq!(guarded.get("/readyz").await.0, 200);
    assert_eq!(guarded.get("/metrics").await.0, 200);
    // One task from the open gateway, two with tokens; none refused.
    let written: i64 = kafka.end_offsets(&pipeline.input).values().sum();
    assert_eq!(written, 3);
    guarded.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_down_a_submission_is_answered_503_and_nothing_is_written() {
    init_logs();
    // Only the mock cluster can be taken down from a test.
    let kafka = TestKafka::mock();
    common::announce(&format!(
        "with_the_broker_down…: runs against {} only (it takes the broker down)",
        kafka.describe()
    ));
    let (pipeline, mut settings) = setup(&kafka).await;
    settings.gateway.produce_timeout_ms = 1_500;
    let gw = RunningGateway::start(&settings).await;
    let cluster = kafka.mock_cluster().expect("mock");
    cluster.broker_down(1).expect("broker down");
    let (status, answer, _) = gw
        .post("/v1/tasks", r#"{"type": "echo", "payload": 1}"#, &[])
        .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(error_of(&answer).0, "broker_unavailable");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not acknowledge")),
        "{answer}"
    );
    // librdkafka's own words stay in the gateway's log.
    assert!(
        !answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Local:") || m.contains(&pipeline.input)),
        "{answer}"
    );
    let (status, ready) = gw.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    cluster.broker_up(1).expect("broker up");
    // Ready again, and the refused task was never written, even late.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while gw.get("/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written: i64 = kafka.end_offsets(&pipeline.input).values().sum();
    assert_eq!(written, 0, "the refused task was written");
    // And the gateway works again.
    let (status, answer, _) = gw
        .post("/v1/tasks", r#"{"type": "echo", "payload": 1}"#, &[])
        .await;
    assert_eq!(status, 202, "{answer}");
    let written: i64 = kafka.end_offsets(&pipeline.input).values().sum();
    assert_eq!(written, 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_report_themselves_and_the_gateway_lists_them_live_then_stopped() {
    init_logs();
    for kafka in
        TestKafka::all("workers_report_themselves_and_the_gateway_lists_them_live_then_stopped")
    {
        let (pipeline, mut settings) = setup(&kafka).await;
        common::with_workers(&kafka, &mut settings).await;
        settings.metrics.lag_interval_ms = 200;
        // The real worker (App, as `conveyor worker` runs it): its
        // processors and its reports.
        let stop = conveyor::shutdown::CancellationToken::new();
        let app = tokio::spawn(
            conveyor::app::App::from_settings(settings.clone()).run_until(stop.clone()),
        );
        let gw = RunningGateway::start(&settings).await;
        let id = gw.submit(json!({"type": "echo", "payload": 7})).await;
        let (_, task) = gw.get(&format!("/v1/tasks/{id}?wait=30s")).await;
        assert_eq!(task["status"], "succeeded", "{task}");

        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let listed = loop {
            let (status, body) = gw.get("/v1/workers").await;
            assert_eq!(status, 200, "{body}");
            let ready = body["workers"].as_array().is_some_and(|w| {
                w.len() == 1
                    && w[0]["state"] == "live"
                    && w[0]["processors"][0]["finished"].as_u64() >= Some(1)
                    && w[0]["processors"][0]["partitions"]
                        .as_array()
                        .is_some_and(|p| p.len() >= pipeline.partitions as usize)
            });
            if ready {
                break body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker was not listed with its task and partitions: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let worker = &listed["workers"][0];
        assert_eq!(worker["pid"], std::process::id());
        assert_eq!(worker["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(worker["stopped"], false);
        let processor = &worker["processors"][0];
        assert_eq!(processor["name"], settings.processors[0].name.as_str());
        assert_eq!(
            processor["assigned"].as_u64(),
            Some(pipeline.partitions as u64)
        );
        let mut input_partitions: Vec<i64> = processor["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter(|p| p["topic"] == pipeline.input.as_str())
            .map(|p| p["partition"].as_i64().expect("a partition"))
            .collect();
        input_partitions.sort_unstable();
        assert_eq!(
            input_partitions,
            (0..i64::from(pipeline.partitions)).collect::<Vec<_>>(),
            "{processor}"
        );
        assert_eq!(processor["in_flight"], 0);
        assert_eq!(processor["breaker_open"], false);

        // Stopped cleanly: its last report says so.
        stop.cancel();
        app.await.expect("the worker task").expect("the worker ran");
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let (_, body) = gw.get("/v1/workers").await;
            if body["workers"][0]["state"] == "stopped" {
                assert_eq!(body["workers"].as_array().map(Vec::len), Some(1));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stopped worker was not listed as stopped: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        gw.stop().await;
    }
}
