//! Prometheus metrics: one [`Registry`] per process, every name a constant
//! here, labels only from bounded sets (processor, topic, partition, task
//! type, outcome, error kind — never a task id or key). Task types that are
//! not configured are counted as `_unknown`, so a producer cannot create
//! label values.
//!
//! Served as text at `/metrics` on `metrics.listen`.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `conveyor_tasks_consumed_total{processor,task_type}`: task records taken.
pub const TASKS_CONSUMED: &str = "conveyor_tasks_consumed_total";
/// `conveyor_tasks_succeeded_total{processor,task_type}`.
pub const TASKS_SUCCEEDED: &str = "conveyor_tasks_succeeded_total";
/// `conveyor_tasks_failed_total{processor,task_type,kind}`: terminal failures.
pub const TASKS_FAILED: &str = "conveyor_tasks_failed_total";
/// `conveyor_tasks_retried_total{processor,task_type,via}`: retries
/// scheduled, `via` = `in_place` or `retry_topic`.
pub const TASKS_RETRIED: &str = "conveyor_tasks_retried_total";
/// `conveyor_tasks_dead_lettered_total{processor,task_type,kind}`.
pub const TASKS_DEAD_LETTERED: &str = "conveyor_tasks_dead_lettered_total";
/// `conveyor_errors_total{processor,kind}`: every error a processor met,
/// whatever came of it, in one series per kind to alert on. A task's
/// failed attempt counts once (retried or final) under its
/// [`FailureKind`](crate::codec::FailureKind); the engine's own errors
/// under [`ENGINE_ERRORS`].
pub const ERRORS: &str = "conveyor_errors_total";
/// The engine's error kinds in [`ERRORS`]: `produce` (a delivery failed
/// and is produced again), `commit` (an offset commit failed), `consumer`
/// (a consumer error librdkafka recovers from), `fatal` (the processor
/// stopped on an error retrying cannot fix), `split` (a partition's queue
/// could not be split off the main queue; once per assignment).
pub const ENGINE_ERRORS: [&str; 5] = ["produce", "commit", "consumer", "fatal", "split"];
/// `conveyor_handler_duration_seconds{processor,task_type,outcome}`: one
/// observation per attempt; outcome `success`, `retryable`, `permanent`,
/// `timeout` or `panic`.
pub const HANDLER_DURATION: &str = "conveyor_handler_duration_seconds";
/// `conveyor_task_latency_seconds{processor,task_type}`: from the request's
/// `submitted_at` to the acknowledgement of its terminal result.
pub const TASK_LATENCY: &str = "conveyor_task_latency_seconds";
/// `conveyor_records_produced_total{processor,record}`: acknowledged
/// outputs, `record` = `result`, `dead_letter`, `retry` or `workflow` (a
/// workflow's next request).
pub const RECORDS_PRODUCED: &str = "conveyor_records_produced_total";
/// `conveyor_produce_retries_total{processor}`: records the broker did not
/// take for a passing reason (each is produced again after a capped,
/// jittered backoff).
pub const PRODUCE_RETRIES: &str = "conveyor_produce_retries_total";
/// `conveyor_records_skipped_total{processor}`: records not run because
/// the committed offset's metadata says they finished before (a crash or a
/// rebalance while an older task was still running).
pub const RECORDS_SKIPPED: &str = "conveyor_records_skipped_total";
/// `conveyor_progress_restored_total{processor,outcome}`: partitions
/// assigned with a committed offset, by what its metadata gave: `used`,
/// `missing` (none: the broker may drop commit metadata; finished work
/// above the committed offset runs again) or `invalid` (not conveyor's,
/// or not for that offset: ignored).
pub const PROGRESS_RESTORED: &str = "conveyor_progress_restored_total";
/// `conveyor_progress_overflow_total{processor}`: commits whose finished
/// offsets above the watermark did not all fit in the commit's metadata
/// (those left out run again after a crash).
pub const PROGRESS_OVERFLOW: &str = "conveyor_progress_overflow_total";
/// `conveyor_oldest_unfinished_task_age_seconds{processor,topic,partition}`:
/// how long the oldest unfinished record of an owned partition has been
/// dispatched. While it runs nothing above it is committed.
pub const OLDEST_UNFINISHED: &str = "conveyor_oldest_unfinished_task_age_seconds";
/// `conveyor_offset_commits_total{processor}`: successful commits.
pub const OFFSET_COMMITS: &str = "conveyor_offset_commits_total";
/// `conveyor_offset_commit_failures_total{processor}`.
pub const OFFSET_COMMIT_FAILURES: &str = "conveyor_offset_commit_failures_total";
/// `conveyor_tasks_in_flight{processor}`: dispatched and not finished.
pub const TASKS_IN_FLIGHT: &str = "conveyor_tasks_in_flight";
/// `conveyor_partitions_assigned{processor}`.
pub const PARTITIONS_ASSIGNED: &str = "conveyor_partitions_assigned";
/// `conveyor_partitions_paused{processor}`: owned partitions not being read
/// (at their in-flight bound, or all of them while the processor is at its
/// bound, the producer queue is full or the breaker is open).
pub const PARTITIONS_PAUSED: &str = "conveyor_partitions_paused";
/// `conveyor_partitions_unsplit{processor}`: owned partitions whose queue
/// could not be split off the consumer's main queue (read through it, under
/// the same bounds; see `ENGINE_ERRORS`' `split`).
pub const PARTITIONS_UNSPLIT: &str = "conveyor_partitions_unsplit";
/// `conveyor_commit_metadata_refused_total{processor}`: commits whose
/// progress metadata the broker refused as too large; each halves that
/// partition's metadata budget (`kafka.commit_metadata_bytes`), down to
/// none.
pub const COMMIT_METADATA_REFUSED: &str = "conveyor_commit_metadata_refused_total";
/// `conveyor_rebalance_events_total{processor,event}`: `assigned`,
/// `revoked` or `lost` partitions.
pub const REBALANCE_EVENTS: &str = "conveyor_rebalance_events_total";
/// `conveyor_breaker_open{processor}`: 1 while the poison-pill breaker is open.
pub const BREAKER_OPEN: &str = "conveyor_breaker_open";
/// `conveyor_consumer_committed_lag_messages{processor,topic,partition}`:
/// high watermark − committed offset.
pub const COMMITTED_LAG: &str = "conveyor_consumer_committed_lag_messages";
/// `conveyor_consumer_processing_lag_messages{processor,topic,partition}`:
/// high watermark − the next offset not yet finished.
pub const PROCESSING_LAG: &str = "conveyor_consumer_processing_lag_messages";

