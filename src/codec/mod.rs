//! The wire contract: [`TaskRequest`] and [`TaskResult`] in Avro binary,
//! optionally framed in the Confluent wire format.
//!
//! The `.avsc` files under `schemas/` are the source of truth ([`schema`]
//! embeds them). The encoder and decoder here are written by hand against
//! those schemas, field by field, because the generic `apache_avro::Value`
//! path costs several microseconds per record and this one sits on every
//! task's hot path. `tests/codec_interop.rs` proves both directions against
//! `apache-avro` reading and writing with the `.avsc` files, so the two cannot
//! drift apart unnoticed.
//!
//! # Reading untrusted bytes
//!
//! Decoding never panics and never allocates more than the input's size:
//! garbage in gives a [`DecodeError`] naming the record, the field and the
//! problem. Bytes left over after the last known field are ignored, so a
//! producer that appends new fields (with defaults, as Avro's evolution rules
//! ask) does not break an older worker.
//!
//! # Framing
//!
//! With [`WireFormat::Confluent`] every record written starts with the magic
//! byte `0` and the big-endian 4-byte schema id, as Schema Registry tooling
//! expects. Reading accepts both forms whatever the setting: a plain record
//! can never start with a zero byte (its first field is a 36-character
//! string, whose length is encoded as `0x48`), so the two cannot be confused.
//! A framed record whose schema id is not the configured one is refused.

mod binary;
pub mod event;
pub mod render;
pub mod schema;
pub mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use binary::Reader;

/// A task or run id as a record key: its hyphenated lower-case text, the
/// bytes `Uuid::to_string` gives, written straight into one exact
/// allocation (the formatter's way grew a string, on every task).
pub(crate) fn uuid_key(id: &Uuid) -> Vec<u8> {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.as_hyphenated().encode_lower(&mut text);
    text.to_vec()
}

/// Content type of payloads and outputs when none is given.
pub const DEFAULT_CONTENT_TYPE: &str = "application/json";

/// The Confluent wire format's magic byte.
const CONFLUENT_MAGIC: u8 = 0;
/// Magic byte plus the 4-byte schema id.
const CONFLUENT_HEADER_LEN: usize = 5;

/// A request to run one task (`schemas/task_request.avsc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRequest {
    /// Unique id of the task; its result carries the same id.
    pub id: Uuid,
    /// Task type, which selects the handler (`type` in the schema).
    pub task_type: String,
    /// Optional ordering key.
    pub key: Option<String>,
    /// The handler's input, opaque to conveyor.
    pub payload: Vec<u8>,
    /// Media type of `payload`.
    pub content_type: String,
    /// Attempt number, starting at 1.
    pub attempt: i32,
    /// First submission time, milliseconds since the Unix epoch.
    pub submitted_at: i64,
    /// Optional time after which the task is not worth running, milliseconds
    /// since the Unix epoch.
    pub deadline: Option<i64>,
    /// Set when the task is a workflow step.
    pub workflow: Option<WorkflowRef>,
    /// Free-form pairs carried along unchanged.
    pub metadata: BTreeMap<String, String>,
}

impl TaskRequest {
    /// A first attempt of a new task with a fresh random id, submitted now,
    /// with a JSON payload.
    pub fn new(task_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        TaskRequest {
            id: Uuid::new_v4(),
            task_type: task_type.into(),
            key: None,
            payload: payload.into(),
            content_type: DEFAULT_CONTENT_TYPE.to_owned(),
            attempt: 1,
            submitted_at: now_millis(),
            deadline: None,
            workflow: None,
            metadata: BTreeMap::new(),
        }
    }
}

/// Where a task stands in a workflow (`WorkflowRef` in both schemas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowRef {
    /// Id of the workflow run.
    pub id: Uuid,
    /// Name of the workflow definition.
    pub name: String,
    /// Index of the step, from 0.
    pub step: i32,
    /// Position among the siblings of a fan-out, from 0.
    pub child_index: Option<i32>,
    /// Number of siblings of a fan-out.
    pub child_count: Option<i32>,
}

