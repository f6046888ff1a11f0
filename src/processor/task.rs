//! Running one record's task to its end and handing what it causes to the
//! producer; `delivery.rs` finishes the record once all of it is
//! acknowledged, and starts the next record of its lane.
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
//!
//! A task is **let go of** unfinished when its partition drains (a revoke,
//! or shutdown): at once while it only waits (a retry-topic record not due
//! yet, an in-place backoff, a breaker hold), and at the drain deadline
//! while its handler runs (the handler's future is dropped: Rust's
//! cancellation, which the `Handler` trait documents). It produces nothing
//! and its offset stays unfinished, so the partition's next owner runs it;
//! no two copies of a key's task run at once across members.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::message::OwnedHeaders;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use super::delivery::{deliver, Outgoing, Record};
use super::headers::{self, Origin};
use super::lifecycle;
use super::{Job, Shared};
use crate::breaker::Verdict;
use crate::codec::{now_millis, FailureKind, TaskError, TaskRequest, TaskResult, TaskStatus};
use crate::handlers::Output;
use crate::retry::Decision;
use crate::workflow::Next;

/// Starts `jobs` (records that each open their lane) on the runtime, in
/// one tokio task: each job runs until it first waits, and only a job that
/// waits (an asynchronous handler, a retry's backoff, a full producer
/// queue) becomes a task of its own. A task per record, and the wake-up
/// that starts it, cost more than a short handler does.
pub(super) fn start(shared: &Arc<Shared>, jobs: Vec<Job>) {
    if jobs.is_empty() {
        return;
    }
    let shared = shared.clone();
    let runtime = shared.runtime.clone();
    runtime.spawn(async move {
        // One allocation for the batch, not one per job: a job that ends
        // on its first poll leaves its box to the next one, and only a job
        // that waits takes its box along into a task of its own.
        let mut jobs = jobs.into_iter();
        let Some(first) = jobs.next() else {
            return;
        };
        let mut task = Box::pin(run_lane(shared.clone(), first));
        loop {
            if futures::poll!(task.as_mut()).is_pending() {
                let Some(job) = jobs.next() else {
                    tokio::spawn(task);
                    return;
                };
                tokio::spawn(std::mem::replace(
                    &mut task,
                    Box::pin(run_lane(shared.clone(), job)),
                ));
            } else {
                let Some(job) = jobs.next() else {
                    return;
                };
                task.set(run_lane(shared.clone(), job));
            }
        }
    });
}

/// Records a lane runs in one tokio task before it lets others run.
const LANE_TURN: u32 = 16;

