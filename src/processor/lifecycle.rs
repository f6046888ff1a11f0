//! A task's life beyond its result: the events a worker writes (started,
//! progress, retrying, cancelled; see `schemas/task_event.avsc`) and the
//! cancellations it carries out ([`crate::control`]).
//!
//! Events are written fire-and-forget on the processor's producer: they
//! are not part of a task's at-least-once unit (its offset does not wait
//! for them), and one the broker does not take is counted in
//! `conveyor_task_events_failed_total`, never retried for ever. Each is
//! keyed by the task id, so a task's events stay in order.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::delivery::{offer_event, Outgoing};
use super::Shared;
use crate::codec::event::{encode_event, TaskEvent, PROGRESS, STARTED};
use crate::codec::TaskRequest;
use crate::handlers::{ProgressError, ProgressSink, TaskContext};
use crate::settings::EventSettings;

/// Where a processor writes events.
#[derive(Debug, Clone)]
pub(crate) struct EventsOut {
    topic: Arc<str>,
    max_bytes: usize,
    interval: Duration,
}

impl EventsOut {
    /// The events topic and bounds of `settings`, when on.
    pub(crate) fn of(settings: &EventSettings) -> Option<EventsOut> {
        settings.enabled.then(|| EventsOut {
            topic: settings.topic.as_str().into(),
            max_bytes: settings.progress_max_bytes,
            interval: Duration::from_millis(settings.progress_interval_ms),
        })
    }
}

/// Events of one task handed to the producer and not yet acknowledged
/// (or refused): a task's result waits for them, so that its events come
/// before its end in the events topic when the gateway looks.
#[derive(Default)]
pub(crate) struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    notify: tokio::sync::Notify,
}

/// Longest a task's end waits for its events to be acknowledged.
const SETTLE: Duration = Duration::from_secs(5);

impl InFlight {
    fn start(&self) {
        self.count.fetch_add(1, AtomicOrdering::AcqRel);
    }

    pub(crate) fn done(&self) {
        if self.count.fetch_sub(1, AtomicOrdering::AcqRel) == 1 {
            self.notify.notify_waiters();
        }
    }

