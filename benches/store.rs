//! The gateway's status store at size: one `conveyor gateway` process (the
//! real binary) ingesting 1,000,000 results, its resident memory at 10,000
//! and at 1,000,000, disk bytes per task, ingest rate, restart time with
//! the store full, random lookups at 64 concurrent connections and list
//! queries at both sizes.
//!
//! ```sh
//! cargo bench --bench store                                  # mock cluster
//! cargo bench --bench store -- --brokers 127.0.0.1:9092
//! cargo bench --bench store -- --results 200000 --seconds 5
//! ```
//!
//! The broker (with the mock cluster, this process), the producer of the
//! results, the load generator and the gateway share the machine's cores:
//! rates are of the whole. Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that cannot run stops

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::codec::{now_millis, Codec, TaskError, TaskResult, TaskStatus};
use conveyor::settings::Settings;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

const TYPES: [&str; 4] = ["resize", "email", "report", "sync"];

struct Options {
    brokers: Option<String>,
    results: usize,
    seconds: u64,
}

fn options() -> Options {
    let mut o = Options {
        brokers: None,
        results: 1_000_000,
        seconds: 10,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--brokers" => o.brokers = Some(value()),
            "--results" => o.results = value().parse().unwrap_or(o.results),
            "--seconds" => o.seconds = value().parse().unwrap_or(o.seconds),
            _ => {}
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

fn result(i: usize) -> TaskResult {
    let failed = i.is_multiple_of(10);
    TaskResult {
        id: Uuid::new_v4(),
        task_type: TYPES[i % TYPES.len()].into(),
        status: if failed {
            TaskStatus::Failed
        } else {
            TaskStatus::Succeeded
        },
        output: (!failed).then(|| {
            format!("{{\"n\":{i},\"url\":\"https://example.com/out/{i:08}.png\",\"ok\":true}}")
                .into_bytes()
        }),
        content_type: "application/json".into(),
        error: failed.then(|| TaskError {
            kind: "handler".into(),
            message: "the upstream answered 502".into(),
        }),
        attempts: 1,
        started_at: now_millis() - 20,
        finished_at: now_millis(),
        worker: "bench-worker-1".into(),
        workflow: None,
    }
}

async fn produce(brokers: &str, topic: &str, from: usize, to: usize) -> Vec<Uuid> {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .expect("producer");
    let codec = Codec::default();
    let mut ids = Vec::with_capacity(to - from);
    let mut pending = Vec::new();
    for i in from..to {
        let r = result(i);
        ids.push(r.id);
        let mut value = Vec::new();
        codec.encode_result(&r, &mut value);
        let key = r.id.to_string();
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&value)) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(_), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
        if pending.len() >= 100_000 {
            for d in pending.drain(..) {
                d.await.expect("delivered").expect("acknowledged");
            }
        }
    }
    for d in pending {
        d.await.expect("delivered").expect("acknowledged");
    }
    ids
}

struct Gateway {
    child: Child,
    port: u16,
}

