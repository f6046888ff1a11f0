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
use conveyor::codec::event::{
    decode_control, decode_event, encode_control, encode_event, TaskControl, TaskEvent, CANCEL,
    PROGRESS, STARTED,
};
use conveyor::codec::schema::{
    TASK_CONTROL_AVSC, TASK_EVENT_AVSC, TASK_REQUEST_AVSC, TASK_RESULT_AVSC,
};

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

/// The schemas as round 2 shipped them (before task events and
/// cancellation), for old readers and writers.
const PREVIOUS_TASK_RESULT_AVSC: &str = include_str!("fixtures/schemas-round2/task_result.avsc");
const PREVIOUS_TASK_REQUEST_AVSC: &str = include_str!("fixtures/schemas-round2/task_request.avsc");

/// Reads `bytes` written with `writer` as `reader` sees them (Avro schema
/// resolution), then re-encodes them with `reader`.
fn resolve(writer: &Schema, reader: &Schema, bytes: &[u8]) -> Vec<u8> {
    let value = GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()
        .expect("a resolving reader")
        .read_value(&mut &bytes[..])
        .expect("the reader's schema reads the writer's record");
    write_with_apache(reader, value)
}

#[test]
fn previous_schema_readers_read_new_records_and_new_readers_read_old_ones() {
    let previous_result = Schema::parse_str(PREVIOUS_TASK_RESULT_AVSC).unwrap();
    let previous_request = Schema::parse_str(PREVIOUS_TASK_REQUEST_AVSC).unwrap();
    let current_result = task_result_schema().unwrap();
    let current_request = task_request_schema().unwrap();
    // A cancelled task's result, as a worker writes it now.
    let cancelled = TaskResult {
        id: Uuid::new_v4(),
        task_type: "render".into(),
        status: TaskStatus::Failed,
        output: None,
        content_type: "application/json".into(),
        error: Some(TaskError {
            kind: "cancelled".into(),
            message: "cancelled while running; the handler stopped: bye".into(),
        }),
        attempts: 1,
        started_at: 10,
        finished_at: 20,
        worker: "w".into(),
        workflow: None,
    };
    let mut now = Vec::new();
    Codec::default().encode_result(&cancelled, &mut now);
    // An old reader reads it: a failure of kind `cancelled`.
    let old_view = resolve(&current_result, &previous_result, &now);
    let read = read_with_apache(&previous_result, &old_view);
    assert_eq!(read, result_value(&cancelled));
    // A record an old writer wrote reads the same with today's codec.
    let old_written = write_with_apache(&previous_result, result_value(&cancelled));
    assert_eq!(Codec::default().decode_result(&old_written), Ok(cancelled));
    // Requests: unchanged, both ways.
    let request = TaskRequest::new("render", b"{}".to_vec());
    let mut now = Vec::new();
    Codec::default().encode_request(&request, &mut now);
    let old_view = resolve(&current_request, &previous_request, &now);
    assert_eq!(
        Codec::default().decode_request(&old_view),
        Ok(request.clone())
    );
    let old_written = write_with_apache(&previous_request, request_value(&request));
    assert_eq!(Codec::default().decode_request(&old_written), Ok(request));
}

fn event_value(e: &TaskEvent) -> Value {
    record(vec![
        ("id", Value::Uuid(e.id)),
        ("type", Value::String(e.task_type.clone())),
        ("kind", Value::String(e.kind.clone())),
        ("at", Value::TimestampMillis(e.at)),
        ("worker", Value::String(e.worker.clone())),
        ("attempt", Value::Int(e.attempt)),
        ("progress", optional(e.progress.clone().map(Value::Bytes))),
        ("due", optional(e.due.map(Value::TimestampMillis))),
        ("message", optional(e.message.clone().map(Value::String))),
        ("token", optional(e.token.clone().map(Value::String))),
    ])
}

#[test]
fn events_and_control_records_follow_their_schemas_both_ways() {
    let schema = Schema::parse_str(TASK_EVENT_AVSC).unwrap();
    let bare = TaskEvent::new(Uuid::new_v4(), "render", STARTED, "w-1", 1);
    let full = TaskEvent {
        progress: Some(br#"{"done":37}"#.to_vec()),
        due: Some(99),
        message: Some("timeout".into()),
        token: Some("0123456789abcdef0123456789abcdef".into()),
        ..TaskEvent::new(Uuid::new_v4(), "render", PROGRESS, "w-2", 3)
    };
    for event in [bare, full] {
        let mut bytes = Vec::new();
        encode_event(&event, &mut bytes);
        assert_eq!(read_with_apache(&schema, &bytes), event_value(&event));
        let written = write_with_apache(&schema, event_value(&event));
        assert_eq!(decode_event(&written), Ok(event));
    }
    let control_schema = Schema::parse_str(TASK_CONTROL_AVSC).unwrap();
    let control = TaskControl {
        id: Uuid::new_v4(),
        action: CANCEL.into(),
        at: 1_700_000_000_000,
        by: "cli".into(),
    };
    let mut bytes = Vec::new();
    encode_control(&control, &mut bytes);
    let expected = record(vec![
        ("id", Value::Uuid(control.id)),
        ("action", Value::String(control.action.clone())),
        ("at", Value::TimestampMillis(control.at)),
        ("by", Value::String(control.by.clone())),
    ]);
    assert_eq!(read_with_apache(&control_schema, &bytes), expected);
    assert_eq!(
        decode_control(&write_with_apache(&control_schema, expected)),
        Ok(control)
    );
}

#[test]
fn event_readers_take_records_of_older_and_newer_writers() {
    // An older writer without the optional fields, and a newer one that
    // appended a field: today's decoder reads both.
    let older = Schema::parse_str(
        r#"{"type":"record","name":"TaskEvent","namespace":"conveyor","fields":[
            {"name":"id","type":{"type":"string","logicalType":"uuid"}},
            {"name":"type","type":"string"},
            {"name":"kind","type":"string"},
            {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"worker","type":"string"},
            {"name":"attempt","type":"int"}]}"#,
    )
    .unwrap();
    let id = Uuid::new_v4();
    let old = write_with_apache(
        &older,
        record(vec![
            ("id", Value::Uuid(id)),
            ("type", Value::String("t".into())),
            ("kind", Value::String("started".into())),
            ("at", Value::TimestampMillis(5)),
            ("worker", Value::String("w".into())),
            ("attempt", Value::Int(2)),
        ]),
    );
    let read = decode_event(&old).unwrap();
    assert_eq!((read.id, read.attempt, read.token), (id, 2, None));
    let mut newer_json: serde_json::Value = serde_json::from_str(TASK_EVENT_AVSC).unwrap();
    newer_json["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "host", "type": "string", "default": ""}));
    let newer = Schema::parse_str(&newer_json.to_string()).unwrap();
    let event = TaskEvent::new(id, "t", "paused", "w", 1);
    let mut fields = match event_value(&event) {
        Value::Record(fields) => fields,
        other => panic!("{other:?}"),
    };
    fields.push(("host".into(), Value::String("h-1".into())));
    let written = write_with_apache(&newer, Value::Record(fields));
    assert_eq!(
        decode_event(&written),
        Ok(event),
        "an unknown kind and an appended field are read, not refused"
    );
}
