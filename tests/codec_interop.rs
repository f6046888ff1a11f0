//! The `.avsc` files are the contract: what conveyor's hand-written codec
//! writes must be read correctly by `apache-avro` with those schemas, and what
//! `apache-avro` writes with them must be read correctly by conveyor. Random
//! records (proptest) exercise every optional branch and value range.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

use std::collections::{BTreeMap, HashMap};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use conveyor::codec::schema::{TASK_REQUEST_AVSC, TASK_RESULT_AVSC};

/// `apache-avro` (a dev-dependency) parsing the contracts the codec follows.
fn task_request_schema() -> Result<apache_avro::Schema, apache_avro::Error> {
    apache_avro::Schema::parse_str(TASK_REQUEST_AVSC)
}

fn task_result_schema() -> Result<apache_avro::Schema, apache_avro::Error> {
    apache_avro::Schema::parse_str(TASK_RESULT_AVSC)
}
use conveyor::codec::{Codec, TaskError, TaskRequest, TaskResult, TaskStatus, WorkflowRef};
use proptest::prelude::*;
use uuid::Uuid;

fn optional(value: Option<Value>) -> Value {
    match value {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn workflow_value(w: &WorkflowRef) -> Value {
    record(vec![
        ("id", Value::Uuid(w.id)),
        ("name", Value::String(w.name.clone())),
        ("step", Value::Int(w.step)),
        ("child_index", optional(w.child_index.map(Value::Int))),
        ("child_count", optional(w.child_count.map(Value::Int))),
    ])
}

/// The request as apache-avro's generic value, written from the schema's
/// point of view (field names and logical types as in the `.avsc`).
fn request_value(r: &TaskRequest) -> Value {
    record(vec![
        ("id", Value::Uuid(r.id)),
        ("type", Value::String(r.task_type.clone())),
        ("key", optional(r.key.clone().map(Value::String))),
        ("payload", Value::Bytes(r.payload.clone())),
        ("content_type", Value::String(r.content_type.clone())),
        ("attempt", Value::Int(r.attempt)),
        ("submitted_at", Value::TimestampMillis(r.submitted_at)),
        ("deadline", optional(r.deadline.map(Value::TimestampMillis))),
        (
            "workflow",
            optional(r.workflow.as_ref().map(workflow_value)),
        ),
        (
            "metadata",
            Value::Map(
                r.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect::<HashMap<_, _>>(),
            ),
        ),
    ])
}

fn result_value(r: &TaskResult) -> Value {
    let status = match r.status {
        TaskStatus::Succeeded => Value::Enum(0, "SUCCEEDED".into()),
        TaskStatus::Failed => Value::Enum(1, "FAILED".into()),
    };
    record(vec![
        ("id", Value::Uuid(r.id)),
        ("type", Value::String(r.task_type.clone())),
        ("status", status),
        ("output", optional(r.output.clone().map(Value::Bytes))),
        ("content_type", Value::String(r.content_type.clone())),
        (
            "error",
            optional(r.error.as_ref().map(|e| {
                record(vec![
                    ("kind", Value::String(e.kind.clone())),
                    ("message", Value::String(e.message.clone())),
                ])
            })),
        ),
        ("attempts", Value::Int(r.attempts)),
        ("started_at", Value::TimestampMillis(r.started_at)),
        ("finished_at", Value::TimestampMillis(r.finished_at)),
        ("worker", Value::String(r.worker.clone())),
        (
            "workflow",
            optional(r.workflow.as_ref().map(workflow_value)),
        ),
    ])
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

fn workflow() -> impl Strategy<Value = Option<WorkflowRef>> {
    proptest::option::of(
        (
            uuid(),
            ".{0,20}",
            any::<i32>(),
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<i32>()),
        )
            .prop_map(|(id, name, step, child_index, child_count)| WorkflowRef {
                id,
                name,
                step,
                child_index,
                child_count,
            }),
    )
}

prop_compose! {
    fn request()(
        id in uuid(),
        task_type in "[a-z_]{1,16}",
        key in proptest::option::of(".{0,24}"),
        payload in proptest::collection::vec(any::<u8>(), 0..400),
        content_type in "[a-z/+-]{0,24}",
        attempt in any::<i32>(),
        submitted_at in any::<i64>(),
        deadline in proptest::option::of(any::<i64>()),
        workflow in workflow(),
        metadata in proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..5),
    ) -> TaskRequest {
        TaskRequest { id, task_type, key, payload, content_type, attempt, submitted_at, deadline, workflow, metadata }
    }
}

prop_compose! {
    fn result()(
        id in uuid(),
        task_type in "[a-z_]{1,16}",
        failed in any::<bool>(),
        output in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..400)),
        content_type in "[a-z/+-]{0,24}",
        error in proptest::option::of((".{0,12}", ".{0,40}")),
        attempts in any::<i32>(),
        started_at in any::<i64>(),
        finished_at in any::<i64>(),
        worker in ".{0,20}",
        workflow in workflow(),
    ) -> TaskResult {
        TaskResult {
            id,
            task_type,
            status: if failed { TaskStatus::Failed } else { TaskStatus::Succeeded },
            output,
            content_type,
            error: error.map(|(kind, message)| TaskError { kind, message }),
            attempts,
            started_at,
            finished_at,
            worker,
            workflow,
        }
    }
}