/// Terminal state of a task (`TaskStatus` in the schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    /// The handler returned an output.
    Succeeded,
    /// The task failed for good.
    Failed,
}

impl TaskStatus {
    /// The enum's symbols in schema order; the index is the wire value.
    const SYMBOLS: [TaskStatus; 2] = [TaskStatus::Succeeded, TaskStatus::Failed];

    fn index(self) -> i64 {
        match self {
            TaskStatus::Succeeded => 0,
            TaskStatus::Failed => 1,
        }
    }

    /// The schema's symbol for this status.
    pub fn symbol(self) -> &'static str {
        match self {
            TaskStatus::Succeeded => "SUCCEEDED",
            TaskStatus::Failed => "FAILED",
        }
    }
}

/// Why a task failed (`TaskError` in the schema).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// Class of the failure, a short snake_case word.
    pub kind: String,
    /// Human-readable description.
    pub message: String,
}

/// Why conveyor failed a task: the `kind` it writes into results
/// (`TaskError::kind`), dead letters (`conveyor.error.kind`) and metric
/// labels. On the wire a kind is text (records written by others may
/// carry any), so `TaskError::kind` stays a `String`; every kind conveyor
/// itself writes is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The handler said the task cannot succeed.
    Permanent,
    /// The handler failed in a way worth retrying (reported as the kind
    /// once the attempts run out).
    Retryable,
    /// An attempt (or a workflow run) ran out of time.
    Timeout,
    /// The handler panicked.
    Panic,
    /// The request record could not be decoded.
    Decode,
    /// No handler for the task type here.
    UnknownType,
    /// The task's deadline passed before it could start.
    Deadline,
    /// An output larger than the broker accepts.
    OutputTooLarge,
    /// A fan-out step's output longer than its workflow's `max_fan_out`, or
    /// not an array.
    FanOut,
    /// A step of a workflow this configuration does not define.
    UnknownWorkflow,
    /// A step that does not fit its workflow's definition.
    InvalidWorkflowStep,
    /// A workflow run: one of its steps failed.
    StepFailed,
    /// The task (or its workflow run) was cancelled.
    Cancelled,
}

impl FailureKind {
    /// Every kind, in declaration order.
    pub const ALL: [FailureKind; 13] = [
        FailureKind::Permanent,
        FailureKind::Retryable,
        FailureKind::Timeout,
        FailureKind::Panic,
        FailureKind::Decode,
        FailureKind::UnknownType,
        FailureKind::Deadline,
        FailureKind::OutputTooLarge,
        FailureKind::FanOut,
        FailureKind::UnknownWorkflow,
        FailureKind::InvalidWorkflowStep,
        FailureKind::StepFailed,
        FailureKind::Cancelled,
    ];

    /// The kind as written on the wire and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureKind::Permanent => "permanent",
            FailureKind::Retryable => "retryable",
            FailureKind::Timeout => "timeout",
            FailureKind::Panic => "panic",
            FailureKind::Decode => "decode",
            FailureKind::UnknownType => "unknown_type",
            FailureKind::Deadline => "deadline",
            FailureKind::OutputTooLarge => "output_too_large",
            FailureKind::FanOut => "fan_out",
            FailureKind::UnknownWorkflow => "unknown_workflow",
            FailureKind::InvalidWorkflowStep => "invalid_workflow_step",
            FailureKind::StepFailed => "step_failed",
            FailureKind::Cancelled => "cancelled",
        }
    }

    /// The kind a wire text names, if it is one of conveyor's.
    pub fn parse(text: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<FailureKind> for String {
    fn from(kind: FailureKind) -> String {
        kind.as_str().to_owned()
    }
}

/// The outcome of one task (`schemas/task_result.avsc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskResult {
    /// Id of the task, from its request.
    pub id: Uuid,
    /// Task type, from its request (`type` in the schema).
    pub task_type: String,
    /// Terminal state.
    pub status: TaskStatus,
    /// The handler's output, if any.
    pub output: Option<Vec<u8>>,
    /// Media type of `output`.
    pub content_type: String,
    /// Set when the task failed.
    pub error: Option<TaskError>,
    /// How many times the handler ran.
    pub attempts: i32,
    /// Start of the first attempt, milliseconds since the Unix epoch.
    pub started_at: i64,
    /// Time the task became terminal, milliseconds since the Unix epoch.
    pub finished_at: i64,
    /// Identity of the worker that produced the result.
    pub worker: String,
    /// From the request, when the task was a workflow step.
    pub workflow: Option<WorkflowRef>,
}

