//! The API's input checks and error answers: every refusal is a JSON body
//! `{"error": {"code", "field", "message"}}` naming the field at fault.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// Longest ordering key accepted, in characters (JSON Schema's
/// `maxLength` counts characters; openapi.json says the same).
pub const MAX_KEY_CHARS: usize = 1024;
/// Longest idempotency key accepted, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 256;
/// Most digits of a duration's number (`wait`, a `deadline` as text).
pub const MAX_DURATION_DIGITS: usize = 12;

/// A refusal: status, a stable machine-readable code, the field at fault
/// (when one is), and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, such as `invalid_field`.
    pub code: &'static str,
    /// The field at fault, as a path (`tasks[2].type`).
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// The task's status, when the refusal is about it (a cancel of a
    /// finished task): `status` beside `error` in the body.
    pub task_status: Option<&'static str>,
}

impl ApiError {
    /// A refusal not tied to a field.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            field: None,
            message: message.into(),
            task_status: None,
        }
    }

    /// A 422 naming `field`.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_field",
            field: Some(field.into()),
            message: message.into(),
            task_status: None,
        }
    }

    /// The same refusal, saying the task's status too.
    pub fn with_task_status(mut self, status: &'static str) -> Self {
        self.task_status = Some(status);
        self
    }

    /// The same refusal with another status and code.
    pub fn with(mut self, status: StatusCode, code: &'static str) -> Self {
        self.status = status;
        self.code = code;
        self
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let (Some(field), Some(map)) = (&self.field, error.as_object_mut()) {
            map.insert("field".into(), json!(field));
        }
        match self.task_status {
            Some(status) => json!({ "error": error, "status": status }),
            None => json!({ "error": error }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A task as submitted, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Its type.
    pub task_type: String,
    /// The topic its type goes to.
    pub topic: String,
    /// The payload as JSON text.
    pub payload: Vec<u8>,
    /// Ordering key.
    pub key: Option<String>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Deadline, ms since the epoch.
    pub deadline: Option<i64>,
    /// Not to start before this time (ms since the epoch): from `delay` or
    /// `run_at`; `None` runs it now.
    pub run_at: Option<i64>,
}

/// What submitted tasks are checked against.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Accepted task types and their topics.
    pub task_topics: BTreeMap<String, String>,
    /// Largest payload, in bytes of JSON text.
    pub max_payload_bytes: usize,
    /// Most tasks in one batch.
    pub max_batch: usize,
    /// The longest delay accepted (ms); `None` when delays are off.
    pub max_delay_ms: Option<i64>,
}

const TASK_FIELDS: &[&str] = &[
    "type",
    "payload",
    "key",
    "idempotency_key",
    "deadline",
    "delay",
    "run_at",
];

/// When a task asks to start, from its `delay` or `run_at` (at most one),
/// as ms since the epoch; `None` to start now. `path` names the fields.
pub fn parse_start(
    map: &Map<String, Value>,
    path: &dyn Fn(&str) -> String,
    max_delay_ms: Option<i64>,
    now: i64,
) -> Result<Option<i64>, ApiError> {
    let given = |name: &str| map.get(name).filter(|v| !v.is_null());
    let (field, at) = match (given("delay"), given("run_at")) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                path("run_at"),
                "give delay or run_at, not both",
            ))
        }
        (Some(delay), None) => {
            let Value::String(text) = delay else {
                return Err(ApiError::field(
                    path("delay"),
                    format!(
                        "must be a duration such as \"90s\", \"10m\" or \"1h\", not {}",
                        kind_of(delay)
                    ),
                ));
            };
            let after = crate::delay::parse_delay(text)
                .map_err(|why| ApiError::field(path("delay"), why))?;
            let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
            ("delay", now.saturating_add(ms))
        }
        (None, Some(run_at)) => {
            let Value::String(text) = run_at else {
                return Err(ApiError::field(
                    path("run_at"),
                    format!(
                        "must be an RFC 3339 time with its UTC offset, such as \"2026-12-24T18:00:00+01:00\", not {}",
                        kind_of(run_at)
                    ),
                ));
            };
            (
                "run_at",
                crate::delay::parse_run_at(text)
                    .map_err(|why| ApiError::field(path("run_at"), why))?,
            )
        }
    };
    let Some(max) = max_delay_ms else {
        return Err(ApiError::field(
            path(field),
            "delayed tasks are off on this gateway ([delays] enabled = false)",
        ));
    };
    // A time already past, or a delay of 0, starts it now.
    crate::delay::within_max(at, max, now).map_err(|why| ApiError::field(path(field), why))
}

