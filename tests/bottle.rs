//! The Bottle example end to end: a Python web app submits a task through
//! the gateway, conveyor's `http` handler runs it by calling the same app,
//! and the app shows the result it looked up through the gateway.
//!
//! Skipped, saying so, when python3 or Bottle is missing, unless
//! `CONVEYOR_REQUIRE_BOTTLE` is set (CI sets it, so there it fails instead).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::{init_logs, InProcessWorker, TestGateway, TestKafka};
use conveyor::metrics::Metrics;
use conveyor::settings::{HandlerKind, Ordering, TaskSettings};
use serde_json::{json, Value};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/bottle/app.py");

struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the app and waits until it says it listens.
fn start_app(port: u16, gateway: &str) -> App {
    let mut child = Command::new("python3")
        .arg(APP)
        .env("PORT", port.to_string())
        .env("CONVEYOR_GATEWAY", gateway)
        // The app uses the Python client of this repository.
        .env(
            "PYTHONPATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/src"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3");
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the app's first line");
    assert!(line.starts_with("listening on"), "the app printed: {line}");
    App(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bottle_round_trip() {
    init_logs();
    if !common::python_module_available(
        "bottle_round_trip",
        "bottle",
        "CONVEYOR_REQUIRE_BOTTLE",
        "pip install -r examples/bottle/requirements.txt",
    ) {
        return;
    }
    for kafka in TestKafka::all("bottle_round_trip") {
        let port = common::free_port();
        let pipeline = kafka.pipeline(2).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        settings.processors[0].tasks.insert(
            "reverse".into(),
            TaskSettings {
                url: Some(format!("http://127.0.0.1:{port}/tasks/reverse")),
                ..TaskSettings::new(HandlerKind::Http)
            },
        );
        settings.topics.results = pipeline.output.clone();
        let worker = InProcessWorker::start(&settings, "bottle-test", None);
        let gateway = TestGateway::start(&settings, Arc::new(Metrics::new())).await;
        let app = start_app(port, &gateway.base);
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");

        let ask = |path: String, body: Option<Value>| {
            let http = http.clone();
            let url = format!("{base}{path}");
            async move {
                let request = match body {
                    Some(body) => http
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body.to_string()),
                    None => http.get(url),
                };
                let response = request.send().await.expect("the app answers");
                let status = response.status().as_u16();
                let text = response.text().await.expect("body");
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
                (status, value)
            }
        };

        // The web app submits through the gateway and answers at once…
        let (status, submitted) = ask("/reverse".into(), Some(json!({"text": "conveyor"}))).await;
        assert_eq!(status, 202, "{submitted}");
        let id = submitted["id"].as_str().expect("id").to_owned();
        // …the worker calls the app's handler endpoint, and the app shows
        // the result it looked up through the gateway.
        let (status, task) = ask(format!("/result/{id}"), None).await;
        assert_eq!(status, 200, "{task}");
        assert_eq!(task["status"], "succeeded", "{task}");
        assert_eq!(task["result"], json!({"reversed": "royevnoc", "length": 8}));

        // The Python handler refusing a payload (422) fails the task for
        // good, with its answer as the error.
        let (status, submitted) = ask("/reverse".into(), Some(json!({"text": null}))).await;
        assert_eq!(status, 202, "{submitted}");
        let id = submitted["id"].as_str().expect("id").to_owned();
        let (_, task) = ask(format!("/result/{id}"), None).await;
        assert_eq!(task["status"], "failed", "{task}");
        assert_eq!(task["error"]["kind"], "permanent");
        assert!(
            task["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("payload.text must be a string")),
            "{task}"
        );

        drop(app);
        gateway.stop().await;
        worker.stop().await;
    }
}
