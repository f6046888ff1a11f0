//! Submitting: `POST /v1/tasks`, `POST /v1/tasks:batch` and starting a
//! workflow run: checked, idempotency keys reserved, produced with
//! `acks=all`, answered once acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{json, Value};
use uuid::Uuid;

use super::api::{self, ApiError, NewTask};
use super::status::run_status;
use super::view::{TaskView, View, IDEMPOTENCY_METADATA};
use super::*;
use crate::codec::wire as headers;
use crate::codec::{now_millis, TaskRequest, WorkflowRef};

/// The trace context of a submission: the caller's `traceparent` when it
/// is well-formed, else a new one.
pub(super) fn traceparent_of(headers: &HeaderMap) -> String {
    headers
        .get(headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| crate::trace_context::is_valid(v))
        .map_or_else(crate::trace_context::generate, str::to_owned)
}

pub(super) fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "body_too_large",
                field: Some("body".into()),
                message: format!("the request body is over {limit} bytes (gateway.max_body_bytes)"),
                task_status: None,
            }
        } else {
            ApiError::new(rejection.status(), "bad_body", rejection.body_text())
        }
    })
}

pub(super) async fn submit_one(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traceparent = traceparent_of(&headers);
    let outcome = async {
        let value = json_body(&shared, body)?;
        let task = api::parse_task(&value, "", &shared.rules, now_millis())?;
        submit_one_of(&shared, Submission::task(task), &traceparent).await
    }
    .await;
    accepted_or_refused(outcome, &traceparent)
}

pub(super) async fn submit_batch(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traceparent = traceparent_of(&headers);
    let outcome = async {
        let value = json_body(&shared, body)?;
        let tasks = api::parse_batch(&value, &shared.rules, now_millis())?;
        let submissions = tasks.into_iter().map(Submission::task).collect();
        Ok(json!({ "tasks": submit(&shared, submissions, &traceparent).await? }))
    }
    .await;
    accepted_or_refused(outcome, &traceparent)
}

/// The request body as JSON, or the refusal naming what is wrong with it.
pub(super) fn json_body(
    shared: &Shared,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let body = body_bytes(body, shared.settings.max_body_bytes)?;
    api::parse_json(&body)
}

/// 202 with `accepted`, or the refusal; either way with the trace context.
pub(super) fn accepted_or_refused(outcome: Result<Value, ApiError>, traceparent: &str) -> Response {
    let response = match outcome {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(error) => error.into_response(),
    };
    with_traceparent(response, traceparent)
}

pub(super) fn with_traceparent(mut response: Response, traceparent: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(traceparent) {
        response.headers_mut().insert(headers::TRACEPARENT, value);
    }
    response
}

pub(super) fn status_url(id: &Uuid) -> String {
    format!("/v1/tasks/{id}")
}

pub(super) fn run_url(id: &Uuid) -> String {
    format!("/v1/workflows/{id}")
}

/// Releases idempotency keys reserved by a submission however it ends
/// (answered, failed, or its request dropped by the client or a timeout).
pub(super) struct Reservation<'a> {
    shared: &'a Shared,
    keys: Vec<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.shared.reserved();
        for key in &self.keys {
            reserved.remove(key);
        }
    }
}

/// One request to produce: a task, or the first step of a workflow run.
pub(super) struct Submission {
    topic: String,
    request: TaskRequest,
    idempotency_key: Option<String>,
    /// Not to start before (ms since the epoch): produced to a delay tier.
    run_at: Option<i64>,
}

impl Submission {
    fn task(task: NewTask) -> Self {
        let mut request = TaskRequest::new(&task.task_type, task.payload);
        request.key = task.key;
        request.deadline = task.deadline;
        if let Some(key) = &task.idempotency_key {
            request
                .metadata
                .insert(IDEMPOTENCY_METADATA.into(), key.clone());
        }
        Submission {
            topic: task.topic,
            request,
            idempotency_key: task.idempotency_key,
            run_at: task.run_at,
        }
    }
}

/// The answer for a submitted (or replayed) task or workflow run, from
/// the view and what the status store has of it (`stored`: the task, or
/// the run's tasks).
pub(super) fn accepted(
    view: &View,
    id: Uuid,
    workflow: Option<&WorkflowRef>,
    stored: &[TaskView],
    replay: bool,
) -> Value {
    let mut answer = match workflow {
        Some(w) => {
            let tasks = super::status::merge_run(view.run(&w.id), stored);
            let tasks: Vec<&TaskView> = tasks.iter().collect();
            json!({
                "id": w.id, "workflow": w.name,
                "status": run_status(&tasks, w.id),
                "status_url": run_url(&w.id),
            })
        }
        None => json!({
            "id": id,
            "status": super::status::merge(view.get(&id), stored.iter().find(|t| t.id == id))
                .map_or("queued", |t| t.phase.name()),
            "status_url": status_url(&id),
        }),
    };
    if replay {
        if let Some(map) = answer.as_object_mut() {
            map.insert("idempotent_replay".into(), json!(true));
        }
    }
    answer
}

