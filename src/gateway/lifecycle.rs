//! A task while it lives: `POST /v1/tasks/{id}:cancel`,
//! `POST /v1/tasks/{id}/progress` (an `http` handler's report, with its
//! attempt's progress token) and `GET /v1/tasks/{id}/events` (server-sent
//! events until the task is terminal).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::{json, Value};
use uuid::Uuid;

use super::api::{self, ApiError};
use super::status::render;
use super::view::{LiveEvent, TaskView};
use super::Shared;
use crate::codec::event::{encode_control, encode_event, TaskControl, TaskEvent, CANCEL, PROGRESS};
use crate::codec::now_millis;

/// The header carrying an attempt's progress token.
pub const PROGRESS_TOKEN_HEADER: &str = "conveyor-progress-token";

/// Longest a progress report waits for the gateway to learn of its
/// attempt (its `started` event may still be on its way).
const PROGRESS_WAIT: Duration = Duration::from_secs(5);

/// Longest a stream waits, after its task ended, for the task's last
/// events to be read (they are written before the result, but the two
/// topics are read independently).
const STREAM_SETTLE: Duration = Duration::from_secs(5);

/// `POST /v1/tasks/{id}:cancel`: `id` is the path's id, the suffix taken
/// off by the router (`routes::task_route`).
pub(super) async fn cancel_task(shared: &Shared, id: &str) -> Response {
    match cancel(shared, id).await {
        Ok(answer) => (StatusCode::ACCEPTED, Json(answer)).into_response(),
        Err(error) => error.into_response(),
    }
}

pub(super) async fn cancel(shared: &Shared, id: &str) -> Result<Value, ApiError> {
    let id = api::parse_id(id, "task id")?;
    let Some(topic) = &shared.control_topic else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancel_off",
            "cancellation is off in this configuration ([cancel] enabled = false)",
        ));
    };
    let stored = super::status::stored_task(shared, &id)?;
    let stored_run = match &stored {
        Some(_) => Vec::new(),
        None => super::status::stored_run(shared, &id)?,
    };
    let (status, is_run) = {
        let view = shared.view();
        let task = super::status::merge(view.get(&id), stored.as_ref());
        let run = match &task {
            Some(_) => Vec::new(),
            None => super::status::merge_run(view.run(&id), &stored_run),
        };
        match task {
            Some(task) if task.phase.is_terminal() => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "task_finished",
                    format!(
                        "task {id} has already ended ({}); there is nothing to cancel",
                        task.phase.name()
                    ),
                )
                .with_task_status(task.phase.name()));
            }
            Some(task) => (task.phase.name(), false),
            None if !run.is_empty() => {
                let tasks: Vec<&TaskView> = run.iter().collect();
                (super::status::run_status(&tasks, id), true)
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_task",
                    format!(
                    "no task or workflow run {id} is known here: never submitted, or older than \
                         the status store keeps (gateway.retention_ms)"
                ),
                ))
            }
        }
    };
    let control = TaskControl {
        id,
        action: CANCEL.into(),
        at: now_millis(),
        by: format!("gateway {}", shared.config.kafka.client_id),
    };
    let mut value = Vec::new();
    encode_control(&control, &mut value);
    write(shared, topic, id, &value, "the cancellation").await?;
    tracing::info!(%id, status, "cancellation written");
    Ok(json!({
        "id": id,
        "status": status,
        "cancel_requested": true,
        "workflow_run": is_run,
        "status_url": if is_run { super::submit::run_url(&id) } else { super::submit::status_url(&id) },
    }))
}

/// `POST /v1/tasks/{id}/progress`: a progress report for the task's
/// running attempt, authenticated by that attempt's progress token (sent
/// to an `http` handler in the `Conveyor-Progress-Token` header) rather
/// than by a bearer token. The body is any JSON value.
pub(super) async fn post_progress(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match progress(&shared, &id, &headers, &body).await {
        Ok(answer) => (StatusCode::ACCEPTED, Json(answer)).into_response(),
        Err(error) => error.into_response(),
    }
}

