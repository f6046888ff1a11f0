//! Periodic schedules (#26): what `GET /v1/schedules` and `conveyor
//! schedules list` show, read from the schedule topic. (Firing, failover
//! and misfires run the real binary: tests/process.rs.) Mock cluster, and
//! the external broker when `CONVEYOR_TEST_BROKERS` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TestGateway, TestKafka};
use conveyor::codec::now_millis;
use conveyor::schedule::{rfc3339, Fired};
use conveyor::settings::{HandlerKind, Misfire, Ordering, ScheduleSettings, Settings};
use rdkafka::producer::FutureRecord;
use serde_json::Value;

fn schedule(name: &str, cron: &str, misfire: Misfire) -> ScheduleSettings {
    ScheduleSettings {
        name: name.into(),
        cron: cron.into(),
        timezone: "Europe/Paris".into(),
        task_type: "echo".into(),
        payload: "{}".into(),
        key: None,
        misfire,
        misfire_grace_ms: 60_000,
        max_catch_up: 100,
        jitter_ms: 0,
    }
}

/// `conveyor schedules list` run on `settings`.
fn schedules_list(settings: &Settings) -> std::process::Output {
    let config = common::config_file(settings);
    let output = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["schedules", "list", "--config"])
        .arg(&config)
        .env_remove("CONVEYOR_CONFIG")
        .output()
        .expect("run conveyor schedules list");
    let _ = std::fs::remove_file(&config);
    output
}

async fn record(kafka: &TestKafka, topic: &str, fired: &Fired) {
    let payload = serde_json::to_vec(fired).unwrap();
    kafka
        .producer()
        .send(
            FutureRecord::to(topic)
                .key(&fired.schedule)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .expect("recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_listed_with_their_last_tick_and_next_fire_time() {
    for kafka in TestKafka::all("schedules_are_listed_with_their_last_tick_and_next_fire_time") {
        let pipeline = kafka.pipeline(1).await;
        let mut settings: Settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        settings.scheduler.topic = common::unique("schedules");
        kafka.create_named_topic(&settings.scheduler.topic, 1).await;
        settings
            .schedules
            .push(schedule("nightly", "30 2 * * *", Misfire::FireOnce));
        settings
            .schedules
            .push(schedule("never-seen", "*/5 * * * * *", Misfire::Skip));
        settings.validate().expect("valid");
        // Two ticks of `nightly` (the later one counts) and one of a
        // schedule no longer configured (not shown).
        let yesterday = now_millis() - 86_400_000;
        for (schedule, tick) in [
            ("nightly", yesterday - 86_400_000),
            ("nightly", yesterday),
            ("removed", yesterday),
        ] {
            let fired = Fired {
                schedule: schedule.into(),
                tick,
                at: tick,
            };
            record(&kafka, &settings.scheduler.topic, &fired).await;
        }

        let gateway = TestGateway::start(
            &settings,
            std::sync::Arc::new(conveyor::metrics::Metrics::new()),
        )
        .await;
        let response = reqwest::get(format!("{}/v1/schedules", gateway.base))
            .await
            .expect("GET /v1/schedules");
        assert_eq!(response.status(), 200);
        let body: Value =
            serde_json::from_slice(&response.bytes().await.expect("a body")).expect("JSON");

        // A schedule's task carries the idempotency key of its tick: a
        // submission with that key (a duplicate of the tick, say) is
        // answered with the tick's task.
        let schedules = conveyor::schedule::Schedule::all(&settings).expect("schedules");
        let tick = yesterday;
        let task = schedules[0].task(tick);
        let mut value = Vec::new();
        conveyor::codec::Codec::default().encode_request(&task, &mut value);
        kafka
            .producer()
            .send(
                FutureRecord::to(&pipeline.input)
                    .key(&task.id.to_string())
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
        let http = reqwest::Client::new();
        // Once the status view has read it (the gateway follows the task
        // topic)...
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = http
                .get(format!("{}/v1/tasks/{}", gateway.base, task.id))
                .send()
                .await
                .expect("GET answered")
                .status();
            if status == 200 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the view never read the task"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // ... a submission with its tick's key is answered with it.
        let body_text = serde_json::json!({
            "type": "echo",
            "payload": {},
            "idempotency_key": format!("schedule:nightly:{tick}"),
        })
        .to_string();
        let answer: Value = serde_json::from_slice(
            &http
                .post(format!("{}/v1/tasks", gateway.base))
                .header("content-type", "application/json")
                .body(body_text)
                .send()
                .await
                .expect("POST answered")
                .bytes()
                .await
                .expect("a body"),
        )
        .expect("JSON");
        assert_eq!(answer["id"], task.id.to_string(), "{answer}");
        gateway.stop().await;
        let listed = body["schedules"].as_array().expect("a list");
        assert_eq!(listed.len(), 2, "{body}");
        let nightly = &listed[0];
        assert_eq!(nightly["name"], "nightly");
        assert_eq!(nightly["cron"], "30 2 * * *");
        assert_eq!(nightly["timezone"], "Europe/Paris");
        assert_eq!(nightly["misfire"], "fire_once");
        assert_eq!(nightly["last_fired"], rfc3339(yesterday).as_str());
        let next = nightly["next"].as_str().expect("a next fire time");
        // The tick after the last recorded one (due already, or ahead).
        assert!(next > rfc3339(yesterday).as_str(), "{next}");
        let seen = &listed[1];
        assert_eq!(seen["name"], "never-seen");
        assert_eq!(seen["last_fired"], Value::Null);
        assert!(
            seen["next"].as_str().expect("next") >= rfc3339(now_millis() - 1_000).as_str(),
            "{seen}"
        );

        // The command line shows the same, one JSON object per line.
        let output = schedules_list(&settings);
        assert!(output.status.success(), "{output:?}");
        let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["name"], "nightly");
        assert_eq!(lines[0]["last_fired"], rfc3339(yesterday).as_str());
        assert_eq!(lines[1]["last_fired"], Value::Null);
    }
}

#[test]
fn schedules_list_without_schedules_says_so() {
    let output = schedules_list(&Settings::default());
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "conveyor: the configuration has no [[schedules]]\n"
    );
}