/// `conveyor_gateway_requests_total{route,status}`: HTTP requests answered
/// by the gateway, `route` being the route (`/v1/tasks/:id` for a task's
/// status) or `unmatched`.
pub const GATEWAY_REQUESTS: &str = "conveyor_gateway_requests_total";
/// `conveyor_gateway_request_duration_seconds{route}`.
pub const GATEWAY_REQUEST_DURATION: &str = "conveyor_gateway_request_duration_seconds";
/// `conveyor_gateway_tasks_submitted_total{task_type}`: tasks the broker
/// acknowledged from the gateway.
pub const GATEWAY_TASKS_SUBMITTED: &str = "conveyor_gateway_tasks_submitted_total";
/// `conveyor_gateway_view_tasks`: tasks held by the gateway's status view.
pub const GATEWAY_VIEW_TASKS: &str = "conveyor_gateway_view_tasks";
/// `conveyor_gateway_store_tasks`: tasks kept in the gateway's status
/// store (counted every 10 s).
pub const GATEWAY_STORE_TASKS: &str = "conveyor_gateway_store_tasks";
/// `conveyor_gateway_store_bytes`: bytes of the status store's files on
/// disk (database and write-ahead log).
pub const GATEWAY_STORE_BYTES: &str = "conveyor_gateway_store_bytes";
/// `conveyor_gateway_store_removed_total{reason}`: tasks removed from the
/// status store, `reason` being `retention` (older than
/// `gateway.retention_ms`) or `disk_budget` (the oldest, over
/// `gateway.store_max_bytes`).
pub const GATEWAY_STORE_REMOVED: &str = "conveyor_gateway_store_removed_total";
/// `conveyor_gateway_store_behind_messages`: records of the task and
/// results topics the status store has yet to apply (while it catches up,
/// counted each second; after, asked of the broker every 10 s).
pub const GATEWAY_STORE_BEHIND: &str = "conveyor_gateway_store_behind_messages";
/// `conveyor_gateway_store_applied_total`: records applied to the status
/// store (written with their offsets).
pub const GATEWAY_STORE_APPLIED: &str = "conveyor_gateway_store_applied_total";
/// `conveyor_gateway_store_errors_total`: writes to the status store that
/// failed (retried; `/readyz` says so meanwhile).
pub const GATEWAY_STORE_ERRORS: &str = "conveyor_gateway_store_errors_total";
/// `conveyor_gateway_store_truncated_total`: outputs kept cut to
/// `gateway.store_max_output_bytes`.
pub const GATEWAY_STORE_TRUNCATED: &str = "conveyor_gateway_store_truncated_total";
/// `conveyor_gateway_long_polls`: status requests waiting (`?wait=`) for a
/// task or run to end.
pub const GATEWAY_LONG_POLLS: &str = "conveyor_gateway_long_polls";