fn write_with_apache(schema: &Schema, value: Value) -> Vec<u8> {
    GenericDatumWriter::builder(schema)
        .build()
        .expect("writer for the schema")
        .write_value_to_vec(value)
        .expect("apache-avro writes the value")
}

fn read_with_apache(schema: &Schema, bytes: &[u8]) -> Value {
    let mut reader = bytes;
    let value = GenericDatumReader::builder(schema)
        .build()
        .expect("reader for the schema")
        .read_value(&mut reader)
        .expect("apache-avro reads conveyor's encoding");
    assert!(
        reader.is_empty(),
        "apache-avro left {} bytes unread",
        reader.len()
    );
    value
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn apache_avro_reads_what_conveyor_writes_requests(req in request()) {
        let schema = task_request_schema().unwrap();
        let mut bytes = Vec::new();
        Codec::default().encode_request(&req, &mut bytes);
        prop_assert_eq!(read_with_apache(&schema, &bytes), request_value(&req));
    }

    #[test]
    fn conveyor_reads_what_apache_avro_writes_requests(req in request()) {
        let schema = task_request_schema().unwrap();
        let bytes = write_with_apache(&schema, request_value(&req));
        prop_assert_eq!(Codec::default().decode_request(&bytes), Ok(req));
    }

    #[test]
    fn apache_avro_reads_what_conveyor_writes_results(res in result()) {
        let schema = task_result_schema().unwrap();
        let mut bytes = Vec::new();
        Codec::default().encode_result(&res, &mut bytes);
        prop_assert_eq!(read_with_apache(&schema, &bytes), result_value(&res));
    }

    #[test]
    fn conveyor_reads_what_apache_avro_writes_results(res in result()) {
        let schema = task_result_schema().unwrap();
        let bytes = write_with_apache(&schema, result_value(&res));
        prop_assert_eq!(Codec::default().decode_result(&bytes), Ok(res));
    }
}

#[test]
fn defaults_in_the_schema_fill_fields_an_old_writer_did_not_have() {
    // A writer that knew only the required request fields: Avro schema
    // resolution fills the rest from the `.avsc` defaults, and conveyor
    // reads the resolved record as a plain first attempt.
    let old_writer = Schema::parse_str(
        r#"{"type":"record","name":"TaskRequest","namespace":"conveyor","fields":[
            {"name":"id","type":{"type":"string","logicalType":"uuid"}},
            {"name":"type","type":"string"},
            {"name":"payload","type":"bytes"},
            {"name":"submitted_at","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#,
    )
    .unwrap();
    let id = Uuid::new_v4();
    let old = record(vec![
        ("id", Value::Uuid(id)),
        ("type", Value::String("echo".into())),
        ("payload", Value::Bytes(b"{}".to_vec())),
        ("submitted_at", Value::TimestampMillis(42)),
    ]);
    let bytes = write_with_apache(&old_writer, old);
    let reader_schema = task_request_schema().unwrap();
    let resolved = GenericDatumReader::builder(&old_writer)
        .reader_schema(&reader_schema)
        .build()
        .expect("reader resolving old to current")
        .read_value(&mut bytes.as_slice())
        .expect("the current schema can read the old writer's records");
    let rewritten = write_with_apache(&reader_schema, resolved);
    let req = Codec::default().decode_request(&rewritten).unwrap();
    assert_eq!(req.id, id);
    assert_eq!(req.content_type, "application/json");
    assert_eq!(req.attempt, 1);
    assert_eq!(req.key, None);
    assert_eq!(req.metadata, BTreeMap::new());
}