/// [`submit`] for one submission: its answer.
pub(super) async fn submit_one_of(
    shared: &Shared,
    submission: Submission,
    traceparent: &str,
) -> Result<Value, ApiError> {
    let mut accepted = submit(shared, vec![submission], traceparent).await?;
    accepted.pop().ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the submission got no answer",
        )
    })
}

/// Produces `tasks` (those whose idempotency key is not already taken) and
/// answers once the broker acknowledged every one.
pub(super) async fn submit(
    shared: &Shared,
    tasks: Vec<Submission>,
    traceparent: &str,
) -> Result<Vec<Value>, ApiError> {
    let now = now_millis();
    // Idempotency keys: already known (here or from another replica through
    // the task topics) → the original task; being submitted right now by
    // another request → 409, as the outcome is not known yet.
    let mut reservation = Reservation {
        shared,
        keys: Vec::new(),
    };
    let mut answers: Vec<Option<Value>> = vec![None; tasks.len()];
    // A key used again later in the same batch answers like a key seen
    // before: the first task with it, as a replay (tasks[j] → tasks[i]).
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    // Keys the status store knows (older than the view remembers), with
    // what it has of their tasks; read before the view is locked.
    let mut stored: HashMap<&str, (Uuid, Vec<TaskView>)> = HashMap::new();
    for key in tasks.iter().filter_map(|t| t.idempotency_key.as_deref()) {
        let found = shared
            .store
            .idempotent(key, now)
            .map_err(|e| super::status::store_unavailable(&e))?;
        if let Some(id) = found {
            let task = super::status::stored_task(shared, &id)?;
            let known = match task.as_ref().and_then(|t| t.workflow.clone()) {
                Some(w) => super::status::stored_run(shared, &w.id)?,
                None => task.into_iter().collect(),
            };
            stored.insert(key, (id, known));
        }
    }
    {
        let view = shared.view();
        let mut reserved = shared.reserved();
        let mut first_with: HashMap<&str, usize> = HashMap::new();
        for (i, task) in tasks.iter().enumerate() {
            let Some(key) = &task.idempotency_key else {
                continue;
            };
            if let Some(&first) = first_with.get(key.as_str()) {
                repeats.push((i, first));
                continue;
            }
            first_with.insert(key, i);
            let known = view
                .idempotent(key, now)
                .or_else(|| stored.get(key.as_str()).map(|(id, _)| *id));
            if let Some(id) = known {
                let from_store = stored.get(key.as_str()).map_or(&[][..], |(_, t)| t);
                let task =
                    super::status::merge(view.get(&id), from_store.iter().find(|t| t.id == id));
                let workflow = task.as_ref().and_then(|t| t.workflow.as_ref());
                answers[i] = Some(accepted(&view, id, workflow, from_store, true));
            } else if !reserved.insert(key.clone()) {
                return Err(ApiError::field(
                    field_of(tasks.len(), i, "idempotency_key"),
                    "a request with this idempotency_key is being submitted right now; retry shortly",
                )
                .with(StatusCode::CONFLICT, "idempotency_key_in_use"));
            } else {
                reservation.keys.push(key.clone());
            }
        }
    }

    let mut pending = Vec::new();
    let mut failure = None;
    for (i, task) in tasks.iter().enumerate() {
        if answers[i].is_some() || repeats.iter().any(|&(j, _)| j == i) {
            continue;
        }
        let request = task.request.clone();
        let mut value = Vec::with_capacity(request.payload.len() + 96);
        shared.codec.encode_request(&request, &mut value);
        let record_key = request
            .key
            .clone()
            .unwrap_or_else(|| request.id.to_string());
        // A delayed task waits in a tier, which knows where it goes.
        let tier = match (task.run_at, &shared.tiers) {
            (Some(at), Some(tiers)) => tiers.tier_for(at, now_millis()),
            _ => None,
        };
        let record = FutureRecord::to(tier.unwrap_or(&task.topic))
            .key(&record_key)
            .payload(&value)
            .headers(headers::build([
                (headers::TRACEPARENT, Some(traceparent.to_owned())),
                (headers::RUN_AT, task.run_at.map(|at| at.to_string())),
                (headers::DELAY_DESTINATION, tier.map(|_| task.topic.clone())),
            ]));
        let scheduled = tier.and(task.run_at);
        match shared.producer.send_result(record) {
            Ok(delivery) => pending.push((i, request, scheduled, delivery)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                failure = Some("the gateway's producer queue is full; retry shortly".to_owned());
                break;
            }
            Err((e, _)) => {
                failure = Some(format!("cannot produce to {}: {e}", task.topic));
                break;
            }
        }
    }

    // Tasks already handed to the producer are awaited even after a
    // failure, so the answer says which of them were written.
    let mut acknowledged = Vec::new();
    for (i, request, scheduled, delivery) in pending {
        match delivery.await {
            Ok(Ok(_)) => {
                shared
                    .metrics
                    .gateway_tasks_submitted
                    .with_label_values(&[request.task_type.as_str()])
                    .inc();
                let mut view = shared.view();
                view.apply_request(
                    &request,
                    Some(traceparent.to_owned()),
                    scheduled,
                    now_millis(),
                );
                answers[i] = Some(accepted(
                    &view,
                    request.id,
                    request.workflow.as_ref(),
                    &[],
                    false,
                ));
                drop(view);
                acknowledged.push(request.id);
            }
            Ok(Err((e, _))) => {
                failure
                    .get_or_insert_with(|| format!("the broker did not acknowledge the task: {e}"));
            }
            Err(_) => {
                failure.get_or_insert_with(|| "the producer stopped".to_owned());
            }
        }
    }
    drop(reservation);
    if let Some(message) = failure {
        return Err(unavailable(&acknowledged, message));
    }
    for (repeat, first) in repeats {
        let mut answer = answers.get(first).cloned().flatten();
        if let Some(Value::Object(map)) = answer.as_mut() {
            map.insert("idempotent_replay".into(), json!(true));
        }
        if let Some(slot) = answers.get_mut(repeat) {
            *slot = answer;
        }
    }
    Ok(answers.into_iter().flatten().collect())
}

