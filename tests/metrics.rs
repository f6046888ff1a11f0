//! Metrics that tell the truth: a known mix of outcomes, scraped from
//! `/metrics` over HTTP and parsed as Prometheus text, gives exact counts;
//! consumer lag shows a backlog and its draining, and a member's lag series
//! follow its partitions through a rebalance; a request's traceparent
//! reaches its result. Against the mock cluster and, when configured, the
//! external broker.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{ids, requests, wait_until, InProcessWorker, TestGateway, TestKafka};
use conveyor::codec::{Codec, TaskRequest, TaskStatus};
use conveyor::handlers::{Handler, HandlerError, Output, Registry, TaskContext};
use conveyor::metrics::{self, Metrics};
use conveyor::settings::{HandlerKind, Ordering};
use futures::future::BoxFuture;
use futures::FutureExt;
use prometheus_parse::{Scrape, Value};

const LONG: Duration = Duration::from_secs(120);

/// Payload `ok` succeeds, `flaky` fails its first attempt (retryable),
/// `bad` fails for good.
struct Mix;

impl Handler for Mix {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            match (&task.payload[..], task.attempt) {
                (b"bad", _) => Err(HandlerError::Permanent("bad task".into())),
                (b"flaky", 1) => Err(HandlerError::Retryable("first attempt fails".into())),
                _ => Ok(Output {
                    bytes: b"done".to_vec(),
                    content_type: "text/plain".into(),
                }),
            }
        }
        .boxed()
    }
}