impl Gateway {
    fn start(config: &Path, port: u16) -> Gateway {
        let child = Command::new(env!("CARGO_BIN_EXE_conveyor"))
            .args(["gateway", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("gateway starts");
        Gateway { child, port }
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }

    async fn ready(&self, http: &reqwest::Client) {
        loop {
            let ok = http
                .get(format!("http://127.0.0.1:{}/readyz", self.port))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, http: &reqwest::Client, name: &str) -> f64 {
        let text = http
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Starts it and waits until it is ready: how long that took and how
    /// many records it applied meanwhile.
    async fn timed_start(
        config: &Path,
        port: u16,
        http: &reqwest::Client,
    ) -> (Gateway, Duration, f64) {
        let started = Instant::now();
        let gateway = Gateway::start(config, port);
        gateway.ready(http).await;
        let took = started.elapsed();
        let applied = gateway
            .metric(http, "conveyor_gateway_store_applied_total")
            .await;
        (gateway, took, applied)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// The store's files: the database, its write-ahead log and its index.
fn store_files(store: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    ["", "-wal", "-shm"].into_iter().map(move |suffix| {
        let mut name = store.to_path_buf().into_os_string();
        name.push(suffix);
        PathBuf::from(name)
    })
}

/// Removes the store's files.
fn remove_store(store: &Path) {
    for file in store_files(store) {
        let _ = std::fs::remove_file(file);
    }
}

/// Median and p99 of a list query (`query`), asked `times` times in a row,
/// and of following its cursor 10 pages deep.
async fn list_timing(http: &reqwest::Client, port: u16, query: &str) -> String {
    let mut took = Vec::new();
    for _ in 0..200 {
        let at = Instant::now();
        let r = http
            .get(format!("http://127.0.0.1:{port}/v1/tasks?{query}"))
            .send()
            .await
            .expect("list");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
        took.push(at.elapsed());
    }
    took.sort();
    let mut cursor: Option<String> = None;
    let deep = Instant::now();
    for _ in 0..10 {
        let url = match &cursor {
            Some(c) => format!("http://127.0.0.1:{port}/v1/tasks?{query}&cursor={c}"),
            None => format!("http://127.0.0.1:{port}/v1/tasks?{query}"),
        };
        let body: serde_json::Value = serde_json::from_slice(
            &http
                .get(url)
                .send()
                .await
                .expect("page")
                .bytes()
                .await
                .expect("body"),
        )
        .expect("json");
        cursor = body["next_cursor"].as_str().map(str::to_owned);
    }
    format!(
        "median {:.2} ms, p99 {:.2} ms; 10 pages by cursor {:.1} ms",
        quantile(&took, 0.5).as_secs_f64() * 1e3,
        quantile(&took, 0.99).as_secs_f64() * 1e3,
        deep.elapsed().as_secs_f64() * 1e3
    )
}

/// The dashboard's task list (`/ui/tasks`, 50 rows rendered as HTML) with
/// `query`: median and p99 of 200 loads, and the page's size.
async fn page_timing(http: &reqwest::Client, port: u16, query: &str) -> String {
    let mut took = Vec::new();
    let mut size = 0;
    for _ in 0..200 {
        let at = Instant::now();
        let r = http
            .get(format!("http://127.0.0.1:{port}/ui/tasks?{query}"))
            .send()
            .await
            .expect("page");
        assert_eq!(r.status(), 200);
        size = r.bytes().await.expect("body").len();
        took.push(at.elapsed());
    }
    took.sort();
    format!(
        "median {:.2} ms, p99 {:.2} ms, {size} bytes",
        quantile(&took, 0.5).as_secs_f64() * 1e3,
        quantile(&took, 0.99).as_secs_f64() * 1e3,
    )
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let suffix = Uuid::new_v4().simple().to_string();
        let task_topic = format!("bench-store-tasks-{suffix}");
        let results = format!("bench-store-results-{suffix}");
        let (_cluster, brokers) =
            common::broker_with_topics(o.brokers.as_deref(), &[&task_topic, &results], 8).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let store: PathBuf = std::env::temp_dir().join(format!("conveyor-bench-store-{suffix}.db"));
        let mut settings = Settings::default();
        settings.kafka.brokers = brokers.clone();
        settings.topics.results = results.clone();
        settings.topics.task_prefix = String::new();
        settings.gateway.task_types = vec![task_topic.clone()];
        settings.gateway.listen = format!("127.0.0.1:{port}");
        settings.gateway.store_path = store.display().to_string();
        settings.metrics.listen = String::new();
        settings.delays.enabled = false;
        settings.events.enabled = false;
        settings.cancel.enabled = false;
        settings.workers.enabled = false;
        let config = std::env::temp_dir().join(format!("conveyor-bench-store-{suffix}.toml"));
        std::fs::write(&config, settings.to_toml().expect("toml")).expect("config");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(128)
            .build()
            .expect("client");
        println!(
            "status store check: {} · {} results, 8 partitions, ~90-byte outputs",
            if o.brokers.is_some() {
                format!("external broker at {brokers}")
            } else {
                "in-process mock cluster".to_owned()
            },
            o.results
        );

        // 10,000 results, then the gateway: caught up and idle.
        let small = 10_000.min(o.results);
        let mut ids = produce(&brokers, &results, 0, small).await;
        let gateway = Gateway::start(&config, port);
        gateway.ready(&http).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_small = gateway.rss_mib();
        let list_small = list_timing(&http, port, "type=email&status=succeeded&limit=100").await;
        println!("at {small}: RSS {rss_small:.1} MiB; list type+status, 100 per page: {list_small}");
        let page_small = page_timing(&http, port, "type=email&status=succeeded").await;
        println!("at {small}: dashboard task list (type+status, 50 rows): {page_small}");
        // The rest produced in chunks of 100,000 while it runs, each
        // applied before the next (librdkafka's mock cluster keeps only
        // the latest records of a partition, some 25,000 here: a backlog
        // larger than that would be lost to the store before it is read).
        let ingest = Instant::now();
        let mut produced = small;
        while produced < o.results {
            let next = (produced + 100_000).min(o.results);
            ids.extend(produce(&brokers, &results, produced, next).await);
            produced = next;
            loop {
                let applied = gateway
                    .metric(&http, "conveyor_gateway_store_applied_total")
                    .await;
                if applied as usize >= produced {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let took = ingest.elapsed();
        println!(
            "ingest: {} results produced and applied in {:.1} s: {:.0} results/s (the producer \
             sharing the cores)",
            o.results - small,
            took.as_secs_f64(),
            (o.results - small) as f64 / took.as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_big = gateway.rss_mib();
        // The database and its write-ahead log (not the shared-memory index).
        let disk: u64 = store_files(&store)
            .take(2)
            .map(|file| std::fs::metadata(file).map(|m| m.len()).unwrap_or(0))
            .sum();
        let list_big = list_timing(&http, port, "type=email&status=succeeded&limit=100").await;
        let page_big = page_timing(&http, port, "type=email&status=succeeded").await;
        println!("at {}: dashboard task list (type+status, 50 rows): {page_big}", o.results);
        println!(
            "at {}: RSS {rss_big:.1} MiB ({:+.0} % against {small}); disk {:.1} MiB, {:.0} bytes per task; \
             list type+status, 100 per page: {list_big}",
            o.results,
            (rss_big / rss_small - 1.0) * 100.0,
            disk as f64 / (1 << 20) as f64,
            disk as f64 / o.results as f64
        );

        // Random lookups, old ones included, at 64 connections.
        let ids = Arc::new(ids);
        let deadline = Instant::now() + Duration::from_secs(o.seconds);
        let mut clients = Vec::new();
        for c in 0..64u64 {
            let http = http.clone();
            let ids = ids.clone();
            clients.push(tokio::spawn(async move {
                let mut took = Vec::new();
                let mut missing = 0usize;
                let mut rng = fastrand::Rng::with_seed(c);
                while Instant::now() < deadline {
                    let id = ids[rng.usize(..ids.len())];
                    let at = Instant::now();
                    let r = http
                        .get(format!("http://127.0.0.1:{port}/v1/tasks/{id}"))
                        .send()
                        .await
                        .expect("lookup");
                    let ok = r.status() == 200;
                    r.bytes().await.expect("body");
                    took.push(at.elapsed());
                    if !ok {
                        missing += 1;
                    }
                }
                (took, missing)
            }));
        }
        let mut took = Vec::new();
        let mut missing = 0;
        for c in clients {
            let (t, m) = c.await.expect("client");
            took.extend(t);
            missing += m;
        }
        took.sort();
        println!(
            "lookups of random ids at 64 connections: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {missing} not 200",
            took.len() as f64 / o.seconds as f64,
            quantile(&took, 0.5).as_secs_f64() * 1e3,
            quantile(&took, 0.99).as_secs_f64() * 1e3
        );
        gateway.stop();

        // A restart with the store full: ready without re-reading.
        let (gateway, took, applied) = Gateway::timed_start(&config, port, &http).await;
        println!(
            "restart with {} results kept: ready in {:.2} s, {applied} records read again",
            o.results,
            took.as_secs_f64()
        );
        gateway.stop();

        // A wiped replica: rebuilt from what the topics still hold (all of
        // it on a real broker; the mock cluster keeps only the latest
        // records of each partition). The ingest rate without a producer.
        remove_store(&store);
        let (gateway, took, applied) = Gateway::timed_start(&config, port, &http).await;
        println!(
            "rebuild of a wiped store: {applied} records applied in {:.1} s from start to ready: \
             {:.0} records/s",
            took.as_secs_f64(),
            applied / took.as_secs_f64()
        );
        gateway.stop();
        remove_store(&store);
        let _ = std::fs::remove_file(&config);
    });
}
