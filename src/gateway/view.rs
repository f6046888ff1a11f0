//! The gateway's status view: what it knows of each task, materialised from
//! the task topics (a request seen: `queued`) and the results topic (a
//! result seen: `succeeded` or `failed`), plus the idempotency index.
//!
//! Pure bookkeeping, no I/O: the follower feeds it records, the HTTP
//! handlers read it. Memory is bounded three ways, the oldest entries going
//! first: by count (`view_max_tasks`), by age (`view_max_age_ms`, measured
//! from the record's own time) and by the bytes of outputs and errors held
//! (`view_max_bytes`). A task forgotten by the view answers 404.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::Notify;
use uuid::Uuid;

use crate::codec::event::TaskEvent;
use crate::codec::{TaskError, TaskRequest, TaskResult, TaskStatus, WorkflowRef};

/// Metadata key under which the gateway records a task's idempotency key,
/// so every replica can learn it from the task topics.
pub use crate::codec::wire::IDEMPOTENCY_KEY as IDEMPOTENCY_METADATA;

/// Where a task stands, as the view knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Delayed: waiting in a delay tier until `run_at`.
    Scheduled,
    /// Its request is known, its result not yet.
    Queued,
    /// An attempt started (a `started` event) and no result yet.
    Running,
    /// An attempt failed and another is due (a `retrying` event).
    Retrying,
    /// Its result says it succeeded.
    Succeeded,
    /// Its result says it failed for good.
    Failed,
    /// Its result says it was cancelled (a FAILED result of kind
    /// `cancelled`).
    Cancelled,
}

impl Phase {
    /// The API's name for the phase.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Scheduled => "scheduled",
            Phase::Queued => "queued",
            Phase::Running => "running",
            Phase::Retrying => "retrying",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Whether the task will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

/// Most events of one task the view keeps for its event streams (a
/// stream resuming from an older one misses those dropped; the latest
/// progress is kept apart and always shown).
pub const MAX_TASK_EVENTS: usize = 32;

/// One event of a task, as its event stream shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEvent {
    /// Its offset in the events topic: the stream's event id.
    pub offset: i64,
    /// The event's kind.
    pub kind: String,
    /// When, ms since the epoch.
    pub at: i64,
    /// The attempt.
    pub attempt: i32,
    /// Who wrote it.
    pub worker: String,
    /// A progress value (JSON text).
    pub progress: Option<Vec<u8>>,
    /// A retry's due time.
    pub due: Option<i64>,
    /// A note.
    pub message: Option<String>,
}

impl LiveEvent {
    fn bytes(&self) -> usize {
        self.kind.len()
            + self.worker.len()
            + self.progress.as_ref().map_or(0, Vec::len)
            + self.message.as_ref().map_or(0, String::len)
            + 64
    }
}

/// The attempt that is running, from its `started` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When it started, ms since the epoch.
    pub started_at: i64,
    /// Its number, from 1.
    pub attempt: i32,
    /// The worker running it.
    pub worker: String,
    /// Its progress token.
    pub token: Option<String>,
}

