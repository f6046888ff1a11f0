//! The gateway's status store against a real broker: results kept past the
//! in-memory view's bounds and found by id, list queries paged by cursor
//! with no task repeated or skipped while results keep arriving, outputs
//! kept cut with their size, retention removing a task from disk, bad list
//! queries refused naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{unique, Pipeline, TestGateway, TestKafka};
use conveyor::codec::{now_millis, TaskError, TaskResult, TaskStatus};
use conveyor::metrics::Metrics;
use conveyor::settings::{HandlerKind, Ordering, Settings};
use serde_json::Value;
use uuid::Uuid;

const TIMEOUT: Duration = Duration::from_secs(60);

fn settings(kafka: &TestKafka, pipeline: &Pipeline) -> Settings {
    let mut settings = kafka.worker_settings(
        pipeline,
        Ordering::None,
        &[("a", HandlerKind::Echo), ("b", HandlerKind::Echo)],
    );
    // The in-memory view keeps 50 tasks: every other lookup is the store's.
    settings.gateway.view_max_tasks = 50;
    settings.gateway.store_max_output_bytes = 64;
    settings.gateway.store_path = std::env::temp_dir()
        .join(format!("{}.db", unique("conveyor-store")))
        .display()
        .to_string();
    settings
}

fn result(task_type: &str, status: TaskStatus, finished_at: i64, output: &[u8]) -> TaskResult {
    TaskResult {
        id: Uuid::new_v4(),
        task_type: task_type.into(),
        status,
        output: (status == TaskStatus::Succeeded).then(|| output.to_vec()),
        content_type: "application/json".into(),
        error: (status == TaskStatus::Failed).then(|| TaskError {
            kind: "handler".into(),
            message: "no".into(),
        }),
        attempts: 1,
        started_at: finished_at,
        finished_at,
        worker: "w".into(),
        workflow: None,
    }
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    common::json_answer(http.get(url).send().await.expect("answered")).await
}

