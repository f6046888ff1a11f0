//! Cancellations: the compacted control topic (`[cancel]`), read whole by
//! every worker into [`Cancels`].
//!
//! The gateway (`POST /v1/tasks/{id}:cancel`) and `conveyor cancel` write
//! a [`TaskControl`] keyed by the task's (or workflow run's) id. Each
//! worker reads every partition of the topic from its start and keeps the
//! cancellations it has not yet carried out, bounded by `max_entries`
//! (oldest forgotten first, counted) and by `max_age_ms` (from the
//! record's `at`); the topic is created with `cleanup.policy =
//! compact,delete` and `retention.ms = max_age_ms`, so it forgets them
//! too. A cancellation carried out is not withdrawn (no tombstone): until
//! the cancelled task's offset is committed, a crash hands the task to a
//! next owner that must still see it (a tombstone written with the result
//! let the next owner run it: `tests/process.rs` shows it). A tombstone
//! written by hand (a null value) is honoured.
//!
//! The processors do not start a task before the reader has read the topic
//! to the end it had when the worker started ([`Cancels::ready`]): a task
//! cancelled before a crash is not run by the partition's next owner.
//! Tasks that wait (a retry's backoff, a rate limit) or run a handler are
//! [watched](Cancels::watch): a cancellation read meanwhile cancels their
//! token at once.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::codec::event::{decode_control, CANCEL};
use crate::codec::now_millis;
use crate::kafka::{Read, Reader};
use crate::metrics::Metrics;
use crate::settings::{CancelSettings, KafkaSettings};

/// What a worker knows of cancellations.
pub struct Cancels {
    settings: CancelSettings,
    kafka: KafkaSettings,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    /// The reader has read the topic to the end it had at start.
    caught_up: AtomicBool,
    caught_up_notify: tokio::sync::Notify,
    started: OnceLock<()>,
}

#[derive(Default)]
struct Inner {
    /// Id → when it was cancelled (ms since the epoch).
    cancelled: HashMap<Uuid, i64>,
    /// Oldest first: (when read, id); entries whose id is gone or was
    /// cancelled again since are stale.
    order: VecDeque<(i64, Uuid)>,
    /// Tasks watched: task id → (its workflow run's id, its token,
    /// watchers).
    watched: HashMap<Uuid, Watched>,
    /// Workflow run id → how many watched tasks belong to it.
    runs: HashMap<Uuid, usize>,
}

struct Watched {
    run: Option<Uuid>,
    token: CancellationToken,
    count: usize,
}

impl std::fmt::Debug for Cancels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancels")
            .field("topic", &self.settings.topic)
            .field("caught_up", &self.caught_up.load(Ordering::Relaxed))
            .finish()
    }
}

/// Keeps a task watched while it lives; dropping it stops the watch.
pub struct Watch {
    cancels: Arc<Cancels>,
    id: Uuid,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.cancels.unwatch(self.id);
    }
}

impl Cancels {
    /// A worker's cancellations, not read yet ([`Cancels::start`]).
    pub fn new(settings: CancelSettings, kafka: KafkaSettings, metrics: Arc<Metrics>) -> Self {
        Cancels {
            settings,
            kafka,
            metrics,
            inner: Mutex::new(Inner::default()),
            caught_up: AtomicBool::new(false),
            caught_up_notify: tokio::sync::Notify::new(),
            started: OnceLock::new(),
        }
    }

    /// The control topic.
    pub fn topic(&self) -> &str {
        &self.settings.topic
    }

