//! Gateway load check: submit throughput (requests/s) and the latency of
//! `POST /v1/tasks` under a closed-loop concurrent HTTP load generator.
//!
//! ```sh
//! cargo bench --bench gateway                                # mock cluster
//! cargo bench --bench gateway -- --brokers 127.0.0.1:9092 --seconds 10
//! ```
//!
//! Options: `--seconds S` per level (5), `--concurrency 1,16,64` (the
//! levels), `--payload BYTES` (200). `BENCH_OPTS` adds librdkafka
//! properties (`linger.ms=0,…`) to the gateway's producer.
//!
//! Each request is answered only after the broker acknowledged the task
//! (acks=all), so latency includes the producer's linger (librdkafka's
//! default 5 ms) and the broker's round trip. The load generator, the
//! gateway and (with the mock cluster) the broker share this machine's
//! cores: the figures are of the whole, not of the gateway alone. Not a
//! test: nothing is asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that cannot run stops

mod common;

use conveyor::shutdown::CancellationToken;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::metrics::Metrics;
use conveyor::settings::Settings;

struct Options {
    brokers: Option<String>,
    seconds: u64,
    levels: Vec<usize>,
    payload: usize,
}

fn options() -> Options {
    let mut o = Options {
        brokers: None,
        seconds: 5,
        levels: vec![1, 16, 64],
        payload: 200,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--brokers" => o.brokers = Some(value()),
            "--seconds" => o.seconds = value().parse().unwrap_or(o.seconds),
            "--payload" => o.payload = value().parse().unwrap_or(o.payload),
            "--concurrency" => {
                let levels: Vec<usize> = value()
                    .split(',')
                    .filter_map(|v| v.trim().parse().ok())
                    .collect();
                if !levels.is_empty() {
                    o.levels = levels;
                }
            }
            _ => {} // cargo bench passes --bench
        }
    }
    o
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let task_topic = format!("bench-gw-tasks-{suffix}");
        let results = format!("bench-gw-results-{suffix}");
        let (_cluster, brokers) =
            common::broker_with_topics(o.brokers.as_deref(), &[&task_topic, &results], 8).await;
        let mut settings = Settings::default();
        settings.kafka.brokers = brokers.clone();
        if let Ok(extra) = std::env::var("BENCH_OPTS") {
            for pair in extra.split(',').filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once('=') {
                    settings.kafka.options.insert(k.into(), v.into());
                }
            }
        }
        settings.topics.results = results;
        settings.topics.task_prefix = String::new();
        settings.gateway.task_types = vec![task_topic.clone()];
        settings.gateway.listen = "127.0.0.1:0".into();
        // Submissions only: no delay tiers, events or control topics.
        settings.delays.enabled = false;
        settings.events.enabled = false;
        settings.cancel.enabled = false;
        settings.workers.enabled = false;
        let stop = CancellationToken::new();
        let gateway = conveyor::gateway::start(&settings, Arc::new(Metrics::new()), stop.clone())
            .await
            .expect("gateway starts");
        let url = format!("http://{}/v1/tasks", gateway.address());
        let body = serde_json::json!({
            "type": task_topic,
            "payload": {"data": "x".repeat(o.payload.saturating_sub(12))},
        })
        .to_string();
        println!(
            "gateway load check: {} · POST /v1/tasks, {}-byte bodies, {} s per level, commit {}",
            if o.brokers.is_some() {
                format!("external broker at {brokers}")
            } else {
                "in-process mock cluster".to_owned()
            },
            body.len(),
            o.seconds,
            std::env::var("BENCH_COMMIT").unwrap_or_else(|_| "(set BENCH_COMMIT to label)".into()),
        );
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()
            .expect("client");
        // Warm up: the idempotent producer needs its producer id first.
        for _ in 0..20 {
            let _ = client.post(&url).body(body.clone()).send().await;
        }
        println!(
            "{:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
            "concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors"
        );
        for &level in &o.levels {
            let until = Instant::now() + Duration::from_secs(o.seconds);
            let mut clients = tokio::task::JoinSet::new();
            for _ in 0..level {
                let client = client.clone();
                let url = url.clone();
                let body = body.clone();
                clients.spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0usize;
                    while Instant::now() < until {
                        let started = Instant::now();
                        let ok = match client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await
                        {
                            Ok(r) => r.status().as_u16() == 202 && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        if ok {
                            latencies.push(started.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                    (latencies, errors)
                });
            }
            let started = Instant::now();
            let mut latencies = Vec::new();
            let mut errors = 0;
            while let Some(joined) = clients.join_next().await {
                let (l, e) = joined.expect("client task");
                latencies.extend(l);
                errors += e;
            }
            let elapsed = started.elapsed().as_secs_f64();
            latencies.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            println!(
                "{:>11} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                level,
                latencies.len() as f64 / elapsed,
                ms(quantile(&latencies, 0.5)),
                ms(quantile(&latencies, 0.9)),
                ms(quantile(&latencies, 0.99)),
                ms(quantile(&latencies, 0.999)),
                errors
            );
        }
        stop.cancel();
        gateway.finished().await.expect("gateway stops");
    });
}
