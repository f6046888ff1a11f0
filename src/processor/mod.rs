//! The engine: one consumer-group member that reads task requests, runs a
//! handler for each, produces the results and commits at least once.
//!
//! # The at-least-once rule
//!
//! An input offset counts as finished only when its task finished **and**
//! every record it caused was acknowledged by the broker (`acks=all`,
//! idempotent producer), and the committed offset advances only over the
//! contiguous prefix of finished offsets of its partition
//! ([`OffsetTracker`]). A crash at any instant therefore loses nothing:
//! whatever was not committed is read again by the next owner of the
//! partition. It redoes at most the tasks in flight plus those finished
//! since the last commit (`commit_interval_ms`).
//!
//! # Progress beyond the watermark
//!
//! Each commit (sent by the poll thread every `commit_interval_ms`, see
//! `Shared::commit`) also carries, in its metadata, the finished offsets
//! above the committed one ([`progress`]). A member assigned the partition
//! reads them back and skips those records, so a slow head does not make
//! the work finished behind it run again after a crash. Metadata that is
//! missing (a broker that drops it) or not conveyor's for that offset is
//! ignored. `max_uncommitted_per_partition` bounds how far past its oldest
//! unfinished record a partition is read.
//!
//! # Failures that stop the processor
//!
//! An error retrying cannot fix (see `delivery.rs`: not authorized to
//! write, a deleted topic, a fatal idempotent-producer error) is recorded
//! with `Shared::fail`; the poll thread then stops at once, commits what
//! finished (nothing past the failed task) and returns the error.
//!
//! # Threads
//!
//! The consumer lives on one dedicated thread that polls it, dispatches
//! records and stores offsets; no other thread calls it. librdkafka runs
//! the rebalance callbacks on that thread too, inside `poll`, which lets a
//! revoke *block* there until the revoked partitions' tasks have drained.
//! Handlers run on tokio (records dispatched together start in one task;
//! only those that wait get a task of their own). The producer's own thread
//! receives the acknowledgements and finishes each task there
//! (`delivery.rs`); both report through the shared state only, and wake
//! the poll thread when it waits for room.
//!
//! # Ordering and bounds
//!
//! Records are put in *lanes*: one per partition (`ordering = "partition"`),
//! one per record key (`"key"`; records without a key get a lane each), or
//! none (`"none"`). A lane runs its records one at a time in offset order:
//! the next starts once the previous one's outputs are handed to the
//! idempotent producer (which keeps their order per partition), not once
//! they are acknowledged; the offset still counts as finished only then.
//! A join contribution holds its lane until its changelog record is
//! acknowledged (the join's state must be written before the next
//! contribution of the run is counted).
//! Records dispatched but not finished count against `max_in_flight`,
//! `max_in_flight_per_partition` and (by their size) `max_in_flight_bytes`.
//!
//! Each owned partition's records arrive on a queue of its own
//! (librdkafka's partition queues), and the poll thread takes from a
//! partition's queue only as many records as its bounds leave room for. A
//! partition at its bound (or every partition, when the processor is at its
//! bound, the producer queue is full or the breaker is open) is simply not
//! read: its queue fills up to librdkafka's prefetch limits
//! (`queued.min.messages`, `queued.max.messages.kbytes`, per partition with
//! split queues) and fetching stops by itself. Pausing the partition instead
//! would make librdkafka discard what it prefetched and fetch it again on
//! resume, which cost ~200 ms per pause here (BENCHMARKS.md).
//!
//! A partition's queue is split off right after it is assigned; the
//! records fetched before that arrive on the consumer's main queue. A split
//! queue is read only once the main queue has been seen empty since the
//! split (`poll.rs`; empty by its length: rust-rdkafka's poll answers
//! `None` also after serving a rebalance, statistics, a log line or a
//! commit's result), so every partition is dispatched in offset order; the
//! ledger refuses a record that arrives below offsets already dispatched
//! without having been dispatched itself (`Admission::OutOfOrder`), and the
//! processor stops rather than let the commit pass it. Every admission,
//! from either queue, is checked against the bounds by the ledger; a record
//! without room is held by the poll thread, in order, until there is (see
//! `poll::Held`).
//!
//! # Failures
//!
//! See `task.rs`: retries in place or through the retry topic, dead
//! letters with FAILED results, the breaker. A task's outputs (result, dead
//! letter, parked retry) are all acknowledged before its offset counts as
//! finished.
//!
//! # Rebalance and shutdown
//!
//! On revoke: records of the revoked partitions that have not started are
//! dropped (they were not committed, so the next owner reads them), tasks
//! that only wait (a retry not due, a backoff, a breaker hold) are let go
//! of at once, running ones are awaited until `drain_timeout_ms` and then
//! cancelled (see `task.rs`), the progress is committed synchronously, then
//! the partitions go. A task let go of produces nothing and its offset is
//! not committed. Shutdown does the same for every partition, then closes.

