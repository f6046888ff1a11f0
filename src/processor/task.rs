//! One lane's tokio task: run each record's task to its end, produce what
//! it causes, wait for every acknowledgement, report the record finished.
//!
//! A task ends in one of three ways:
//! - **success**: a SUCCEEDED result;
//! - **terminal failure** (permanent error, attempts exhausted, undecodable
//!   record, unknown task type): a dead letter carrying the original record
//!   and a FAILED result (when an id can be read), both acknowledged;
//! - **parked**: a long backoff hands the request (next attempt number, due
//!   time in a header) to the retry topic.
//!
//! Retryable failures (a retryable error, a timeout, a panic) with a short
//! backoff are retried here, in place: the lane waits, so ordering holds.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, error, info_span, warn, Instrument};

use super::headers::{self, Origin};
use super::{Job, Shared};
use crate::breaker::Verdict;
use crate::codec::{now_millis, TaskError, TaskRequest, TaskResult, TaskStatus};
use crate::handlers::{HandlerError, Output, TaskContext};
use crate::retry::Decision;
use crate::workflow::Next;

/// Wait between attempts to produce a record the broker did not take.
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
            task_id = tracing::field::Empty,
            task_type = tracing::field::Empty,
            attempt = tracing::field::Empty,
        );
        crate::telemetry::link_to_traceparent(&span, job.headers.traceparent.as_deref());
        run_job(&shared, &job).instrument(span).await;
        match shared.complete(&job) {
            Some(next) => job = next,
            None => return,
        }
    }
}

/// A failure that ends the task.
struct Terminal {
    kind: String,
    message: String,
    attempts: i32,
    first_failure_at: i64,
}

/// How one task ended.
enum End {
    Succeeded(TaskResult),
    Failed(Terminal),
    Parked {
        request: TaskRequest,
        due_at: i64,
        first_failure_at: i64,
    },
}