/// Milliseconds since the Unix epoch, now; 0 if the clock is before 1970.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How records are framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// Bare Avro binary.
    Plain,
    /// Magic byte 0, then the big-endian schema id, then Avro binary.
    Confluent {
        /// Schema Registry id of `task_request.avsc`.
        request_schema_id: u32,
        /// Schema Registry id of `task_result.avsc`.
        result_schema_id: u32,
    },
}

/// What was wrong with the bytes, without the position.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeProblem {
    /// The input ended inside the field, or a length points past its end.
    Truncated,
    /// A varint longer than ten bytes or wider than 64 bits.
    BadVarint,
    /// An `int` whose value does not fit 32 bits.
    IntOutOfRange(i64),
    /// A negative length or block size.
    NegativeLength(i64),
    /// A string that is not UTF-8.
    InvalidUtf8,
    /// A `uuid` string that is not a hyphenated UUID.
    InvalidUuid,
    /// A union branch index other than 0 (null) or 1.
    BadUnionIndex(i64),
    /// An enum index past the last symbol.
    BadEnumIndex(i64),
    /// A Confluent-framed record carrying another schema's id.
    UnexpectedSchemaId {
        /// The id in the frame.
        found: u32,
        /// The configured id.
        expected: u32,
    },
}

impl fmt::Display for DecodeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeProblem::Truncated => f.write_str("input ends early"),
            DecodeProblem::BadVarint => f.write_str("malformed variable-length integer"),
            DecodeProblem::IntOutOfRange(v) => write!(f, "int value {v} does not fit 32 bits"),
            DecodeProblem::NegativeLength(v) => write!(f, "negative length {v}"),
            DecodeProblem::InvalidUtf8 => f.write_str("string is not valid UTF-8"),
            DecodeProblem::InvalidUuid => f.write_str("not a hyphenated UUID"),
            DecodeProblem::BadUnionIndex(v) => write!(f, "union branch {v} is not 0 or 1"),
            DecodeProblem::BadEnumIndex(v) => write!(f, "enum index {v} is out of range"),
            DecodeProblem::UnexpectedSchemaId { found, expected } => write!(
                f,
                "Confluent frame names schema id {found}, expected {expected}"
            ),
        }
    }
}

/// A record that could not be decoded: which record, which field, what was
/// wrong. Poison input, never worth retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {record}.{field}: {problem}")]
pub struct DecodeError {
    record: &'static str,
    field: &'static str,
    problem: DecodeProblem,
}

impl DecodeError {
    pub(crate) fn new(record: &'static str, field: &'static str, problem: DecodeProblem) -> Self {
        DecodeError {
            record,
            field,
            problem,
        }
    }

    /// Schema name of the record being read (`TaskRequest`, `WorkflowRef`…).
    pub fn record(&self) -> &'static str {
        self.record
    }

    /// The field being read when the problem was found (`<frame>` for the
    /// Confluent header).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What was wrong.
    pub fn problem(&self) -> &DecodeProblem {
        &self.problem
    }
}

/// Encodes and decodes the task records in the configured [`WireFormat`].
/// Cheap to copy; holds no buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    wire: WireFormat,
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new(WireFormat::Plain)
    }
}

impl Codec {
    /// A codec writing `wire`.
    pub fn new(wire: WireFormat) -> Self {
        Codec { wire }
    }

    /// The format this codec writes.
    pub fn wire_format(&self) -> WireFormat {
        self.wire
    }

