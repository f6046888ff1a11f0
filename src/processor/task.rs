//! One lane's tokio task: run each record's handler in turn, produce its
//! result, wait for the broker's acknowledgement, report it finished.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, error, info_span, warn, Instrument};

use super::{Job, Shared};
use crate::codec::{now_millis, TaskError, TaskRequest, TaskResult, TaskStatus};
use crate::handlers::{HandlerError, TaskContext};

/// Wait between attempts to produce a result the broker did not take.
const PRODUCE_RETRY: Duration = Duration::from_millis(200);
/// Wait while the producer queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// Starts the lane that `job` opens.
pub(super) fn spawn(shared: Arc<Shared>, job: Job) {
    let runtime = shared.runtime.clone();
    runtime.spawn(run_lane(shared, job));
}

async fn run_lane(shared: Arc<Shared>, mut job: Job) {
    loop {
        let span = info_span!(
            "task",
            processor = %shared.name,
            topic = %job.topic,
            partition = job.partition,
            offset = job.offset,
        );
        if let Some(result) = run_one(&shared, &job).instrument(span.clone()).await {
            produce(&shared, &job, result).instrument(span).await;
        }
        match shared.complete(&job) {
            Some(next) => job = next,
            None => return,
        }
    }
}

/// Runs the handler for one record and returns the result to produce, or
/// `None` for a record so broken that no task id can be read from it.
async fn run_one(shared: &Shared, job: &Job) -> Option<TaskResult> {
    let request = match shared.codec.decode_request(&job.payload) {
        Ok(request) => request,
        Err(e) => {
            let head = shared.codec.peek_request(&job.payload);
            warn!(error = %e, task_id = ?head.as_ref().map(|h| h.0), "cannot decode the task request; it fails without running");
            let (id, task_type) = head?;
            let now = now_millis();
            return Some(TaskResult {
                id,
                task_type: task_type.unwrap_or_default(),
                status: TaskStatus::Failed,
                output: None,
                content_type: String::new(),
                error: Some(TaskError {
                    kind: "decode".into(),
                    message: e.to_string(),
                }),
                attempts: 0,
                started_at: now,
                finished_at: now,
                worker: shared.worker.clone(),
                workflow: None,
            });
        }
    };
    let started_at = now_millis();
    let (Some(handler), Some(task)) = (
        shared.registry.get(&request.task_type),
        shared.settings.tasks.get(&request.task_type),
    ) else {
        warn!(task_id = %request.id, task_type = %request.task_type, "no handler for this task type; it fails without running");
        let message = format!(
            "processor `{}` has no handler for task type `{}`",
            shared.name, request.task_type
        );
        return Some(failed(
            shared,
            &request,
            started_at,
            0,
            "unknown_type",
            message,
        ));
    };
    let context = TaskContext {
        traceparent: job.traceparent.clone(),
    };
    let timeout = Duration::from_millis(task.timeout_ms);
    let attempt = AssertUnwindSafe(handler.handle(&request, &context)).catch_unwind();
    let outcome = tokio::time::timeout(timeout, attempt).await;
    let attempts = request.attempt.max(1);
    Some(match outcome {
        Ok(Ok(Ok(output))) => {
            debug!(task_id = %request.id, "task succeeded");
            TaskResult {
                id: request.id,
                task_type: request.task_type.clone(),
                status: TaskStatus::Succeeded,
                output: Some(output.bytes),
                content_type: output.content_type,
                error: None,
                attempts,
                started_at,
                finished_at: now_millis(),
                worker: shared.worker.clone(),
                workflow: request.workflow.clone(),
            }
        }
        Ok(Ok(Err(e))) => {
            warn!(task_id = %request.id, error = %e, kind = e.kind(), "task failed");
            failed(
                shared,
                &request,
                started_at,
                attempts,
                e.kind(),
                e.to_string(),
            )
        }
        Ok(Err(panic)) => {
            let message = panic_message(panic.as_ref());
            error!(task_id = %request.id, %message, "handler panicked");
            failed(
                shared,
                &request,
                started_at,
                attempts,
                "panic",
                format!("handler panicked: {message}"),
            )
        }
        Err(_) => {
            warn!(task_id = %request.id, timeout_ms = task.timeout_ms, "task timed out");
            let e = HandlerError::Retryable(format!("no answer within {} ms", task.timeout_ms));
            failed(
                shared,
                &request,
                started_at,
                attempts,
                "timeout",
                e.to_string(),
            )
        }
    })
}

fn failed(
    shared: &Shared,
    request: &TaskRequest,
    started_at: i64,
    attempts: i32,
    kind: &str,
    message: String,
) -> TaskResult {
    TaskResult {
        id: request.id,
        task_type: request.task_type.clone(),
        status: TaskStatus::Failed,
        output: None,
        content_type: request.content_type.clone(),
        error: Some(TaskError {
            kind: kind.into(),
            message,
        }),
        attempts,
        started_at,
        finished_at: now_millis(),
        worker: shared.worker.clone(),
        workflow: request.workflow.clone(),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Produces `result` and returns once the broker acknowledged it. Never
/// gives up: the input offset must not be stored before the result is
/// safe, so a failing broker holds this lane (and, through the in-flight
/// bounds, intake) until it recovers or the process stops.
async fn produce(shared: &Shared, job: &Job, mut result: TaskResult) {
    let mut value = Vec::new();
    shared.codec.encode_result(&result, &mut value);
    let key = result.id.to_string();
    let mut blocked = false;
    loop {
        let mut record = FutureRecord::to(&shared.output_topic)
            .key(&key)
            .payload(&value);
        if let Some(traceparent) = &job.traceparent {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_bytes()),
            }));
        }
        let failure = match shared.producer.send_result(record) {
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => break,
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            },
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if !blocked {
                    blocked = true;
                    shared
                        .producer_blocked
                        .fetch_add(1, AtomicOrdering::Relaxed);
                }
                tokio::time::sleep(QUEUE_FULL_WAIT).await;
                continue;
            }
            Err((e, _)) => e,
        };
        if is_too_large(&failure) && result.output.is_some() {
            // The output can never be written; report that instead, so the
            // task ends and the partition moves on.
            warn!(task_id = %result.id, bytes = value.len(), "result too large for the broker; reporting a failure instead");
            result.output = None;
            result.status = TaskStatus::Failed;
            result.error = Some(TaskError {
                kind: "output_too_large".into(),
                message: format!(
                    "the result ({} bytes) is larger than the broker accepts ({failure})",
                    value.len()
                ),
            });
            value.clear();
            shared.codec.encode_result(&result, &mut value);
            continue;
        }
        warn!(task_id = %result.id, error = %failure, "result not acknowledged; producing it again");
        tokio::time::sleep(PRODUCE_RETRY).await;
    }
    if blocked {
        shared
            .producer_blocked
            .fetch_sub(1, AtomicOrdering::Relaxed);
    }
}

fn is_too_large(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}