async fn run_job(shared: &Shared, job: &Job) {
    // A record from the retry topic waits until it is due. Its lane (and,
    // through the in-flight bound, its partition) waits with it; fresh
    // tasks in the input topics do not.
    if let Some(due) = job.headers.not_before {
        let wait = due - now_millis();
        if let Ok(wait) = u64::try_from(wait) {
            debug!(wait_ms = wait, "retry not due yet");
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
    let request = match shared.codec.decode_request(&job.payload) {
        Ok(request) => request,
        Err(e) => {
            let head = shared.codec.peek_request(&job.payload);
            warn!(error = %e, task_id = ?head.as_ref().map(|h| h.0), "cannot decode the task request; dead-lettering it");
            let now = now_millis();
            let failure = Terminal {
                kind: "decode".into(),
                message: e.to_string(),
                attempts: 0,
                first_failure_at: now,
            };
            let result = head.map(|(id, task_type)| TaskResult {
                id,
                task_type: task_type.unwrap_or_default(),
                status: TaskStatus::Failed,
                output: None,
                content_type: String::new(),
                error: Some(error_of(&failure)),
                attempts: 0,
                started_at: now,
                finished_at: now,
                worker: shared.worker.clone(),
                workflow: None,
            });
            fail(shared, job, failure, result, None).await;
            let m = &shared.metrics;
            if m.enabled() {
                let labels = [shared.name.as_str(), crate::metrics::UNKNOWN_TYPE];
                m.tasks_consumed.with_label_values(&labels).inc();
                let labels = [shared.name.as_str(), crate::metrics::UNKNOWN_TYPE, "decode"];
                m.tasks_failed.with_label_values(&labels).inc();
                m.tasks_dead_lettered.with_label_values(&labels).inc();
            }
            return;
        }
    };
    let span = tracing::Span::current();
    span.record("task_id", tracing::field::display(request.id));
    span.record("task_type", request.task_type.as_str());
    if shared.workflows.is_contribution(&request) {
        // A child's output for a join: gathered, no handler runs.
        super::join::contribute(shared, job, &request).await;
        return;
    }
    let type_label = shared.type_label(&request.task_type);
    let m = &shared.metrics;
    if m.enabled() {
        m.tasks_consumed
            .with_label_values(&[&shared.name, type_label])
            .inc();
    }
    let observe_latency = || {
        if !m.enabled() {
            return;
        }
        let seconds = (now_millis() - request.submitted_at).max(0) as f64 / 1000.0;
        m.task_latency
            .with_label_values(&[&shared.name, type_label])
            .observe(seconds);
    };
    loop {
        let started_at = now_millis();
        match run_task(shared, job, request.clone()).await {
            End::Succeeded(result) => {
                record_success(shared);
                let value = encode_result(shared, &result);
                let mut records = vec![(Target::Output(result.id), value, None)];
                if request.workflow.is_some() {
                    let next = shared
                        .workflows
                        .after_success(&request, &result, &shared.worker);
                    records.extend(next.into_iter().map(|n| workflow_record(shared, n)));
                }
                deliver(shared, job, records).await;
                if m.enabled() {
                    m.tasks_succeeded
                        .with_label_values(&[&shared.name, type_label])
                        .inc();
                }
                observe_latency();
                return;
            }
            End::Parked {
                request,
                due_at,
                first_failure_at,
            } => {
                park(shared, job, &request, due_at, first_failure_at).await;
                return;
            }
            End::Failed(failure) => {
                if let Some(until) = trip_breaker(shared) {
                    // Hold this task (its offset stays uncommitted, intake
                    // is paused) until the breaker closes, then run it again.
                    error!(
                        task_id = %request.id,
                        cooldown_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "poison-pill breaker open: most recent tasks failed for good; \
                         pausing intake and not dead-lettering instead of draining the topic"
                    );
                    tokio::time::sleep_until(until.into()).await;
                    continue;
                }
                let result = failed_result(shared, &request, started_at, &failure);
                let kind = failure.kind.clone();
                fail(shared, job, failure, Some(result), Some(&request)).await;
                if m.enabled() {
                    let labels = [shared.name.as_str(), type_label, kind.as_str()];
                    m.tasks_failed.with_label_values(&labels).inc();
                    m.tasks_dead_lettered.with_label_values(&labels).inc();
                }
                observe_latency();
                return;
            }
        }
    }
}

/// Runs attempts of `request` until it succeeds, fails for good, or is
/// parked in the retry topic.
async fn run_task(shared: &Shared, job: &Job, mut request: TaskRequest) -> End {
    let started_at = now_millis();
    let (Some(handler), Some(task)) = (
        shared.registry.get(&request.task_type),
        shared.settings.tasks.get(&request.task_type),
    ) else {
        warn!(task_id = %request.id, task_type = %request.task_type, "no handler for this task type; dead-lettering it");
        return End::Failed(Terminal {
            kind: "unknown_type".into(),
            message: format!(
                "processor `{}` has no handler for task type `{}`",
                shared.name, request.task_type
            ),
            attempts: 0,
            first_failure_at: started_at,
        });
    };
    if let Err((kind, why)) = shared.workflows.check(&request) {
        // Not run: a step that does not fit this worker's definition (a
        // configuration that differs between workers, or a request made
        // by hand) is dead-lettered, to be replayed once it fits.
        return End::Failed(Terminal {
            kind: kind.into(),
            message: format!("processor `{}`: {why}", shared.name),
            attempts: 0,
            first_failure_at: started_at,
        });
    }
    if let Some(deadline) = request.deadline.filter(|d| started_at > *d) {
        return End::Failed(Terminal {
            kind: "deadline".into(),
            message: format!(
                "the task's deadline passed {} ms before it could start",
                started_at - deadline
            ),
            attempts: request.attempt.saturating_sub(1),
            first_failure_at: started_at,
        });
    }
    let policy = shared.settings.retry_policy(&request.task_type);
    let context = TaskContext {
        traceparent: job.headers.traceparent.clone(),
    };
    let timeout = Duration::from_millis(task.timeout_ms);
    let mut first_failure_at = job.headers.first_failure_at;
    let type_label = shared.type_label(&request.task_type);
    let duration = |outcome: &str, since: Instant| {
        if !shared.metrics.enabled() {
            return;
        }
        shared
            .metrics
            .handler_duration
            .with_label_values(&[&shared.name, type_label, outcome])
            .observe(since.elapsed().as_secs_f64());
    };
    let retried = |via: &str| {
        if !shared.metrics.enabled() {
            return;
        }
        shared
            .metrics
            .tasks_retried
            .with_label_values(&[&shared.name, type_label, via])
            .inc();
    };
    loop {
        request.attempt = request.attempt.max(1);
        tracing::Span::current().record("attempt", request.attempt);
        let began = Instant::now();
        let attempt = AssertUnwindSafe(handler.handle(&request, &context)).catch_unwind();
        let outcome = tokio::time::timeout(timeout, attempt).await;
        let outcome_label = match &outcome {
            Ok(Ok(Ok(_))) => "success",
            Ok(Ok(Err(e))) => e.kind(),
            Ok(Err(_)) => "panic",
            Err(_) => "timeout",
        };
        duration(outcome_label, began);
        let error = match outcome {
            Ok(Ok(Ok(output))) => {
                debug!(task_id = %request.id, attempt = request.attempt, "task succeeded");
                return End::Succeeded(succeeded(shared, &request, started_at, output));
            }
            Ok(Ok(Err(e))) => (
                e.kind(),
                e.to_string(),
                matches!(e, HandlerError::Retryable(_)),
            ),
            Ok(Err(panic)) => {
                let message = format!("handler panicked: {}", panic_message(panic.as_ref()));
                error!(task_id = %request.id, %message);
                ("panic", message, true)
            }
            Err(_) => (
                "timeout",
                format!("no answer within {} ms", task.timeout_ms),
                true,
            ),
        };
        let (kind, message, retryable) = error;
        let now = now_millis();
        let first = *first_failure_at.get_or_insert(now);
        let attempts_so_far = u32::try_from(request.attempt).unwrap_or(1);
        let decision = if retryable {
            policy.decide(attempts_so_far, fastrand::f64())
        } else {
            Decision::Exhausted
        };
        match decision {
            Decision::Exhausted => {
                warn!(task_id = %request.id, attempt = request.attempt, kind, error = %message, "task failed for good");
                let message = if retryable && attempts_so_far > 1 {
                    format!("after {} attempts: {message}", request.attempt)
                } else {
                    message
                };
                return End::Failed(Terminal {
                    kind: kind.into(),
                    message,
                    attempts: request.attempt,
                    first_failure_at: first,
                });
            }
            Decision::InPlace(delay) => {
                warn!(task_id = %request.id, attempt = request.attempt, kind, error = %message, delay_ms = delay.as_millis() as u64, "task failed; retrying in place");
                retried("in_place");
                tokio::time::sleep(delay).await;
                request.attempt += 1;
            }
            Decision::RetryTopic(delay) => {
                warn!(task_id = %request.id, attempt = request.attempt, kind, error = %message, delay_ms = delay.as_millis() as u64, "task failed; parking it in the retry topic");
                retried("retry_topic");
                request.attempt += 1;
                let due_at =
                    now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                return End::Parked {
                    request,
                    due_at,
                    first_failure_at: first,
                };
            }
        }
    }
}

fn succeeded(
    shared: &Shared,
    request: &TaskRequest,
    started_at: i64,
    output: Output,
) -> TaskResult {
    TaskResult {
        id: request.id,
        task_type: request.task_type.clone(),
        status: TaskStatus::Succeeded,
        output: Some(output.bytes),
        content_type: output.content_type,
        error: None,
        attempts: request.attempt,
        started_at,
        finished_at: now_millis(),
        worker: shared.worker.clone(),
        workflow: request.workflow.clone(),
    }
}

fn error_of(failure: &Terminal) -> TaskError {
    TaskError {
        kind: failure.kind.clone(),
        message: failure.message.clone(),
    }
}

fn failed_result(
    shared: &Shared,
    request: &TaskRequest,
    started_at: i64,
    failure: &Terminal,
) -> TaskResult {
    TaskResult {
        id: request.id,
        task_type: request.task_type.clone(),
        status: TaskStatus::Failed,
        output: None,
        content_type: request.content_type.clone(),
        error: Some(error_of(failure)),
        attempts: failure.attempts,
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

fn record_success(shared: &Shared) {
    let mut breaker = shared.breaker.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = breaker.as_mut() {
        b.success(Instant::now());
    }
}

/// Counts a terminal failure; returns when the breaker closes if this
/// failure must be held instead of dead-lettered.
fn trip_breaker(shared: &Shared) -> Option<Instant> {
    let mut breaker = shared.breaker.lock().unwrap_or_else(|p| p.into_inner());
    let b = breaker.as_mut()?;
    match b.failure(Instant::now()) {
        Verdict::Closed => None,
        Verdict::Open => {
            shared
                .status
                .breaker_open
                .store(true, AtomicOrdering::Relaxed);
            b.open_until()
        }
    }
}

/// Where the original record was first read: the retry-topic headers when
/// it came through the retry topic, else the record itself.
fn origin(job: &Job) -> Origin {
    job.headers.origin.clone().unwrap_or_else(|| Origin {
        topic: job.topic.to_string(),
        partition: job.partition,
        offset: job.offset,
        timestamp: job.timestamp,
    })
}

fn origin_headers(origin: &Origin) -> [(&'static str, Option<String>); 4] {
    [
        (headers::ORIGINAL_TOPIC, Some(origin.topic.clone())),
        (
            headers::ORIGINAL_PARTITION,
            Some(origin.partition.to_string()),
        ),
        (headers::ORIGINAL_OFFSET, Some(origin.offset.to_string())),
        (
            headers::ORIGINAL_TIMESTAMP,
            origin.timestamp.map(|t| t.to_string()),
        ),
    ]
}

/// Dead-letters the record and produces the FAILED result, if any, and
/// what the failure means for the workflow `request` is a step of.
async fn fail(
    shared: &Shared,
    job: &Job,
    failure: Terminal,
    result: Option<TaskResult>,
    request: Option<&TaskRequest>,
) {
    let origin = origin(job);
    let dead_letter_headers = headers::build(
        [
            (headers::ERROR_KIND, Some(failure.kind.clone())),
            (headers::ERROR_MESSAGE, Some(failure.message.clone())),
            (headers::ATTEMPTS, Some(failure.attempts.to_string())),
            (headers::PROCESSOR, Some(shared.name.clone())),
            (headers::WORKER, Some(shared.worker.clone())),
            (
                headers::FIRST_FAILURE_AT,
                Some(failure.first_failure_at.to_string()),
            ),
            (headers::LAST_FAILURE_AT, Some(now_millis().to_string())),
            (headers::TRACEPARENT, job.headers.traceparent.clone()),
        ]
        .into_iter()
        .chain(origin_headers(&origin)),
    );
    let mut records = vec![(
        Target::DeadLetter,
        job.payload.clone(),
        Some(dead_letter_headers),
    )];
    if let Some(result) = result {
        if let (Some(request), Some(error)) = (request, &result.error) {
            let next = shared
                .workflows
                .after_failure(request, error, &shared.worker);
            records.extend(next.into_iter().map(|n| workflow_record(shared, n)));
        }
        records.push((
            Target::Output(result.id),
            encode_result(shared, &result),
            None,
        ));
    }
    deliver(shared, job, records).await;
}

/// Hands the next attempt to the retry topic, due at `due_at`.
async fn park(
    shared: &Shared,
    job: &Job,
    request: &TaskRequest,
    due_at: i64,
    first_failure_at: i64,
) {
    let origin = origin(job);
    let topic = shared.settings.retry_topic(&origin.topic);
    let park_headers = headers::build(
        [
            (headers::NOT_BEFORE, Some(due_at.to_string())),
            (
                headers::FIRST_FAILURE_AT,
                Some(first_failure_at.to_string()),
            ),
            (headers::TRACEPARENT, job.headers.traceparent.clone()),
        ]
        .into_iter()
        .chain(origin_headers(&origin)),
    );
    let mut value = Vec::new();
    shared.codec.encode_request(request, &mut value);
    deliver(
        shared,
        job,
        vec![(Target::Topic(topic), value, Some(park_headers))],
    )
    .await;
}

/// A workflow's next record as something to deliver.
fn workflow_record(shared: &Shared, next: Next) -> (Target, Vec<u8>, Option<OwnedHeaders>) {
    match next {
        Next::Request {
            topic,
            key,
            request,
        } => {
            let mut value = Vec::new();
            shared.codec.encode_request(&request, &mut value);
            (Target::Keyed { topic, key }, value, None)
        }
        Next::Result(result) => (
            Target::Output(result.id),
            encode_result(shared, &result),
            None,
        ),
    }
}

fn encode_result(shared: &Shared, result: &TaskResult) -> Vec<u8> {
    let mut value = Vec::new();
    shared.codec.encode_result(result, &mut value);
    value
}

/// One record to produce.
pub(super) struct Outgoing<'a> {
    pub(super) topic: &'a str,
    /// A fixed partition, else the partitioner's choice by key.
    pub(super) partition: Option<i32>,
    pub(super) key: Option<&'a [u8]>,
    /// `None`: a tombstone.
    pub(super) value: Option<Vec<u8>>,
    pub(super) headers: Option<OwnedHeaders>,
}

/// Where a record goes.
enum Target {
    /// The processor's output topic, keyed by this task id.
    Output(uuid::Uuid),
    /// The dead-letter topic, with the original key.
    DeadLetter,
    /// A named topic, with the original key.
    Topic(String),
    /// A workflow's next request: a named topic and key.
    Keyed { topic: String, key: Vec<u8> },
}

/// Produces `records` and returns once the broker acknowledged all of them.
async fn deliver(
    shared: &Shared,
    job: &Job,
    records: Vec<(Target, Vec<u8>, Option<OwnedHeaders>)>,
) {
    let sends = records
        .into_iter()
        .map(|(target, value, extra)| async move {
            let (topic, key, record): (&str, Option<Vec<u8>>, &str) = match &target {
                Target::Output(id) => (
                    &shared.output_topic,
                    Some(id.to_string().into_bytes()),
                    "result",
                ),
                Target::DeadLetter => (&shared.dead_letter_topic, job.key.clone(), "dead_letter"),
                Target::Topic(t) => (t, job.key.clone(), "retry"),
                Target::Keyed { topic, key } => (topic, Some(key.clone()), "workflow"),
            };
            let record_headers = extra.or_else(|| {
                job.headers
                    .traceparent
                    .clone()
                    .map(|t| headers::build([(headers::TRACEPARENT, Some(t))]))
            });
            produce(
                shared,
                Outgoing {
                    topic,
                    partition: None,
                    key: key.as_deref(),
                    value: Some(value),
                    headers: record_headers,
                },
            )
            .await;
            if shared.metrics.enabled() {
                shared
                    .metrics
                    .records_produced
                    .with_label_values(&[&shared.name, record])
                    .inc();
            }
        });
    futures::future::join_all(sends).await;
}

/// Produces one record and returns once the broker acknowledged it. Never
/// gives up: the input offset must not be stored before its outputs are
/// safe, so a failing broker holds this lane (and, through the in-flight
/// bounds, intake) until it recovers or the process stops. A result too
/// large for the broker is replaced by a FAILED result saying so.
pub(super) async fn produce(shared: &Shared, outgoing: Outgoing<'_>) {
    let Outgoing {
        topic,
        partition,
        key,
        mut value,
        headers: record_headers,
    } = outgoing;
    let mut blocked = false;
    loop {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(value) = &value {
            record = record.payload(value);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(h) = &record_headers {
            record = record.headers(h.clone());
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
        if is_too_large(&failure) {
            if let Some((bytes, smaller)) = value
                .as_ref()
                .and_then(|v| Some((v.len(), without_output(shared, v, &failure)?)))
            {
                warn!(
                    topic,
                    bytes, "result too large for the broker; reporting a failure instead"
                );
                value = Some(smaller);
                continue;
            }
        }
        if shared.metrics.enabled() {
            shared
                .metrics
                .produce_errors
                .with_label_values(&[&shared.name])
                .inc();
        }
        warn!(topic, error = %failure, "record not acknowledged; producing it again");
        tokio::time::sleep(PRODUCE_RETRY).await;
    }
    if blocked {
        shared
            .producer_blocked
            .fetch_sub(1, AtomicOrdering::Relaxed);
    }
}

/// For an encoded result with an output, the same result FAILED with kind
/// `output_too_large` and no output.
fn without_output(shared: &Shared, value: &[u8], failure: &KafkaError) -> Option<Vec<u8>> {
    let mut result = shared.codec.decode_result(value).ok()?;
    result.output.as_ref()?;
    result.output = None;
    result.status = TaskStatus::Failed;
    result.error = Some(TaskError {
        kind: "output_too_large".into(),
        message: format!(
            "the result ({} bytes) is larger than the broker accepts ({failure})",
            value.len()
        ),
    });
    Some(encode_result(shared, &result))
}

fn is_too_large(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}