    fn write_frame(&self, out: &mut Vec<u8>, pick: fn(WireFormat) -> Option<u32>) {
        if let Some(id) = pick(self.wire) {
            out.push(CONFLUENT_MAGIC);
            out.extend_from_slice(&id.to_be_bytes());
        }
    }

    /// Strips a Confluent frame if there is one, checking its schema id
    /// against the configured one.
    fn unframe<'a>(
        &self,
        input: &'a [u8],
        record: &'static str,
        pick: fn(WireFormat) -> Option<u32>,
    ) -> Result<&'a [u8], DecodeError> {
        if input.first() != Some(&CONFLUENT_MAGIC) {
            return Ok(input);
        }
        let frame_error = |problem| DecodeError::new(record, "<frame>", problem);
        let header: [u8; CONFLUENT_HEADER_LEN] = input
            .get(..CONFLUENT_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| frame_error(DecodeProblem::Truncated))?;
        let found = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if let Some(expected) = pick(self.wire) {
            if found != expected {
                return Err(frame_error(DecodeProblem::UnexpectedSchemaId {
                    found,
                    expected,
                }));
            }
        }
        Ok(input.get(CONFLUENT_HEADER_LEN..).unwrap_or_default())
    }

    /// Appends the encoding of `request` to `out`.
    pub fn encode_request(&self, request: &TaskRequest, out: &mut Vec<u8>) {
        out.reserve(96 + request.payload.len() + request.task_type.len());
        self.write_frame(out, request_schema_id);
        binary::write_uuid(out, &request.id);
        binary::write_str(out, &request.task_type);
        binary::write_optional_tag(out, request.key.is_some());
        if let Some(key) = &request.key {
            binary::write_str(out, key);
        }
        binary::write_bytes(out, &request.payload);
        binary::write_str(out, &request.content_type);
        binary::write_int(out, request.attempt);
        binary::write_long(out, request.submitted_at);
        binary::write_optional_tag(out, request.deadline.is_some());
        if let Some(deadline) = request.deadline {
            binary::write_long(out, deadline);
        }
        write_workflow(out, request.workflow.as_ref());
        binary::write_string_map(out, &request.metadata);
    }

    /// The id and, if readable, the type of a request that may not decode as
    /// a whole: enough to report a FAILED result for a malformed record.
    pub fn peek_request(&self, input: &[u8]) -> Option<(Uuid, Option<String>)> {
        const RECORD: &str = "TaskRequest";
        let body = self.unframe(input, RECORD, request_schema_id).ok()?;
        let mut r = Reader::new(body, RECORD);
        let id = r.read_uuid().ok()?;
        Some((id, r.read_string().ok()))
    }

    /// Decodes one request; see the module docs for what is accepted.
    pub fn decode_request(&self, input: &[u8]) -> Result<TaskRequest, DecodeError> {
        const RECORD: &str = "TaskRequest";
        let body = self.unframe(input, RECORD, request_schema_id)?;
        let mut r = Reader::new(body, RECORD);
        r.field(RECORD, "id");
        let id = r.read_uuid()?;
        r.field(RECORD, "type");
        let task_type = r.read_string()?;
        r.field(RECORD, "key");
        let key = if r.read_optional_tag()? {
            Some(r.read_string()?)
        } else {
            None
        };
        r.field(RECORD, "payload");
        let payload = r.read_bytes()?.to_vec();
        r.field(RECORD, "content_type");
        let content_type = r.read_string()?;
        r.field(RECORD, "attempt");
        let attempt = r.read_int()?;
        r.field(RECORD, "submitted_at");
        let submitted_at = r.read_long()?;
        r.field(RECORD, "deadline");
        let deadline = if r.read_optional_tag()? {
            Some(r.read_long()?)
        } else {
            None
        };
        r.field(RECORD, "workflow");
        let workflow = read_workflow(&mut r)?;
        r.field(RECORD, "metadata");
        let metadata = r.read_string_map()?;
        Ok(TaskRequest {
            id,
            task_type,
            key,
            payload,
            content_type,
            attempt,
            submitted_at,
            deadline,
            workflow,
            metadata,
        })
    }

    /// Appends the encoding of `result` to `out`.
    pub fn encode_result(&self, result: &TaskResult, out: &mut Vec<u8>) {
        let output_len = result.output.as_ref().map_or(0, Vec::len);
        out.reserve(128 + output_len + result.task_type.len() + result.worker.len());
        self.write_frame(out, result_schema_id);
        binary::write_uuid(out, &result.id);
        binary::write_str(out, &result.task_type);
        binary::write_long(out, result.status.index());
        binary::write_optional_tag(out, result.output.is_some());
        if let Some(output) = &result.output {
            binary::write_bytes(out, output);
        }
        binary::write_str(out, &result.content_type);
        binary::write_optional_tag(out, result.error.is_some());
        if let Some(error) = &result.error {
            binary::write_str(out, &error.kind);
            binary::write_str(out, &error.message);
        }
        binary::write_int(out, result.attempts);
        binary::write_long(out, result.started_at);
        binary::write_long(out, result.finished_at);
        binary::write_str(out, &result.worker);
        write_workflow(out, result.workflow.as_ref());
    }

    /// Decodes one result; see the module docs for what is accepted.
    pub fn decode_result(&self, input: &[u8]) -> Result<TaskResult, DecodeError> {
        const RECORD: &str = "TaskResult";
        let body = self.unframe(input, RECORD, result_schema_id)?;
        let mut r = Reader::new(body, RECORD);
        r.field(RECORD, "id");
        let id = r.read_uuid()?;
        r.field(RECORD, "type");
        let task_type = r.read_string()?;
        r.field(RECORD, "status");
        let status = TaskStatus::SYMBOLS[r.read_enum_index(TaskStatus::SYMBOLS.len())?];
        r.field(RECORD, "output");
        let output = if r.read_optional_tag()? {
            Some(r.read_bytes()?.to_vec())
        } else {
            None
        };
        r.field(RECORD, "content_type");
        let content_type = r.read_string()?;
        r.field(RECORD, "error");
        let error = if r.read_optional_tag()? {
            r.field("TaskError", "kind");
            let kind = r.read_string()?;
            r.field("TaskError", "message");
            let message = r.read_string()?;
            Some(TaskError { kind, message })
        } else {
            None
        };
        r.field(RECORD, "attempts");
        let attempts = r.read_int()?;
        r.field(RECORD, "started_at");
        let started_at = r.read_long()?;
        r.field(RECORD, "finished_at");
        let finished_at = r.read_long()?;
        r.field(RECORD, "worker");
        let worker = r.read_string()?;
        r.field(RECORD, "workflow");
        let workflow = read_workflow(&mut r)?;
        Ok(TaskResult {
            id,
            task_type,
            status,
            output,
            content_type,
            error,
            attempts,
            started_at,
            finished_at,
            worker,
            workflow,
        })
    }
}