    /// How long a running handler asked to stop has before it is dropped.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.settings.grace_ms)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts reading the control topic on a thread of its own, until
    /// `stop`; the first call starts it, later ones do nothing (the
    /// processors of one worker share it).
    pub fn start(self: &Arc<Self>, stop: &tokio_util::sync::CancellationToken) {
        if self.started.set(()).is_err() {
            return;
        }
        let cancels = self.clone();
        let stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("conveyor-control".into())
            .spawn(move || cancels.read(&stop));
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the control topic's reader; cancellations are not seen");
            self.set_caught_up();
        }
    }

    /// Whether the reader has caught up with the control topic.
    pub fn is_ready(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Waits until the reader has read the control topic to the end it had
    /// at start.
    pub async fn ready(&self) {
        loop {
            let notified = self.caught_up_notify.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
        self.caught_up_notify.notify_waiters();
    }

    /// Watches task `id` (of workflow run `run`): `token` is cancelled as
    /// soon as either is, at once if one already is. Watches of one id
    /// nest (the same task's waits and attempt).
    pub fn watch(
        self: &Arc<Self>,
        id: Uuid,
        run: Option<Uuid>,
        token: &CancellationToken,
    ) -> Watch {
        let already = {
            let mut inner = self.inner();
            let fresh = match inner.watched.get_mut(&id) {
                Some(w) => {
                    w.count += 1;
                    false
                }
                None => {
                    inner.watched.insert(
                        id,
                        Watched {
                            run,
                            token: token.clone(),
                            count: 1,
                        },
                    );
                    true
                }
            };
            if fresh {
                if let Some(run) = run {
                    *inner.runs.entry(run).or_default() += 1;
                }
            }
            inner.cancelled.contains_key(&id)
                || run.is_some_and(|r| inner.cancelled.contains_key(&r))
        };
        if already {
            token.cancel();
        }
        Watch {
            cancels: self.clone(),
            id,
        }
    }

    fn unwatch(&self, id: Uuid) {
        let mut inner = self.inner();
        let Some(w) = inner.watched.get_mut(&id) else {
            return;
        };
        w.count = w.count.saturating_sub(1);
        if w.count > 0 {
            return;
        }
        let run = w.run;
        inner.watched.remove(&id);
        if let Some(run) = run {
            if let Some(n) = inner.runs.get_mut(&run) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inner.runs.remove(&run);
                }
            }
        }
    }

    /// Records a cancellation read from the topic (at `at`, ms since the
    /// epoch): watched tasks it concerns are cancelled. Expired ones are
    /// ignored; past `max_entries` the oldest is forgotten.
    pub fn apply_cancel(&self, id: Uuid, at: i64, now: i64) {
        let max_age = i64::try_from(self.settings.max_age_ms).unwrap_or(i64::MAX);
        if now.saturating_sub(at) > max_age {
            return;
        }
        let mut tokens = Vec::new();
        let (len, dropped) = {
            let mut inner = self.inner();
            inner.cancelled.insert(id, at);
            inner.order.push_back((at, id));
            let mut dropped = 0u64;
            while inner.cancelled.len() > self.settings.max_entries {
                let Some((when, old)) = inner.order.pop_front() else {
                    break;
                };
                if inner.cancelled.get(&old) == Some(&when) {
                    inner.cancelled.remove(&old);
                    dropped += 1;
                }
            }
            if let Some(w) = inner.watched.get(&id) {
                tokens.push(w.token.clone());
            }
            if inner.runs.contains_key(&id) {
                tokens.extend(
                    inner
                        .watched
                        .values()
                        .filter(|w| w.run == Some(id))
                        .map(|w| w.token.clone()),
                );
            }
            (inner.cancelled.len(), dropped)
        };
        for token in tokens {
            token.cancel();
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                max_entries = self.settings.max_entries,
                "cancel.max_entries reached: the oldest cancellations are forgotten (a task they name runs if it had not yet)"
            );
            self.metrics
                .cancellations_dropped
                .with_label_values::<&str>(&[])
                .inc_by(dropped);
        }
        self.publish(len);
    }

    /// Forgets `id`'s cancellation (a tombstone read, or carried out here).
    pub fn forget(&self, id: Uuid) {
        let len = {
            let mut inner = self.inner();
            if inner.cancelled.remove(&id).is_none() {
                return;
            }
            inner.cancelled.len()
        };
        self.publish(len);
    }

    /// Forgets cancellations older than `max_age_ms`, and stale order
    /// entries.
    pub fn expire(&self, now: i64) {
        let max_age = i64::try_from(self.settings.max_age_ms).unwrap_or(i64::MAX);
        let len = {
            let mut inner = self.inner();
            while let Some(&(at, id)) = inner.order.front() {
                let current = inner.cancelled.get(&id) == Some(&at);
                if current && now.saturating_sub(at) <= max_age {
                    break;
                }
                inner.order.pop_front();
                if current {
                    inner.cancelled.remove(&id);
                }
            }
            inner.cancelled.len()
        };
        self.publish(len);
    }

    /// How many cancellations are held.
    pub fn len(&self) -> usize {
        self.inner().cancelled.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn publish(&self, len: usize) {
        self.metrics
            .cancellations
            .with_label_values::<&str>(&[])
            .set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    /// The reader thread: reads the whole topic, then follows it.
    fn read(&self, stop: &tokio_util::sync::CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        while !stop.is_cancelled() {
            match self.follow(stop) {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, topic = %self.settings.topic, "reading the control topic; trying again");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn follow(&self, stop: &tokio_util::sync::CancellationToken) -> Result<(), String> {
        let topic = &self.settings.topic;
        let reader = Reader::new(&self.kafka, "control").map_err(|e| e.to_string())?;
        let partitions = reader.partitions(topic).map_err(|e| e.to_string())?;
        // Where each partition ended when reading began.
        let mut behind: HashMap<i32, i64> = HashMap::new();
        for p in &partitions {
            let (low, high) = reader
                .client()
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .map_err(|e| format!("reading the watermarks of {topic}: {e}"))?;
            if high > low {
                behind.insert(*p, high);
            }
        }
        reader
            .assign(topic, &partitions, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        let mut last_expiry = Instant::now();
        loop {
            if behind.is_empty() && !self.is_ready() {
                tracing::info!(topic = %topic, held = self.len(), "control topic read");
                self.set_caught_up();
            }
            if stop.is_cancelled() {
                return Ok(());
            }
            if last_expiry.elapsed() >= Duration::from_secs(1) {
                self.expire(now_millis());
                last_expiry = Instant::now();
            }
            match reader.read(Duration::from_millis(100)) {
                Read::Idle => {}
                Read::Error(error) => {
                    tracing::debug!(%error, "control topic reader");
                }
                Read::End(p) => {
                    if let Ok(position) = reader.client().position() {
                        for e in position.elements_for_topic(topic) {
                            if e.partition() != p {
                                continue;
                            }
                            if let (Offset::Offset(o), Some(high)) = (e.offset(), behind.get(&p)) {
                                if o >= *high {
                                    behind.remove(&p);
                                }
                            }
                        }
                    }
                }
                Read::Record(message) => {
                    let p = message.partition();
                    if behind
                        .get(&p)
                        .is_some_and(|high| message.offset() + 1 >= *high)
                    {
                        behind.remove(&p);
                    }
                    let key = message
                        .key()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .and_then(|k| Uuid::try_parse(k).ok());
                    match (message.payload(), key) {
                        (None, Some(id)) => self.forget(id),
                        (Some(value), _) => match decode_control(value) {
                            Ok(control) if control.action == CANCEL => {
                                self.apply_cancel(control.id, control.at, now_millis());
                            }
                            Ok(control) => {
                                tracing::debug!(action = %control.action, "control topic: an action this worker does not know; ignored");
                            }
                            Err(error) => {
                                tracing::warn!(%error, partition = p, offset = message.offset(), "control topic: an undecodable record; ignored");
                            }
                        },
                        (None, None) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When `id` was cancelled, as `c` holds it.
    fn held(c: &Cancels, id: Uuid) -> Option<i64> {
        c.inner().cancelled.get(&id).copied()
    }

    fn cancels(max_entries: usize) -> Arc<Cancels> {
        Arc::new(Cancels::new(
            CancelSettings {
                max_entries,
                max_age_ms: 60_000,
                ..CancelSettings::default()
            },
            KafkaSettings::default(),
            Arc::new(Metrics::new()),
        ))
    }

    #[test]
    fn a_cancellation_reaches_watched_tasks_of_its_id_or_run_and_later_watches() {
        let c = cancels(10);
        let (task, other, run) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let t1 = CancellationToken::new();
        let t2 = CancellationToken::new();
        let _w1 = c.watch(task, None, &t1);
        let _w2 = c.watch(other, Some(run), &t2);
        c.apply_cancel(task, 1_000, 2_000);
        assert!(t1.is_cancelled() && !t2.is_cancelled());
        c.apply_cancel(run, 1_000, 2_000);
        assert!(t2.is_cancelled(), "a run's cancellation reaches its tasks");
        let t3 = CancellationToken::new();
        let _w3 = c.watch(Uuid::new_v4(), Some(run), &t3);
        assert!(
            t3.is_cancelled(),
            "watching a cancelled run's task cancels at once"
        );
        assert_eq!(held(&c, run), Some(1_000));
        c.forget(task);
        assert_eq!(held(&c, task), None);
    }

    #[test]
    fn the_bound_forgets_the_oldest_and_counts_them_and_age_expires() {
        let c = cancels(3);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            c.apply_cancel(*id, 1_000 + i as i64, 2_000);
        }
        assert_eq!(c.len(), 3);
        assert_eq!(held(&c, ids[0]), None);
        assert_eq!(held(&c, ids[4]), Some(1_004));
        let dropped = c
            .metrics
            .cancellations_dropped
            .with_label_values::<&str>(&[])
            .get();
        assert_eq!(dropped, 2);
        // Too old to apply; then everything expires.
        c.apply_cancel(Uuid::new_v4(), 0, 100_000);
        assert_eq!(c.len(), 3);
        c.expire(1_002 + 60_001);
        assert_eq!(c.len(), 2, "only the entry at 1002 and later stay");
        c.expire(10_000_000);
        assert!(c.is_empty());
        assert!(c.inner().order.is_empty());
    }

    #[test]
    fn unwatching_forgets_the_task_and_its_run() {
        let c = cancels(10);
        let (task, run) = (Uuid::new_v4(), Uuid::new_v4());
        let t = CancellationToken::new();
        let outer = c.watch(task, Some(run), &t);
        let inner = c.watch(task, Some(run), &t);
        drop(inner);
        assert_eq!(c.inner().watched.len(), 1);
        drop(outer);
        assert!(c.inner().watched.is_empty() && c.inner().runs.is_empty());
    }
}