/// Scrapes `/metrics` served for `metrics` over real HTTP, and parses it.
async fn scrape(metrics: &Arc<Metrics>) -> Scrape {
    let (address, server) = metrics::serve("127.0.0.1:0", metrics.clone(), None)
        .await
        .expect("serve");
    let text = reqwest::get(format!("http://{address}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    server.abort();
    parse_scrape(&text)
}

/// Parses a text exposition, failing the test if it is not one.
fn parse_scrape(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The value of `name` with exactly these labels (a histogram's count).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {} series", found.len());
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_known_mix_gives_exact_counters_and_histogram_counts() {
    const N: usize = 20;
    const M: usize = 10;
    const K: usize = 5;
    for kafka in TestKafka::all("a_known_mix_gives_exact_counters_and_histogram_counts") {
        let pipeline = kafka.pipeline(2).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("mix", HandlerKind::Echo)]);
        settings.processors[0].initial_backoff_ms = 50;
        settings.metrics.lag_interval_ms = 200;
        let mut registry = Registry::new();
        registry.register("mix", Arc::new(Mix));
        let mut sent = requests("mix", "ok", N);
        sent.extend(requests("mix", "flaky", M));
        sent.extend(requests("mix", "bad", K));
        // And one record that is not a task at all.
        let producer = kafka.producer();
        let junk = kafka
            .send(&producer, &pipeline.input, b"junk", b"\x01junk", None)
            .await;
        junk.await.unwrap().unwrap();
        kafka.produce_requests(&pipeline.input, &sent).await;

        let worker = InProcessWorker::start(&settings, "worker", Some(registry));
        kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        wait_until("every record finished", LONG, || {
            worker.status.finished() == N + M + K + 1
        })
        .await;
        scrape_until("lag series exist", &worker.metrics, |s| {
            !lag_partitions(s, metrics::PROCESSING_LAG).is_empty()
        })
        .await;
        let s = scrape(&worker.metrics).await;
        worker.stop().await;

        let p = ("processor", "test");
        let t = ("task_type", "mix");
        let unknown = ("task_type", metrics::UNKNOWN_TYPE);
        let all = (N + M + K) as f64;
        assert_eq!(value(&s, metrics::TASKS_CONSUMED, &[p, t]), all);
        assert_eq!(value(&s, metrics::TASKS_CONSUMED, &[p, unknown]), 1.0);
        assert_eq!(value(&s, metrics::TASKS_SUCCEEDED, &[p, t]), (N + M) as f64);
        assert_eq!(
            value(&s, metrics::TASKS_FAILED, &[p, t, ("kind", "permanent")]),
            K as f64
        );
        assert_eq!(
            value(&s, metrics::TASKS_FAILED, &[p, unknown, ("kind", "decode")]),
            1.0
        );
        assert_eq!(
            value(&s, metrics::TASKS_RETRIED, &[p, t, ("via", "in_place")]),
            M as f64
        );
        assert_eq!(
            value(
                &s,
                metrics::TASKS_DEAD_LETTERED,
                &[p, t, ("kind", "permanent")]
            ),
            K as f64
        );
        assert_eq!(
            value(
                &s,
                metrics::TASKS_DEAD_LETTERED,
                &[p, unknown, ("kind", "decode")]
            ),
            1.0
        );
        // Every failed attempt once, by kind; the other kinds at zero.
        let errors = |kind| value(&s, metrics::ERRORS, &[p, ("kind", kind)]);
        assert_eq!(errors("retryable"), M as f64);
        assert_eq!(errors("permanent"), K as f64);
        assert_eq!(errors("decode"), 1.0);
        for kind in [
            "timeout",
            "panic",
            "unknown_type",
            "fatal",
            "produce",
            "commit",
        ] {
            assert_eq!(errors(kind), 0.0, "{kind}");
        }
        // One observation per attempt, by outcome.
        let duration =
            |outcome| value(&s, metrics::HANDLER_DURATION, &[p, t, ("outcome", outcome)]);
        assert_eq!(duration("success"), (N + M) as f64);
        assert_eq!(duration("retryable"), M as f64);
        assert_eq!(duration("permanent"), K as f64);
        // One latency observation per terminal result: N + M + K.
        assert_eq!(value(&s, metrics::TASK_LATENCY, &[p, t]), all);
        assert_eq!(
            value(&s, metrics::RECORDS_PRODUCED, &[p, ("record", "result")]),
            all
        );
        assert_eq!(
            value(
                &s,
                metrics::RECORDS_PRODUCED,
                &[p, ("record", "dead_letter")]
            ),
            (K + 1) as f64
        );
        assert_eq!(value(&s, metrics::TASKS_IN_FLIGHT, &[p]), 0.0);
        // Two input partitions and the two of its retry topic.
        assert_eq!(value(&s, metrics::PARTITIONS_ASSIGNED, &[p]), 4.0);
        assert_eq!(value(&s, metrics::BREAKER_OPEN, &[p]), 0.0);
        assert_eq!(
            value(&s, metrics::REBALANCE_EVENTS, &[p, ("event", "assigned")]),
            4.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_metrics_off_tasks_run_and_nothing_is_recorded() {
    const N: usize = 50;
    // Whether recording happens does not depend on the broker.
    let kafka = TestKafka::mock();
    let pipeline = kafka.pipeline(2).await;
    let mut settings =
        kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
    settings.metrics.enabled = false;
    settings.metrics.lag_interval_ms = 200;
    let sent = requests("echo", "{}", N);
    kafka.produce_requests(&pipeline.input, &sent).await;
    let worker = InProcessWorker::start(&settings, "worker", None);
    let results = kafka
        .collect_results(&pipeline.output, &ids(&sent), LONG)
        .await;
    assert_eq!(results.by_id.len(), N);
    wait_until("every task finished", LONG, || {
        worker.status.finished() == N
    })
    .await;
    // Long enough for several statistics intervals had they been on.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!worker.metrics.enabled());
    let s = scrape(&worker.metrics).await;
    worker.stop().await;
    let p = ("processor", "test");
    let t = ("task_type", "echo");
    assert_eq!(value(&s, metrics::TASKS_CONSUMED, &[p, t]), 0.0);
    assert_eq!(value(&s, metrics::TASKS_SUCCEEDED, &[p, t]), 0.0);
    assert_eq!(
        value(&s, metrics::RECORDS_PRODUCED, &[p, ("record", "result")]),
        0.0
    );
    assert_eq!(value(&s, metrics::PARTITIONS_ASSIGNED, &[p]), 0.0);
    assert_eq!(
        value(&s, metrics::REBALANCE_EVENTS, &[p, ("event", "assigned")]),
        0.0
    );
    for name in [
        metrics::HANDLER_DURATION,
        metrics::TASK_LATENCY,
        metrics::COMMITTED_LAG,
        metrics::PROCESSING_LAG,
    ] {
        assert!(
            s.samples.iter().all(|x| x.metric != name),
            "{name} was recorded with metrics off"
        );
    }
}

/// Scrapes the gateway's own `/metrics` at `base`.
async fn scrape_gateway(http: &reqwest::Client, base: &str) -> Scrape {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    parse_scrape(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_requests_are_counted_and_every_deploy_name_is_exported() {
    for kafka in TestKafka::all("gateway_requests_are_counted_and_every_deploy_name_is_exported") {
        let pipeline = kafka.pipeline(2).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::None,
            &[("echo", HandlerKind::Echo), ("sleep", HandlerKind::Sleep)],
        );
        settings.metrics.lag_interval_ms = 200;
        settings.processors[0].max_attempts = 1;
        let worker = InProcessWorker::start(&settings, "worker", None);
        // The worker's registry: one /metrics shows both, as in `conveyor dev`.
        let gateway = TestGateway::start(&settings, worker.metrics.clone()).await;
        let base = gateway.base.clone();
        let http = reqwest::Client::new();
        let post = |body: &'static str| {
            let request = http
                .post(format!("{base}/v1/tasks"))
                .header("content-type", "application/json")
                .body(body);
            async move {
                let response = request.send().await.expect("POST answered");
                let status = response.status().as_u16();
                (status, response.text().await.expect("body"))
            }
        };
        let (status, first) = post(r#"{"type": "echo", "payload": 1}"#).await;
        assert_eq!(status, 202, "{first}");
        assert_eq!(post(r#"{"type": "echo", "payload": 2}"#).await.0, 202);
        assert_eq!(post(r#"{"type": "nope", "payload": 3}"#).await.0, 422);
        // Fails for good, so the failure and dead-letter series exist too.
        assert_eq!(
            post(r#"{"type": "sleep", "payload": {"msec": 1}}"#).await.0,
            202
        );
        let id = serde_json::from_str::<serde_json::Value>(&first).expect("JSON")["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let answer = http
            .get(format!("{base}/v1/tasks/{id}?wait=30s"))
            .send()
            .await
            .expect("GET answered");
        assert_eq!(answer.status().as_u16(), 200);
        let missing = http
            .get(format!(
                "{base}/v1/tasks/00000000-0000-4000-8000-000000000000"
            ))
            .send()
            .await
            .expect("GET answered");
        assert_eq!(missing.status().as_u16(), 404);

        // Lag series come from the worker's statistics and the view gauge
        // from the gateway's housekeeping: wait for both.
        let deadline = tokio::time::Instant::now() + LONG;
        let s = loop {
            let s = scrape_gateway(&http, &base).await;
            let view_tasks = s
                .samples
                .iter()
                .find(|x| x.metric == metrics::GATEWAY_VIEW_TASKS)
                .map(|x| matches!(x.value, Value::Gauge(v) if v == 3.0));
            if view_tasks == Some(true) && !lag_partitions(&s, metrics::PROCESSING_LAG).is_empty() {
                break s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no lag series or view gauge of 3 tasks"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let route = |r| ("route", r);
        let requests = |r, status| {
            value(
                &s,
                metrics::GATEWAY_REQUESTS,
                &[route(r), ("status", status)],
            )
        };
        assert_eq!(requests("/v1/tasks", "202"), 3.0);
        assert_eq!(requests("/v1/tasks", "422"), 1.0);
        assert_eq!(requests("/v1/tasks/:id", "200"), 1.0);
        assert_eq!(requests("/v1/tasks/:id", "404"), 1.0);
        assert_eq!(
            value(&s, metrics::GATEWAY_REQUEST_DURATION, &[route("/v1/tasks")]),
            4.0
        );
        assert_eq!(
            value(
                &s,
                metrics::GATEWAY_TASKS_SUBMITTED,
                &[("task_type", "echo")]
            ),
            2.0
        );
        deploy_files_use_only_exported_names(&s);

        gateway.stop().await;
        worker.stop().await;
    }
}

/// Scrapes until `condition` holds, or panics after a while naming `what`.
async fn scrape_until(what: &str, metrics: &Arc<Metrics>, condition: impl Fn(&Scrape) -> bool) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        if condition(&scrape(metrics).await) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every `conveyor_…` name in the Grafana dashboard and the alert rules is a
/// metric the worker or the gateway exports (histogram series by their base name).
fn deploy_files_use_only_exported_names(scrape: &Scrape) {
    let base = |name: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name)
            .to_owned()
    };
    let exported: HashSet<String> = scrape.samples.iter().map(|s| base(&s.metric)).collect();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut used = HashSet::new();
    for file in [
        "deploy/grafana/conveyor.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect("deploy file");
        let mut rest = text.as_str();
        while let Some(at) = rest.find("conveyor_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            used.insert((file, base(&tail[..end])));
            rest = &tail[end..];
        }
    }
    assert!(
        used.len() >= 15,
        "the deploy files use the metrics: {used:?}"
    );
    let unknown: Vec<_> = used
        .iter()
        .filter(|(_, name)| !exported.contains(name))
        .collect();
    assert!(
        unknown.is_empty(),
        "names the worker and gateway do not export: {unknown:?}"
    );
}

/// The topic-partitions a scrape has lag series for.
fn lag_partitions(scrape: &Scrape, name: &str) -> HashSet<(String, String)> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter_map(|s| {
            let topic = s.labels.get("topic")?;
            let partition = s.labels.get("partition")?;
            Some((topic.to_owned(), partition.to_owned()))
        })
        .collect()
}

fn lag_total(scrape: &Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            Value::Gauge(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_shows_a_backlog_draining_and_follows_partitions_through_a_rebalance() {
    const TASKS: usize = 400;
    common::init_logs();
    for kafka in
        TestKafka::all("lag_shows_a_backlog_draining_and_follows_partitions_through_a_rebalance")
    {
        let pipeline = kafka.pipeline(4).await;
        let mut settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[("sleep", HandlerKind::Sleep)],
        );
        settings.metrics.lag_interval_ms = 200;
        let sent = requests("sleep", r#"{"ms":10}"#, TASKS);
        kafka.produce_requests(&pipeline.input, &sent).await;

        let a = InProcessWorker::start(&settings, "worker-a", None);
        // A backlog: lag is visible in both forms.
        scrape_until("lag shows the backlog", &a.metrics, |s| {
            lag_total(s, metrics::PROCESSING_LAG) > 0.0
                && lag_total(s, metrics::COMMITTED_LAG) > 0.0
        })
        .await;

        // A second member takes some partitions: the first keeps lag series
        // only for the partitions it still owns.
        let b = InProcessWorker::start(&settings, "worker-b", None);
        wait_until("b owns partitions", LONG, || {
            b.status.assigned_partitions() > 0
        })
        .await;
        scrape_until("a's lag series match its partitions", &a.metrics, |s| {
            let series = lag_partitions(s, metrics::COMMITTED_LAG);
            series.len() == a.status.assigned_partitions()
                && lag_partitions(s, metrics::PROCESSING_LAG).len() == series.len()
        })
        .await;
        assert!(a.status.assigned_partitions() < 8, "a gave partitions to b");

        // The backlog drains: lag returns to zero on every owned partition.
        kafka
            .collect_results(&pipeline.output, &ids(&sent), LONG)
            .await;
        for w in [&a, &b] {
            scrape_until("lag drains to zero", &w.metrics, |s| {
                !lag_partitions(s, metrics::COMMITTED_LAG).is_empty()
                    && lag_total(s, metrics::COMMITTED_LAG) == 0.0
                    && lag_total(s, metrics::PROCESSING_LAG) == 0.0
            })
            .await;
        }
        b.stop().await;
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_requests_traceparent_reaches_its_result() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for kafka in TestKafka::all("a_requests_traceparent_reaches_its_result") {
        let pipeline = kafka.pipeline(1).await;
        let settings = kafka.worker_settings(
            &pipeline,
            Ordering::Partition,
            &[("echo", HandlerKind::Echo)],
        );
        let request = TaskRequest::new("echo", b"{}".to_vec());
        let mut value = Vec::new();
        Codec::default().encode_request(&request, &mut value);
        let producer = kafka.producer();
        let record = rdkafka::producer::FutureRecord::to(&pipeline.input)
            .key(request.id.as_bytes())
            .payload(&value)
            .headers(
                rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                    key: "traceparent",
                    value: Some(TRACEPARENT),
                }),
            );
        producer
            .send(record, Duration::from_secs(30))
            .await
            .expect("produced");
        let worker = InProcessWorker::start(&settings, "worker", None);
        let records = kafka.read_records(&pipeline.output, 1, LONG).await;
        worker.stop().await;
        let codec = Codec::default();
        use rdkafka::message::Message;
        let result = codec.decode_result(records[0].payload().unwrap()).unwrap();
        assert_eq!(result.id, request.id);
        assert_eq!(result.status, TaskStatus::Succeeded);
        assert_eq!(
            common::header(&records[0], "traceparent").as_deref(),
            Some(TRACEPARENT)
        );
    }
}
