//! Smoke test of the foundation: encoded TaskRequests go through a real
//! Kafka-protocol broker and come back intact, exactly once each, in order
//! per key, and a consumer group commits their offsets. Runs against the mock
//! cluster and, when `CONVEYOR_TEST_BROKERS` is set, the external broker.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

mod common;

use std::collections::{BTreeMap, HashMap};

use common::{TestKafka, SETUP_TIMEOUT};
use conveyor::codec::{Codec, TaskRequest};
use conveyor::kafka;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Offset;

const TASKS: usize = 400;
const KEYS: usize = 10;
const PARTITIONS: i32 = 4;

#[tokio::test]
async fn encoded_requests_round_trip_through_a_consumer_group() {
    for broker in TestKafka::all("smoke") {
        round_trip(&broker).await;
    }
}

async fn round_trip(broker: &TestKafka) {
    let codec = Codec::default();
    let settings = broker.settings();
    let topic = broker.create_topic("smoke", PARTITIONS).await;

    // Produce: TASKS requests over KEYS keys, each carrying its sequence
    // number within its key so order can be checked on the way out.
    let producer: FutureProducer = kafka::producer_config(&settings.kafka)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut sent: HashMap<uuid::Uuid, TaskRequest> = HashMap::new();
    let mut deliveries = Vec::new();
    for i in 0..TASKS {
        let mut req = TaskRequest::new("echo", format!(r#"{{"n":{i}}}"#).into_bytes());
        let key = format!("key-{}", i % KEYS);
        req.key = Some(key.clone());
        req.metadata.insert("seq".into(), (i / KEYS).to_string());
        let mut value = Vec::new();
        codec.encode_request(&req, &mut value);
        let record = FutureRecord::to(&topic).key(&key).payload(&value);
        deliveries.push(
            producer
                .send_result(record)
                .expect("producer queue has room"),
        );
        sent.insert(req.id, req);
    }
    let mut per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    for delivery in deliveries {
        let delivery = tokio::time::timeout(SETUP_TIMEOUT, delivery)
            .await
            .expect("delivery report in time")
            .expect("delivery future not cancelled")
            .expect("broker acknowledged the record");
        *per_partition.entry(delivery.partition).or_default() += 1;
    }
    assert_eq!(per_partition.values().sum::<i64>(), TASKS as i64);

    // Consume with a fresh group from the beginning.
    let group = common::unique("smoke-group");
    let consumer: StreamConsumer = kafka::consumer_config(&settings.kafka, &group, 6_000)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");

    let mut received: HashMap<uuid::Uuid, TaskRequest> = HashMap::new();
    let mut last_seq_per_key: HashMap<String, i64> = HashMap::new();
    while received.len() < TASKS {
        let message = tokio::time::timeout(SETUP_TIMEOUT, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: only {} of {TASKS} requests arrived",
                    broker.describe(),
                    received.len()
                )
            })
            .expect("consume");
        let req = codec
            .decode_request(message.payload().unwrap_or_default())
            .expect("every record decodes");
        let key = req.key.clone().expect("every request has a key");
        assert_eq!(
            message.key(),
            Some(key.as_bytes()),
            "record key is the task key"
        );
        let seq: i64 = req.metadata["seq"].parse().expect("seq is a number");
        let previous = last_seq_per_key.insert(key.clone(), seq);
        assert!(
            previous.is_none_or(|p| p + 1 == seq),
            "key {key}: seq {seq} after {previous:?}"
        );
        consumer
            .store_offset_from_message(&message)
            .expect("store offset");
        assert!(
            received.insert(req.id, req).is_none(),
            "a request arrived twice"
        );
    }
    assert_eq!(received, sent, "every request came back exactly as sent");

    // The group's committed offsets cover every record.
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("synchronous commit");
    let committed = consumer
        .committed(SETUP_TIMEOUT)
        .expect("committed offsets");
    let mut committed_per_partition = BTreeMap::new();
    for element in committed.elements() {
        if let Offset::Offset(offset) = element.offset() {
            committed_per_partition.insert(element.partition(), offset);
        }
    }
    assert_eq!(
        committed_per_partition,
        per_partition,
        "{}: committed offsets equal the records per partition",
        broker.describe()
    );
}
