//! Status: `GET /v1/tasks/{id}` and `GET /v1/workflows/{id}` from the
//! view, both long-polling (`?wait=`) through one helper.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use uuid::Uuid;

use super::api::{self, ApiError};
use super::view::{self, TaskView, View};
use super::*;
use crate::workflow::Workflows;

/// `GET /v1/workflows/{id}`: a run's status, step by step, optionally
/// waiting (`?wait=`) until it is over.
pub(super) async fn get_run(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let outcome = async {
        let run = api::parse_id(&id, "workflow run id")?;
        let wait = wait_of(&shared, &params)?;
        let stored = stored_run(&shared, &run)?;
        // The run's own result has the run's id: it wakes the wait.
        let tasks = long_poll(&shared, run, wait, |view| {
            let tasks = merge_run(view.run(&run), &stored);
            if tasks.is_empty() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_workflow_run",
                    format!(
                        "no workflow run {run} is known here: never started, or older than \
                         the status store keeps (gateway.retention_ms)"
                    ),
                ));
            }
            let over = tasks.iter().any(|t| t.id == run && t.phase.is_terminal());
            Ok((tasks, over))
        })
        .await?;
        Ok::<_, ApiError>(render_run(&shared.workflows, run, &tasks))
    }
    .await;
    match outcome {
        Ok(value) => Json(value).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `succeeded`, `failed` or `cancelled` once the run's own result is
/// known, `running` once any of its steps started or finished, `scheduled` while its first step waits
/// for its time, else `queued`.
pub(super) fn run_status(tasks: &[&TaskView], run: Uuid) -> &'static str {
    if let Some(result) = tasks.iter().find(|t| t.id == run) {
        return result.phase.name();
    }
    if tasks.iter().any(|t| {
        t.phase.is_terminal() || matches!(t.phase, view::Phase::Running | view::Phase::Retrying)
    }) {
        "running"
    } else if !tasks.is_empty() && tasks.iter().all(|t| t.phase == view::Phase::Scheduled) {
        "scheduled"
    } else {
        "queued"
    }
}

/// A run as the API shows it: overall status, then each step's status,
/// attempts and outputs so far (a fan-out's children counted, their
/// outputs in child order), and the final output or error.
pub(super) fn render_run(workflows: &Workflows, run: Uuid, tasks: &[TaskView]) -> Value {
    let refs: Vec<&TaskView> = tasks.iter().collect();
    let name = tasks
        .iter()
        .find_map(|t| t.workflow.as_ref().map(|w| w.name.clone()))
        .unwrap_or_default();
    let definition = workflows.get(&name);
    let mut value = json!({
        "id": run,
        "workflow": name,
        "status": run_status(&refs, run),
    });
    let Some(map) = value.as_object_mut() else {
        return value;
    };
    if let Some(result) = tasks.iter().find(|t| t.id == run) {
        map.insert("finished_at".into(), json!(result.finished_at));
        insert_outcome(map, result, "result");
    }
    let steps: Vec<Value> = definition
        .map(|d| {
            d.steps
                .iter()
                .enumerate()
                .map(|(index, step)| {
                    let index = i32::try_from(index).unwrap_or(i32::MAX);
                    let at_step: Vec<&TaskView> = tasks
                        .iter()
                        .filter(|t| t.id != run)
                        .filter(|t| t.workflow.as_ref().is_some_and(|w| w.step == index))
                        // A join's contributions are the children's, not the join's.
                        .filter(|t| {
                            !(step.join
                                && t.workflow.as_ref().is_some_and(|w| w.child_index.is_some()))
                        })
                        .collect();
                    render_step(index, &step.task, &at_step)
                })
                .collect()
        })
        .unwrap_or_default();
    map.insert("steps".into(), json!(steps));
    value
}

/// Most children's outputs one step of a run lists (as many as the
/// status view holds tasks by default).
pub(super) const MAX_LISTED_OUTPUTS: usize = 100_000;