mod delivery;
pub mod headers;
mod hot;
mod join;
mod ledger;
mod lifecycle;
mod poll;
mod rebalance;
mod task;

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering as AtomicOrdering,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::Producer as _;
use tracing::{debug, error, info, warn};

use crate::breaker::Breaker;
use crate::codec::Codec;
use crate::handlers::Registry;
use crate::kafka;
use crate::metrics::Metrics;
use crate::settings::{KafkaSettings, ProcessorSettings};
use crate::shutdown::CancellationToken;
use crate::workflow::Workflows;
use hot::Hot;
use ledger::{Admission, Arrival, Bounds, Ledger, Ticket, TopicPartition};
use rebalance::EngineContext;

/// How often open joins are checked against their workflow's deadline.
const JOIN_SWEEP: Duration = Duration::from_secs(1);

/// Why a processor stopped other than by request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessorError {
    /// A client could not be created (bad librdkafka option, …).
    #[error("processor `{processor}`: cannot create the Kafka {client}: {source}")]
    Client {
        /// Processor name.
        processor: String,
        /// `consumer` or `producer`.
        client: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// An error that retrying cannot fix: the message says what to fix.
    #[error("processor `{processor}`: {message}")]
    Fatal {
        /// Processor name.
        processor: String,
        /// What went wrong and what to fix.
        message: String,
    },
}

/// Live figures of a running processor, readable from any thread (for
/// health checks and tests; metrics come from the same places).
#[derive(Debug, Default)]
pub struct ProcessorStatus {
    assigned: AtomicUsize,
    /// Owned partitions read through a queue of their own (split off by
    /// the poll thread after each assignment).
    reading: AtomicUsize,
    /// Owned partitions whose queue could not be split off.
    unsplit: AtomicUsize,
    in_flight: AtomicUsize,
    parked: AtomicUsize,
    finished: AtomicUsize,
    breaker_open: AtomicBool,
    drain_commit_failures: AtomicUsize,
    /// Records that waited for room in the producer's queue.
    producer_waits: AtomicUsize,
    /// When the poll loop last went round, in ms since the Unix epoch (0:
    /// not started).
    last_poll_ms: AtomicU64,
    /// The processor stopped on an error that retrying cannot fix.
    failed: AtomicBool,
    /// Records read from the consumer's main queue (fetched before their
    /// partition's queue was split off, or of a partition that has none).
    from_main_queue: AtomicUsize,
    /// Test hook: the poll loop waits while this is set.
    #[cfg(feature = "test-hooks")]
    held: AtomicBool,
    /// Test hook: ms the poll loop waits before splitting off new queues.
    #[cfg(feature = "test-hooks")]
    split_delay_ms: AtomicU64,
    /// Test hook: most records the poll loop takes from the main queue per
    /// pass (0: the built-in batch).
    #[cfg(feature = "test-hooks")]
    main_batch: AtomicUsize,
}

impl ProcessorStatus {
    /// Milliseconds since the poll loop last went round; `None` before it
    /// started. A poll loop that does not go round (a callback blocked in
    /// librdkafka, a lock never released) is the consumer that is alive
    /// but has silently stopped consuming.
    pub fn since_last_poll(&self) -> Option<Duration> {
        let last = self.last_poll_ms.load(AtomicOrdering::Relaxed);
        let now = u64::try_from(crate::codec::now_millis()).unwrap_or(0);
        (last > 0).then(|| Duration::from_millis(now.saturating_sub(last)))
    }

    /// Whether the processor stopped on an error that retrying cannot fix.
    pub fn failed(&self) -> bool {
        self.failed.load(AtomicOrdering::Relaxed)
    }

    /// Test hook (cargo feature `test-hooks`, which only the tests turn
    /// on): while `held`, the poll loop waits without going round, as a
    /// blocked one would.
    #[cfg(feature = "test-hooks")]
    pub fn hold_poll_loop(&self, held: bool) {
        self.held.store(held, AtomicOrdering::Relaxed);
    }

    /// Test hook (cargo feature `test-hooks`): the poll loop waits `delay`
    /// before splitting off the queues of newly assigned partitions, so
    /// that what librdkafka fetches meanwhile comes through the main queue,
    /// and `delay` again after, so that the split-off queues fill too.
    #[cfg(feature = "test-hooks")]
    pub fn delay_splits(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.split_delay_ms.store(ms, AtomicOrdering::Relaxed);
    }

    /// The delay set by [`ProcessorStatus::delay_splits`].
    fn split_delay(&self) -> Option<Duration> {
        #[cfg(feature = "test-hooks")]
        {
            let ms = self.split_delay_ms.load(AtomicOrdering::Relaxed);
            (ms > 0).then(|| Duration::from_millis(ms))
        }
        #[cfg(not(feature = "test-hooks"))]
        None
    }

