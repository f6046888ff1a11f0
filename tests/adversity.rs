//! Bounded under adversity, with workers in this process: the progress
//! metadata of commits (used when it is conveyor's own for that offset,
//! ignored otherwise), the bound on uncommitted records behind a stuck
//! head, dead letters too large for their topic, and the worker's health
//! probes. The crash-time behaviour (SIGKILL behind a stuck head, a
//! producer that is refused) is in tests/process.rs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use common::{header, ids, requests, wait_until, InProcessWorker, TestKafka};
use conveyor::codec::{Codec, TaskRequest, TaskStatus};
use conveyor::handlers::{Handler, HandlerError, Output, Registry, TaskContext};
use conveyor::progress;
use conveyor::settings::{HandlerKind, Ordering};
use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

const LONG: Duration = Duration::from_secs(120);

/// Produces `count` echo requests to `partition` of `topic`, in order;
/// returns them (their offsets are 0.. on a fresh topic).
async fn produce_to(
    kafka: &TestKafka,
    topic: &str,
    partition: i32,
    count: usize,
) -> Vec<TaskRequest> {
    let codec = Codec::default();
    let producer = kafka.producer();
    let sent = requests("echo", "{}", count);
    for request in &sent {
        let mut value = Vec::new();
        codec.encode_request(request, &mut value);
        let delivery = kafka
            .send(
                &producer,
                topic,
                request.id.to_string().as_bytes(),
                &value,
                Some(partition),
            )
            .await;
        delivery.await.expect("delivered").expect("acknowledged");
    }
    sent
}

