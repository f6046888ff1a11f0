//! [`TaskEvent`] (`schemas/task_event.avsc`) and [`TaskControl`]
//! (`schemas/task_control.avsc`): always plain Avro binary, read with the
//! same checks as the task records (see the parent module).

use uuid::Uuid;

use super::binary::{self, Reader};
use super::DecodeError;

/// `started`: an attempt began.
pub const STARTED: &str = "started";
/// `progress`: the handler reported how far it got.
pub const PROGRESS: &str = "progress";
/// `retrying`: an attempt failed; another is due.
pub const RETRYING: &str = "retrying";
/// `cancelled`: the task was cancelled.
pub const CANCELLED: &str = "cancelled";

/// The one control action so far.
pub const CANCEL: &str = "cancel";

/// One step in a task's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEvent {
    /// The task's id.
    pub id: Uuid,
    /// Its type.
    pub task_type: String,
    /// What happened ([`STARTED`], [`PROGRESS`], [`RETRYING`],
    /// [`CANCELLED`], or a kind a newer writer knows).
    pub kind: String,
    /// When, in ms since the epoch.
    pub at: i64,
    /// Who wrote it.
    pub worker: String,
    /// The attempt, from 1; 0 when none started.
    pub attempt: i32,
    /// A progress value: JSON text.
    pub progress: Option<Vec<u8>>,
    /// When the next attempt is due (ms since the epoch).
    pub due: Option<i64>,
    /// A note.
    pub message: Option<String>,
    /// A started attempt's progress token.
    pub token: Option<String>,
}

impl TaskEvent {
    /// An event of `kind` about `id`, now, with nothing optional set.
    pub fn new(id: Uuid, task_type: &str, kind: &str, worker: &str, attempt: i32) -> Self {
        TaskEvent {
            id,
            task_type: task_type.to_owned(),
            kind: kind.to_owned(),
            at: super::now_millis(),
            worker: worker.to_owned(),
            attempt,
            progress: None,
            due: None,
            message: None,
            token: None,
        }
    }
}

fn write_optional_str(out: &mut Vec<u8>, value: Option<&str>) {
    binary::write_optional_tag(out, value.is_some());
    if let Some(value) = value {
        binary::write_str(out, value);
    }
}

fn read_optional_string(r: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    Ok(if r.read_optional_tag()? {
        Some(r.read_string()?)
    } else {
        None
    })
}

/// Appends the encoding of `event` to `out`.
pub fn encode_event(event: &TaskEvent, out: &mut Vec<u8>) {
    let progress = event.progress.as_ref().map_or(0, Vec::len);
    out.reserve(96 + progress + event.task_type.len() + event.worker.len());
    binary::write_uuid(out, &event.id);
    binary::write_str(out, &event.task_type);
    binary::write_str(out, &event.kind);
    binary::write_long(out, event.at);
    binary::write_str(out, &event.worker);
    binary::write_int(out, event.attempt);
    binary::write_optional_tag(out, event.progress.is_some());
    if let Some(progress) = &event.progress {
        binary::write_bytes(out, progress);
    }
    binary::write_optional_tag(out, event.due.is_some());
    if let Some(due) = event.due {
        binary::write_long(out, due);
    }
    write_optional_str(out, event.message.as_deref());
    write_optional_str(out, event.token.as_deref());
}

/// Decodes one event. Fields a newer writer appended are ignored; fields
/// an older writer did not have take their defaults.
pub fn decode_event(input: &[u8]) -> Result<TaskEvent, DecodeError> {
    const RECORD: &str = "TaskEvent";
    let mut r = Reader::new(input, RECORD);
    r.field(RECORD, "id");
    let id = r.read_uuid()?;
    r.field(RECORD, "type");
    let task_type = r.read_string()?;
    r.field(RECORD, "kind");
    let kind = r.read_string()?;
    r.field(RECORD, "at");
    let at = r.read_long()?;
    r.field(RECORD, "worker");
    let worker = r.read_string()?;
    r.field(RECORD, "attempt");
    let attempt = r.read_int()?;
    let mut event = TaskEvent {
        id,
        task_type,
        kind,
        at,
        worker,
        attempt,
        progress: None,
        due: None,
        message: None,
        token: None,
    };
    // The optional fields carry defaults: a record written before one of
    // them existed ends early.
    if r.at_end() {
        return Ok(event);
    }
    r.field(RECORD, "progress");
    if r.read_optional_tag()? {
        event.progress = Some(r.read_bytes()?.to_vec());
    }
    if r.at_end() {
        return Ok(event);
    }
    r.field(RECORD, "due");
    if r.read_optional_tag()? {
        event.due = Some(r.read_long()?);
    }
    if r.at_end() {
        return Ok(event);
    }
    r.field(RECORD, "message");
    event.message = read_optional_string(&mut r)?;
    if r.at_end() {
        return Ok(event);
    }
    r.field(RECORD, "token");
    event.token = read_optional_string(&mut r)?;
    Ok(event)
}

/// An instruction about a task or a workflow run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskControl {
    /// The task's or run's id.
    pub id: Uuid,
    /// What to do ([`CANCEL`], or an action a newer writer knows).
    pub action: String,
    /// When it was asked for, ms since the epoch.
    pub at: i64,
    /// Who asked.
    pub by: String,
}

/// Appends the encoding of `control` to `out`.
pub fn encode_control(control: &TaskControl, out: &mut Vec<u8>) {
    out.reserve(64 + control.action.len() + control.by.len());
    binary::write_uuid(out, &control.id);
    binary::write_str(out, &control.action);
    binary::write_long(out, control.at);
    binary::write_str(out, &control.by);
}

/// Decodes one control record.
pub fn decode_control(input: &[u8]) -> Result<TaskControl, DecodeError> {
    const RECORD: &str = "TaskControl";
    let mut r = Reader::new(input, RECORD);
    r.field(RECORD, "id");
    let id = r.read_uuid()?;
    r.field(RECORD, "action");
    let action = r.read_string()?;
    r.field(RECORD, "at");
    let at = r.read_long()?;
    r.field(RECORD, "by");
    let by = r.read_string()?;
    Ok(TaskControl { id, action, at, by })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> TaskEvent {
        TaskEvent {
            progress: Some(br#"{"done":37,"of":120}"#.to_vec()),
            due: Some(1_700_000_000_123),
            message: Some("timeout".into()),
            token: Some("0123456789abcdef0123456789abcdef".into()),
            ..TaskEvent::new(Uuid::new_v4(), "render", PROGRESS, "w-1", 2)
        }
    }

    #[test]
    fn events_and_controls_round_trip() {
        let e = event();
        let mut out = Vec::new();
        encode_event(&e, &mut out);
        assert_eq!(decode_event(&out).unwrap(), e);
        let c = TaskControl {
            id: Uuid::new_v4(),
            action: CANCEL.into(),
            at: 5,
            by: "cli".into(),
        };
        let mut out = Vec::new();
        encode_control(&c, &mut out);
        assert_eq!(decode_control(&out).unwrap(), c);
    }

    #[test]
    fn truncated_or_garbage_events_are_errors_naming_the_field() {
        let mut out = Vec::new();
        encode_event(&event(), &mut out);
        // Cut inside `kind`: an error, never a panic.
        let e = decode_event(&out[..40]).unwrap_err();
        assert_eq!(e.record(), "TaskEvent");
        for n in 0..out.len() {
            let _ = decode_event(&out[..n]);
        }
        assert!(decode_control(b"\x48garbage").is_err());
    }
}