    /// Waits until none is in flight (at most [`SETTLE`]).
    pub(super) async fn settle(&self) {
        let _ = tokio::time::timeout(SETTLE, async {
            loop {
                let notified = self.notify.notified();
                if self.count.load(AtomicOrdering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

/// Writes `event` to the events topic, if events are on.
pub(super) fn send_event(shared: &Shared, event: &TaskEvent) {
    send_counted(shared, event, None);
}

/// Writes `event`, counted in `in_flight` until acknowledged.
pub(super) fn send_counted(shared: &Shared, event: &TaskEvent, in_flight: Option<&Arc<InFlight>>) {
    let Some(out) = &shared.events else {
        return;
    };
    let mut value = Vec::new();
    encode_event(event, &mut value);
    let record = Outgoing {
        topic: out.topic.clone(),
        partition: None,
        key: Some(crate::codec::uuid_key(&event.id)),
        value: Some(value),
        headers: None,
    };
    if let Some(in_flight) = in_flight {
        in_flight.start();
    }
    let kind = known_kind(&event.kind);
    if let Err(error) = offer_event(shared, &record, kind, in_flight.cloned()) {
        if let Some(in_flight) = in_flight {
            in_flight.done();
        }
        event_failed(shared, kind, &error);
    }
}

/// Writes `event` and waits until the broker took it (or refused it).
pub(super) async fn send_settled(shared: &Shared, event: &TaskEvent) {
    if shared.events.is_none() {
        return;
    }
    let in_flight = Arc::new(InFlight::default());
    send_counted(shared, event, Some(&in_flight));
    in_flight.settle().await;
}

/// Counts (and logs) an event of metric label `kind` that the producer
/// or the broker did not take.
pub(super) fn event_failed(shared: &Shared, kind: &'static str, error: &KafkaError) {
    tracing::debug!(%error, kind, "a task event was not written");
    shared
        .metrics
        .task_events_failed
        .with_label_values(&[kind])
        .inc();
}

/// A kind as a metric label (bounded whatever the event says): one of the
/// four, or `other`.
fn known_kind(kind: &str) -> &'static str {
    use crate::codec::event::{CANCELLED, RETRYING};
    [STARTED, PROGRESS, RETRYING, CANCELLED]
        .into_iter()
        .find(|k| *k == kind)
        .unwrap_or("other")
}

/// An event about `request` of `kind`, by this worker.
pub(super) fn event_of(shared: &Shared, request: &TaskRequest, kind: &str) -> TaskEvent {
    TaskEvent::new(
        request.id,
        &request.task_type,
        kind,
        &shared.worker,
        request.attempt,
    )
}

/// One attempt's progress reports: announces the attempt (`started`, with
/// its token) before its first report or once its handler waits, and
/// coalesces reports closer together than the interval (the last always
/// lands: a timer writes it, or [`Progress::finish`] at the attempt's end).
pub(super) struct Progress {
    me: Weak<Progress>,
    shared: Arc<Shared>,
    id: Uuid,
    task_type: String,
    attempt: i32,
    token: String,
    announced: AtomicBool,
    state: Mutex<Pending>,
    in_flight: Arc<InFlight>,
}

#[derive(Default)]
struct Pending {
    last_sent: Option<Instant>,
    value: Option<Vec<u8>>,
    timer: bool,
}

impl Progress {
    /// The progress of `request`'s current attempt, when events are on.
    pub(super) fn of(shared: &Arc<Shared>, request: &TaskRequest) -> Option<Arc<Progress>> {
        shared.events.as_ref()?;
        Some(Arc::new_cyclic(|me| Progress {
            me: me.clone(),
            shared: shared.clone(),
            id: request.id,
            task_type: request.task_type.clone(),
            attempt: request.attempt,
            token: Uuid::new_v4().simple().to_string(),
            announced: AtomicBool::new(false),
            state: Mutex::new(Pending::default()),
            in_flight: Arc::new(InFlight::default()),
        }))
    }

    /// Writes the attempt's `started` event, once.
    pub(super) fn announce(&self) {
        if self.announced.swap(true, AtomicOrdering::AcqRel) {
            return;
        }
        let mut event = self.event(STARTED);
        event.token = Some(self.token.clone());
        send_counted(&self.shared, &event, Some(&self.in_flight));
    }

    /// An event of this attempt, of `kind`.
    fn event(&self, kind: &str) -> TaskEvent {
        TaskEvent::new(
            self.id,
            &self.task_type,
            kind,
            &self.shared.worker,
            self.attempt,
        )
    }

    fn send(&self, value: Vec<u8>) {
        let mut event = self.event(PROGRESS);
        event.progress = Some(value);
        send_counted(&self.shared, &event, Some(&self.in_flight));
    }

    /// Writes a report still held back, then waits until every event of
    /// the attempt was acknowledged (the attempt ends: its result comes
    /// after them).
    pub(super) async fn finish(&self) {
        self.flush();
        if self.announced.load(AtomicOrdering::Acquire) {
            self.in_flight.settle().await;
        }
    }

    /// Writes a report still held back, now.
    fn flush(&self) {
        let held = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let held = state.value.take();
            if held.is_some() {
                state.last_sent = Some(Instant::now());
            }
            held
        };
        if let Some(value) = held {
            self.send(value);
        }
    }
}

impl ProgressSink for Progress {
    fn report(&self, value: Vec<u8>) -> Result<(), ProgressError> {
        let Some(out) = &self.shared.events else {
            return Err(ProgressError::Off);
        };
        if value.len() > out.max_bytes {
            return Err(ProgressError::TooLarge {
                size: value.len(),
                max: out.max_bytes,
            });
        }
        self.announce();
        let now = Instant::now();
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let due = state.last_sent.map(|t| t + out.interval);
            match due {
                Some(due) if due > now => {
                    state.value = Some(value);
                    if state.timer {
                        return Ok(());
                    }
                    state.timer = true;
                    Some(due - now)
                }
                _ => {
                    state.last_sent = Some(now);
                    state.value = None;
                    drop(state);
                    self.send(value);
                    return Ok(());
                }
            }
        };
        if let (Some(wait), Some(me)) = (wait, self.me.upgrade()) {
            self.shared.runtime.spawn(async move {
                tokio::time::sleep(wait).await;
                me.state.lock().unwrap_or_else(|p| p.into_inner()).timer = false;
                me.flush();
            });
        }
        Ok(())
    }

    fn token(&self) -> &str {
        &self.token
    }
}

/// The context a handler's attempt runs with.
pub(super) fn context(
    traceparent: Option<String>,
    cancel: Option<&CancellationToken>,
    progress: Option<&Arc<Progress>>,
) -> TaskContext {
    TaskContext::running(
        traceparent,
        cancel.cloned(),
        progress.map(|p| p.clone() as Arc<dyn ProgressSink>),
    )
}