fn request_schema_id(wire: WireFormat) -> Option<u32> {
    match wire {
        WireFormat::Plain => None,
        WireFormat::Confluent {
            request_schema_id, ..
        } => Some(request_schema_id),
    }
}

fn result_schema_id(wire: WireFormat) -> Option<u32> {
    match wire {
        WireFormat::Plain => None,
        WireFormat::Confluent {
            result_schema_id, ..
        } => Some(result_schema_id),
    }
}

fn write_optional_int(out: &mut Vec<u8>, value: Option<i32>) {
    binary::write_optional_tag(out, value.is_some());
    if let Some(v) = value {
        binary::write_int(out, v);
    }
}

fn write_workflow(out: &mut Vec<u8>, workflow: Option<&WorkflowRef>) {
    binary::write_optional_tag(out, workflow.is_some());
    if let Some(w) = workflow {
        binary::write_uuid(out, &w.id);
        binary::write_str(out, &w.name);
        binary::write_int(out, w.step);
        write_optional_int(out, w.child_index);
        write_optional_int(out, w.child_count);
    }
}

fn read_optional_int(r: &mut Reader<'_>) -> Result<Option<i32>, DecodeError> {
    if r.read_optional_tag()? {
        r.read_int().map(Some)
    } else {
        Ok(None)
    }
}