pub(super) fn render_step(index: i32, task_type: &str, tasks: &[&TaskView]) -> Value {
    let mut step = json!({"index": index, "type": task_type});
    let Some(map) = step.as_object_mut() else {
        return step;
    };
    let count = tasks
        .iter()
        .find_map(|t| t.workflow.as_ref().and_then(|w| w.child_count));
    match (count, tasks) {
        (None, []) => {
            map.insert("status".into(), json!("pending"));
        }
        (None, [task, ..]) => {
            map.insert("status".into(), json!(task.phase.name()));
            map.insert("task_id".into(), json!(task.id));
            map.insert("attempts".into(), json!(task.attempts));
            insert_outcome(map, task, "output");
        }
        (Some(count), _) => {
            let count = usize::try_from(count).unwrap_or(0);
            // The count comes from the records, which anyone can write:
            // never allocate by it beyond a fixed limit.
            let listed = count.min(MAX_LISTED_OUTPUTS);
            let mut outputs = vec![Value::Null; listed];
            let (mut succeeded, mut failed, mut attempts) = (0usize, 0usize, 0i64);
            for task in tasks {
                let child = task
                    .workflow
                    .as_ref()
                    .and_then(|w| w.child_index)
                    .and_then(|c| usize::try_from(c).ok());
                attempts += i64::from(task.attempts.unwrap_or(0));
                match task.phase {
                    view::Phase::Succeeded => {
                        succeeded += 1;
                        if let (Some(slot), Some(output)) =
                            (child.and_then(|c| outputs.get_mut(c)), &task.output)
                        {
                            *slot = crate::workflow::output_as_json(output);
                        }
                    }
                    view::Phase::Failed | view::Phase::Cancelled => failed += 1,
                    view::Phase::Queued
                    | view::Phase::Scheduled
                    | view::Phase::Running
                    | view::Phase::Retrying => {}
                }
            }
            let status = if failed > 0 {
                "failed"
            } else if succeeded >= count {
                "succeeded"
            } else {
                "running"
            };
            map.insert("status".into(), json!(status));
            map.insert("attempts".into(), json!(attempts));
            map.insert(
                "children".into(),
                json!({"count": count, "succeeded": succeeded, "failed": failed}),
            );
            map.insert("outputs".into(), json!(outputs));
        }
    }
    step
}

pub(super) async fn get_task(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    match lookup(&shared, &id, &params).await {
        Ok(task) => Json(render(&task)).into_response(),
        Err(error) => error.into_response(),
    }
}

/// The `wait` query parameter (the only one the status routes take),
/// capped at `gateway.max_wait_ms`; zero when absent.
pub(super) fn wait_of(
    shared: &Shared,
    params: &BTreeMap<String, String>,
) -> Result<Duration, ApiError> {
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "wait") {
        return Err(ApiError::field(
            unknown.clone(),
            "unknown query parameter; this route takes `wait`",
        )
        .with(StatusCode::BAD_REQUEST, "invalid_parameter"));
    }
    Ok(match params.get("wait") {
        None => Duration::ZERO,
        Some(text) => api::parse_duration(text)
            .map_err(|why| {
                ApiError::field("wait", why).with(StatusCode::BAD_REQUEST, "invalid_parameter")
            })?
            .min(Duration::from_millis(shared.settings.max_wait_ms)),
    })
}

pub(super) async fn lookup(
    shared: &Shared,
    id: &str,
    params: &BTreeMap<String, String>,
) -> Result<TaskView, ApiError> {
    let id = api::parse_id(id, "task id")?;
    let wait = wait_of(shared, params)?;
    let stored = stored_task(shared, &id)?;
    long_poll(shared, id, wait, |view| {
        let task = merge(view.get(&id), stored.as_ref()).ok_or_else(|| unknown_task(id))?;
        let over = task.phase.is_terminal();
        Ok((task, over))
    })
    .await
}

/// The 404 of a task neither the view nor the store knows.
pub(super) fn unknown_task(id: Uuid) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_task",
        format!(
            "no task {id} is known here: never submitted, or older than the status store \
             keeps (gateway.retention_ms)"
        ),
    )
}

/// The 503 of a store that cannot be read.
pub(super) fn store_unavailable(error: &super::store::StoreError) -> ApiError {
    tracing::warn!(%error, "reading the status store");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the status store cannot be read: {error}"),
    )
}

/// Task `id` as the status store has it.
pub(super) fn stored_task(shared: &Shared, id: &Uuid) -> Result<Option<TaskView>, ApiError> {
    shared.store.get(id).map_err(|e| store_unavailable(&e))
}

/// The tasks of workflow run `run` the status store has.
pub(super) fn stored_run(shared: &Shared, run: &Uuid) -> Result<Vec<TaskView>, ApiError> {
    shared
        .store
        .run(run, MAX_LISTED_OUTPUTS.saturating_mul(2))
        .map_err(|e| store_unavailable(&e))
}

/// A task as the in-memory view (`live`, the newest: it is written to the
/// store in batches) and the store (`stored`, which remembers what the view
/// forgot) know it together. A result the store has and the view not yet
/// is kept; so is what the view forgot of the request.
pub(super) fn merge(live: Option<&TaskView>, stored: Option<&TaskView>) -> Option<TaskView> {
    match (live, stored) {
        (None, stored) => stored.cloned(),
        (Some(live), None) => Some(live.clone()),
        (Some(live), Some(stored)) if stored.phase.is_terminal() && !live.phase.is_terminal() => {
            let mut task = stored.clone();
            task.events = live.events.clone();
            task.events_partition = live.events_partition;
            Some(task)
        }
        (Some(live), Some(stored)) => {
            let mut task = live.clone();
            task.submitted_at = task.submitted_at.or(stored.submitted_at);
            if task.traceparent.is_none() {
                task.traceparent = stored.traceparent.clone();
            }
            task.run_at = task.run_at.or(stored.run_at);
            if task.workflow.is_none() {
                task.workflow = stored.workflow.clone();
            }
            if task.attempt.is_none() {
                task.attempt = stored.attempt.clone();
            }
            if task.progress.is_none() {
                task.progress = stored.progress.clone();
            }
            if task.idempotency_key.is_none() {
                task.idempotency_key = stored.idempotency_key.clone();
            }
            if task.payload.is_none() {
                task.payload = stored.payload.clone();
                task.payload_size = stored.payload_size;
            }
            Some(task)
        }
    }
}