async fn progress(
    shared: &Shared,
    id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, ApiError> {
    let id = api::parse_id(id, "task id")?;
    let Some(topic) = &shared.events_topic else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "events_off",
            "task events are off in this configuration ([events] enabled = false)",
        ));
    };
    let token = headers
        .get(PROGRESS_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::field(
                "Conveyor-Progress-Token",
                "required: the token conveyor sent with the task's request",
            )
            .with(StatusCode::UNAUTHORIZED, "missing_progress_token")
        })?;
    if body.len() > shared.progress_max_bytes {
        return Err(ApiError::field(
            "body",
            format!(
                "the progress value is {} bytes; events.progress_max_bytes allows {}",
                body.len(),
                shared.progress_max_bytes
            ),
        )
        .with(StatusCode::PAYLOAD_TOO_LARGE, "progress_too_large"));
    }
    let value = api::parse_json(body)?;
    // The attempt's `started` event may not have been read yet: wait for it.
    let attempt = super::status::long_poll(shared, id, PROGRESS_WAIT, |view| {
        let Some(task) = view.get(&id) else {
            return Ok((None, false));
        };
        if task.phase.is_terminal() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "task_finished",
                format!("task {id} has already ended ({})", task.phase.name()),
            )
            .with_task_status(task.phase.name()));
        }
        let current = task
            .attempt
            .as_ref()
            .filter(|a| a.token.as_deref().is_some_and(|t| tokens_match(t, token)));
        Ok((current.map(|a| a.attempt), current.is_some()))
    })
    .await?;
    let Some(attempt) = attempt else {
        return Err(ApiError::field(
            "Conveyor-Progress-Token",
            "not the token of the task's running attempt (the task is unknown, not running, or another attempt runs)",
        )
        .with(StatusCode::FORBIDDEN, "wrong_progress_token"));
    };
    let mut event = TaskEvent::new(
        id,
        "",
        PROGRESS,
        &format!("gateway {}", shared.config.kafka.client_id),
        attempt,
    );
    if let Some(task_type) = shared.view().get(&id).map(|t| t.task_type.clone()) {
        event.task_type = task_type;
    }
    event.progress = Some(value.to_string().into_bytes());
    let mut bytes = Vec::new();
    encode_event(&event, &mut bytes);
    write(shared, topic, id, &bytes, "progress").await?;
    Ok(json!({"id": id, "attempt": attempt, "accepted": true}))
}

/// Produces `value` to `topic` keyed by `id`, acknowledged within
/// `gateway.produce_timeout_ms`, else a 503 (`what` names it in the log).
async fn write(
    shared: &Shared,
    topic: &str,
    id: Uuid,
    value: &[u8],
    what: &str,
) -> Result<(), ApiError> {
    let key = id.to_string();
    let record = FutureRecord::to(topic).key(&key).payload(value);
    let timeout = Duration::from_millis(shared.settings.produce_timeout_ms);
    shared
        .producer
        .send(record, Timeout::After(timeout))
        .await
        .map(|_| ())
        .map_err(|(e, _)| {
            super::submit::unavailable(&[], format!("cannot write {what} to {topic}: {e}"))
        })
}

fn tokens_match(a: &str, b: &str) -> bool {
    super::secret::constant_time_eq(a.as_bytes(), b.as_bytes())
}

/// Counts an open stream; the count drops with it.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        self.0
            .metrics
            .gateway_event_streams
            .with_label_values::<&str>(&[])
            .dec();
    }
}

/// Where a stream resumes: after the event with this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// From the start: the task's status, then every event kept.
    Start,
    /// After the events topic's offset.
    After(i64),
    /// After the task's end: nothing more.
    End,
}

fn resume_of(headers: &HeaderMap) -> Result<Resume, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(Resume::Start);
    };
    let text = value.to_str().map(str::trim).unwrap_or("\u{0}");
    if text.is_empty() {
        return Ok(Resume::Start);
    }
    if text == "end" {
        return Ok(Resume::End);
    }
    // Exactly what the document allows: 1 to 18 digits.
    let digits = (1..=18).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| text.parse::<i64>().ok())
        .flatten()
        .map(Resume::After)
        .ok_or_else(|| {
            ApiError::field(
                "Last-Event-ID",
                "must be an event id this stream sent: 1 to 18 digits, or `end`",
            )
            .with(StatusCode::BAD_REQUEST, "invalid_parameter")
        })
}

/// `GET /v1/tasks/{id}/events`: server-sent events, in order: the task's
/// current status (`status`, without an id), each event kept of it (`started`,
/// `progress`, `retrying`, `cancelled`, with the events topic's offset as
/// id), then its end (`succeeded`, `failed` or `cancelled`, id `end`),
/// after which the stream closes. `Last-Event-ID` resumes after that
/// event. At most `gateway.max_event_streams` are open at once.
pub(super) async fn task_events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = match api::parse_id(&id, "task id") {
        Ok(id) => id,
        Err(error) => return error.into_response(),
    };
    let resume = match resume_of(&headers) {
        Ok(resume) => resume,
        Err(error) => return error.into_response(),
    };
    let stored = match super::status::stored_task(&shared, &id) {
        Ok(stored) => stored,
        Err(error) => return error.into_response(),
    };
    let known = {
        let mut view = shared.view();
        if let Some(stored) = stored.filter(|_| view.get(&id).is_none()) {
            // Only the store has it (the view's bounds forgot it, or the
            // gateway restarted): the view holds it again for the stream.
            view.recall(stored, crate::codec::now_millis());
        }
        view.get(&id).map(|t| t.phase)
    };
    match (known, resume) {
        (None, _) => return super::status::unknown_task(id).into_response(),
        // Resuming after the end: nothing more (204 tells an EventSource
        // not to reconnect).
        (Some(phase), Resume::End) if phase.is_terminal() => {
            return StatusCode::NO_CONTENT.into_response()
        }
        _ => {}
    }
    let limit = shared.settings.max_event_streams;
    if shared.streams.fetch_add(1, Ordering::AcqRel) >= limit {
        shared.streams.fetch_sub(1, Ordering::AcqRel);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!(
                "this gateway has gateway.max_event_streams ({limit}) event streams open; retry later or poll GET /v1/tasks/{{id}}"
            ),
        )
        .into_response();
    }
    shared
        .metrics
        .gateway_event_streams
        .with_label_values::<&str>(&[])
        .inc();
    let state = Stream {
        open: Open(shared.clone()),
        id,
        last: match resume {
            Resume::After(offset) => Some(offset),
            _ => None,
        },
        status_sent: !matches!(resume, Resume::Start),
        queue: VecDeque::new(),
        done: false,
        ended_at: None,
        high: None,
    };
    let stream = futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.queue.pop_front() {
                return Some((Ok::<_, Infallible>(event), state));
            }
            if state.done {
                return None;
            }
            state.next().await;
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