pub(super) fn field_of(count: usize, i: usize, name: &str) -> String {
    if count == 1 {
        name.to_owned()
    } else {
        format!("tasks[{i}].{name}")
    }
}

/// 503: the broker did not take the tasks. `acknowledged` lists those of a
/// batch that were written all the same.
pub(super) fn unavailable(acknowledged: &[Uuid], cause: String) -> ApiError {
    // The cause (librdkafka's words, topic names) is for the operator's
    // log, not for the client.
    tracing::warn!(%cause, written = acknowledged.len(), "submission answered 503");
    let mut message = "the broker did not acknowledge the submission in time \
                       (gateway.produce_timeout_ms); retry, with the same idempotency_key"
        .to_owned();
    if !acknowledged.is_empty() {
        message = format!(
            "{message}; these tasks of the batch were written: {}",
            acknowledged
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        message,
    )
}

/// `POST /v1/workflows/{name}`: starts a run of the workflow `name`.
pub(super) async fn start_run(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traceparent = traceparent_of(&headers);
    let outcome = async {
        if shared.workflows.get(&name).is_none() {
            let known: Vec<&str> = shared
                .workflows
                .definitions()
                .map(|w| w.name.as_str())
                .collect();
            return Err(ApiError::field(
                "name",
                format!(
                    "no workflow `{name}` is defined; this gateway knows: {}",
                    if known.is_empty() {
                        "none (configure [[workflows]])".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            )
            .with(StatusCode::NOT_FOUND, "unknown_workflow"));
        }
        let value = json_body(&shared, body)?;
        let run = api::parse_run(&value, &shared.rules, now_millis())?;
        // A run's key lives in a namespace of its own (per workflow), so
        // that a task submitted with the same key is not taken for it.
        let idempotency_key = run
            .idempotency_key
            .map(|key| format!("{RUN_KEY_PREFIX}{name}/{key}"));
        let mut metadata = BTreeMap::new();
        if let Some(key) = &idempotency_key {
            metadata.insert(IDEMPOTENCY_METADATA.to_owned(), key.clone());
        }
        let (topic, request) = shared
            .workflows
            .start(
                &name,
                run.payload,
                crate::codec::DEFAULT_CONTENT_TYPE.into(),
                metadata,
            )
            .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "unknown_workflow", e.to_string()))?;
        let submission = Submission {
            topic,
            request,
            idempotency_key,
            run_at: run.run_at,
        };
        submit_one_of(&shared, submission, &traceparent).await
    }
    .await;
    accepted_or_refused(outcome, &traceparent)
}

/// What a workflow run's idempotency key is stored under:
/// `conveyor.run/<workflow>/<key>`.
pub(super) const RUN_KEY_PREFIX: &str = "conveyor.run/";