fn read_workflow(r: &mut Reader<'_>) -> Result<Option<WorkflowRef>, DecodeError> {
    if !r.read_optional_tag()? {
        return Ok(None);
    }
    const RECORD: &str = "WorkflowRef";
    r.field(RECORD, "id");
    let id = r.read_uuid()?;
    r.field(RECORD, "name");
    let name = r.read_string()?;
    r.field(RECORD, "step");
    let step = r.read_int()?;
    r.field(RECORD, "child_index");
    let child_index = read_optional_int(r)?;
    r.field(RECORD, "child_count");
    let child_count = read_optional_int(r)?;
    Ok(Some(WorkflowRef {
        id,
        name,
        step,
        child_index,
        child_count,
    }))
}

#[cfg(test)]
mod failure_kind_tests {
    use super::FailureKind;

    #[test]
    fn kinds_round_trip_through_their_wire_names_and_are_distinct() {
        let mut names = std::collections::HashSet::new();
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::parse(kind.as_str()), Some(kind));
            assert!(names.insert(kind.as_str()), "{kind} twice");
            assert!(kind
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
        assert_eq!(FailureKind::parse("something_else"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A record's key decides its partition: it must stay the id's text
    /// exactly as `Uuid::to_string` writes it.
    #[test]
    fn a_uuid_key_is_the_ids_hyphenated_text() {
        for _ in 0..100 {
            let id = Uuid::new_v4();
            assert_eq!(uuid_key(&id), id.to_string().into_bytes());
        }
        let id = Uuid::from_u128(0x00f0_0000_0000_4000_8000_0000_0000_00ab);
        assert_eq!(
            uuid_key(&id),
            b"00f00000-0000-4000-8000-0000000000ab".to_vec()
        );
    }

    pub(crate) fn sample_request() -> TaskRequest {
        let mut req = TaskRequest::new("resize_image", br#"{"w":640}"#.to_vec());
        req.key = Some("user-17".into());
        req.deadline = Some(req.submitted_at + 60_000);
        req.workflow = Some(WorkflowRef {
            id: Uuid::new_v4(),
            name: "thumbnails".into(),
            step: 2,
            child_index: Some(3),
            child_count: Some(50),
        });
        req.metadata.insert("tenant".into(), "acme".into());
        req
    }

    fn sample_result() -> TaskResult {
        TaskResult {
            id: Uuid::new_v4(),
            task_type: "resize_image".into(),
            status: TaskStatus::Failed,
            output: None,
            content_type: DEFAULT_CONTENT_TYPE.into(),
            error: Some(TaskError {
                kind: "timeout".into(),
                message: "handler took longer than 30000 ms".into(),
            }),
            attempts: 3,
            started_at: 1_700_000_000_000,
            finished_at: 1_700_000_030_000,
            worker: "host-a/4242".into(),
            workflow: None,
        }
    }

    fn encode_request(codec: Codec, req: &TaskRequest) -> Vec<u8> {
        let mut out = Vec::new();
        codec.encode_request(req, &mut out);
        out
    }

    #[test]
    fn request_round_trips_plain_and_framed() {
        let req = sample_request();
        for wire in [
            WireFormat::Plain,
            WireFormat::Confluent {
                request_schema_id: 7,
                result_schema_id: 8,
            },
        ] {
            let codec = Codec::new(wire);
            let bytes = encode_request(codec, &req);
            assert_eq!(codec.decode_request(&bytes), Ok(req.clone()));
        }
    }

    #[test]
    fn result_round_trips() {
        let codec = Codec::default();
        let res = sample_result();
        let mut bytes = Vec::new();
        codec.encode_result(&res, &mut bytes);
        assert_eq!(codec.decode_result(&bytes), Ok(res));
    }

    #[test]
    fn confluent_frame_is_magic_then_big_endian_id() {
        let codec = Codec::new(WireFormat::Confluent {
            request_schema_id: 0x0102_0304,
            result_schema_id: 9,
        });
        let bytes = encode_request(codec, &sample_request());
        assert_eq!(bytes.get(..5), Some(&[0u8, 1, 2, 3, 4][..]));
        // The rest is exactly the plain encoding.
        let plain = encode_request(Codec::default(), &codec.decode_request(&bytes).unwrap());
        assert_eq!(bytes.get(5..), Some(&plain[..]));
    }

    #[test]
    fn plain_reader_accepts_framed_input_and_framed_reader_accepts_plain() {
        let req = sample_request();
        let framed = Codec::new(WireFormat::Confluent {
            request_schema_id: 7,
            result_schema_id: 8,
        });
        let plain = Codec::default();
        assert_eq!(
            plain.decode_request(&encode_request(framed, &req)),
            Ok(req.clone())
        );
        assert_eq!(framed.decode_request(&encode_request(plain, &req)), Ok(req));
    }

    #[test]
    fn wrong_schema_id_is_refused_with_both_ids() {
        let writer = Codec::new(WireFormat::Confluent {
            request_schema_id: 7,
            result_schema_id: 8,
        });
        let reader = Codec::new(WireFormat::Confluent {
            request_schema_id: 70,
            result_schema_id: 80,
        });
        let err = reader
            .decode_request(&encode_request(writer, &sample_request()))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot decode TaskRequest.<frame>: Confluent frame names schema id 7, expected 70"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let mut bytes = encode_request(Codec::default(), &sample_request());
        // Cut inside the payload: id (37 bytes), type (13), key (1 + 8), then
        // the payload's length byte and part of its content.
        bytes.truncate(37 + 13 + 9 + 3);
        let err = Codec::default().decode_request(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot decode TaskRequest.payload: input ends early"
        );

        let mut bad_uuid = Vec::new();
        binary::write_str(&mut bad_uuid, "not-a-uuid");
        let err = Codec::default().decode_request(&bad_uuid).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot decode TaskRequest.id: not a hyphenated UUID"
        );
    }

    #[test]
    fn peek_reads_id_and_type_of_a_broken_request() {
        let req = sample_request();
        let mut bytes = encode_request(Codec::default(), &req);
        bytes.truncate(60); // inside the payload
        let codec = Codec::default();
        assert!(codec.decode_request(&bytes).is_err());
        assert_eq!(
            codec.peek_request(&bytes),
            Some((req.id, Some("resize_image".into())))
        );
        assert_eq!(codec.peek_request(b"garbage"), None);
    }

    #[test]
    fn appended_fields_are_ignored() {
        let req = sample_request();
        let mut bytes = encode_request(Codec::default(), &req);
        binary::write_str(&mut bytes, "a field from a newer schema");
        assert_eq!(Codec::default().decode_request(&bytes), Ok(req));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Whatever decodes must survive a round trip unchanged: the
            // decoder accepted exactly what the encoder can express.
            let codec = Codec::default();
            if let Ok(req) = codec.decode_request(&bytes) {
                prop_assert_eq!(codec.decode_request(&encode_request(codec, &req)), Ok(req));
            }
            if let Ok(res) = codec.decode_result(&bytes) {
                let mut again = Vec::new();
                codec.encode_result(&res, &mut again);
                prop_assert_eq!(codec.decode_result(&again), Ok(res));
            }
        }

        #[test]
        fn every_truncation_is_an_error(cut in 0usize..1000) {
            let bytes = encode_request(Codec::default(), &sample_request());
            let cut = cut % bytes.len();
            let err = Codec::default().decode_request(bytes.get(..cut).unwrap_or_default());
            prop_assert!(err.is_err(), "prefix of {} bytes decoded", cut);
        }

        #[test]
        fn corrupted_bytes_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut bytes = encode_request(Codec::default(), &sample_request());
            let len = bytes.len();
            for (at, value) in flips {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b = value;
                }
            }
            let codec = Codec::default();
            if let Ok(req) = codec.decode_request(&bytes) {
                prop_assert_eq!(codec.decode_request(&encode_request(codec, &req)), Ok(req));
            }
        }
    }
}