/// Parses a request body as JSON (400 naming the line and column if it is
/// not).
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_json",
        field: Some("body".into()),
        message: format!("the request body is not valid JSON: {e}"),
        task_status: None,
    })
}

fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ApiError> {
    value.as_object().ok_or_else(|| {
        ApiError::field(
            if field.is_empty() { "body" } else { field },
            format!("must be a JSON object, not {}", kind_of(value)),
        )
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn optional_string<'a>(
    map: &'a Map<String, Value>,
    name: &str,
    path: &str,
    max_chars: usize,
) -> Result<Option<&'a str>, ApiError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Err(ApiError::field(
            path,
            "must not be empty (leave it out instead)",
        )),
        Some(Value::String(s)) if s.chars().count() > max_chars => Err(ApiError::field(
            path,
            format!(
                "is {} characters long; at most {max_chars} are accepted",
                s.chars().count()
            ),
        )),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::field(
            path,
            format!("must be a string, not {}", kind_of(other)),
        )),
    }
}

/// The fields of a workflow start.
const WORKFLOW_FIELDS: &[&str] = &["payload", "idempotency_key", "delay", "run_at"];

/// What `POST /v1/workflows/{name}` asks for: the first step's payload
/// (JSON text) and an optional idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// The first step's payload as JSON text.
    pub payload: Vec<u8>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Not to start before (ms since the epoch).
    pub run_at: Option<i64>,
}