/// `conveyor_delay_moves_total{to}`: delayed tasks moved by the workers'
/// movers, `to` being `tier` (a shorter tier), `task` (due: to its task
/// topic) or `dead_letter` (a tier record conveyor did not write).
pub const DELAY_MOVES: &str = "conveyor_delay_moves_total";
/// `conveyor_delay_partitions_waiting`: tier partitions this worker's
/// mover has paused until their first record is due.
pub const DELAY_PARTITIONS_WAITING: &str = "conveyor_delay_partitions_waiting";

/// `conveyor_delay_tier_lag_messages{tier}`: delayed tasks waiting in a
/// tier topic's partitions this worker's mover owns (`tier`: the topic),
/// each partition's high watermark less the mover's position, every 5 s.
/// Summed over the workers: the tasks waiting in each tier.
pub const DELAY_TIER_LAG: &str = "conveyor_delay_tier_lag_messages";
/// `conveyor_delay_overdue_seconds`: how long (whole seconds) the most overdue tier record
/// this worker's mover holds has been due without being moved (0 when
/// none is): a tier falling behind.
pub const DELAY_OVERDUE: &str = "conveyor_delay_overdue_seconds";

/// `conveyor_schedule_fires_total{schedule}`: tasks fired by `[[schedules]]`
/// (by this worker, while it owned the schedules).
pub const SCHEDULE_FIRES: &str = "conveyor_schedule_fires_total";
/// `conveyor_schedule_misfires_total{schedule}`: ticks not fired on time
/// and not fired at all, as the schedule's misfire policy said.
pub const SCHEDULE_MISFIRES: &str = "conveyor_schedule_misfires_total";
/// `conveyor_schedule_owner`: 1 on the worker that fires the schedules
/// (owns the schedule topic's partition and has read it), else 0.
pub const SCHEDULE_OWNER: &str = "conveyor_schedule_owner";

/// `conveyor_rate_limited_tasks{processor,type}`: tasks waiting for their
/// type's rate limit to let them start.
pub const RATE_LIMITED: &str = "conveyor_rate_limited_tasks";

