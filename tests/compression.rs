//! A worker reads task records compressed with each codec Kafka producers
//! use (gzip, snappy, lz4, zstd: managed clusters and other clients often
//! compress), on the mock cluster and the external broker, and runs every
//! task exactly once (zstd needs rdkafka's `zstd` feature, in Cargo.toml).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{InProcessWorker, TestKafka, SETUP_TIMEOUT};
use conveyor::codec::{Codec, TaskRequest};
use conveyor::settings::{HandlerKind, Ordering};
use uuid::Uuid;

const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];
const PER_CODEC: usize = 50;

#[tokio::test]
async fn tasks_compressed_with_every_codec_are_read_and_run_once() {
    for kafka in TestKafka::all("compression") {
        every_codec(&kafka).await;
    }
}

async fn every_codec(kafka: &TestKafka) {
    let pipeline = kafka.pipeline(2).await;
    let codec = Codec::default();
    let mut expected = HashSet::new();
    let mut payloads = std::collections::HashMap::new();
    for name in CODECS {
        let producer: rdkafka::producer::FutureProducer =
            conveyor::kafka::producer_config(&kafka.settings().kafka)
                .set("compression.type", name)
                // Batches of many records, so that each is compressed.
                .set("linger.ms", "50")
                .create()
                .unwrap_or_else(|e| panic!("a producer compressing with {name}: {e}"));
        let mut deliveries = Vec::new();
        for n in 0..PER_CODEC {
            // Repetitive text compresses well: the batch is really encoded.
            let payload = format!(
                r#"{{"codec":"{name}","n":{n},"text":"{}"}}"#,
                "abc".repeat(200)
            );
            let request = TaskRequest::new("echo", payload.clone().into_bytes());
            let mut value = Vec::new();
            codec.encode_request(&request, &mut value);
            let key = request.id.to_string();
            deliveries.push(
                kafka
                    .send(&producer, &pipeline.input, key.as_bytes(), &value, None)
                    .await,
            );
            expected.insert(request.id);
            payloads.insert(request.id, payload);
        }
        for delivery in deliveries {
            tokio::time::timeout(SETUP_TIMEOUT, delivery)
                .await
                .expect("acknowledged in time")
                .expect("not cancelled")
                .unwrap_or_else(|(e, _)| panic!("{}: producing {name}: {e}", kafka.describe()));
        }
    }
    let settings = kafka.worker_settings(&pipeline, Ordering::None, &[("echo", HandlerKind::Echo)]);
    let mut worker = InProcessWorker::start(&settings, "compression", None);
    let results = worker
        .alongside(kafka.collect_results(&pipeline.output, &expected, Duration::from_secs(60)))
        .await;
    worker.stop().await;
    let mut ran: std::collections::BTreeMap<String, usize> = Default::default();
    for (id, copies) in &results.by_id {
        let result = &copies[0];
        assert!(expected.contains(id));
        assert_eq!(
            result.status,
            conveyor::codec::TaskStatus::Succeeded,
            "{result:?}"
        );
        let output = String::from_utf8(result.output.clone().unwrap_or_default()).unwrap();
        assert_eq!(Some(&output), payloads.get::<Uuid>(id));
        let v: serde_json::Value = serde_json::from_str(&output).unwrap();
        *ran.entry(v["codec"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(results.duplicates(), 0, "{}", kafka.describe());
    let want: std::collections::BTreeMap<String, usize> = CODECS
        .iter()
        .map(|c| ((*c).to_owned(), PER_CODEC))
        .collect();
    assert_eq!(ran, want, "{}", kafka.describe());
    common::announce(&format!(
        "compression on {}: {} tasks per codec ({}) read and run once",
        kafka.describe(),
        PER_CODEC,
        CODECS.join(", ")
    ));
}