/// Runs `job`, then each next record of its lane that its letting go
/// starts, in this same tokio task: a task spawned per record (and the
/// wake-up that starts it) cost more than an `echo` handler does, and made
/// `ordering = "key"` use half again the CPU of `"none"`. Yields every
/// [`LANE_TURN`] records so a busy lane does not hold a runtime thread.
///
/// A plain function returning its future, like `run`: as an `async fn` it
/// kept the `Job` twice (argument and local), 2,384 bytes in all; now one
/// `Job` more than `run`'s state.
#[allow(clippy::manual_async_fn)]
fn run_lane(shared: Arc<Shared>, mut job: Job) -> impl std::future::Future<Output = ()> {
    async move {
        let mut ran: u32 = 0;
        loop {
            // `next` is not kept across the yield below: only `job` is.
            let Some(next) = run(shared.clone(), job).await else {
                return;
            };
            job = next;
            ran = ran.wrapping_add(1);
            if ran.is_multiple_of(LANE_TURN) {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Runs one record's task, in its span, until its outputs are handed to
/// the producer; the job finishes when they are acknowledged. Returns the
/// next record of its lane when letting go of the lane started one.
///
/// Not an `async fn`, nor is `run_job`: an `async fn` keeps its arguments
/// and the locals they are moved into side by side in its state, and every
/// waiting task is such a state (2,976 bytes in a release build with three
/// copies of the `Job`; see BENCHMARKS.md).
fn run(shared: Arc<Shared>, job: Job) -> impl std::future::Future<Output = Option<Job>> {
    // The same fields at either level (tracing's macros take a constant
    // level and target).
    macro_rules! task_span {
        ($($level:tt)+) => {
            tracing::span!(
                $($level)+,
                "task",
                processor = %shared.name,
                topic = %job.ticket.topic,
                partition = job.ticket.partition,
                offset = job.ticket.offset,
                task_id = tracing::field::Empty,
                task_type = tracing::field::Empty,
                attempt = tracing::field::Empty,
            )
        };
    }
    // At `info` and when exported, as before; otherwise at `debug` under
    // its own target, so the default `info` creates no span per task
    // (see `telemetry::TASK_SPAN_TARGET`).
    let span = if crate::telemetry::exporting() {
        let span = task_span!(tracing::Level::INFO);
        crate::telemetry::link_to_traceparent(&span, job.headers.traceparent.as_deref());
        span
    } else {
        task_span!(target: crate::telemetry::TASK_SPAN_TARGET, tracing::Level::DEBUG)
    };
    run_job(shared, job).instrument(span)
}

/// Whether tasks have spans to record their id, type and attempt into
/// (see `run`): looking the current span up costs more than the record.
fn task_spans() -> bool {
    crate::telemetry::exporting()
        || tracing::span_enabled!(target: crate::telemetry::TASK_SPAN_TARGET, tracing::Level::DEBUG)
}

/// A failure that ends the task.
struct Terminal {
    kind: FailureKind,
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
    /// Let go of unfinished at a drain: nothing to produce.
    LetGo,
    /// Cancelled while it waited for another attempt or ran.
    Cancelled {
        stage: &'static str,
        message: String,
        attempts: i32,
    },
}

/// When a drain lets go of a task.
#[derive(Clone, Copy)]
pub(crate) enum Stage {
    /// Only waiting: as soon as its partition drains.
    Waiting,
    /// Running its handler: at the drain's deadline.
    Running,
}

/// Runs `future` to its end, unless `job`'s partition is drained first
/// (at the start of the drain for [`Stage::Waiting`], at its deadline for
/// [`Stage::Running`]): then `None`, and the future is dropped.
async fn unless_let_go<F: std::future::Future>(
    shared: &Shared,
    job: &Job,
    stage: Stage,
    future: F,
) -> Option<F::Output> {
    let mut drains = shared.drains(stage);
    // A drain that began before the subscription is seen here.
    if shared.letting_go(job, stage) {
        return None;
    }
    let mut future = std::pin::pin!(future);
    loop {
        tokio::select! {
            output = &mut future => return Some(output),
            changed = drains.changed() => {
                if changed.is_err() {
                    // The processor is gone: nothing will let go of it.
                    return Some(future.await);
                }
                if shared.letting_go(job, stage) {
                    return None;
                }
            }
        }
    }
}

// Deliberately not an `async fn`: see `run`.
#[allow(clippy::manual_async_fn)]
fn run_job(shared: Arc<Shared>, job: Job) -> impl std::future::Future<Output = Option<Job>> {
    async move {
        let shared = &shared;
        let mut request = match shared.codec.decode_request(&job.payload) {
            Ok(request) => request,
            Err(e) => {
                let head = shared.codec.peek_request(&job.payload);
                warn!(error = %e, task_id = ?head.as_ref().map(|h| h.0), "cannot decode the task request; dead-lettering it");
                let now = now_millis();
                let failure = Terminal {
                    kind: FailureKind::Decode,
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
                let m = &shared.metrics;
                if m.enabled() {
                    let labels = [shared.name.as_str(), crate::metrics::UNKNOWN_TYPE];
                    m.tasks_consumed.with_label_values(&labels).inc();
                    let labels = [shared.name.as_str(), crate::metrics::UNKNOWN_TYPE, "decode"];
                    m.tasks_failed.with_label_values(&labels).inc();
                    m.tasks_dead_lettered.with_label_values(&labels).inc();
                }
                shared.count_error(FailureKind::Decode.as_str());
                return Box::pin(fail(shared, job, failure, result, None, None)).await;
            }
        };
        if task_spans() {
            let span = tracing::Span::current();
            span.record("task_id", tracing::field::display(request.id));
            span.record("task_type", request.task_type.as_str());
        }
        if shared.workflows.is_contribution(&request) {
            // A child's output for a join: gathered, no handler runs.
            Box::pin(super::join::contribute(shared, &job, &request)).await;
            return shared.complete(&job);
        }
        // Cancellations: none is missed (the control topic has been read
        // to its end first), and one read later cancels `token` at once
        // while the task waits or runs.
        let token = shared.cancels.as_ref().map(|_| CancellationToken::new());
        let mut _watch = None;
        if let (Some(cancels), Some(token)) = (&shared.cancels, &token) {
            if !cancels.is_ready()
                && unless_let_go(shared, &job, Stage::Waiting, cancels.ready())
                    .await
                    .is_none()
            {
                shared.abandon(job);
                return None;
            }
            let run = request.workflow.as_ref().map(|w| w.id);
            _watch = Some(cancels.watch(request.id, run, token));
        }
        let token = token.as_ref();
        if token.is_some_and(CancellationToken::is_cancelled) {
            let attempts = request.attempt.saturating_sub(1);
            let message = "cancelled before it started".to_owned();
            return Box::pin(cancelled(
                shared,
                job,
                &request,
                BEFORE_START,
                message,
                attempts,
            ))
            .await;
        }
        // A record from the retry topic waits until it is due. Its lane (and,
        // through the in-flight bound, its partition) waits with it; fresh
        // tasks in the input topics do not.
        if let Some(due) = job.headers.not_before {
            let wait = due - now_millis();
            if let Ok(wait) = u64::try_from(wait) {
                debug!(wait_ms = wait, "retry not due yet");
                let sleep = tokio::time::sleep(Duration::from_millis(wait));
                match unless_let_go(shared, &job, Stage::Waiting, or_cancelled(token, sleep)).await
                {
                    None => {
                        shared.abandon(job);
                        return None;
                    }
                    Some(None) => {
                        let attempts = request.attempt.saturating_sub(1);
                        let message = "cancelled while its retry waited to be due".to_owned();
                        return Box::pin(cancelled(
                            shared, job, &request, WAITING, message, attempts,
                        ))
                        .await;
                    }
                    Some(Some(())) => {}
                }
            }
        }
        let type_label = shared.type_label(&request.task_type);
        let m = &shared.metrics;
        let hot = shared.hot.types.get(type_label);
        if let Some(hot) = hot {
            hot.consumed.inc();
        } else if m.enabled() {
            m.tasks_consumed
                .with_label_values(&[&shared.name, type_label])
                .inc();
        }
        let submitted_at = request.submitted_at;
        let latency = || {
            if let Some(hot) = hot {
                Some((hot.latency.clone(), submitted_at))
            } else if m.enabled() {
                let histogram = m
                    .task_latency
                    .with_label_values(&[&shared.name, type_label]);
                Some((histogram, submitted_at))
            } else {
                None
            }
        };
        let first_attempt = request.attempt;
        loop {
            // A rate-limited type waits for its turn before the attempt
            // starts (and is timed from then).
            match rate_turn(shared, &job, &request, token).await {
                Turn::Go => {}
                Turn::LetGo => {
                    shared.abandon(job);
                    return None;
                }
                Turn::Cancelled => {
                    let attempts = request.attempt.saturating_sub(1);
                    let message = "cancelled while it waited for its rate limit".to_owned();
                    return Box::pin(cancelled(shared, job, &request, WAITING, message, attempts))
                        .await;
                }
            }
            let started_at = now_millis();
            let end = run_task(shared, &job, &mut request, started_at, token).await;
            request.attempt = first_attempt;
            match end {
                End::Cancelled {
                    stage,
                    message,
                    attempts,
                } => {
                    return Box::pin(cancelled(shared, job, &request, stage, message, attempts))
                        .await;
                }
                End::LetGo => {
                    debug!(task_id = %request.id, "let go of at a drain; the partition's next owner runs it");
                    shared.abandon(job);
                    return None;
                }
                End::Succeeded(result) => {
                    let mut records = vec![result_record(shared, &job, &result)];
                    if request.workflow.is_some() {
                        let next =
                            shared
                                .workflows
                                .after_success(&request, &result, &shared.worker);
                        records.extend(next.into_iter().map(|n| workflow_record(shared, &job, n)));
                    }
                    // Only a configured type runs, and each has its handles
                    // whenever metrics are on.
                    if let Some(hot) = hot {
                        hot.succeeded.inc();
                    }
                    return deliver(shared, job, records, latency()).await;
                }
                End::Parked {
                    request,
                    due_at,
                    first_failure_at,
                } => {
                    return Box::pin(park(shared, job, &request, due_at, first_failure_at)).await;
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
                        let hold = tokio::time::sleep_until(until.into());
                        if unless_let_go(shared, &job, Stage::Waiting, hold)
                            .await
                            .is_none()
                        {
                            shared.abandon(job);
                            return None;
                        }
                        continue;
                    }
                    let result = failed_result(shared, &request, started_at, &failure);
                    if m.enabled() {
                        let labels = [shared.name.as_str(), type_label, failure.kind.as_str()];
                        m.tasks_failed.with_label_values(&labels).inc();
                        m.tasks_dead_lettered.with_label_values(&labels).inc();
                    }
                    shared.count_error(failure.kind.as_str());
                    let latency = latency();
                    return Box::pin(fail(
                        shared,
                        job,
                        failure,
                        Some(result),
                        Some(&request),
                        latency,
                    ))
                    .await;
                }
            }
        }
    }
}

/// What a wait for a rate limit's turn came to.
enum Turn {
    Go,
    /// The partition was let go of.
    LetGo,
    /// The task was cancelled.
    Cancelled,
}

/// Waits for `request`'s turn under its type's rate limit, if it has one,
/// holding its lane and its in-flight place and nothing else.
async fn rate_turn(
    shared: &Shared,
    job: &Job,
    request: &TaskRequest,
    token: Option<&CancellationToken>,
) -> Turn {
    if shared.limits.is_empty() {
        return Turn::Go;
    }
    let Some(limiter) = shared
        .limits
        .get(&request.task_type)
        .and_then(crate::rate::Limit::limiter)
    else {
        return Turn::Go;
    };
    if limiter.check().is_ok() {
        return Turn::Go;
    }
    let waiting = shared
        .metrics
        .rate_limited
        .with_label_values(&[&shared.name, shared.type_label(&request.task_type)]);
    waiting.inc();
    let turn = Box::pin(unless_let_go(
        shared,
        job,
        Stage::Waiting,
        or_cancelled(token, limiter.until_ready()),
    ))
    .await;
    waiting.dec();
    match turn {
        None => Turn::LetGo,
        Some(None) => Turn::Cancelled,
        Some(Some(())) => Turn::Go,
    }
}

/// Runs `future` to its end, unless `token` is cancelled first (then
/// `None`, and the future is dropped).
async fn or_cancelled<F: std::future::Future>(
    token: Option<&CancellationToken>,
    future: F,
) -> Option<F::Output> {
    match token {
        None => Some(future.await),
        Some(token) => tokio::select! {
            biased;
            () = token.cancelled() => None,
            output = future => Some(output),
        },
    }
}

/// Where a cancelled task stood: never started.
const BEFORE_START: &str = "before_start";
/// Waiting (a retry's backoff or due time, a rate limit).
const WAITING: &str = "waiting";
/// Running its handler.
const RUNNING: &str = "running";

/// Ends a cancelled task: its `cancelled` event, a FAILED result of kind
/// `cancelled` saying where it stood (no dead letter: nothing is wrong
/// with it), and what that means for its workflow run (cancelled too).
async fn cancelled(
    shared: &Arc<Shared>,
    job: Job,
    request: &TaskRequest,
    stage: &'static str,
    message: String,
    attempts: i32,
) -> Option<Job> {
    info!(task_id = %request.id, stage, "{message}");
    let type_label = shared.type_label(&request.task_type);
    shared
        .metrics
        .tasks_cancelled
        .with_label_values(&[&shared.name, type_label, stage])
        .inc();
    let mut event = lifecycle::event_of(shared, request, crate::codec::event::CANCELLED);
    event.attempt = attempts;
    event.message = Some(message.clone());
    lifecycle::send_settled(shared, &event).await;
    let now = now_millis();
    let failure = Terminal {
        kind: FailureKind::Cancelled,
        message,
        attempts,
        first_failure_at: now,
    };
    let result = failed_result(shared, request, now, &failure);
    let mut records = Vec::new();
    if let Some(error) = &result.error {
        let next = shared
            .workflows
            .after_failure(request, error, &shared.worker);
        records.extend(next.into_iter().map(|n| workflow_record(shared, &job, n)));
    }
    records.push(result_record(shared, &job, &result));
    // The cancellation is not withdrawn here: until this record's offset
    // is committed, a crash hands the task to a next owner that must still
    // see it. It expires by age (`cancel.max_age_ms`).
    deliver(shared, job, records, None).await
}

/// Runs attempts of `request` until it succeeds, fails for good, or is
/// parked in the retry topic.
/// `request.attempt` advances with each attempt; the caller puts it back.
/// `started_at`: when the caller began, in ms since the epoch.
async fn run_task(
    shared: &Arc<Shared>,
    job: &Job,
    request: &mut TaskRequest,
    started_at: i64,
    token: Option<&CancellationToken>,
) -> End {
    let (Some(handler), Some(task)) = (
        shared.registry.get(&request.task_type),
        shared.settings.tasks.get(&request.task_type),
    ) else {
        warn!(task_id = %request.id, task_type = %request.task_type, "no handler for this task type; dead-lettering it");
        return End::Failed(Terminal {
            kind: FailureKind::UnknownType,
            message: format!(
                "processor `{}` has no handler for task type `{}`",
                shared.name, request.task_type
            ),
            attempts: 0,
            first_failure_at: started_at,
        });
    };
    if let Err((kind, why)) = shared.workflows.check(request) {
        // Not run: a step that does not fit this worker's definition (a
        // configuration that differs between workers, or a request made
        // by hand) is dead-lettered, to be replayed once it fits.
        return End::Failed(Terminal {
            kind,
            message: format!("processor `{}`: {why}", shared.name),
            attempts: 0,
            first_failure_at: started_at,
        });
    }
    if let Some(deadline) = request.deadline.filter(|d| started_at > *d) {
        return End::Failed(Terminal {
            kind: FailureKind::Deadline,
            message: format!(
                "the task's deadline passed {} ms before it could start",
                started_at - deadline
            ),
            attempts: request.attempt.saturating_sub(1),
            first_failure_at: started_at,
        });
    }
    let timeout = Duration::from_millis(task.timeout_ms);
    let mut first_failure_at = job.headers.first_failure_at;
    let type_label = shared.type_label(&request.task_type);
    let hot = shared.hot.types.get(type_label);
    let duration = |outcome: &str, took: Duration| match hot {
        Some(hot) if outcome == "success" => hot.handled.observe(took.as_secs_f64()),
        _ if shared.metrics.enabled() => shared
            .metrics
            .handler_duration
            .with_label_values(&[&shared.name, type_label, outcome])
            .observe(took.as_secs_f64()),
        _ => {}
    };
    let retried = |via: &str, kind: FailureKind| {
        shared.count_error(kind.as_str());
        if !shared.metrics.enabled() {
            return;
        }
        shared
            .metrics
            .tasks_retried
            .with_label_values(&[&shared.name, type_label, via])
            .inc();
    };
    // When the first attempt began: `finished_at` is `started_at` plus the
    // time since, which spares a wall-clock read per task.
    let mut first_began = None;
    let mut first_of_run = true;
    loop {
        request.attempt = request.attempt.max(1);
        if task_spans() {
            tracing::Span::current().record("attempt", request.attempt);
        }
        // The first attempt had its turn before `started_at` (run_job).
        if !std::mem::take(&mut first_of_run) {
            match rate_turn(shared, job, request, token).await {
                Turn::Go => {}
                Turn::LetGo => return End::LetGo,
                Turn::Cancelled => {
                    return End::Cancelled {
                        stage: WAITING,
                        message: "cancelled while it waited for its rate limit".into(),
                        attempts: request.attempt.saturating_sub(1),
                    }
                }
            }
        }
        if token.is_some_and(CancellationToken::is_cancelled) {
            return End::Cancelled {
                stage: WAITING,
                message: "cancelled while it waited for another attempt".into(),
                attempts: request.attempt.saturating_sub(1),
            };
        }
        let progress = lifecycle::Progress::of(shared, request);
        let context = lifecycle::context(job.headers.traceparent.clone(), token, progress.as_ref());
        let began = Instant::now();
        let first_began = *first_began.get_or_insert(began);
        let mut stop_asked = false;
        let outcome = {
            let mut attempt =
                std::pin::pin!(AssertUnwindSafe(handler.handle(request, &context)).catch_unwind());
            // A handler that answers on its first poll needs no timer: the
            // timeout could not have interrupted it anyway.
            match futures::poll!(attempt.as_mut()) {
                Poll::Ready(answer) => Ok(answer),
                Poll::Pending => {
                    // It runs: now it is worth a `started` event.
                    if let Some(progress) = &progress {
                        progress.announce();
                    }
                    let deadline = tokio::time::Instant::now() + timeout;
                    let ran = async {
                        match tokio::time::timeout_at(
                            deadline,
                            or_cancelled(token, attempt.as_mut()),
                        )
                        .await
                        {
                            Ok(Some(answer)) => Ran::Answered(answer),
                            Err(_) => Ran::TimedOut,
                            // Cancelled: the handler has `cancel.grace_ms`
                            // to answer, then it is dropped.
                            Ok(None) => {
                                let grace = shared
                                    .cancels
                                    .as_ref()
                                    .map_or(Duration::ZERO, |c| c.grace());
                                match tokio::time::timeout(grace, attempt.as_mut()).await {
                                    Ok(answer) => Ran::StoppedWith(answer),
                                    Err(_) => Ran::Dropped(grace),
                                }
                            }
                        }
                    };
                    match Box::pin(unless_let_go(shared, job, Stage::Running, ran)).await {
                        None => return End::LetGo,
                        Some(Ran::Answered(answer)) => Ok(answer),
                        Some(Ran::TimedOut) => Err(()),
                        Some(Ran::StoppedWith(answer)) => {
                            stop_asked = true;
                            Ok(answer)
                        }
                        Some(Ran::Dropped(grace)) => {
                            if let Some(progress) = &progress {
                                progress.finish().await;
                            }
                            return End::Cancelled {
                                stage: RUNNING,
                                message: format!(
                                    "cancelled while running; the handler did not stop within \
                                     cancel.grace_ms ({} ms) and was dropped",
                                    grace.as_millis()
                                ),
                                attempts: request.attempt,
                            };
                        }
                    }
                }
            }
        };
        if let Some(progress) = &progress {
            progress.finish().await;
        }
        if stop_asked {
            // It answered the cancellation: an output means it finished
            // anyway (a success like any other), else it stopped.
            match &outcome {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => {
                    return End::Cancelled {
                        stage: RUNNING,
                        message: format!("cancelled while running; the handler stopped: {e}"),
                        attempts: request.attempt,
                    }
                }
                _ => {
                    return End::Cancelled {
                        stage: RUNNING,
                        message: "cancelled while running; the handler stopped (it panicked)"
                            .into(),
                        attempts: request.attempt,
                    }
                }
            }
        }
        let ended = Instant::now();
        let outcome_label = match &outcome {
            Ok(Ok(Ok(_))) => "success",
            Ok(Ok(Err(e))) => e.kind().as_str(),
            Ok(Err(_)) => FailureKind::Panic.as_str(),
            Err(()) => FailureKind::Timeout.as_str(),
        };
        duration(outcome_label, ended.saturating_duration_since(began));
        let error = match outcome {
            Ok(Ok(Ok(output))) => {
                debug!(task_id = %request.id, attempt = request.attempt, "task succeeded");
                record_success(shared, ended);
                let took = ended.saturating_duration_since(first_began).as_millis();
                let finished_at =
                    started_at.saturating_add(i64::try_from(took).unwrap_or(i64::MAX));
                return End::Succeeded(succeeded(shared, request, started_at, finished_at, output));
            }
            Ok(Ok(Err(e))) => (
                e.kind(),
                e.to_string(),
                e.kind() == FailureKind::Retryable,
                e.retry_after(),
            ),
            Ok(Err(panic)) => {
                let message = format!("handler panicked: {}", panic_message(panic.as_ref()));
                error!(task_id = %request.id, %message);
                (FailureKind::Panic, message, true, None)
            }
            Err(_) => (
                FailureKind::Timeout,
                format!("no answer within {} ms", task.timeout_ms),
                true,
                None,
            ),
        };
        let (kind, message, retryable, asked) = error;
        let now = now_millis();
        let first = *first_failure_at.get_or_insert(now);
        let attempts_so_far = u32::try_from(request.attempt).unwrap_or(1);
        let decision = if retryable {
            // Worked out on a failure only: a success does not need it.
            let policy = shared.settings.retry_policy(&request.task_type);
            policy.decide_after(attempts_so_far, asked, fastrand::f64())
        } else {
            Decision::Exhausted
        };
        match decision {
            Decision::Exhausted => {
                warn!(task_id = %request.id, attempt = request.attempt, kind = %kind, error = %message, "task failed for good");
                let message = if retryable && attempts_so_far > 1 {
                    format!("after {} attempts: {message}", request.attempt)
                } else {
                    message
                };
                return End::Failed(Terminal {
                    kind,
                    message,
                    attempts: request.attempt,
                    first_failure_at: first,
                });
            }
            Decision::InPlace(delay) => {
                warn!(task_id = %request.id, attempt = request.attempt, kind = %kind, error = %message, delay_ms = delay.as_millis() as u64, "task failed; retrying in place");
                retried("in_place", kind);
                let due_at =
                    now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                retrying_event(shared, request, due_at, &message);
                let backoff = tokio::time::sleep(delay);
                match Box::pin(unless_let_go(
                    shared,
                    job,
                    Stage::Waiting,
                    or_cancelled(token, backoff),
                ))
                .await
                {
                    None => return End::LetGo,
                    Some(None) => {
                        return End::Cancelled {
                            stage: WAITING,
                            message: "cancelled while it waited for another attempt".into(),
                            attempts: request.attempt,
                        }
                    }
                    Some(Some(())) => {}
                }
                request.attempt += 1;
            }
            Decision::RetryTopic(delay) => {
                warn!(task_id = %request.id, attempt = request.attempt, kind = %kind, error = %message, delay_ms = delay.as_millis() as u64, "task failed; parking it in the retry topic");
                retried("retry_topic", kind);
                let due_at =
                    now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                retrying_event(shared, request, due_at, &message);
                request.attempt += 1;
                return End::Parked {
                    request: request.clone(),
                    due_at,
                    first_failure_at: first,
                };
            }
        }
    }
}

/// How a handler's attempt that waited came out.
enum Ran<T> {
    Answered(T),
    TimedOut,
    /// Asked to stop (cancelled), it answered within the grace.
    StoppedWith(T),
    /// Asked to stop, it did not answer within the grace (shown).
    Dropped(Duration),
}

/// The `retrying` event of `request`'s failed attempt.
fn retrying_event(shared: &Shared, request: &TaskRequest, due_at: i64, message: &str) {
    if shared.events.is_none() {
        return;
    }
    let mut event = lifecycle::event_of(shared, request, crate::codec::event::RETRYING);
    event.due = Some(due_at);
    event.message = Some(message.to_owned());
    lifecycle::send_event(shared, &event);
}

fn succeeded(
    shared: &Shared,
    request: &TaskRequest,
    started_at: i64,
    finished_at: i64,
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
        finished_at,
        worker: shared.worker.clone(),
        workflow: request.workflow.clone(),
    }
}

fn error_of(failure: &Terminal) -> TaskError {
    TaskError {
        kind: failure.kind.into(),
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

fn record_success(shared: &Shared, now: Instant) {
    // While nothing failed lately a success changes nothing: no lock.
    if shared.breaker_settled.load(AtomicOrdering::Relaxed) {
        return;
    }
    let mut breaker = shared.breaker.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = breaker.as_mut() {
        b.success(now);
        shared
            .breaker_settled
            .store(b.settled(), AtomicOrdering::Relaxed);
    }
}

/// Counts a terminal failure; returns when the breaker closes if this
/// failure must be held instead of dead-lettered.
fn trip_breaker(shared: &Shared) -> Option<Instant> {
    let mut breaker = shared.breaker.lock().unwrap_or_else(|p| p.into_inner());
    let b = breaker.as_mut()?;
    shared.breaker_settled.store(false, AtomicOrdering::Relaxed);
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
        topic: job.ticket.topic.to_string(),
        partition: job.ticket.partition,
        offset: job.ticket.offset,
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

/// The headers of every dead letter (one contract, see the README's dead
/// letters): the failure's kind and message, attempts so far, who met it
/// and when, and, from `job` (the task whose record or output is
/// dead-lettered), its trace context and where its record was first read.
pub(super) fn dead_letter_headers(
    shared: &Shared,
    job: Option<&Job>,
    kind: &str,
    message: &str,
    attempts: i32,
    first_failure_at: Option<i64>,
) -> OwnedHeaders {
    let now = now_millis();
    let origin = job.map(origin);
    headers::build(
        [
            (headers::ERROR_KIND, Some(kind.to_owned())),
            (headers::ERROR_MESSAGE, Some(message.to_owned())),
            (headers::ATTEMPTS, Some(attempts.to_string())),
            (headers::PROCESSOR, Some(shared.name.clone())),
            (headers::WORKER, Some(shared.worker.clone())),
            (
                headers::FIRST_FAILURE_AT,
                Some(first_failure_at.unwrap_or(now).to_string()),
            ),
            (headers::LAST_FAILURE_AT, Some(now.to_string())),
            (
                headers::TRACEPARENT,
                job.and_then(|j| j.headers.traceparent.clone()),
            ),
        ]
        .into_iter()
        .chain(origin.iter().flat_map(origin_headers)),
    )
}

/// Dead-letters the record and produces the FAILED result, if any, and
/// what the failure means for the workflow `request` is a step of.
async fn fail(
    shared: &Arc<Shared>,
    mut job: Job,
    failure: Terminal,
    result: Option<TaskResult>,
    request: Option<&TaskRequest>,
    latency: Option<(prometheus::Histogram, i64)>,
) -> Option<Job> {
    let dead_letter_headers = dead_letter_headers(
        shared,
        Some(&job),
        failure.kind.as_str(),
        &failure.message,
        failure.attempts,
        Some(failure.first_failure_at),
    );
    let original = std::mem::take(&mut job.payload);
    let mut records = vec![output(
        &job,
        Record::DeadLetter,
        shared.dead_letter_topic.clone(),
        job.key.clone(),
        original,
        Some(dead_letter_headers),
    )];
    if let Some(result) = result {
        if let (Some(request), Some(error)) = (request, &result.error) {
            let next = shared
                .workflows
                .after_failure(request, error, &shared.worker);
            records.extend(next.into_iter().map(|n| workflow_record(shared, &job, n)));
        }
        records.push(result_record(shared, &job, &result));
    }
    deliver(shared, job, records, latency).await
}

/// Hands the next attempt to the retry topic, due at `due_at`: through the
/// delay tiers when they are on and the backoff is at least the shortest
/// tier (their mover hands it to the retry topic when due, so it waits in
/// Kafka, not here), else straight to the retry topic, where it waits in
/// memory for what is left.
async fn park(
    shared: &Arc<Shared>,
    job: Job,
    request: &TaskRequest,
    due_at: i64,
    first_failure_at: i64,
) -> Option<Job> {
    let origin = origin(&job);
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
    let retry_topic = shared.settings.retry_topic(&origin.topic);
    let tier = shared
        .delay_tiers
        .as_ref()
        .and_then(|tiers| tiers.holding(due_at.saturating_sub(now_millis())));
    let (topic, park_headers) = match tier {
        Some(tier) => {
            let through = headers::replace(park_headers, headers::RUN_AT, &due_at.to_string());
            (
                tier.to_owned(),
                headers::replace(through, headers::DELAY_DESTINATION, &retry_topic),
            )
        }
        None => (retry_topic, park_headers),
    };
    let mut value = Vec::new();
    shared.codec.encode_request(request, &mut value);
    let parked = output(
        &job,
        Record::Retry,
        Arc::from(topic),
        job.key.clone(),
        value,
        Some(park_headers),
    );
    deliver(shared, job, vec![parked], None).await
}

/// A workflow's next record as something to deliver.
fn workflow_record(shared: &Shared, job: &Job, next: Next) -> (Record, Outgoing) {
    match next {
        Next::Request {
            topic,
            key,
            request,
        } => {
            let mut value = Vec::new();
            shared.codec.encode_request(&request, &mut value);
            let topic = Arc::from(topic);
            output(job, Record::Workflow, topic, Some(key), value, None)
        }
        Next::Result(result) => result_record(shared, job, &result),
    }
}

fn encode_result(shared: &Shared, result: &TaskResult) -> Vec<u8> {
    let mut value = Vec::new();
    shared.codec.encode_result(result, &mut value);
    value
}

/// `result`, encoded for the output topic and keyed by its task id.
fn result_record(shared: &Shared, job: &Job, result: &TaskResult) -> (Record, Outgoing) {
    output(
        job,
        Record::Result,
        shared.output_topic.clone(),
        Some(crate::codec::uuid_key(&result.id)),
        encode_result(shared, result),
        None,
    )
}

/// One of `job`'s outputs; without `headers` of its own it carries the
/// request's trace context.
fn output(
    job: &Job,
    kind: Record,
    topic: Arc<str>,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
    headers: Option<OwnedHeaders>,
) -> (Record, Outgoing) {
    let headers = headers.or_else(|| {
        job.headers
            .traceparent
            .clone()
            .map(|t| headers::build([(headers::TRACEPARENT, Some(t))]))
    });
    let record = Outgoing {
        topic,
        partition: None,
        key,
        value: Some(value),
        headers,
    };
    (kind, record)
}