/// `conveyor_cancellations`: cancellations this worker holds (read from
/// the control topic, not yet expired or carried out).
pub const CANCELLATIONS: &str = "conveyor_cancellations";
/// `conveyor_cancellations_dropped_total`: cancellations forgotten before
/// they expired because `cancel.max_entries` was reached.
pub const CANCELLATIONS_DROPPED: &str = "conveyor_cancellations_dropped_total";
/// `conveyor_tasks_cancelled_total{processor,type,stage}`: tasks that ended
/// cancelled, by where they stood: `before_start` (never ran), `waiting`
/// (a retry's backoff, a rate limit), `running` (the handler stopped, or
/// was dropped after `cancel.grace_ms`).
pub const TASKS_CANCELLED: &str = "conveyor_tasks_cancelled_total";
/// `conveyor_task_events_failed_total{kind}`: task events (started,
/// progress, retrying, cancelled) the broker did not take.
pub const TASK_EVENTS_FAILED: &str = "conveyor_task_events_failed_total";
/// `conveyor_gateway_event_streams`: open `GET /v1/tasks/{id}/events`
/// streams (bounded by `gateway.max_event_streams`).
pub const GATEWAY_EVENT_STREAMS: &str = "conveyor_gateway_event_streams";
/// `conveyor_worker_reports_total{outcome}`: this worker's reports to the
/// workers topic, `outcome` being `written` or `failed`.
pub const WORKER_REPORTS: &str = "conveyor_worker_reports_total";
/// `conveyor_gateway_workers{state}`: workers the gateway lists, `state`
/// being `live`, `stopped` or `silent` (no report for three intervals).
pub const GATEWAY_WORKERS: &str = "conveyor_gateway_workers";
/// `conveyor_gateway_workers_dropped_total`: workers dropped from the
/// gateway's list because `workers.max_workers` was reached.
pub const GATEWAY_WORKERS_DROPPED: &str = "conveyor_gateway_workers_dropped_total";
/// `conveyor_gateway_worker_reports_refused_total{reason}`: records of the
/// workers topic not taken, `reason` being `too_large` or `unreadable`.
pub const GATEWAY_WORKER_REPORTS_REFUSED: &str = "conveyor_gateway_worker_reports_refused_total";
/// `conveyor_gateway_ui_actions_total{action,outcome}`: dashboard actions
/// (`login`, `logout`, `cancel`, `replay`, and `dlq_read` for a
/// dead-letter page), `outcome` being `done`, `refused` (no or a wrong
/// CSRF token, a wrong login token; for `dlq_read`, four reads already
/// under way) or `failed`.
pub const GATEWAY_UI_ACTIONS: &str = "conveyor_gateway_ui_actions_total";

/// Label value for task types no handler is configured for.
pub const UNKNOWN_TYPE: &str = "_unknown";