/// What the view holds of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskView {
    /// The task's id.
    pub id: Uuid,
    /// Its type.
    pub task_type: String,
    /// Where it stands.
    pub phase: Phase,
    /// When it was submitted (ms since the epoch), when its request was seen.
    pub submitted_at: Option<i64>,
    /// When it became terminal (ms since the epoch).
    pub finished_at: Option<i64>,
    /// How many times the handler ran, once terminal.
    pub attempts: Option<i32>,
    /// The handler's output, if it gave one (the status store keeps at
    /// most `gateway.store_max_output_bytes` of it).
    pub output: Option<Vec<u8>>,
    /// The output's full size, when `output` holds only its start.
    pub output_size: Option<usize>,
    /// Media type of `output`.
    pub content_type: Option<String>,
    /// Why it failed.
    pub error: Option<TaskError>,
    /// The trace context it was submitted with.
    pub traceparent: Option<String>,
    /// Where it stands in a workflow run, if it is a step of one (a run's
    /// own result has the run id and `step` = the number of steps).
    pub workflow: Option<WorkflowRef>,
    /// When a delayed task is to start (ms since the epoch).
    pub run_at: Option<i64>,
    /// The latest attempt that started (from the events topic).
    pub attempt: Option<Attempt>,
    /// The latest progress value (JSON text) and when it was reported.
    pub progress: Option<(Vec<u8>, i64)>,
    /// When a retry is due, while `retrying`.
    pub retry_at: Option<i64>,
    /// Its events, oldest first, at most [`MAX_TASK_EVENTS`] (counted in
    /// the view's bytes, so `view_max_bytes` bounds them with the outputs).
    pub events: VecDeque<LiveEvent>,
    /// The events topic's partition holding its events.
    pub events_partition: Option<i32>,
    /// The idempotency key it was submitted with.
    pub idempotency_key: Option<String>,
    /// Its request's payload: set only on what [`View::apply_request`]
    /// returns for the status store (the view itself does not hold
    /// payloads), which keeps at most `gateway.store_max_output_bytes`.
    pub payload: Option<Vec<u8>>,
    /// The payload's full size, when `payload` holds only its start.
    pub payload_size: Option<usize>,
}

impl TaskView {
    fn bytes(&self) -> usize {
        let error = self
            .error
            .as_ref()
            .map_or(0, |e| e.kind.len() + e.message.len());
        let progress = self.progress.as_ref().map_or(0, |(p, _)| p.len());
        let events: usize = self.events.iter().map(LiveEvent::bytes).sum();
        self.output.as_ref().map_or(0, Vec::len) + error + progress + events
    }

    /// A copy without its events (what the status store keeps).
    pub fn snapshot(&self) -> TaskView {
        TaskView {
            output: self.output.clone(),
            payload: self.payload.clone(),
            ..self.summary()
        }
    }

    /// A copy without its events and its output (what a list shows).
    pub fn summary(&self) -> TaskView {
        TaskView {
            id: self.id,
            task_type: self.task_type.clone(),
            phase: self.phase,
            submitted_at: self.submitted_at,
            finished_at: self.finished_at,
            attempts: self.attempts,
            output: None,
            output_size: self.output_size,
            content_type: self.content_type.clone(),
            error: self.error.clone(),
            traceparent: self.traceparent.clone(),
            workflow: self.workflow.clone(),
            run_at: self.run_at,
            attempt: self.attempt.clone(),
            progress: self.progress.clone(),
            retry_at: self.retry_at,
            events: VecDeque::new(),
            events_partition: self.events_partition,
            idempotency_key: self.idempotency_key.clone(),
            payload: None,
            payload_size: self.payload_size,
        }
    }

    /// A task known only by its id and type (an event or a result seen
    /// before its request).
    pub(crate) fn bare(id: Uuid, task_type: String) -> TaskView {
        TaskView {
            id,
            task_type,
            phase: Phase::Queued,
            submitted_at: None,
            finished_at: None,
            attempts: None,
            output: None,
            output_size: None,
            content_type: None,
            error: None,
            traceparent: None,
            workflow: None,
            run_at: None,
            attempt: None,
            progress: None,
            retry_at: None,
            events: VecDeque::new(),
            events_partition: None,
            idempotency_key: None,
            payload: None,
            payload_size: None,
        }
    }
}

/// The view's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most tasks kept.
    pub max_tasks: usize,
    /// Longest a task is kept, in ms, from its latest record's time.
    pub max_age_ms: i64,
    /// Most bytes of outputs and errors kept.
    pub max_bytes: usize,
    /// How long an idempotency key maps to its task, in ms.
    pub idempotency_window_ms: i64,
}

struct Slot {
    task: TaskView,
    /// Position in `order`; an entry of `order` with another sequence is
    /// stale.
    seq: u64,
}