async fn ready(http: &reqwest::Client, base: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (status, body) = get(http, &format!("{base}/readyz")).await;
        if status == 200 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `GET /v1/tasks/{id}` knows `id` as terminal.
async fn wait_known(http: &reqwest::Client, base: &str, id: Uuid) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (status, body) = get(http, &format!("{base}/v1/tasks/{id}")).await;
        if status == 200 && body["status"] != "queued" {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every page of `query`, following `next_cursor`, with `between` run
/// after each page.
async fn pages(
    http: &reqwest::Client,
    base: &str,
    query: &str,
    mut between: impl AsyncFnMut(),
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1_000 {
        let url = match &cursor {
            Some(c) => format!("{base}/v1/tasks?{query}&cursor={c}"),
            None => format!("{base}/v1/tasks?{query}"),
        };
        let (status, body) = get(http, &url).await;
        assert_eq!(status, 200, "{url}: {body}");
        ids.extend(
            body["tasks"]
                .as_array()
                .expect("tasks")
                .iter()
                .map(|t| t["id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
        between().await;
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return ids,
        }
    }
    panic!("more than 1000 pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_past_the_view_are_found_and_listed_page_by_page_while_more_arrive() {
    for kafka in TestKafka::all("results_past_the_view_are_found_and_listed_page_by_page") {
        let pipeline = kafka.pipeline(2).await;
        let settings = settings(&kafka, &pipeline);
        let http = reqwest::Client::new();
        // 400 results, a and b, succeeded and failed, one ms apart, two
        // hours old (older than the old one-hour view) to now.
        let start = now_millis() - 2 * 3_600_000;
        let first: Vec<TaskResult> = (0..400)
            .map(|i| {
                let status = if i % 3 == 0 {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Succeeded
                };
                let task_type = if i % 2 == 0 { "a" } else { "b" };
                result(
                    task_type,
                    status,
                    start + i,
                    format!("{{\"i\":{i}}}").as_bytes(),
                )
            })
            .collect();
        kafka.produce_results(&pipeline.output, &first).await;
        let gateway = TestGateway::start(&settings, Arc::new(Metrics::new())).await;
        let base = gateway.base.clone();
        ready(&http, &base).await;

        // The oldest, long gone from the 50-task view, is found.
        let oldest = wait_known(&http, &base, first[0].id).await;
        assert_eq!(oldest["status"], "failed", "{oldest}");
        assert_eq!(oldest["finished_at"], first[0].finished_at);
        let second = wait_known(&http, &base, first[1].id).await;
        assert_eq!(second["result"]["i"], 1, "{second}");
        // Its event stream: its status, then its end, from the store.
        let stream = http
            .get(format!("{base}/v1/tasks/{}/events", first[0].id))
            .timeout(TIMEOUT)
            .send()
            .await
            .expect("stream answered");
        assert_eq!(stream.status().as_u16(), 200);
        let text = stream.text().await.expect("stream read to its end");
        let events: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event:"))
            .map(str::trim)
            .collect();
        assert_eq!(events, ["status", "failed"], "{text}");
        assert!(
            text.contains("id: end") || text.contains("id:end"),
            "{text}"
        );

        // Every succeeded task of type a, newest first, 7 per page, while
        // newer results keep arriving between the pages.
        let mut expected: Vec<&TaskResult> = first
            .iter()
            .filter(|r| r.task_type == "a" && r.status == TaskStatus::Succeeded)
            .collect();
        expected.sort_by_key(|r| std::cmp::Reverse(r.finished_at));
        let expected: Vec<Uuid> = expected.iter().map(|r| r.id).collect();
        let mut arrived = Vec::new();
        let listed = pages(
            &http,
            &base,
            "type=a&status=succeeded&limit=7",
            async || {
                let more = result("a", TaskStatus::Succeeded, now_millis(), b"{}");
                arrived.push(more.id);
                kafka.produce_results(&pipeline.output, &[more]).await;
            },
        )
        .await;
        let unique: HashSet<&Uuid> = listed.iter().collect();
        assert_eq!(unique.len(), listed.len(), "a task listed twice");
        // The pages began before the new ones: those that were read in
        // time head the list; everything after is exactly the expected.
        let tail: Vec<Uuid> = listed
            .iter()
            .copied()
            .filter(|id| !arrived.contains(id))
            .collect();
        assert_eq!(tail, expected, "{}", kafka.describe());

        // Time filters, and a page of one: the newest of type b before a
        // time.
        let until = start + 101;
        let (status, body) = get(
            &http,
            &format!("{base}/v1/tasks?type=b&since={start}&until={until}&limit=1"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["tasks"][0]["id"], first[99].id.to_string(), "{body}");
        assert!(body["next_cursor"].is_string());

        // An output above store_max_output_bytes is kept cut, with its size.
        let long = result(
            "a",
            TaskStatus::Succeeded,
            now_millis(),
            format!("\"{}\"", "x".repeat(200)).as_bytes(),
        );
        kafka
            .produce_results(&pipeline.output, std::slice::from_ref(&long))
            .await;
        // Past the view's 50 tasks, so the answer is the store's.
        let filler: Vec<TaskResult> = (0..60)
            .map(|_| result("b", TaskStatus::Succeeded, now_millis(), b"{}"))
            .collect();
        kafka.produce_results(&pipeline.output, &filler).await;
        wait_known(&http, &base, filler[59].id).await;
        let cut = wait_known(&http, &base, long.id).await;
        assert_eq!(cut["result_truncated"]["size"], 202, "{cut}");
        assert_eq!(cut["result_truncated"]["kept"], 64, "{cut}");
        assert_eq!(cut["result"].as_str().map(str::len), Some(64), "{cut}");

        // Refusals name the parameter.
        for (query, field) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("cursor=%21%21", "cursor"),
            ("since=20&until=10", "since"),
            ("status=done", "status"),
        ] {
            let (status, body) = get(&http, &format!("{base}/v1/tasks?{query}")).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert_eq!(body["error"]["field"], field, "{query}: {body}");
        }
        gateway.stop().await;
        let _ = std::fs::remove_file(&settings.gateway.store_path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_retention_answers_404_and_is_gone_from_disk() {
    for kafka in TestKafka::all("a_task_past_retention_answers_404_and_is_gone_from_disk") {
        let pipeline = kafka.pipeline(1).await;
        let mut settings = settings(&kafka, &pipeline);
        settings.gateway.retention_ms = 4_000;
        let gateway = TestGateway::start(&settings, Arc::new(Metrics::new())).await;
        let base = gateway.base.clone();
        let http = reqwest::Client::new();
        ready(&http, &base).await;
        let task = result("a", TaskStatus::Succeeded, now_millis(), b"1");
        kafka
            .produce_results(&pipeline.output, std::slice::from_ref(&task))
            .await;
        wait_known(&http, &base, task.id).await;
        let kept = |id: Uuid| on_disk(&settings.gateway.store_path).1.contains(&id);
        common::wait_until("the task written to disk", TIMEOUT, || kept(task.id)).await;
        // Retention is counted from the task's latest record (its finish).
        common::wait_until("the task removed after retention", TIMEOUT, || {
            !kept(task.id)
        })
        .await;
        let waited = now_millis() - task.finished_at;
        assert!(
            waited >= 4_000,
            "removed after {waited} ms, before retention"
        );
        let (status, body) = get(&http, &format!("{base}/v1/tasks/{}", task.id)).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "unknown_task");
        gateway.stop().await;
        let _ = std::fs::remove_file(&settings.gateway.store_path);
    }
}

/// The store's applied offsets summed, and its tasks, read from the file.
fn on_disk(path: &str) -> (i64, HashSet<Uuid>) {
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("store opens");
    let offsets: i64 = db
        .query_row("SELECT coalesce(sum(next), 0) FROM offsets", [], |row| {
            row.get(0)
        })
        .expect("offsets");
    let mut statement = db.prepare("SELECT id FROM tasks").expect("select");
    let ids = statement
        .query_map([], |row| row.get::<_, Vec<u8>>(0))
        .expect("ids")
        .map(|id| Uuid::from_slice(&id.expect("id")).expect("uuid"))
        .collect();
    (offsets, ids)
}

fn start_gateway(config: &std::path::Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("log"))
        .expect("log file");
    std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["gateway", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("CONVEYOR_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start conveyor gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_ingest_leaves_a_store_that_resumes_from_its_offsets() {
    const RESULTS: usize = 100_000;
    for kafka in
        TestKafka::all("a_sigkill_during_ingest_leaves_a_store_that_resumes_from_its_offsets")
    {
        let pipeline = kafka.pipeline(4).await;
        let mut settings = settings(&kafka, &pipeline);
        let port = common::free_port();
        settings.gateway.listen = format!("127.0.0.1:{port}");
        let config = common::config_file(&settings);
        let sent: Vec<TaskResult> = (0..RESULTS)
            .map(|i| {
                result(
                    "a",
                    TaskStatus::Succeeded,
                    now_millis(),
                    format!("{i}").as_bytes(),
                )
            })
            .collect();
        kafka.produce_results(&pipeline.output, &sent).await;
        let sent_ids: HashSet<Uuid> = sent.iter().map(|r| r.id).collect();

        // Killed while it applies the backlog.
        let mut gateway = start_gateway(&config);
        let applied = "conveyor_gateway_store_applied_total";
        common::wait_until_async("the gateway applied 10,000 results", TIMEOUT, async || {
            common::metric(port, applied).await.unwrap_or(0.0) >= 10_000.0
        })
        .await;
        gateway.kill().expect("SIGKILL");
        gateway.wait().expect("reaped");
        let (offsets, rows) = on_disk(&settings.gateway.store_path);
        assert!(
            (offsets as usize) < RESULTS,
            "the backlog was applied before the kill ({offsets}); make it longer"
        );
        // Every result is one task: rows and offsets move together.
        assert_eq!(
            rows.len() as i64,
            offsets,
            "{}: rows and offsets differ",
            kafka.describe()
        );
        assert!(rows.is_subset(&sent_ids));

        // The restart reads only what the store had not applied.
        let restarted = std::time::Instant::now();
        let mut gateway = start_gateway(&config);
        common::wait_until_async("the restarted gateway ready", TIMEOUT, async || {
            reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        let ready_after = restarted.elapsed();
        let reapplied = common::metric(port, applied).await.unwrap_or(0.0) as i64;
        gateway.kill().expect("SIGKILL");
        gateway.wait().expect("reaped");
        let (offsets_after, rows_after) = on_disk(&settings.gateway.store_path);
        common::announce(&format!(
            "{}: SIGKILL after {offsets} of {RESULTS} results applied; the restart applied {reapplied} \
             more and was ready in {ready_after:?}",
            kafka.describe()
        ));
        assert_eq!(
            reapplied,
            RESULTS as i64 - offsets,
            "the restart re-read what was applied"
        );
        assert_eq!(offsets_after, RESULTS as i64);
        assert_eq!(
            rows_after, sent_ids,
            "the store holds exactly the results on the topic"
        );
        let _ = std::fs::remove_file(&settings.gateway.store_path);
    }
}
