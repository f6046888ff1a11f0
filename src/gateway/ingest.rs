//! What the follower reads, applied: to the in-memory view at once, and to
//! the status store in batches written with their offsets.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::follow::Event;
use super::store::{Writer, MAX_PENDING};
use super::view::{TaskView, IDEMPOTENCY_METADATA};
use super::Shared;
use crate::codec::now_millis;
use crate::shutdown::CancellationToken;

/// Longest a record waits in a batch before the batch is written.
const BATCH_WAIT: Duration = Duration::from_millis(100);
/// How often the store's tasks are counted for the metrics.
const COUNT_EVERY: Duration = Duration::from_secs(10);
/// How often catching up is logged.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The follower's side of the status view and store.
pub(super) struct Ingest {
    writer: Writer,
    stop: CancellationToken,
    /// Records of the stored topics read since the last write.
    unwritten: u64,
    counted: Option<Instant>,
    reported: Instant,
    caught_up: bool,
}

impl Ingest {
    pub(super) fn new(writer: Writer, stop: CancellationToken) -> Ingest {
        Ingest {
            writer,
            stop,
            unwritten: 0,
            counted: None,
            reported: Instant::now(),
            caught_up: false,
        }
    }

    /// Applies what the follower read.
    pub(super) fn apply(&mut self, shared: &Shared, event: Event) {
        let now = now_millis();
        match event {
            Event::Request {
                request,
                traceparent,
                scheduled,
                at,
            } => {
                let task = shared
                    .view()
                    .apply_request(&request, traceparent, scheduled, now);
                if let Some(key) = request.metadata.get(IDEMPOTENCY_METADATA) {
                    self.writer.key(key, request.id, request.submitted_at);
                }
                self.record(shared, task, request.submitted_at);
                self.writer.applied(&at.topic, at.partition, at.offset);
                self.unwritten += 1;
            }
            Event::Result(result, at) => {
                let finished_at = result.finished_at;
                let task = shared.view().apply_result(result, now);
                self.record(shared, task, finished_at);
                self.writer.applied(&at.topic, at.partition, at.offset);
                self.unwritten += 1;
            }
            Event::Skipped(at) => {
                self.writer.applied(&at.topic, at.partition, at.offset);
                self.unwritten += 1;
            }
            Event::Step {
                event,
                partition,
                offset,
            } => {
                let at = event.at;
                let task = shared.view().apply_event(event, partition, offset, now);
                self.record(shared, task, at);
            }
            Event::CaughtUp => {
                // What was read before it is written before the gateway
                // says it is ready.
                self.write(shared);
                self.caught_up = true;
                tracing::info!(
                    store = %shared.store.path().display(),
                    "gateway status view caught up with the results and task topics"
                );
                shared.caught_up.store(true, Ordering::Relaxed);
            }
            Event::Tick { behind } => self.tick(shared, behind, now),
        }
        if self.writer.due(BATCH_WAIT) {
            self.write(shared);
        }
        // A store that cannot write holds the follower back rather than
        // let the batch grow: the view stops moving, `/readyz` says why.
        while self.writer.pending() >= 2 * MAX_PENDING && !self.stop.is_cancelled() {
            std::thread::sleep(Duration::from_secs(1));
            self.write(shared);
        }
    }

    fn record(&mut self, shared: &Shared, task: Option<TaskView>, at: i64) {
        if let Some(task) = task {
            if self.writer.task(task, at) {
                shared
                    .metrics
                    .gateway_store_truncated
                    .with_label_values(&[] as &[&str])
                    .inc();
            }
        }
    }

    fn write(&mut self, shared: &Shared) {
        match self.writer.flush() {
            Ok(_) => {
                shared
                    .metrics
                    .gateway_store_applied
                    .with_label_values(&[] as &[&str])
                    .inc_by(self.unwritten);
                self.unwritten = 0;
                let mut failing = shared.store_failing();
                if failing.take().is_some() {
                    tracing::info!("the status store writes again");
                }
            }
            Err(error) => {
                shared
                    .metrics
                    .gateway_store_errors
                    .with_label_values(&[] as &[&str])
                    .inc();
                let mut failing = shared.store_failing();
                if failing.is_none() {
                    tracing::error!(%error, pending = self.writer.pending(), "the status store cannot write; retrying");
                }
                *failing = Some(error.to_string());
            }
        }
    }

    fn tick(&mut self, shared: &Shared, behind: i64, now: i64) {
        self.write(shared);
        let m = &shared.metrics;
        let none = &[] as &[&str];
        {
            let mut view = shared.view();
            view.evict(now);
            m.gateway_view_tasks
                .with_label_values(none)
                .set(i64::try_from(view.len()).unwrap_or(i64::MAX));
        }
        m.gateway_store_behind.with_label_values(none).set(behind);
        if !self.caught_up && self.reported.elapsed() >= REPORT_EVERY {
            self.reported = Instant::now();
            tracing::info!(
                behind,
                "the status store is catching up with the results and task topics"
            );
        }
        match self.writer.housekeep(now) {
            Ok(removed) => {
                m.gateway_store_removed
                    .with_label_values(&["retention"])
                    .inc_by(removed.expired);
                m.gateway_store_removed
                    .with_label_values(&["disk_budget"])
                    .inc_by(removed.over_budget);
                if removed.over_budget > 0 {
                    tracing::warn!(
                        removed = removed.over_budget,
                        "the status store is over gateway.store_max_bytes: its oldest tasks were removed"
                    );
                }
            }
            Err(error) => {
                m.gateway_store_errors.with_label_values(none).inc();
                tracing::warn!(%error, "status store housekeeping");
            }
        }
        if let Ok(usage) = self.writer.usage() {
            m.gateway_store_bytes
                .with_label_values(none)
                .set(i64::try_from(usage.file_bytes).unwrap_or(i64::MAX));
        }
        if self.counted.is_none_or(|at| at.elapsed() >= COUNT_EVERY) {
            self.counted = Some(Instant::now());
            if let Ok(count) = shared.store.count() {
                m.gateway_store_tasks.with_label_values(none).set(count);
            }
        }
    }
}