/// Every metric of a worker, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Whether the processor engine records anything (`metrics.enabled`).
    enabled: bool,
    /// See [`TASKS_CONSUMED`].
    pub tasks_consumed: IntCounterVec,
    /// See [`TASKS_SUCCEEDED`].
    pub tasks_succeeded: IntCounterVec,
    /// See [`TASKS_FAILED`].
    pub tasks_failed: IntCounterVec,
    /// See [`TASKS_RETRIED`].
    pub tasks_retried: IntCounterVec,
    /// See [`TASKS_DEAD_LETTERED`].
    pub tasks_dead_lettered: IntCounterVec,
    /// See [`ERRORS`].
    pub errors: IntCounterVec,
    /// See [`HANDLER_DURATION`].
    pub handler_duration: HistogramVec,
    /// See [`TASK_LATENCY`].
    pub task_latency: HistogramVec,
    /// See [`RECORDS_PRODUCED`].
    pub records_produced: IntCounterVec,
    /// See [`PRODUCE_RETRIES`].
    pub produce_retries: IntCounterVec,
    /// See [`RECORDS_SKIPPED`].
    pub records_skipped: IntCounterVec,
    /// See [`PROGRESS_RESTORED`].
    pub progress_restored: IntCounterVec,
    /// See [`PROGRESS_OVERFLOW`].
    pub progress_overflow: IntCounterVec,
    /// See [`OLDEST_UNFINISHED`].
    pub oldest_unfinished: IntGaugeVec,
    /// See [`OFFSET_COMMITS`].
    pub offset_commits: IntCounterVec,
    /// See [`OFFSET_COMMIT_FAILURES`].
    pub offset_commit_failures: IntCounterVec,
    /// See [`TASKS_IN_FLIGHT`].
    pub tasks_in_flight: IntGaugeVec,
    /// See [`PARTITIONS_ASSIGNED`].
    pub partitions_assigned: IntGaugeVec,
    /// See [`PARTITIONS_PAUSED`].
    pub partitions_paused: IntGaugeVec,
    /// See [`PARTITIONS_UNSPLIT`].
    pub partitions_unsplit: IntGaugeVec,
    /// See [`COMMIT_METADATA_REFUSED`].
    pub commit_metadata_refused: IntCounterVec,
    /// See [`REBALANCE_EVENTS`].
    pub rebalance_events: IntCounterVec,
    /// See [`BREAKER_OPEN`].
    pub breaker_open: IntGaugeVec,
    /// See [`COMMITTED_LAG`].
    pub committed_lag: IntGaugeVec,
    /// See [`PROCESSING_LAG`].
    pub processing_lag: IntGaugeVec,
    /// See [`GATEWAY_REQUESTS`].
    pub gateway_requests: IntCounterVec,
    /// See [`GATEWAY_REQUEST_DURATION`].
    pub gateway_request_duration: HistogramVec,
    /// See [`GATEWAY_TASKS_SUBMITTED`].
    pub gateway_tasks_submitted: IntCounterVec,
    /// See [`GATEWAY_VIEW_TASKS`].
    pub gateway_view_tasks: IntGaugeVec,
    /// See [`GATEWAY_LONG_POLLS`].
    pub gateway_long_polls: IntGaugeVec,
    /// See [`GATEWAY_STORE_TASKS`].
    pub gateway_store_tasks: IntGaugeVec,
    /// See [`GATEWAY_STORE_BYTES`].
    pub gateway_store_bytes: IntGaugeVec,
    /// See [`GATEWAY_STORE_REMOVED`].
    pub gateway_store_removed: IntCounterVec,
    /// See [`GATEWAY_STORE_BEHIND`].
    pub gateway_store_behind: IntGaugeVec,
    /// See [`GATEWAY_STORE_APPLIED`].
    pub gateway_store_applied: IntCounterVec,
    /// See [`GATEWAY_STORE_ERRORS`].
    pub gateway_store_errors: IntCounterVec,
    /// See [`GATEWAY_STORE_TRUNCATED`].
    pub gateway_store_truncated: IntCounterVec,
    /// See [`DELAY_MOVES`].
    pub delay_moves: IntCounterVec,
    /// See [`DELAY_PARTITIONS_WAITING`].
    pub delay_partitions_waiting: IntGaugeVec,
    /// See [`DELAY_TIER_LAG`].
    pub delay_tier_lag: IntGaugeVec,
    /// See [`DELAY_OVERDUE`].
    pub delay_overdue: IntGaugeVec,
    /// See [`SCHEDULE_FIRES`].
    pub schedule_fires: IntCounterVec,
    /// See [`SCHEDULE_MISFIRES`].
    pub schedule_misfires: IntCounterVec,
    /// See [`SCHEDULE_OWNER`].
    pub schedule_owner: IntGaugeVec,
    /// See [`RATE_LIMITED`].
    pub rate_limited: IntGaugeVec,
    /// See [`CANCELLATIONS`].
    pub cancellations: IntGaugeVec,
    /// See [`CANCELLATIONS_DROPPED`].
    pub cancellations_dropped: IntCounterVec,
    /// See [`TASKS_CANCELLED`].
    pub tasks_cancelled: IntCounterVec,
    /// See [`TASK_EVENTS_FAILED`].
    pub task_events_failed: IntCounterVec,
    /// See [`GATEWAY_EVENT_STREAMS`].
    pub gateway_event_streams: IntGaugeVec,
    /// See [`WORKER_REPORTS`].
    pub worker_reports: IntCounterVec,
    /// See [`GATEWAY_WORKERS`].
    pub gateway_workers: IntGaugeVec,
    /// See [`GATEWAY_WORKERS_DROPPED`].
    pub gateway_workers_dropped: IntCounterVec,
    /// See [`GATEWAY_WORKER_REPORTS_REFUSED`].
    pub gateway_worker_reports_refused: IntCounterVec,
    /// See [`GATEWAY_UI_ACTIONS`].
    pub gateway_ui_actions: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"));
    register(registry, name, Box::new(metric.clone()));
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"));
    register(registry, name, Box::new(metric.clone()));
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    // 1 ms to ~65 s.
    let buckets = prometheus::exponential_buckets(0.001, 2.0, 17)
        .unwrap_or_else(|e| unreachable!("buckets are well-formed: {e}"));
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"));
    register(registry, name, Box::new(metric.clone()));
    metric
}