/// Checks the body of a workflow start.
pub fn parse_run(value: &Value, rules: &Rules, now: i64) -> Result<NewRun, ApiError> {
    let max_payload_bytes = rules.max_payload_bytes;
    let map = object(value, "")?;
    if let Some(unknown) = map.keys().find(|k| !WORKFLOW_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::field(
            unknown.clone(),
            format!(
                "unknown field; a workflow start has {}",
                WORKFLOW_FIELDS.join(", ")
            ),
        ));
    }
    let payload = match map.get("payload") {
        None => {
            return Err(ApiError::field(
                "payload",
                "required: the first step's input, any JSON value",
            ))
        }
        Some(payload) => payload.to_string().into_bytes(),
    };
    if payload.len() > max_payload_bytes {
        return Err(ApiError::field(
            "payload",
            format!(
                "is {} bytes of JSON; at most {max_payload_bytes} are accepted (gateway.max_payload_bytes)",
                payload.len()
            ),
        )
        .with(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    }
    let idempotency_key = optional_string(
        map,
        "idempotency_key",
        "idempotency_key",
        MAX_IDEMPOTENCY_KEY_CHARS,
    )?;
    let run_at = parse_start(map, &|name: &str| name.to_owned(), rules.max_delay_ms, now)?;
    Ok(NewRun {
        payload,
        idempotency_key: idempotency_key.map(str::to_owned),
        run_at,
    })
}

/// Checks one task object; field paths start with `prefix` (`""` or
/// `tasks[3].`).
pub fn parse_task(
    value: &Value,
    prefix: &str,
    rules: &Rules,
    now: i64,
) -> Result<NewTask, ApiError> {
    let path = |name: &str| format!("{prefix}{name}");
    let map = object(value, prefix.trim_end_matches('.'))?;
    if let Some(unknown) = map.keys().find(|k| !TASK_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::field(
            path(unknown),
            format!("unknown field; a task has {}", TASK_FIELDS.join(", ")),
        ));
    }
    let task_type = match map.get("type") {
        None | Some(Value::Null) => {
            return Err(ApiError::field(path("type"), "required: the task type"))
        }
        Some(Value::String(t)) => t,
        Some(other) => {
            return Err(ApiError::field(
                path("type"),
                format!("must be a string, not {}", kind_of(other)),
            ))
        }
    };
    let Some(topic) = rules.task_topics.get(task_type) else {
        let known: Vec<&str> = rules.task_topics.keys().map(String::as_str).collect();
        return Err(ApiError::field(
            path("type"),
            format!(
                "unknown task type `{task_type}`; this gateway accepts: {}",
                if known.is_empty() {
                    "none (configure [[processors]] or gateway.task_types)".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        ));
    };
    let payload = match map.get("payload") {
        None => {
            return Err(ApiError::field(
                path("payload"),
                "required: any JSON value (use {} for none)",
            ))
        }
        Some(payload) => payload.to_string().into_bytes(),
    };
    if payload.len() > rules.max_payload_bytes {
        return Err(ApiError::field(
            path("payload"),
            format!(
                "is {} bytes of JSON; at most {} are accepted (gateway.max_payload_bytes)",
                payload.len(),
                rules.max_payload_bytes
            ),
        )
        .with(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    }
    let key = optional_string(map, "key", &path("key"), MAX_KEY_CHARS)?;
    let idempotency_key = optional_string(
        map,
        "idempotency_key",
        &path("idempotency_key"),
        MAX_IDEMPOTENCY_KEY_CHARS,
    )?;
    let deadline = match map.get("deadline") {
        None | Some(Value::Null) => None,
        // A past instant is taken: the task then fails with kind
        // `deadline` without running, as one that waited too long does (no
        // schema can say "in the future", and the document must describe
        // exactly what is accepted).
        Some(Value::Number(n)) => match n.as_i64() {
            Some(at) if at >= 0 => Some(at),
            Some(_) => {
                return Err(ApiError::field(
                    path("deadline"),
                    "must be at least 0 (milliseconds since the Unix epoch)",
                ))
            }
            None => {
                return Err(ApiError::field(
                    path("deadline"),
                    "must be a whole number of milliseconds since the Unix epoch",
                ))
            }
        },
        Some(Value::String(text)) => match parse_duration(text) {
            Ok(after) if !after.is_zero() => {
                let ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
                Some(now.saturating_add(ms))
            }
            Ok(_) => return Err(ApiError::field(path("deadline"), "must be after now")),
            Err(why) => return Err(ApiError::field(path("deadline"), why)),
        },
        Some(other) => {
            return Err(ApiError::field(
                path("deadline"),
                format!(
                "must be milliseconds since the Unix epoch or a duration such as \"30s\", not {}",
                kind_of(other)
            ),
            ))
        }
    };
    let run_at = parse_start(map, &path, rules.max_delay_ms, now)?;
    Ok(NewTask {
        task_type: task_type.clone(),
        topic: topic.clone(),
        payload,
        key: key.map(str::to_owned),
        idempotency_key: idempotency_key.map(str::to_owned),
        deadline,
        run_at,
    })
}

/// Checks a batch body `{"tasks": [...]}`.
pub fn parse_batch(value: &Value, rules: &Rules, now: i64) -> Result<Vec<NewTask>, ApiError> {
    let map = object(value, "")?;
    if let Some(unknown) = map.keys().find(|k| k.as_str() != "tasks") {
        return Err(ApiError::field(
            unknown.clone(),
            "unknown field; a batch is {\"tasks\": [...]}",
        ));
    }
    let tasks = match map.get("tasks") {
        None => return Err(ApiError::field("tasks", "required: an array of tasks")),
        Some(Value::Array(tasks)) => tasks,
        Some(other) => {
            return Err(ApiError::field(
                "tasks",
                format!("must be an array, not {}", kind_of(other)),
            ))
        }
    };
    if tasks.is_empty() {
        return Err(ApiError::field("tasks", "must hold at least one task"));
    }
    if tasks.len() > rules.max_batch {
        return Err(ApiError::field(
            "tasks",
            format!(
                "holds {} tasks; at most {} are accepted (gateway.max_batch)",
                tasks.len(),
                rules.max_batch
            ),
        )
        .with(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large"));
    }
    tasks
        .iter()
        .enumerate()
        .map(|(i, task)| parse_task(task, &format!("tasks[{i}]."), rules, now))
        .collect()
}

/// Parses a task or run id from a path: a UUID in its hyphenated form
/// (`8-4-4-4-12` hex digits), the form openapi.json's pattern describes
/// and the one the API answers with.
pub fn parse_id(text: &str, what: &str) -> Result<uuid::Uuid, ApiError> {
    let refuse = |why: String| {
        ApiError::field("id", format!("`{text}` is not a {what} (a UUID): {why}"))
            .with(StatusCode::BAD_REQUEST, "invalid_id")
    };
    if text.len() != 36 {
        return Err(refuse(
            "expected the hyphenated form, 36 characters (8-4-4-4-12 hex digits)".into(),
        ));
    }
    uuid::Uuid::try_parse(text).map_err(|e| refuse(e.to_string()))
}

/// Parses a duration: a whole number followed by `ms`, `s` or `m` (`500ms`,
/// `10s`, `2m`), or a bare number of seconds. Exactly what openapi.json's
/// pattern `^(0|[1-9][0-9]{0,11})(ms|s|m)?$` describes: no sign, spaces or
/// leading zeros, at most 12 digits.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let bad = || {
        format!(
            "`{text}` is not a duration such as 500ms, 10s or 2m \
             (a whole number of at most {MAX_DURATION_DIGITS} digits, no leading zero)"
        )
    };
    if number.is_empty()
        || number.len() > MAX_DURATION_DIGITS
        || (number.len() > 1 && number.starts_with('0'))
    {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            task_topics: [("echo".to_owned(), "conveyor.tasks.echo".to_owned())]
                .into_iter()
                .collect(),
            max_payload_bytes: 16,
            max_batch: 2,
            max_delay_ms: Some(30 * 86_400_000),
        }
    }

    fn refusal(body: &str) -> (u16, Option<String>) {
        let value = match parse_json(body.as_bytes()) {
            Ok(v) => v,
            Err(e) => return (e.status.as_u16(), e.field),
        };
        match parse_task(&value, "", &rules(), 1_000) {
            Ok(task) => panic!("accepted {body}: {task:?}"),
            Err(e) => (e.status.as_u16(), e.field),
        }
    }

    #[test]
    fn a_good_task_is_accepted_with_its_topic() {
        let value = json!({"type": "echo", "payload": {"a": 1}, "key": "k",
                           "idempotency_key": "i", "deadline": "2s"});
        let task = parse_task(&value, "", &rules(), 1_000).expect("valid");
        assert_eq!(task.topic, "conveyor.tasks.echo");
        assert_eq!(task.payload, br#"{"a":1}"#);
        assert_eq!(task.key.as_deref(), Some("k"));
        assert_eq!(task.idempotency_key.as_deref(), Some("i"));
        assert_eq!(task.deadline, Some(3_000));
    }

    #[test]
    fn keys_are_bounded_in_characters_as_the_document_says() {
        // 1,024 two-byte characters (2,048 bytes) are within maxLength...
        let at_bound = "é".repeat(MAX_KEY_CHARS);
        let value = json!({"type": "echo", "payload": 1, "key": at_bound,
                           "idempotency_key": "i".repeat(MAX_IDEMPOTENCY_KEY_CHARS)});
        let task = parse_task(&value, "", &rules(), 1_000).expect("at the bound");
        assert_eq!(task.key.map(|k| k.chars().count()), Some(MAX_KEY_CHARS));
        // ...one more is not.
        for (field, value) in [
            (
                "key",
                json!({"type": "echo", "payload": 1, "key": "é".repeat(MAX_KEY_CHARS + 1)}),
            ),
            (
                "idempotency_key",
                json!({"type": "echo", "payload": 1,
                       "idempotency_key": "é".repeat(MAX_IDEMPOTENCY_KEY_CHARS + 1)}),
            ),
        ] {
            let e = parse_task(&value, "", &rules(), 1_000).expect_err("over the bound");
            assert_eq!((e.status.as_u16(), e.field.as_deref()), (422, Some(field)));
            assert!(e.message.contains("characters long"), "{}", e.message);
        }
    }

    #[test]
    fn every_bad_input_names_its_field_and_status() {
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(refusal("{"), (400, some("body")));
        assert_eq!(refusal("[]"), (422, some("body")));
        assert_eq!(refusal(r#"{"payload": 1}"#), (422, some("type")));
        assert_eq!(refusal(r#"{"type": 3, "payload": 1}"#), (422, some("type")));
        assert_eq!(
            refusal(r#"{"type": "nope", "payload": 1}"#),
            (422, some("type"))
        );
        assert_eq!(refusal(r#"{"type": "echo"}"#), (422, some("payload")));
        assert_eq!(
            refusal(r#"{"type": "echo", "payload": "0123456789abcdef"}"#),
            (413, some("payload"))
        );
        assert_eq!(
            refusal(r#"{"type": "echo", "payload": 1, "paylod": 2}"#),
            (422, some("paylod"))
        );
        assert_eq!(
            refusal(r#"{"type": "echo", "payload": 1, "key": 5}"#),
            (422, some("key"))
        );
        assert_eq!(
            refusal(r#"{"type": "echo", "payload": 1, "idempotency_key": ""}"#),
            (422, some("idempotency_key"))
        );
        assert_eq!(
            refusal(r#"{"type": "echo", "payload": 1, "deadline": -1}"#),
            (422, some("deadline"))
        );
        assert_eq!(
            refusal(r#"{"type": "echo", "payload": 1, "deadline": "soon"}"#),
            (422, some("deadline"))
        );
    }

    #[test]
    fn batch_errors_name_the_task() {
        let r = rules();
        let bad = json!({"tasks": [{"type": "echo", "payload": 1}, {"type": "x", "payload": 1}]});
        let e = parse_batch(&bad, &r, 0).expect_err("bad type");
        assert_eq!(e.field.as_deref(), Some("tasks[1].type"));
        let many = json!({"tasks": [{"type": "echo", "payload": 1}, {"type": "echo", "payload": 1},
                                    {"type": "echo", "payload": 1}]});
        assert_eq!(
            parse_batch(&many, &r, 0).map_err(|e| e.status.as_u16()),
            Err(413)
        );
        assert_eq!(
            parse_batch(&json!({"tasks": []}), &r, 0).map_err(|e| e.field),
            Err(Some("tasks".into()))
        );
    }

    #[test]
    fn ids_are_hyphenated_uuids_only() {
        let id = "0b1c5a7e-8c1f-4f43-9d3e-2f6f1f0c9a10";
        assert_eq!(
            parse_id(id, "task id").map(|u| u.to_string()),
            Ok(id.into())
        );
        assert_eq!(
            parse_id(&id.to_uppercase(), "task id").map(|u| u.to_string()),
            Ok(id.into())
        );
        for bad in [
            "0b1c5a7e8c1f4f439d3e2f6f1f0c9a10",
            "{0b1c5a7e-8c1f-4f43-9d3e-2f6f1f0c9a10}",
            "urn:uuid:0b1c5a7e-8c1f-4f43-9d3e-2f6f1f0c9a10",
            "0b1c5a7e-8c1f-4f43-9d3e-2f6f1f0c9a1g",
            "",
        ] {
            let e = parse_id(bad, "task id").expect_err(bad);
            assert_eq!((e.status.as_u16(), e.field.as_deref()), (400, Some("id")));
        }
    }

    #[test]
    fn durations_parse_and_refuse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("999999999999m"),
            Ok(Duration::from_secs(999_999_999_999 * 60))
        );
        for bad in [
            "",
            "s",
            "1h",
            "-1s",
            "1.5s",
            "99999999999999999999s",
            "1000000000000s",
            " 10s",
            "010s",
            "+5",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// Parses `body` as one task at `now`, to its start time or the
    /// refusal's field and message.
    fn start_of(
        body: serde_json::Value,
        rules: &Rules,
        now: i64,
    ) -> Result<Option<i64>, (String, String)> {
        parse_task(&body, "", rules, now)
            .map(|t| t.run_at)
            .map_err(|e| (e.field.unwrap_or_default(), e.message))
    }

    #[test]
    fn a_delay_or_a_run_at_sets_the_start_and_bad_ones_are_refused_by_name() {
        let rules = rules();
        let now = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        let task = |extra: serde_json::Value| {
            let mut body = json!({"type": "echo", "payload": 1});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            body
        };
        assert_eq!(start_of(task(json!({})), &rules, now), Ok(None));
        assert_eq!(
            start_of(task(json!({"delay": "90s"})), &rules, now),
            Ok(Some(now + 90_000))
        );
        assert_eq!(
            start_of(task(json!({"delay": "1h"})), &rules, now),
            Ok(Some(now + 3_600_000))
        );
        assert_eq!(
            start_of(task(json!({"delay": "0s"})), &rules, now),
            Ok(None)
        );
        assert_eq!(
            start_of(task(json!({"delay": null})), &rules, now),
            Ok(None)
        );
        assert_eq!(
            start_of(
                task(json!({"run_at": "2026-01-01T01:00:00+01:00"})),
                &rules,
                now
            ),
            Ok(None),
            "an hour ahead of UTC: now, so it starts now"
        );
        assert_eq!(
            start_of(
                task(json!({"run_at": "2026-01-01T00:00:02.5Z"})),
                &rules,
                now
            ),
            Ok(Some(now + 2_500))
        );
        assert_eq!(
            start_of(task(json!({"delay": "30d"})), &rules, now),
            Ok(Some(now + 30 * 86_400_000))
        );
        let refused = |extra, field: &str, words: &str| {
            let (f, message) = start_of(task(extra), &rules, now).expect_err("refused");
            assert_eq!(f, field, "{message}");
            assert!(message.contains(words), "{field}: {message}");
        };
        refused(
            json!({"delay": "1h", "run_at": "2026-01-01T00:00:00Z"}),
            "run_at",
            "not both",
        );
        refused(json!({"delay": "-5s"}), "delay", "is not a duration");
        refused(json!({"delay": 5}), "delay", "not a number");
        refused(json!({"delay": "31d"}), "delay", "more than 30d from now");
        refused(
            json!({"run_at": "2026-03-01T00:00:00Z"}),
            "run_at",
            "more than 30d from now",
        );
        refused(
            json!({"run_at": "2026-01-01T10:00:00"}),
            "run_at",
            "no UTC offset",
        );
        refused(
            json!({"run_at": "tomorrow"}),
            "run_at",
            "not an RFC 3339 time",
        );
        let off = Rules {
            max_delay_ms: None,
            ..rules.clone()
        };
        let (field, message) = start_of(task(json!({"delay": "1s"})), &off, now).expect_err("off");
        assert_eq!(
            (field.as_str(), message.as_str()),
            (
                "delay",
                "delayed tasks are off on this gateway ([delays] enabled = false)"
            )
        );
        // In a batch, the path names the task.
        let e = parse_batch(
            &json!({"tasks": [{"type": "echo", "payload": 1}, {"type": "echo", "payload": 1, "delay": "1y"}]}),
            &rules,
            now,
        )
        .expect_err("refused");
        assert_eq!(e.field.as_deref(), Some("tasks[1].delay"));
    }

    #[test]
    fn workflow_starts_are_checked() {
        let rules = Rules {
            max_payload_bytes: 100,
            ..rules()
        };
        let run = parse_run(
            &json!({"payload": {"text": "a b"}, "idempotency_key": "k1", "delay": "1m"}),
            &rules,
            1_000,
        )
        .unwrap();
        assert_eq!(run.run_at, Some(61_000));
        assert_eq!(run.payload, br#"{"text":"a b"}"#);
        assert_eq!(run.idempotency_key.as_deref(), Some("k1"));
        let cases = [
            (json!({}), "payload", 422),
            (json!({"payload": 1, "key": "x"}), "key", 422),
            (
                json!({"payload": 1, "idempotency_key": 5}),
                "idempotency_key",
                422,
            ),
            (json!({"payload": "x".repeat(200)}), "payload", 413),
            (json!([1]), "body", 422),
            (
                json!({"payload": 1, "delay": "1h", "run_at": "2026-01-01T00:00:00Z"}),
                "run_at",
                422,
            ),
        ];
        for (body, field, status) in cases {
            let e = parse_run(&body, &rules, 1_000).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {e:?}");
            assert_eq!(e.status.as_u16(), status, "{body}: {e:?}");
        }
    }
}