/// Commits `offset` with `metadata` for each partition, as `group`.
fn commit_with_metadata(kafka: &TestKafka, group: &str, topic: &str, commits: &[(i32, i64, &str)]) {
    let consumer: BaseConsumer =
        conveyor::kafka::consumer_config(&kafka.settings().kafka, group, 6_000)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
    let mut list = TopicPartitionList::new();
    for (partition, offset, metadata) in commits {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .expect("partition");
        list.find_partition(topic, *partition)
            .expect("just added")
            .set_metadata(metadata);
    }
    consumer.commit(&list, CommitMode::Sync).expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_metadata_is_used_only_when_it_is_conveyors_own_for_that_offset() {
    // The mock cluster keeps commit metadata; nisshi 0.8.1 drops it (the
    // fallback there is shown in tests/process.rs).
    let kafka = TestKafka::mock();
    common::announce(&format!(
        "commit_metadata_is_used_only_when_it_is_conveyors_own_for_that_offset: runs against {}",
        kafka.describe()
    ));
    let pipeline = kafka.pipeline(4).await;
    let mut sent = Vec::new();
    for p in 0..4 {
        sent.push(produce_to(&kafka, &pipeline.input, p, 10).await);
    }
    let valid = progress::encode(4, [(6, 8)], progress::MAX_METADATA).metadata;
    let truncated = valid[..valid.len() - 3].to_owned();
    let for_another_offset = progress::encode(5, [(6, 8)], progress::MAX_METADATA).metadata;
    commit_with_metadata(
        &kafka,
        &pipeline.group,
        &pipeline.input,
        &[
            (0, 4, "hello, not conveyor's"),
            (1, 4, &truncated),
            (2, 4, &for_another_offset),
            (3, 4, &valid),
        ],
    );
    let stored = kafka.committed_with_metadata(&pipeline.group, &pipeline.input);
    assert_eq!(
        stored[&3],
        (4, valid.clone()),
        "the broker keeps commit metadata"
    );

    let settings = kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
    let worker = InProcessWorker::start(&settings, "worker", None);
    // Every record from the committed offset 4 on runs, except offsets 6
    // and 7 of partition 3, which the valid blob says finished.
    let skipped: HashSet<_> = [sent[3][6].id, sent[3][7].id].into();
    let expected: HashSet<_> = sent
        .iter()
        .flat_map(|p| p[4..].iter().map(|r| r.id))
        .filter(|id| !skipped.contains(id))
        .collect();
    let results = kafka
        .collect_results(&pipeline.output, &expected, LONG)
        .await;
    wait_until("every partition committed to its end", LONG, || {
        kafka
            .committed(&pipeline.group, &pipeline.input)
            .values()
            .all(|&o| o == 10)
    })
    .await;
    let m = worker.metrics.clone();
    worker.stop().await;
    let ran: HashSet<_> = results.by_id.keys().copied().collect();
    assert_eq!(ran, expected, "exactly the records not finished before ran");
    assert_eq!(m.records_skipped.with_label_values(&["test"]).get(), 2);
    let restored = |outcome| {
        m.progress_restored
            .with_label_values(&["test", outcome])
            .get()
    };
    assert_eq!(
        restored("invalid"),
        3,
        "garbage, truncated, another offset's"
    );
    assert_eq!(restored("used"), 1);
    assert_eq!(restored("missing"), 0);
}

/// `gate` tasks: payload `head` waits until the gate opens; every other
/// payload answers at once.
struct Gate {
    open: AtomicBool,
}

impl Handler for Gate {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            if task.payload == b"head" {
                while !self.open.load(AtomicOrdering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok(Output {
                bytes: task.payload.clone(),
                content_type: "text/plain".into(),
            })
        }
        .boxed()
    }
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_uncommitted_window_holds_at_its_bound_behind_a_stuck_head_and_resumes() {
    const BEHIND: usize = 2_000;
    const BOUND: usize = 100;
    for kafka in
        TestKafka::all("the_uncommitted_window_holds_at_its_bound_behind_a_stuck_head_and_resumes")
    {
        let pipeline = kafka.pipeline(1).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("gate", HandlerKind::Echo)]);
        settings.processors[0].max_uncommitted_per_partition = BOUND;
        settings.processors[0]
            .tasks
            .get_mut("gate")
            .expect("gate")
            .timeout_ms = 600_000;
        let head = requests("gate", "head", 1);
        let behind = requests("gate", "fast", BEHIND);
        kafka.produce_requests(&pipeline.input, &head).await;
        kafka.produce_requests(&pipeline.input, &behind).await;
        let gate = Arc::new(Gate {
            open: AtomicBool::new(false),
        });
        let mut registry = Registry::from_settings(&settings.processors[0]).expect("registry");
        registry.register("gate", gate.clone());
        let worker = InProcessWorker::start(&settings, "worker", Some(registry));

        // Everything dispatched at or above the head counts: the head and
        // BOUND - 1 records behind it, which finish; then nothing more.
        wait_until("the records within the bound finished", LONG, || {
            worker.status.finished() == BOUND - 1
        })
        .await;
        let rss_before = rss_kib();
        let mut most = 0;
        for _ in 0..20 {
            most = most.max(worker.status.finished());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss_after = rss_kib();
        common::announce(&format!(
            "uncommitted bound {BOUND} on {}: {} finished behind the stuck head over 2 s with {BEHIND} waiting; RSS {} → {} KiB",
            kafka.describe(),
            most,
            rss_before,
            rss_after
        ));
        assert_eq!(most, BOUND - 1, "nothing past the bound was read");
        assert_eq!(
            kafka
                .committed(&pipeline.group, &pipeline.input)
                .get(&0)
                .copied()
                .unwrap_or(0),
            0,
            "the head holds the committed offset"
        );

        gate.open.store(true, AtomicOrdering::SeqCst);
        let mut all = ids(&head);
        all.extend(ids(&behind));
        let results = kafka.collect_results(&pipeline.output, &all, LONG).await;
        wait_until("everything committed", LONG, || {
            kafka.committed(&pipeline.group, &pipeline.input).get(&0) == Some(&(BEHIND as i64 + 1))
        })
        .await;
        worker.stop().await;
        assert_eq!(results.by_id.len(), BEHIND + 1);
        assert_eq!(results.duplicates(), 0);
        assert!(results.all().all(|r| r.status == TaskStatus::Succeeded));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_too_large_for_its_topic_is_cut_marked_and_committed() {
    for kafka in TestKafka::all("a_dead_letter_too_large_for_its_topic_is_cut_marked_and_committed")
    {
        let pipeline = kafka.pipeline(2).await;
        let mut settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        // The producer refuses records over 2,000 bytes, as a topic with a
        // small max.message.bytes would.
        settings
            .kafka
            .options
            .insert("message.max.bytes".into(), "2000".into());
        // No handler for `nobody`: each fails for good and is dead-lettered
        // with its 3,000-byte payload.
        let big = "z".repeat(3_000);
        let doomed = requests("nobody", &big, 3);
        let fine = requests("echo", "{}", 5);
        kafka.produce_requests(&pipeline.input, &doomed).await;
        kafka.produce_requests(&pipeline.input, &fine).await;
        let worker = InProcessWorker::start(&settings, "worker", None);
        let mut expected = ids(&doomed);
        expected.extend(ids(&fine));
        let results = kafka
            .collect_results(&pipeline.output, &expected, LONG)
            .await;
        kafka.wait_committed(&pipeline, 8, LONG).await;
        worker.stop().await;
        for task in &doomed {
            let r = &results.by_id[&task.id][0];
            assert_eq!(r.status, TaskStatus::Failed);
            assert_eq!(
                r.error.as_ref().map(|e| e.kind.as_str()),
                Some("unknown_type")
            );
        }
        let letters = kafka.read_records(&pipeline.dead_letter, 3, LONG).await;
        assert_eq!(letters.len(), 3, "one dead letter each");
        let codec = Codec::default();
        let original_size = {
            let mut v = Vec::new();
            codec.encode_request(&doomed[0], &mut v);
            v.len()
        };
        for letter in &letters {
            use rdkafka::message::Message;
            let value = letter.payload().unwrap_or_default();
            assert!(value.len() < 2_000, "cut to fit: {} bytes", value.len());
            assert!(!value.is_empty());
            assert_eq!(
                header(letter, "conveyor.original.size").as_deref(),
                Some(original_size.to_string().as_str()),
                "marked with the size before cutting"
            );
            assert_eq!(
                header(letter, "conveyor.error.kind").as_deref(),
                Some("unknown_type")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthz_fails_while_the_poll_loop_is_blocked_and_recovers_after() {
    for kafka in TestKafka::all("healthz_fails_while_the_poll_loop_is_blocked_and_recovers_after") {
        let pipeline = kafka.pipeline(2).await;
        let settings =
            kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
        let worker = InProcessWorker::start(&settings, "worker", None);
        let health = conveyor::health::WorkerHealth {
            processors: vec![("test".into(), worker.status.clone())],
            stall: Duration::from_millis(1_000),
        };
        let (address, server) =
            conveyor::metrics::serve("127.0.0.1:0", worker.metrics.clone(), Some(health))
                .await
                .expect("serve");
        let http = reqwest::Client::new();
        let probe = |path: &'static str| {
            let http = http.clone();
            async move {
                let response = http
                    .get(format!("http://{address}{path}"))
                    .send()
                    .await
                    .expect("probe answered");
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
        };
        let deadline = tokio::time::Instant::now() + LONG;
        loop {
            let (ready, _) = probe("/readyz").await;
            let (live, _) = probe("/healthz").await;
            if ready == 200 && live == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready: {ready}/{live}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        worker.status.hold_poll_loop(true);
        let stalled = loop {
            let (status, body) = probe("/healthz").await;
            if status == 503 {
                break body;
            }
            assert!(tokio::time::Instant::now() < deadline, "never unhealthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            stalled.contains("processor `test`: the poll loop has not gone round for"),
            "{stalled}"
        );
        worker.status.hold_poll_loop(false);
        loop {
            let (status, _) = probe("/healthz").await;
            if status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never healthy again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.abort();
        worker.stop().await;
    }
}