struct Stream {
    open: Open,
    id: Uuid,
    /// The id of the last event sent.
    last: Option<i64>,
    status_sent: bool,
    queue: VecDeque<SseEvent>,
    done: bool,
    /// When the task was first seen ended (its last events may still be
    /// read for up to [`STREAM_SETTLE`]).
    ended_at: Option<tokio::time::Instant>,
    /// The high watermark of the task's events partition then.
    high: Option<i64>,
}

impl Stream {
    /// Queues what is new of the task, or waits for a change.
    async fn next(&mut self) {
        let shared = self.open.0.clone();
        let id = self.id;
        let (task, notify) = {
            let mut view = shared.view();
            let Some(task) = view.get(&id).cloned() else {
                // Forgotten by the view (its bounds): the stream ends.
                self.done = true;
                return;
            };
            let notify = view.waiter(id);
            (task, notify)
        };
        if !self.status_sent {
            self.status_sent = true;
            self.queue.push_back(
                SseEvent::default()
                    .event("status")
                    .data(render(&task).to_string()),
            );
        }
        self.queue_events(&task);
        let stopping = shared.stopping.load(Ordering::Relaxed);
        if task.phase.is_terminal() && (stopping || self.settled(&task).await) {
            // Events read while `settled` waited (the last ones, which it
            // waited for) are in the view now, not in `task`: they go out
            // before the end.
            let task = shared.view().get(&id).cloned().unwrap_or(task);
            self.queue_events(&task);
            self.queue.push_back(
                SseEvent::default()
                    .event(task.phase.name())
                    .id("end")
                    .data(render(&task).to_string()),
            );
            self.done = true;
        } else if stopping {
            self.done = true;
        }
        if self.done || !self.queue.is_empty() {
            drop(notify);
            shared.view().release_waiter(&id);
            return;
        }
        // While an ended task's last events are awaited, look again
        // shortly; else wait for a change (keep-alives flow meanwhile).
        let wait = if self.ended_at.is_some() {
            Duration::from_millis(50)
        } else {
            Duration::from_secs(3600)
        };
        let _ = tokio::time::timeout(wait, notify.notified()).await;
        drop(notify);
        shared.view().release_waiter(&id);
    }

    /// Queues `task`'s events not sent yet, in order.
    fn queue_events(&mut self, task: &TaskView) {
        let last = self.last;
        for event in task
            .events
            .iter()
            .filter(|e| last.is_none_or(|l| e.offset > l))
        {
            self.queue.push_back(sse_of(event));
            self.last = Some(event.offset);
        }
    }

    /// Whether an ended task's events have all been read. They are
    /// written before its result, so they lie below the high watermark its
    /// events partition had when the end was first seen (a task with no
    /// event read has none to wait for). Gives up after
    /// [`STREAM_SETTLE`].
    async fn settled(&mut self, task: &TaskView) -> bool {
        let Some(partition) = task.events_partition else {
            return true;
        };
        let shared = self.open.0.clone();
        let ended = *self.ended_at.get_or_insert_with(tokio::time::Instant::now);
        if ended.elapsed() >= STREAM_SETTLE {
            return true;
        }
        // Asked again while the broker does not answer.
        if self.high.is_none() {
            self.high = shared.events_high(partition).await;
        }
        let Some(high) = self.high else {
            return false;
        };
        let read = shared.view().events_read(partition);
        read >= high
    }
}

fn sse_of(event: &LiveEvent) -> SseEvent {
    let mut data = json!({
        "kind": event.kind,
        "at": event.at,
        "attempt": event.attempt,
        "worker": event.worker,
    });
    if let Some(map) = data.as_object_mut() {
        if let Some(progress) = &event.progress {
            map.insert("progress".into(), crate::workflow::output_as_json(progress));
        }
        if let Some(due) = event.due {
            map.insert("due".into(), json!(due));
        }
        if let Some(message) = &event.message {
            map.insert("message".into(), json!(message));
        }
    }
    SseEvent::default()
        .event(event.kind.as_str())
        .id(event.offset.to_string())
        .data(data.to_string())
}