fn register(registry: &Registry, name: &str, metric: Box<dyn prometheus::core::Collector>) {
    // Names are constants, each registered once in a fresh registry.
    if let Err(e) = registry.register(metric) {
        unreachable!("metric {name} registers once: {e}");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered in a new registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let p = &["processor"];
        let pt = &["processor", "task_type"];
        let ptk = &["processor", "task_type", "kind"];
        let lag = &["processor", "topic", "partition"];
        let metrics = Metrics {
            tasks_consumed: counter(
                &r,
                TASKS_CONSUMED,
                "Task records taken from the input and retry topics.",
                pt,
            ),
            tasks_succeeded: counter(
                &r,
                TASKS_SUCCEEDED,
                "Tasks that succeeded (result acknowledged).",
                pt,
            ),
            tasks_failed: counter(
                &r,
                TASKS_FAILED,
                "Tasks that failed for good, by error kind.",
                ptk,
            ),
            tasks_retried: counter(
                &r,
                TASKS_RETRIED,
                "Retries scheduled, in place or through the retry topic.",
                &["processor", "task_type", "via"],
            ),
            tasks_dead_lettered: counter(
                &r,
                TASKS_DEAD_LETTERED,
                "Records written to the dead-letter topic, by error kind.",
                ptk,
            ),
            handler_duration: histogram(
                &r,
                HANDLER_DURATION,
                "Duration of one handler attempt.",
                &["processor", "task_type", "outcome"],
            ),
            task_latency: histogram(
                &r,
                TASK_LATENCY,
                "From the request's submitted_at to its terminal result's acknowledgement.",
                pt,
            ),
            records_produced: counter(
                &r,
                RECORDS_PRODUCED,
                "Records the broker acknowledged, by kind.",
                &["processor", "record"],
            ),
            produce_retries: counter(
                &r,
                PRODUCE_RETRIES,
                "Records the broker did not take for a passing reason, produced again after a backoff.",
                p,
            ),
            records_skipped: counter(
                &r,
                RECORDS_SKIPPED,
                "Records not run because the committed offset's metadata says they finished before.",
                p,
            ),
            progress_restored: counter(
                &r,
                PROGRESS_RESTORED,
                "Partitions assigned with a committed offset, by what its progress metadata gave (used, missing, invalid).",
                &["processor", "outcome"],
            ),
            progress_overflow: counter(
                &r,
                PROGRESS_OVERFLOW,
                "Commits whose finished offsets above the watermark did not all fit in the metadata.",
                p,
            ),
            oldest_unfinished: gauge(
                &r,
                OLDEST_UNFINISHED,
                "Seconds since the oldest unfinished record of an owned partition was dispatched.",
                lag,
            ),
            errors: counter(
                &r,
                ERRORS,
                "Errors met, by kind: failed task attempts (retried or final) and the engine's own.",
                &["processor", "kind"],
            ),
            offset_commits: counter(&r, OFFSET_COMMITS, "Successful offset commits.", p),
            offset_commit_failures: counter(
                &r,
                OFFSET_COMMIT_FAILURES,
                "Failed offset commits.",
                p,
            ),
            tasks_in_flight: gauge(&r, TASKS_IN_FLIGHT, "Tasks dispatched and not finished.", p),
            partitions_assigned: gauge(&r, PARTITIONS_ASSIGNED, "Partitions this member owns.", p),
            partitions_paused: gauge(
                &r,
                PARTITIONS_PAUSED,
                "Owned partitions not being read: at the in-flight bounds, a full producer queue or the breaker.",
                p,
            ),
            partitions_unsplit: gauge(
                &r,
                PARTITIONS_UNSPLIT,
                "Owned partitions whose queue could not be split off the main queue.",
                p,
            ),
            commit_metadata_refused: counter(
                &r,
                COMMIT_METADATA_REFUSED,
                "Commits whose progress metadata the broker refused as too large.",
                p,
            ),
            rebalance_events: counter(
                &r,
                REBALANCE_EVENTS,
                "Partitions assigned, revoked or lost.",
                &["processor", "event"],
            ),
            breaker_open: gauge(
                &r,
                BREAKER_OPEN,
                "1 while the poison-pill breaker is open.",
                p,
            ),
            committed_lag: gauge(
                &r,
                COMMITTED_LAG,
                "High watermark minus committed offset, per owned partition.",
                lag,
            ),
            processing_lag: gauge(
                &r,
                PROCESSING_LAG,
                "High watermark minus the next offset not yet finished, per owned partition.",
                lag,
            ),
            gateway_requests: counter(
                &r,
                GATEWAY_REQUESTS,
                "HTTP requests answered by the gateway, by route and status.",
                &["route", "status"],
            ),
            gateway_request_duration: histogram(
                &r,
                GATEWAY_REQUEST_DURATION,
                "Time to answer one gateway request, by route.",
                &["route"],
            ),
            gateway_tasks_submitted: counter(
                &r,
                GATEWAY_TASKS_SUBMITTED,
                "Tasks submitted through the gateway and acknowledged by the broker.",
                &["task_type"],
            ),
            gateway_view_tasks: gauge(
                &r,
                GATEWAY_VIEW_TASKS,
                "Tasks held by the gateway's status view.",
                &[],
            ),
            gateway_long_polls: gauge(
                &r,
                GATEWAY_LONG_POLLS,
                "Status requests waiting (?wait=) for a task or workflow run to end.",
                &[],
            ),
            gateway_store_tasks: gauge(
                &r,
                GATEWAY_STORE_TASKS,
                "Tasks kept in the gateway's status store.",
                &[],
            ),
            gateway_store_bytes: gauge(
                &r,
                GATEWAY_STORE_BYTES,
                "Bytes of the gateway's status store files on disk.",
                &[],
            ),
            gateway_store_removed: counter(
                &r,
                GATEWAY_STORE_REMOVED,
                "Tasks removed from the status store: past retention, or the oldest over the disk budget.",
                &["reason"],
            ),
            gateway_store_behind: gauge(
                &r,
                GATEWAY_STORE_BEHIND,
                "Records of the task and results topics the status store has yet to apply.",
                &[],
            ),
            gateway_store_applied: counter(
                &r,
                GATEWAY_STORE_APPLIED,
                "Records applied to the status store with their offsets.",
                &[],
            ),
            gateway_store_errors: counter(
                &r,
                GATEWAY_STORE_ERRORS,
                "Writes to the status store that failed (retried).",
                &[],
            ),
            gateway_store_truncated: counter(
                &r,
                GATEWAY_STORE_TRUNCATED,
                "Outputs kept cut to gateway.store_max_output_bytes.",
                &[],
            ),
            delay_moves: counter(
                &r,
                DELAY_MOVES,
                "Delayed tasks moved: to a shorter tier, to their task topic when due, or to the dead letters.",
                &["to"],
            ),
            delay_partitions_waiting: gauge(
                &r,
                DELAY_PARTITIONS_WAITING,
                "Delay tier partitions paused until their first record is due.",
                &[],
            ),
            delay_tier_lag: gauge(
                &r,
                DELAY_TIER_LAG,
                "Delayed tasks waiting in the tier partitions this worker's mover owns, by tier topic.",
                &["tier"],
            ),
            delay_overdue: gauge(
                &r,
                DELAY_OVERDUE,
                "Seconds the most overdue tier record held by this worker's mover has been due without being moved.",
                &[],
            ),
            schedule_fires: counter(
                &r,
                SCHEDULE_FIRES,
                "Tasks fired by [[schedules]], by schedule.",
                &["schedule"],
            ),
            schedule_misfires: counter(
                &r,
                SCHEDULE_MISFIRES,
                "Schedule ticks not fired, as the schedule's misfire policy said, by schedule.",
                &["schedule"],
            ),
            schedule_owner: gauge(
                &r,
                SCHEDULE_OWNER,
                "1 on the worker that fires the schedules, else 0.",
                &[],
            ),
            rate_limited: gauge(
                &r,
                RATE_LIMITED,
                "Tasks waiting for their type's rate limit to let them start.",
                &["processor", "type"],
            ),
            cancellations: gauge(
                &r,
                CANCELLATIONS,
                "Cancellations this worker holds, read from the control topic.",
                &[],
            ),
            cancellations_dropped: counter(
                &r,
                CANCELLATIONS_DROPPED,
                "Cancellations forgotten early because cancel.max_entries was reached.",
                &[],
            ),
            tasks_cancelled: counter(
                &r,
                TASKS_CANCELLED,
                "Tasks that ended cancelled, by where they stood (before_start, waiting, running).",
                &["processor", "type", "stage"],
            ),
            task_events_failed: counter(
                &r,
                TASK_EVENTS_FAILED,
                "Task events the broker did not take, by kind.",
                &["kind"],
            ),
            gateway_event_streams: gauge(
                &r,
                GATEWAY_EVENT_STREAMS,
                "Open task event streams (GET /v1/tasks/{id}/events).",
                &[],
            ),
            worker_reports: counter(
                &r,
                WORKER_REPORTS,
                "This worker's reports to the workers topic, by outcome.",
                &["outcome"],
            ),
            gateway_workers: gauge(
                &r,
                GATEWAY_WORKERS,
                "Workers the gateway lists, by state (live, stopped, silent).",
                &["state"],
            ),
            gateway_workers_dropped: counter(
                &r,
                GATEWAY_WORKERS_DROPPED,
                "Workers dropped from the gateway's list at workers.max_workers.",
                &[],
            ),
            gateway_worker_reports_refused: counter(
                &r,
                GATEWAY_WORKER_REPORTS_REFUSED,
                "Records of the workers topic not taken, by reason.",
                &["reason"],
            ),
            gateway_ui_actions: counter(
                &r,
                GATEWAY_UI_ACTIONS,
                "Dashboard actions (login, cancel, replay), by outcome.",
                &["action", "outcome"],
            ),
            registry: r,
            enabled: true,
        };
        // The delay movers' series exist (at 0) from the start, so that the
        // alert and the dashboards see them on every worker, moving or not.
        for gauge in [
            &metrics.delay_overdue,
            &metrics.delay_partitions_waiting,
            &metrics.schedule_owner,
            &metrics.cancellations,
            &metrics.gateway_event_streams,
        ] {
            gauge.with_label_values::<&str>(&[]).set(0);
        }
        metrics
            .cancellations_dropped
            .with_label_values::<&str>(&[])
            .inc_by(0);
        metrics
            .gateway_workers_dropped
            .with_label_values::<&str>(&[])
            .inc_by(0);
        for counter in [
            &metrics.gateway_store_errors,
            &metrics.gateway_store_applied,
            &metrics.gateway_store_truncated,
        ] {
            counter.with_label_values::<&str>(&[]).inc_by(0);
        }
        metrics
            .gateway_store_behind
            .with_label_values::<&str>(&[])
            .set(0);
        for reason in ["retention", "disk_budget"] {
            metrics
                .gateway_store_removed
                .with_label_values(&[reason])
                .inc_by(0);
        }
        for to in ["tier", "task", "dead_letter"] {
            metrics.delay_moves.with_label_values(&[to]).inc_by(0);
        }
        metrics
    }

    /// Metrics the processor engine does not record into
    /// (`metrics.enabled = false`): every series stays at zero. For
    /// measuring what recording costs; gateway metrics are unaffected.
    pub fn disabled() -> Self {
        Metrics {
            enabled: false,
            ..Self::new()
        }
    }

    /// Whether the processor engine records into these metrics.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The registry, for serving or adding more metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics.listen = \"{listen}\": {reason}")]
pub struct ServeError {
    listen: String,
    reason: String,
}

/// Binds `listen` and serves `GET /metrics` (and, for a worker, the
/// `/healthz` and `/readyz` probes of `health`) until the returned handle
/// is aborted; returns the bound address (useful with port 0).
pub async fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
    health: Option<crate::health::WorkerHealth>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServeError> {
    let error = |reason: String| ServeError {
        listen: listen.to_owned(),
        reason,
    };
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        error(format!(
            "cannot listen: {e}; choose another address, or \"\" to serve no metrics"
        ))
    })?;
    let address = listener.local_addr().map_err(|e| error(e.to_string()))?;
    let mut app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            }
        }),
    );
    if let Some(health) = health {
        app = app.merge(health.routes());
    }
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok((address, handle))
}