/// The status view and the idempotency index.
pub struct View {
    limits: Limits,
    tasks: HashMap<Uuid, Slot>,
    /// Oldest first: (sequence, record time, id).
    order: VecDeque<(u64, i64, Uuid)>,
    next_seq: u64,
    bytes: usize,
    idempotency: HashMap<String, (Uuid, i64)>,
    /// Oldest first: (time, key).
    idempotency_order: VecDeque<(i64, String)>,
    waiters: HashMap<Uuid, Arc<Notify>>,
    /// Workflow runs: run id → the ids of its tasks the view holds.
    runs: HashMap<Uuid, HashSet<Uuid>>,
    /// Events topic partition → the next offset to read there.
    events_read: HashMap<i32, i64>,
}

impl View {
    /// An empty view with these bounds.
    pub fn new(limits: Limits) -> Self {
        View {
            limits,
            tasks: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            waiters: HashMap::new(),
            runs: HashMap::new(),
            events_read: HashMap::new(),
        }
    }

    /// Every task of workflow run `run` the view holds (its own result
    /// included), in no particular order.
    pub fn run(&self, run: &Uuid) -> Vec<&TaskView> {
        self.runs
            .get(run)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id).map(|slot| &slot.task))
            .collect()
    }

    /// The task, if the view knows it.
    pub fn get(&self, id: &Uuid) -> Option<&TaskView> {
        self.tasks.get(id).map(|slot| &slot.task)
    }

    /// How many tasks the view holds.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the view holds no task.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Bytes of outputs and errors held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The task first submitted with `key` within the window ending at
    /// `now`.
    pub fn idempotent(&self, key: &str, now: i64) -> Option<Uuid> {
        self.idempotency
            .get(key)
            .filter(|(_, at)| now.saturating_sub(*at) < self.limits.idempotency_window_ms)
            .map(|(id, _)| *id)
    }

    /// Records that `key` maps to task `id` from time `at`, unless it
    /// already maps to a task within the window.
    pub fn remember_idempotency(&mut self, key: &str, id: Uuid, at: i64) {
        if self.idempotent(key, at).is_some() {
            return;
        }
        self.idempotency.insert(key.to_owned(), (id, at));
        self.idempotency_order.push_back((at, key.to_owned()));
    }

    /// Forgets an idempotency key (its submission was not acknowledged).
    pub fn forget_idempotency(&mut self, key: &str, id: Uuid) {
        if self
            .idempotency
            .get(key)
            .is_some_and(|(known, _)| *known == id)
        {
            self.idempotency.remove(key);
        }
    }

    /// A request was seen (or submitted here): the task is queued unless
    /// the view already has its result.
    /// `scheduled`: the request was seen waiting in a delay tier, to start
    /// then (ms since the epoch); `None`: seen on its task topic. A task
    /// seen on its task topic is queued from then on, whatever order the
    /// topics are read in.
    pub fn apply_request(
        &mut self,
        request: &TaskRequest,
        traceparent: Option<String>,
        scheduled: Option<i64>,
        now: i64,
    ) -> Option<TaskView> {
        if let Some(key) = request.metadata.get(IDEMPOTENCY_METADATA) {
            self.remember_idempotency(key, request.id, request.submitted_at);
        }
        if let Some(slot) = self.tasks.get_mut(&request.id) {
            slot.task.submitted_at.get_or_insert(request.submitted_at);
            if slot.task.traceparent.is_none() {
                slot.task.traceparent = traceparent;
            }
            if slot.task.idempotency_key.is_none() {
                slot.task.idempotency_key = request.metadata.get(IDEMPOTENCY_METADATA).cloned();
            }
            if let Some(at) = scheduled {
                slot.task.run_at.get_or_insert(at);
            } else if slot.task.phase == Phase::Scheduled {
                slot.task.phase = Phase::Queued;
            }
            return Some(TaskView {
                payload: Some(request.payload.clone()),
                ..slot.task.snapshot()
            });
        }
        let task = TaskView {
            phase: if scheduled.is_some() {
                Phase::Scheduled
            } else {
                Phase::Queued
            },
            run_at: scheduled,
            submitted_at: Some(request.submitted_at),
            traceparent,
            workflow: request.workflow.clone(),
            idempotency_key: request.metadata.get(IDEMPOTENCY_METADATA).cloned(),
            ..TaskView::bare(request.id, request.task_type.clone())
        };
        let snapshot = TaskView {
            payload: Some(request.payload.clone()),
            ..task.snapshot()
        };
        self.insert(task, request.submitted_at);
        self.evict(now);
        Some(snapshot)
    }

    /// A result was seen: the task is terminal. A second result for the
    /// same task (at-least-once can write one twice) changes nothing.
    /// Returns the task as it now stands (without its events), `None` when
    /// nothing changed.
    pub fn apply_result(&mut self, result: TaskResult, now: i64) -> Option<TaskView> {
        let cancelled = result
            .error
            .as_ref()
            .is_some_and(|e| e.kind == crate::codec::FailureKind::Cancelled.as_str());
        let phase = match result.status {
            TaskStatus::Succeeded => Phase::Succeeded,
            TaskStatus::Failed if cancelled => Phase::Cancelled,
            TaskStatus::Failed => Phase::Failed,
        };
        let id = result.id;
        let before = match self.tasks.remove(&id) {
            Some(slot) if slot.task.phase.is_terminal() => {
                self.tasks.insert(id, slot);
                return None;
            }
            Some(slot) => {
                self.bytes = self.bytes.saturating_sub(slot.task.bytes());
                self.unlink(&slot.task);
                Some(slot.task)
            }
            None => None,
        };
        let finished_at = result.finished_at;
        let mut task = TaskView {
            phase,
            finished_at: Some(finished_at),
            attempts: Some(result.attempts),
            output: result.output,
            content_type: Some(result.content_type),
            error: result.error,
            workflow: result.workflow,
            ..TaskView::bare(id, result.task_type)
        };
        if let Some(before) = before {
            task.submitted_at = before.submitted_at;
            task.traceparent = before.traceparent;
            task.attempt = before.attempt;
            task.progress = before.progress;
            task.events = before.events;
            task.events_partition = before.events_partition;
            task.idempotency_key = before.idempotency_key;
        }
        let snapshot = task.snapshot();
        self.insert(task, finished_at);
        if let Some(waiting) = self.waiters.remove(&id) {
            waiting.notify_waiters();
        }
        self.evict(now);
        Some(snapshot)
    }

    /// An event from the events topic (read at `partition`, `offset`):
    /// folded into its task (which it makes `running` or `retrying` while
    /// not terminal) and kept for its event streams. An event of a task
    /// already terminal is kept (read after its result) but changes only
    /// its latest progress; one of an unknown kind is skipped.
    ///
    /// Returns the task as it now stands (without its events).
    pub fn apply_event(
        &mut self,
        event: TaskEvent,
        partition: i32,
        offset: i64,
        now: i64,
    ) -> Option<TaskView> {
        use crate::codec::event::{CANCELLED, PROGRESS, RETRYING, STARTED};
        let read = self.events_read.entry(partition).or_insert(0);
        *read = (*read).max(offset.saturating_add(1));
        if ![STARTED, PROGRESS, RETRYING, CANCELLED].contains(&event.kind.as_str()) {
            return None;
        }
        let id = event.id;
        // Changed in place: an event does not renew the task's place in
        // the eviction order (one entry per task, not one per event).
        let slot = match self.tasks.get_mut(&id) {
            Some(slot) => slot,
            None => {
                let at = event.at;
                self.insert(TaskView::bare(id, event.task_type.clone()), at);
                self.tasks.get_mut(&id)?
            }
        };
        let task = &mut slot.task;
        let before = task.bytes();
        task.events_partition = Some(partition);
        // The events and results topics are read independently: an event
        // written before the result may be read after it. It joins the
        // task's events (its stream shows it), but an ended task's status
        // stays what its result says.
        let ended = task.phase.is_terminal();
        match event.kind.as_str() {
            _ if ended && event.kind != PROGRESS => {}
            STARTED => {
                task.phase = Phase::Running;
                task.retry_at = None;
                task.attempt = Some(Attempt {
                    started_at: event.at,
                    attempt: event.attempt,
                    worker: event.worker.clone(),
                    token: event.token.clone(),
                });
            }
            PROGRESS => {
                if let Some(value) = &event.progress {
                    task.progress = Some((value.clone(), event.at));
                }
            }
            RETRYING => {
                task.phase = Phase::Retrying;
                task.retry_at = event.due;
            }
            _ => {}
        }
        task.events.push_back(LiveEvent {
            offset,
            kind: event.kind,
            at: event.at,
            attempt: event.attempt,
            worker: event.worker,
            progress: event.progress,
            due: event.due,
            message: event.message,
        });
        while task.events.len() > MAX_TASK_EVENTS {
            task.events.pop_front();
        }
        let after = task.bytes();
        let snapshot = task.snapshot();
        self.bytes = self.bytes.saturating_sub(before).saturating_add(after);
        self.evict(now);
        if let Some(waiting) = self.waiters.get(&id) {
            waiting.notify_waiters();
        }
        Some(snapshot)
    }

    /// Holds `task` (read back from the status store) again, unless the
    /// view already has it; it counts as new for the bounds.
    pub fn recall(&mut self, task: TaskView, now: i64) {
        if self.tasks.contains_key(&task.id) {
            return;
        }
        self.insert(task, now);
        self.evict(now);
    }

    /// The next offset the view will read in partition `partition` of the
    /// events topic (0 when it has read none there).
    pub fn events_read(&self, partition: i32) -> i64 {
        self.events_read.get(&partition).copied().unwrap_or(0)
    }

    /// The notifier woken when task `id` changes (an event, its result).
    /// Call
    /// [`View::release_waiter`] when done waiting.
    pub fn waiter(&mut self, id: Uuid) -> Arc<Notify> {
        self.waiters.entry(id).or_default().clone()
    }

    /// Drops the notifier of `id` when nobody else waits on it.
    pub fn release_waiter(&mut self, id: &Uuid) {
        if self
            .waiters
            .get(id)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            self.waiters.remove(id);
        }
    }

    /// Wakes every waiter (the gateway is stopping).
    pub fn wake_all(&mut self) {
        for (_, waiting) in self.waiters.drain() {
            waiting.notify_waiters();
        }
    }

    /// How many tasks have someone waiting on them.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Adds `task` (the caller evicts what is then over the bounds).
    fn insert(&mut self, task: TaskView, at: i64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += task.bytes();
        self.order.push_back((seq, at, task.id));
        if let Some(w) = &task.workflow {
            self.runs.entry(w.id).or_default().insert(task.id);
        }
        self.tasks.insert(task.id, Slot { task, seq });
    }

    /// Removes `task` from its run's index.
    fn unlink(&mut self, task: &TaskView) {
        let Some(w) = &task.workflow else {
            return;
        };
        if let Some(ids) = self.runs.get_mut(&w.id) {
            ids.remove(&task.id);
            if ids.is_empty() {
                self.runs.remove(&w.id);
            }
        }
    }

    /// Forgets the oldest tasks and idempotency keys beyond the bounds.
    pub fn evict(&mut self, now: i64) {
        let oldest_kept = now.saturating_sub(self.limits.max_age_ms);
        while let Some(&(seq, at, id)) = self.order.front() {
            let live = self.tasks.get(&id).is_some_and(|slot| slot.seq == seq);
            let over = self.tasks.len() > self.limits.max_tasks
                || self.bytes > self.limits.max_bytes
                || at < oldest_kept;
            if live && !over {
                break;
            }
            self.order.pop_front();
            if live {
                if let Some(slot) = self.tasks.remove(&id) {
                    self.bytes = self.bytes.saturating_sub(slot.task.bytes());
                    self.unlink(&slot.task);
                }
            }
        }
        let oldest_key = now.saturating_sub(self.limits.idempotency_window_ms);
        while let Some((at, key)) = self.idempotency_order.front() {
            let over = self.idempotency.len() > self.limits.max_tasks || *at < oldest_key;
            if !over {
                break;
            }
            let at = *at;
            if let Some((_, known_at)) = self.idempotency.get(key) {
                if *known_at == at {
                    self.idempotency.remove(key);
                }
            }
            self.idempotency_order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_tasks: 3,
            max_age_ms: 1_000,
            max_bytes: 100,
            idempotency_window_ms: 500,
        }
    }

    fn request(at: i64) -> TaskRequest {
        let mut r = TaskRequest::new("echo", b"{}".to_vec());
        r.submitted_at = at;
        r
    }

    fn result(id: Uuid, status: TaskStatus, output: &[u8], at: i64) -> TaskResult {
        TaskResult {
            id,
            task_type: "echo".into(),
            status,
            output: Some(output.to_vec()),
            content_type: "application/json".into(),
            error: None,
            attempts: 2,
            started_at: at,
            finished_at: at,
            worker: "w".into(),
            workflow: None,
        }
    }

    #[test]
    fn request_then_result_goes_queued_then_terminal_and_stays() {
        let mut view = View::new(limits());
        let r = request(10);
        view.apply_request(&r, Some("tp".into()), None, 10);
        assert_eq!(view.get(&r.id).map(|t| t.phase), Some(Phase::Queued));
        view.apply_result(result(r.id, TaskStatus::Succeeded, b"1", 20), 20);
        let task = view.get(&r.id).cloned();
        assert_eq!(task.as_ref().map(|t| t.phase), Some(Phase::Succeeded));
        assert_eq!(task.as_ref().and_then(|t| t.submitted_at), Some(10));
        assert_eq!(
            task.as_ref().and_then(|t| t.traceparent.clone()),
            Some("tp".into())
        );
        // A duplicate result or a late request changes nothing.
        view.apply_result(result(r.id, TaskStatus::Failed, b"2", 30), 30);
        view.apply_request(&r, None, None, 30);
        assert_eq!(view.get(&r.id), task.as_ref());
        assert_eq!(view.len(), 1);
        assert_eq!(view.bytes(), 1);
    }

    #[test]
    fn result_before_request_is_terminal() {
        let mut view = View::new(limits());
        let r = request(10);
        view.apply_result(result(r.id, TaskStatus::Failed, b"", 20), 20);
        view.apply_request(&r, None, None, 21);
        let task = view.get(&r.id);
        assert_eq!(task.map(|t| t.phase), Some(Phase::Failed));
        assert_eq!(task.and_then(|t| t.submitted_at), Some(10));
    }

    #[test]
    fn bounds_forget_the_oldest_first() {
        let mut view = View::new(limits());
        let ids: Vec<Uuid> = (0..4)
            .map(|i| {
                let r = request(100 + i);
                view.apply_request(&r, None, None, 100 + i);
                r.id
            })
            .collect();
        // Count: 3 kept, the first forgotten.
        assert!(view.get(&ids[0]).is_none());
        assert!(ids[1..].iter().all(|id| view.get(id).is_some()));
        // Bytes: a 90-byte output then a 20-byte one push out the older.
        view.apply_result(result(ids[2], TaskStatus::Succeeded, &[0; 90], 200), 200);
        view.apply_result(result(ids[3], TaskStatus::Succeeded, &[0; 20], 201), 201);
        assert!(view.get(&ids[2]).is_none(), "over max_bytes");
        assert!(view.get(&ids[3]).is_some());
        assert_eq!(view.bytes(), 20);
        // Age: everything older than max_age_ms goes.
        view.evict(1_202);
        assert!(view.is_empty());
        assert_eq!(view.bytes(), 0);
    }

    #[test]
    fn idempotency_keys_hold_within_the_window_only() {
        let mut view = View::new(limits());
        let mut first = request(1_000);
        first
            .metadata
            .insert(IDEMPOTENCY_METADATA.into(), "k".into());
        view.apply_request(&first, None, None, 1_000);
        assert_eq!(view.idempotent("k", 1_499), Some(first.id));
        // A second request with the same key (another replica raced) does
        // not take the key over.
        let mut second = request(1_100);
        second
            .metadata
            .insert(IDEMPOTENCY_METADATA.into(), "k".into());
        view.apply_request(&second, None, None, 1_100);
        assert_eq!(view.idempotent("k", 1_200), Some(first.id));
        assert_eq!(view.idempotent("k", 1_500), None);
        view.forget_idempotency("k", first.id);
        assert_eq!(view.idempotent("k", 1_200), None);
    }

    fn event(id: Uuid, kind: &str, at: i64) -> TaskEvent {
        let mut e = TaskEvent::new(id, "echo", kind, "w-1", 1);
        e.at = at;
        e
    }

    #[test]
    fn events_make_a_task_running_and_one_read_after_its_result_is_kept_without_reviving_it() {
        use crate::codec::event::{CANCELLED, PROGRESS, STARTED};
        let mut view = View::new(Limits {
            max_tasks: 10,
            max_age_ms: 10_000,
            max_bytes: 10_000,
            idempotency_window_ms: 500,
        });
        let r = request(10);
        view.apply_request(&r, None, None, 10);
        let mut started = event(r.id, STARTED, 11);
        started.token = Some("t".into());
        view.apply_event(started, 3, 40, 11);
        let mut progress = event(r.id, PROGRESS, 12);
        progress.progress = Some(b"{\"n\":1}".to_vec());
        view.apply_event(progress, 3, 41, 12);
        let task = view.get(&r.id).unwrap();
        assert_eq!(task.phase, Phase::Running);
        assert_eq!(
            task.attempt.as_ref().map(|a| a.worker.as_str()),
            Some("w-1")
        );
        assert_eq!(
            task.progress.as_ref().map(|p| p.0.clone()),
            Some(b"{\"n\":1}".to_vec())
        );
        assert_eq!(view.events_read(3), 42);
        // The result, then the cancelled event written before it.
        let mut done = result(r.id, TaskStatus::Failed, b"", 20);
        done.error = Some(TaskError {
            kind: "cancelled".into(),
            message: "m".into(),
        });
        view.apply_result(done, 20);
        view.apply_event(event(r.id, CANCELLED, 13), 3, 42, 21);
        view.apply_event(event(r.id, STARTED, 14), 3, 43, 21);
        let task = view.get(&r.id).unwrap();
        assert_eq!(task.phase, Phase::Cancelled, "the result decides");
        let kinds: Vec<&str> = task.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["started", "progress", "cancelled", "started"]);
        assert_eq!(task.attempt.as_ref().map(|a| a.started_at), Some(11));
        // Unknown kinds are skipped; the log is bounded.
        view.apply_event(event(r.id, "paused", 15), 3, 44, 21);
        for i in 0..100 {
            view.apply_event(event(r.id, PROGRESS, 16 + i), 3, 45 + i, 21);
        }
        assert_eq!(view.get(&r.id).unwrap().events.len(), MAX_TASK_EVENTS);
        assert_eq!(view.events_read(3), 145);
    }

    #[tokio::test]
    async fn a_result_wakes_its_waiter() {
        let mut view = View::new(limits());
        let r = request(10);
        view.apply_request(&r, None, None, 10);
        let waiter = view.waiter(r.id);
        let woken = waiter.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        view.apply_result(result(r.id, TaskStatus::Succeeded, b"", 20), 20);
        tokio::time::timeout(std::time::Duration::from_secs(1), woken)
            .await
            .expect("the waiter is woken");
        assert_eq!(view.waiting(), 0);
    }
}