    /// Test hook (cargo feature `test-hooks`): the poll loop takes at most
    /// `records` from the main queue per pass, so that a partition's queue
    /// could be read while the main queue still holds its older records
    /// (the engine must not: it waits until the main queue is empty).
    #[cfg(feature = "test-hooks")]
    pub fn serve_main_by(&self, records: usize) {
        self.main_batch.store(records, AtomicOrdering::Relaxed);
    }

    /// Most records a pass takes from the main queue: `built_in`, or what
    /// [`ProcessorStatus::serve_main_by`] set.
    fn main_batch(&self, built_in: usize) -> usize {
        #[cfg(feature = "test-hooks")]
        {
            match self.main_batch.load(AtomicOrdering::Relaxed) {
                0 => built_in,
                records => records,
            }
        }
        #[cfg(not(feature = "test-hooks"))]
        built_in
    }

    /// Records read from the consumer's main queue since start: fetched
    /// before their partition's queue was split off, or of a partition
    /// whose queue could not be split off.
    pub fn from_main_queue(&self) -> usize {
        self.from_main_queue.load(AtomicOrdering::Relaxed)
    }

    fn poll_loop_alive(&self) {
        #[cfg(feature = "test-hooks")]
        while self.held.load(AtomicOrdering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let now = u64::try_from(crate::codec::now_millis()).unwrap_or(0);
        self.last_poll_ms.store(now, AtomicOrdering::Relaxed);
    }

    /// Partitions this member owns now.
    pub fn assigned_partitions(&self) -> usize {
        self.assigned.load(AtomicOrdering::Relaxed)
    }

    /// Owned partitions whose records come through a queue of their own:
    /// once it equals [`ProcessorStatus::assigned_partitions`], every
    /// record produced from now on is read under the partition bounds.
    pub fn reading_partitions(&self) -> usize {
        self.reading.load(AtomicOrdering::Relaxed)
    }

    /// Owned partitions whose queue could not be split off: their records
    /// come through the consumer's main queue, under the same bounds (the
    /// partition is paused while any of its records wait for room).
    pub fn unsplit_partitions(&self) -> usize {
        self.unsplit.load(AtomicOrdering::Relaxed)
    }

    /// Records dispatched and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(AtomicOrdering::Relaxed)
    }

    /// Records from a retry topic dispatched and waiting until they are
    /// due (not counted in [`ProcessorStatus::in_flight`]).
    pub fn parked(&self) -> usize {
        self.parked.load(AtomicOrdering::Relaxed)
    }

    /// Records finished (result acknowledged) since start.
    pub fn finished(&self) -> usize {
        self.finished.load(AtomicOrdering::Relaxed)
    }

    /// Records that found the producer's queue full and waited for room
    /// (intake is held meanwhile), since start.
    pub fn producer_waits(&self) -> usize {
        self.producer_waits.load(AtomicOrdering::Relaxed)
    }

    /// Whether the poison-pill breaker is open.
    pub fn breaker_open(&self) -> bool {
        self.breaker_open.load(AtomicOrdering::Relaxed)
    }

    /// Synchronous commits after a drain (on revoke or stop) that the
    /// broker refused: each means the partitions' next owner redoes the
    /// work since the last successful commit.
    pub fn drain_commit_failures(&self) -> usize {
        self.drain_commit_failures.load(AtomicOrdering::Relaxed)
    }
}

/// Everything one processor needs.
#[derive(Debug, Clone)]
pub struct ProcessorSpec {
    /// The processor's settings, with derived defaults filled in.
    pub settings: ProcessorSettings,
    /// Cluster connection.
    pub kafka: KafkaSettings,
    /// Wire format of requests and results.
    pub codec: Codec,
    /// Handlers by task type.
    pub registry: Registry,
    /// This worker's identity, written into every result.
    pub worker: String,
    /// Where the processor publishes its live figures.
    pub status: Arc<ProcessorStatus>,
    /// The worker's metrics.
    pub metrics: Arc<Metrics>,
    /// How often librdkafka reports statistics (consumer lag), in ms.
    pub lag_interval_ms: u64,
    /// The workflow definitions, for the steps this processor runs.
    pub workflows: Arc<Workflows>,
    /// The delay tiers, when on: a retry's backoff waits in them rather
    /// than in this processor's memory.
    pub delay_tiers: Option<crate::delay::Tiers>,
    /// The task types' rate limits ([`crate::rate`]).
    pub rate_limits: Arc<crate::rate::Limits>,
    /// Where task events go (`[events]`).
    pub events: crate::settings::EventSettings,
    /// The worker's cancellations, when `[cancel]` is on (shared by its
    /// processors; the first to start starts its reader).
    pub cancels: Option<Arc<crate::control::Cancels>>,
}