/// A run's tasks, each merged as [`merge`] does.
pub(super) fn merge_run(live: Vec<&TaskView>, stored: &[TaskView]) -> Vec<TaskView> {
    let mut by_id: std::collections::HashMap<Uuid, &TaskView> =
        stored.iter().map(|t| (t.id, t)).collect();
    let mut tasks: Vec<TaskView> = live
        .into_iter()
        .filter_map(|t| merge(Some(t), by_id.remove(&t.id)))
        .collect();
    tasks.extend(by_id.into_values().cloned());
    tasks
}

/// The long poll behind `?wait=`: `look` reads the view (locked) and says
/// what it found and whether that is final; until it is, the request
/// waits for a change of the task `id` (its result arriving), at most
/// `wait`, and looks again. What `look` last found is the answer when the
/// wait runs out or the gateway stops; its error is answered at once.
pub(super) async fn long_poll<T>(
    shared: &Shared,
    id: Uuid,
    wait: Duration,
    mut look: impl FnMut(&View) -> Result<(T, bool), ApiError>,
) -> Result<T, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notify;
        let mut woken;
        {
            let mut view = shared.view();
            let (found, over) = look(&view)?;
            if over
                || tokio::time::Instant::now() >= deadline
                || shared.stopping.load(Ordering::Relaxed)
            {
                return Ok(found);
            }
            notify = view.waiter(id);
            // Registered before the view is unlocked, so a result applied
            // in between still wakes this request.
            woken = Box::pin(notify.notified());
            woken.as_mut().enable();
        }
        let counted = LongPoll::start(&shared.metrics);
        let _ = tokio::time::timeout_at(deadline, woken).await;
        drop(counted);
        drop(notify);
        shared.view().release_waiter(&id);
    }
}

/// The media type of `task`'s output.
pub(super) fn content_type_of(task: &TaskView) -> &str {
    task.content_type
        .as_deref()
        .unwrap_or(crate::codec::DEFAULT_CONTENT_TYPE)
}

/// Adds `task`'s output (under `name`, embedded as its content type
/// allows) and its error, when it has them.
pub(super) fn insert_outcome(
    map: &mut serde_json::Map<String, Value>,
    task: &TaskView,
    name: &str,
) {
    if let Some(output) = &task.output {
        crate::codec::render::embed_bytes(map, name, output, content_type_of(task));
    }
    if let Some(size) = task.output_size {
        // The store kept only the start of it (gateway.store_max_output_bytes).
        map.insert(
            format!("{name}_truncated"),
            json!({"size": size, "kept": task.output.as_ref().map_or(0, Vec::len)}),
        );
    }
    if let Some(error) = &task.error {
        map.insert(
            "error".into(),
            json!({"kind": error.kind, "message": error.message}),
        );
    }
}

/// What every view of a task starts with: id, type, status, attempts and
/// times.
pub(super) fn head(task: &TaskView) -> Value {
    json!({
        "id": task.id,
        "type": task.task_type,
        "status": task.phase.name(),
        "attempts": task.attempts,
        "submitted_at": task.submitted_at,
        "finished_at": task.finished_at,
    })
}

pub(super) fn render(task: &TaskView) -> Value {
    let mut value = head(task);
    if let Some(map) = value.as_object_mut() {
        if task.output.is_some() {
            map.insert("content_type".into(), json!(content_type_of(task)));
        }
        insert_outcome(map, task, "result");
        if let Some(attempt) = &task.attempt {
            map.insert("started_at".into(), json!(attempt.started_at));
            map.insert("attempt".into(), json!(attempt.attempt));
            map.insert("worker".into(), json!(attempt.worker));
        }
        if let Some((progress, at)) = &task.progress {
            map.insert("progress".into(), crate::workflow::output_as_json(progress));
            map.insert("progress_at".into(), json!(at));
        }
        if let (Some(retry_at), view::Phase::Retrying) = (task.retry_at, task.phase) {
            map.insert("retry_at".into(), json!(retry_at));
        }
        if let Some(run_at) = task.run_at {
            map.insert("run_at".into(), json!(run_at));
        }
        if let Some(traceparent) = &task.traceparent {
            map.insert("traceparent".into(), json!(traceparent));
        }
    }
    value
}

/// Counts a request in `conveyor_gateway_long_polls` while it waits (also
/// when the wait is cut short: the request dropped, the time limit hit).
struct LongPoll(prometheus::IntGauge);

impl LongPoll {
    fn start(metrics: &crate::metrics::Metrics) -> LongPoll {
        let gauge = metrics.gateway_long_polls.with_label_values(&[] as &[&str]);
        gauge.inc();
        LongPoll(gauge)
    }
}

impl Drop for LongPoll {
    fn drop(&mut self) {
        self.0.dec();
    }
}