/// One record handed to a task.
#[derive(Debug)]
pub(crate) struct Job {
    /// Where it belongs and what it counts for (see [`ledger`]).
    ticket: Ticket,
    key: Option<Vec<u8>>,
    timestamp: Option<i64>,
    payload: Vec<u8>,
    headers: headers::Incoming,
}

/// What a record's job is built from, read before the engine's lock.
struct Prepared {
    tp: TopicPartition,
    headers: headers::Incoming,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

impl AsRef<Ticket> for Job {
    fn as_ref(&self) -> &Ticket {
        &self.ticket
    }
}

struct State {
    ledger: Ledger<Job>,
    /// A drain waits for tasks to finish: finishing ones signal it.
    draining: bool,
    /// The drain's deadline passed: tasks of the draining partitions still
    /// running their handlers are let go of.
    cancelling: bool,
}

/// State shared by the poll thread, the rebalance callbacks and the tasks.
pub(crate) struct Shared {
    name: String,
    settings: ProcessorSettings,
    output_topic: Arc<str>,
    codec: Codec,
    registry: Registry,
    worker: String,
    producer: delivery::Producer,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    /// Signalled whenever a task finishes, for drains.
    finished: Condvar,
    /// Bumped when a drain begins: tasks that only wait check whether
    /// their partition is being let go of.
    drain_begun: tokio::sync::watch::Sender<u64>,
    /// Bumped when a drain's deadline passes: tasks running a handler
    /// check whether their partition is being let go of.
    drain_deadline: tokio::sync::watch::Sender<u64>,
    /// Tasks waiting for room in the producer queue: intake stops meanwhile.
    producer_blocked: AtomicUsize,
    status: Arc<ProcessorStatus>,
    dead_letter_topic: Arc<str>,
    /// The poison-pill breaker, when on.
    breaker: Mutex<Option<Breaker>>,
    /// The breaker is off, or settled ([`Breaker::settled`]): successes
    /// need not be recorded. Set under the breaker's lock.
    breaker_settled: AtomicBool,
    metrics: Arc<Metrics>,
    hot: Hot,
    workflows: Arc<Workflows>,
    joins: join::Joins,
    /// The poll thread, woken when a partition queue receives records, or
    /// when a task finishes while `starved` is set.
    poll_thread: std::sync::OnceLock<std::thread::Thread>,
    /// Set by the poll thread while some partition has no room: a finishing
    /// task then wakes it (waking it on every finished task cost a syscall
    /// per task).
    starved: AtomicBool,
    /// Produce failures in a row (reset by any acknowledgement): the
    /// backoff before producing again grows with it.
    failures_in_a_row: AtomicU32,
    /// When the processor started: dispatch ticks count from here.
    started: Instant,
    /// An error retrying cannot fix, met off the poll thread (producing):
    /// the poll thread stops the processor with it.
    fatal: Mutex<Option<String>>,
    /// The delay tiers, when on (see [`ProcessorSpec::delay_tiers`]).
    delay_tiers: Option<crate::delay::Tiers>,
    /// The task types' rate limits.
    limits: Arc<crate::rate::Limits>,
    /// Partitions per topic, for the rate limits' shares (see
    /// `rescale_limits`).
    partition_counts: Mutex<HashMap<String, usize>>,
    /// Where task events go, when on.
    events: Option<lifecycle::EventsOut>,
    /// The worker's cancellations, when on.
    cancels: Option<Arc<crate::control::Cancels>>,
}

impl Shared {
    /// Stops the processor: `message` says what retrying cannot fix. No
    /// offset is stored past the task that met it (its outputs were not
    /// acknowledged), and the drain does not wait for the others.
    pub(crate) fn fail(&self, message: String) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        if fatal.is_none() {
            error!(processor = %self.name, %message, "stopping");
            self.count_error("fatal");
            *fatal = Some(message);
        }
        drop(fatal);
        self.wake();
    }

    /// The error the processor must stop with, if one was met.
    fn fatal_error(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts one error of `kind` (see [`crate::metrics::ERRORS`]).
    pub(crate) fn count_error(&self, kind: &str) {
        if self.metrics.enabled() {
            self.metrics
                .errors
                .with_label_values(&[self.name.as_str(), kind])
                .inc();
        }
    }

    /// Whether the breaker is open now.
    fn breaker_open(&self) -> bool {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let open = breaker.as_mut().is_some_and(|b| b.is_open(Instant::now()));
        self.status
            .breaker_open
            .store(open, AtomicOrdering::Relaxed);
        if let Some(gauge) = &self.hot.breaker_open {
            gauge.set(i64::from(open));
        }
        open
    }

    /// `task_type` as a metric label: configured types only.
    pub(crate) fn type_label(&self, task_type: &str) -> &str {
        self.settings
            .tasks
            .get_key_value(task_type)
            .map_or(crate::metrics::UNKNOWN_TYPE, |(known, _)| known.as_str())
    }

    /// Publishes the in-flight figures after a change.
    fn publish_in_flight(&self, state: &State) {
        let in_flight = state.ledger.in_flight();
        self.status
            .in_flight
            .store(in_flight, AtomicOrdering::Relaxed);
        self.status
            .parked
            .store(state.ledger.parked(), AtomicOrdering::Relaxed);
        if let Some(gauge) = &self.hot.in_flight {
            gauge.set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters torn (no
        // handler code runs under it); keep going with the data as it is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes records (read from `from`, when known) into their lanes, under
    /// one lock for them all; a job to start now goes to `starts`. Returns
    /// how many were dealt with: the records from there on found no room (their
    /// partition, or the processor, is at a bound) and must be offered
    /// again, before anything later of their partition. An error when a
    /// record arrived below offsets already dispatched without having been
    /// dispatched itself (taking it late would break its lane's order,
    /// dropping it would let the commit pass a record that never ran).
    fn dispatch<M: Message>(
        &self,
        messages: &[M],
        from: Option<&TopicPartition>,
        starts: &mut Vec<Job>,
    ) -> Result<usize, ProcessorError> {
        if messages.is_empty() {
            return Ok(0);
        }
        // Everything but the admission is done before the lock, which the
        // producer's delivery thread waits for to finish tasks (the copies
        // are wasted only on a skipped record).
        let prepared: Vec<Prepared> = messages
            .iter()
            .map(|message| {
                let topic = message.topic();
                let partition = message.partition();
                Prepared {
                    tp: match from {
                        Some(tp) if tp.1 == partition && *tp.0 == *topic => tp.clone(),
                        _ => (Arc::from(topic), partition),
                    },
                    headers: headers::read(message),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().unwrap_or_default().to_vec(),
                }
            })
            .collect();
        let tick = self.tick();
        let mut state = self.lock();
        let mut taken = 0;
        let mut outcome = Ok(messages.len());
        for (index, (message, record)) in messages.iter().zip(prepared).enumerate() {
            let Prepared {
                tp,
                headers,
                key,
                payload,
            } = record;
            let offset = message.offset();
            let arrival = Arrival {
                partition: &tp,
                offset,
                key: message.key(),
                bytes: message.payload().map_or(0, <[u8]>::len),
                parked: headers.not_before.is_some(),
            };
            let admission = state.ledger.admit(arrival, tick, |ticket| Job {
                ticket,
                key,
                timestamp: message.timestamp().to_millis(),
                payload,
                headers,
            });
            match admission {
                Admission::Start(job) => {
                    starts.push(job);
                    taken += 1;
                }
                Admission::Queued => taken += 1,
                Admission::Skipped => {
                    // Finished before a crash or rebalance, as the last
                    // commit's metadata records: not run again, not produced
                    // again.
                    if let Some(skipped) = &self.hot.skipped {
                        skipped.inc();
                    }
                }
                Admission::Again(e) => {
                    debug!(topic = %tp.0, partition = tp.1, %e, "record delivered again; the first copy was taken");
                }
                Admission::OutOfOrder(e) => {
                    let message = format!(
                        "record {}/{} offset {} arrived after offset {} of its partition without having been read before; \
                         stopping rather than skipping it (its partition's next owner reads it from the last commit)",
                        tp.0, tp.1, e.offset, e.last
                    );
                    self.count_error("fatal");
                    outcome = Err(ProcessorError::Fatal {
                        processor: self.name.clone(),
                        message,
                    });
                    break;
                }
                Admission::NoRoom => {
                    outcome = Ok(index);
                    break;
                }
                Admission::NotOwned => {
                    debug!(
                        topic = %tp.0,
                        partition = tp.1,
                        offset,
                        "record of a partition not owned; left for its owner"
                    );
                }
                Admission::Closed => {}
            }
        }
        if taken > 0 {
            self.publish_in_flight(&state);
        }
        outcome
    }

    /// Records that `job` finished (its result is acknowledged) and returns
    /// the next job of its lane, if one waits.
    fn complete(&self, job: &Job) -> Option<Job> {
        let mut state = self.lock();
        let next = state.ledger.finish(&job.ticket);
        self.publish_in_flight(&state);
        let draining = state.draining;
        drop(state);
        self.status.finished.fetch_add(1, AtomicOrdering::Relaxed);
        if draining {
            self.finished.notify_all();
        }
        if self.starved.swap(false, AtomicOrdering::AcqRel) {
            self.wake();
        }
        next
    }

    /// Lets go of `job` unfinished (see `task.rs`): it no longer counts as
    /// in flight, and its offset stays unfinished for the partition's next
    /// owner.
    pub(crate) fn abandon(&self, job: Job) {
        let mut state = self.lock();
        state.ledger.abandon(&job.ticket);
        self.publish_in_flight(&state);
        let draining = state.draining;
        drop(state);
        if draining {
            self.finished.notify_all();
        }
        if self.starved.swap(false, AtomicOrdering::AcqRel) {
            self.wake();
        }
    }

    /// What a task at `stage` watches for drains.
    pub(super) fn drains(&self, stage: task::Stage) -> tokio::sync::watch::Receiver<u64> {
        match stage {
            task::Stage::Waiting => self.drain_begun.subscribe(),
            task::Stage::Running => self.drain_deadline.subscribe(),
        }
    }

    /// Whether a drain lets go of `job` at `stage`: a waiting one as soon
    /// as its partition drains; a running one once the drain's deadline
    /// passed, or when its partition is gone.
    pub(super) fn letting_go(&self, job: &Job, stage: task::Stage) -> bool {
        let state = self.lock();
        let ledger = &state.ledger;
        match stage {
            task::Stage::Waiting => ledger.letting_go(&job.ticket),
            task::Stage::Running => {
                ledger.letting_go(&job.ticket) && (state.cancelling || !ledger.holds(&job.ticket))
            }
        }
    }

    /// Takes `job` out of its lane (its outputs are with the producer) and
    /// returns the lane's next record, if one waits. The job still counts
    /// as in flight until [`Shared::finish`].
    pub(crate) fn let_go_of_lane(&self, job: &mut Job) -> Option<Job> {
        job.ticket.lane.as_ref()?;
        self.lock().ledger.let_go_of_lane(&mut job.ticket)
    }

    /// `job` is over (its outputs acknowledged): counts it finished and
    /// starts the next record of its lane (unless it let go of it before).
    pub(crate) fn finish(self: &Arc<Self>, job: Job) {
        if let Some(next) = self.complete(&job) {
            task::start(self, vec![next]);
        }
    }

    /// The generation of `tp`'s assignment, when owned.
    fn generation_of(&self, tp: &TopicPartition) -> Option<u64> {
        self.lock().ledger.generation(tp)
    }

    /// Publishes how many owned partitions are read through a queue of
    /// their own, and how many could not be split off.
    fn publish_queues(&self, reading: usize, unsplit: usize) {
        self.status.reading.store(reading, AtomicOrdering::Relaxed);
        self.status.unsplit.store(unsplit, AtomicOrdering::Relaxed);
        if let Some(gauge) = &self.hot.unsplit {
            gauge.set(i64::try_from(unsplit).unwrap_or(i64::MAX));
        }
    }

    /// Wakes the poll thread: there is room for more records, or an offset
    /// to store.
    pub(crate) fn wake(&self) {
        if let Some(thread) = self.poll_thread.get() {
            thread.unpark();
        }
    }

    /// Works out how many records each owned partition may take now:
    /// `owned` is refilled with every owned partition, its room (0 when it
    /// must not be read) and the generation of its assignment. Returns the
    /// room left processor-wide. Poll thread only.
    fn apply(&self, owned: &mut Vec<(TopicPartition, usize, u64)>) -> ledger::Room {
        let breaker_open = self.breaker_open();
        let blocked = self.producer_blocked.load(AtomicOrdering::Relaxed) > 0 || breaker_open;
        let room = self.lock().ledger.room(blocked, owned);
        if let Some(gauge) = &self.hot.paused {
            gauge.set(i64::try_from(room.closed).unwrap_or(i64::MAX));
        }
        room
    }

    /// Seconds since the processor started: when records were dispatched.
    fn tick(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }
}

/// The commit path measured without a broker, for `benches/commit.rs`
/// (cargo feature `test-hooks`).
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod bench {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::ledger::{Admission, Arrival, Bounds, Ledger, Progress, Ticket};
    use crate::settings::Ordering;

    /// Times of one commit of every partition.
    #[derive(Debug, Clone, Copy)]
    pub struct CommitPath {
        /// Under the engine's lock now: the snapshots.
        pub snapshot: Duration,
        /// Outside it now: encoding the snapshots.
        pub encode: Duration,
        /// Under the lock as it was before snapshots: walking and encoding
        /// every partition's finished ranges.
        pub before: Duration,
        /// Under the lock now, for the next commit of the same progress
        /// (every partition's encoding kept from the first).
        pub unchanged: Duration,
        /// Metadata characters made (now, before).
        pub characters: (usize, usize),
    }

    /// `partitions` partitions with `records` dispatched each, the first
    /// unfinished; behind it every record finished (`alternate`: every
    /// other one, the most ranges).
    pub fn commit_path(partitions: i32, records: i64, alternate: bool) -> CommitPath {
        let mut ledger: Ledger<Ticket> = Ledger::new(Bounds {
            ordering: Ordering::None,
            max_in_flight: usize::MAX,
            max_in_flight_per_partition: usize::MAX,
            max_uncommitted_per_partition: usize::MAX,
            max_in_flight_bytes: usize::MAX,
            commit_metadata_bytes: crate::progress::MAX_METADATA,
        });
        let tps: Vec<(Arc<str>, i32)> = (0..partitions).map(|p| (Arc::from("in"), p)).collect();
        ledger.assign(tps.clone());
        for tp in &tps {
            for offset in 0..records {
                let arrival = Arrival {
                    partition: tp,
                    offset,
                    key: None,
                    bytes: 200,
                    parked: false,
                };
                if let Admission::Start(ticket) = ledger.admit(arrival, 0, |t| t) {
                    if offset > 0 && !(alternate && offset % 2 == 0) {
                        ledger.finish(&ticket);
                    }
                }
            }
        }
        let started = Instant::now();
        let before_made = ledger.encode_all_as_before();
        let before = started.elapsed();
        let started = Instant::now();
        let snapshots = ledger.progress(None, true);
        let snapshot = started.elapsed();
        let started = Instant::now();
        let mut made = 0;
        let mut encoded = Vec::with_capacity(snapshots.len());
        for s in &snapshots {
            if let Progress::Ranges(ranges) = &s.progress {
                let e = crate::progress::encode(s.watermark, ranges.iter().copied(), s.budget);
                made += e.metadata.len();
                encoded.push(Arc::new(e));
            }
        }
        let encode = started.elapsed();
        for (s, e) in snapshots.iter().zip(encoded) {
            ledger.encoded(s, e);
        }
        let started = Instant::now();
        let again = ledger.progress(None, true);
        let unchanged = started.elapsed();
        drop(again);
        CommitPath {
            snapshot,
            encode,
            before,
            unchanged,
            characters: (made, before_made),
        }
    }
}

/// Runs one processor until `stop` is set, then drains, commits and
/// returns. Errors only for what retrying cannot fix.
pub async fn run(spec: ProcessorSpec, stop: CancellationToken) -> Result<(), ProcessorError> {
    let status = spec.status.clone();
    let outcome = run_processor(spec, stop).await;
    if outcome.is_err() {
        status.failed.store(true, AtomicOrdering::Relaxed);
    }
    outcome
}

async fn run_processor(spec: ProcessorSpec, stop: CancellationToken) -> Result<(), ProcessorError> {
    let name = spec.settings.name.clone();
    let client_error = |client, source| ProcessorError::Client {
        processor: name.clone(),
        client,
        source,
    };
    // The idempotent producer needs a moment before it can send: create it
    // before joining the group so a restart resumes quickly.
    let producer: delivery::Producer = kafka::producer_config(&spec.kafka)
        .set("client.id", format!("{}-{}", spec.worker, name))
        .create_with_context(delivery::Deliveries::default())
        .map_err(|e| client_error("producer", e))?;
    let group = spec.settings.group();
    let output_topic: Arc<str> = spec.settings.results_topic().into();
    let shared = Arc::new(Shared {
        name: name.clone(),
        settings: spec.settings.clone(),
        output_topic,
        codec: spec.codec,
        registry: spec.registry,
        worker: spec.worker.clone(),
        producer,
        runtime: tokio::runtime::Handle::current(),
        state: Mutex::new(State {
            ledger: Ledger::new(Bounds {
                commit_metadata_bytes: spec.kafka.commit_metadata_bytes,
                ..Bounds::of(&spec.settings)
            }),
            draining: false,
            cancelling: false,
        }),
        finished: Condvar::new(),
        drain_begun: tokio::sync::watch::Sender::new(0),
        drain_deadline: tokio::sync::watch::Sender::new(0),
        producer_blocked: AtomicUsize::new(0),
        status: spec.status.clone(),
        dead_letter_topic: spec.settings.dead_letters_topic().into(),
        breaker: Mutex::new(spec.settings.breaker_config().map(Breaker::new)),
        breaker_settled: AtomicBool::new(spec.settings.breaker_config().is_none()),
        metrics: spec.metrics.clone(),
        hot: Hot::new(&spec.metrics, &name, &spec.settings),
        workflows: spec.workflows.clone(),
        joins: join::Joins::new(spec.kafka.clone()),
        poll_thread: std::sync::OnceLock::new(),
        starved: AtomicBool::new(false),
        failures_in_a_row: AtomicU32::new(0),
        started: Instant::now(),
        fatal: Mutex::new(None),
        delay_tiers: spec.delay_tiers.clone(),
        limits: spec.rate_limits.clone(),
        partition_counts: Mutex::new(HashMap::new()),
        events: lifecycle::EventsOut::of(&spec.events),
        cancels: spec.cancels.clone(),
    });
    if let Some(cancels) = &spec.cancels {
        cancels.start(&stop);
    }
    shared.producer.context().connect(&shared);
    hot::zero_series(&spec.metrics, &name, &spec.settings);
    // Every topic this processor reads or writes must exist: a missing
    // output topic would otherwise hold every task (its offset is stored
    // only once the output is acknowledged) with nothing but warnings.
    let topics = spec.settings.read_topics();
    let topology = spec.settings.topology(&spec.workflows);
    let joins = topology
        .iter()
        .any(|t| t.kind == crate::topology::TopicKind::JoinChangelog);
    let mut needed: Vec<String> = topology.into_iter().map(|t| t.name).collect();
    if spec.events.enabled {
        needed.push(spec.events.topic.clone());
    }
    if let Some(cancels) = &spec.cancels {
        needed.push(cancels.topic().to_owned());
    }
    let check = shared.clone();
    let read = topics.clone();
    let checked =
        tokio::task::spawn_blocking(move || check_topics(&check.producer, &needed, &read))
            .await
            .map_err(|e| ProcessorError::Fatal {
                processor: name.clone(),
                message: format!("checking topics failed: {e}"),
            })?
            .map_err(|message| ProcessorError::Fatal {
                processor: name.clone(),
                message,
            })?;
    let (missing, partitions_read) = checked;
    if !missing.is_empty() {
        return Err(ProcessorError::Fatal {
            processor: name.clone(),
            message: format!(
                "these topics do not exist: {}; create them (retry topics are \
                 <input><retry_topic_suffix>; set retry_topic_threshold_ms = 0 to do without; \
                 a join's changelog is <its task topic>.joins, compacted, with as many \
                 partitions as the task topic)",
                missing.join(", ")
            ),
        });
    }
    // The prefetch budget (this processor's share of the worker's),
    // split over every partition it reads, unless the user set the limits.
    let mut config = kafka::consumer_config(&spec.kafka, &group, spec.settings.session_timeout_ms);
    for (key, value) in kafka::prefetch_limits(spec.kafka.prefetch_bytes, partitions_read) {
        if !spec.kafka.options.contains_key(key) {
            config.set(key, value);
        }
    }
    let consumer: BaseConsumer<EngineContext> = config
        .set("client.id", format!("{}-{}", spec.worker, name))
        // conveyor commits by itself: see `Shared::commit`.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Statistics feed only the lag gauges: none when metrics are off.
        .set(
            "statistics.interval.ms",
            if spec.metrics.enabled() {
                spec.lag_interval_ms
            } else {
                0
            }
            .to_string(),
        )
        .create_with_context(EngineContext {
            shared: shared.clone(),
        })
        .map_err(|e| client_error("consumer", e))?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| ProcessorError::Fatal {
            processor: name.clone(),
            message: format!("cannot subscribe to {topics:?}: {e}"),
        })?;
    info!(processor = %name, group = %group, topics = ?topics, "processor started");

    // Joins past their workflow's deadline fail even when no record comes.
    let sweeper = joins.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(JOIN_SWEEP).await;
                join::sweep(&shared).await;
            }
        })
    });
    // The poll thread checks the token every pass; waking it makes a stop
    // prompt when it sleeps for want of records.
    let waker = {
        let (stop, shared) = (stop.clone(), shared.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            shared.wake();
        })
    };
    let poll_shared = shared.clone();
    let outcome =
        tokio::task::spawn_blocking(move || poll::poll_loop(&poll_shared, consumer, &stop))
            .await
            .map_err(|e| ProcessorError::Fatal {
                processor: name.clone(),
                message: format!("the poll thread failed: {e}"),
            })?;
    waker.abort();
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    // Every offset stored was a task's whose outputs were acknowledged;
    // flushing covers outputs of tasks cut off by the drain deadline.
    let flushing = shared.clone();
    let flushed =
        tokio::task::spawn_blocking(move || flushing.producer.flush(Duration::from_secs(5))).await;
    if let Ok(Err(e)) = flushed {
        warn!(processor = %name, error = %e, "producer flush incomplete");
    }
    info!(processor = %name, "processor stopped");
    outcome
}

/// The topics of `wanted` the cluster does not have, and how many
/// partitions the topics of `read` have together.
fn check_topics(
    producer: &delivery::Producer,
    wanted: &[String],
    read: &[String],
) -> Result<(Vec<String>, usize), String> {
    let metadata = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(30))
        .map_err(|e| format!("cannot read the cluster's topics: {e}"))?;
    let present: std::collections::HashSet<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name())
        .collect();
    let mut missing: Vec<String> = wanted
        .iter()
        .filter(|t| !present.contains(t.as_str()))
        .cloned()
        .collect();
    missing.sort();
    missing.dedup();
    let partitions = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && read.iter().any(|r| r == t.name()))
        .map(|t| t.partitions().len())
        .sum();
    Ok((missing, partitions))
}
