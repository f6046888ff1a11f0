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
//! A partition's queue is split off right after it is assigned; the few
//! records fetched before that arrive on the consumer's main queue, which
//! is therefore always emptied before any partition queue is read, so every
//! partition is dispatched in offset order.
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
//! dropped (they were not committed, so the next owner reads them), running
//! ones are awaited until `drain_timeout_ms`, the progress is committed
//! synchronously, then the partitions go. A task that finishes after its
//! partition went still produces its result, but its offset is not
//! committed. Shutdown does the same for every partition, then closes.

mod delivery;
pub mod headers;
mod join;
mod ledger;
mod task;

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering as AtomicOrdering,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::breaker::Breaker;
use crate::codec::Codec;
use crate::handlers::Registry;
use crate::kafka;
use crate::metrics::Metrics;
use crate::progress;
use crate::settings::{KafkaSettings, ProcessorSettings};
use crate::workflow::Workflows;
use ledger::{Admission, Arrival, Bounds, Ledger, Ticket, TopicPartition};

/// Longest the poll thread sleeps when nothing arrives: the main queue's
/// callbacks (rebalances, statistics, commits) are served at least this
/// often. Records and finished tasks wake it at once.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Every this many commit intervals, every owned partition's progress is
/// committed, changed or not.
const FULL_COMMIT_EVERY: u32 = 5;
/// Longest wait for the committed offsets of newly assigned partitions.
const PROGRESS_READ_TIMEOUT: Duration = Duration::from_secs(10);
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
    in_flight: AtomicUsize,
    finished: AtomicUsize,
    breaker_open: AtomicBool,
    drain_commit_failures: AtomicUsize,
    /// When the poll loop last went round, in ms since the Unix epoch (0:
    /// not started).
    last_poll_ms: AtomicU64,
    /// The processor stopped on an error that retrying cannot fix.
    failed: AtomicBool,
    /// Test hook: the poll loop waits while this is set.
    held: AtomicBool,
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

    /// Test hook: while `held`, the poll loop waits without going round,
    /// as a blocked one would. Not for production use.
    #[doc(hidden)]
    pub fn hold_poll_loop(&self, held: bool) {
        self.held.store(held, AtomicOrdering::Relaxed);
    }

    fn poll_loop_alive(&self) {
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

    /// Records dispatched and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(AtomicOrdering::Relaxed)
    }

    /// Records finished (result acknowledged) since start.
    pub fn finished(&self) -> usize {
        self.finished.load(AtomicOrdering::Relaxed)
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

impl AsRef<Ticket> for Job {
    fn as_ref(&self) -> &Ticket {
        &self.ticket
    }
}

struct State {
    ledger: Ledger<Job>,
    /// A drain waits for tasks to finish: finishing ones signal it.
    draining: bool,
}

/// Metric handles looked up once, for what the engine records per record
/// (a `with_label_values` lookup hashes every label each time). `None`
/// and empty with metrics off.
#[derive(Default)]
struct Hot {
    in_flight: Option<prometheus::IntGauge>,
    paused: Option<prometheus::IntGauge>,
    breaker_open: Option<prometheus::IntGauge>,
    /// By [`delivery::Record`].
    produced: Option<[prometheus::IntCounter; 4]>,
    produce_retries: Option<prometheus::IntCounter>,
    /// Records skipped because they finished before this assignment.
    skipped: Option<prometheus::IntCounter>,
    /// Commits whose finished offsets did not all fit in the metadata.
    progress_overflow: Option<prometheus::IntCounter>,
    /// Per configured task type.
    types: HashMap<String, TypeMetrics>,
}

/// One task type's per-task series.
struct TypeMetrics {
    consumed: prometheus::IntCounter,
    succeeded: prometheus::IntCounter,
    latency: prometheus::Histogram,
    /// Handler duration of successful attempts.
    handled: prometheus::Histogram,
}

impl Hot {
    fn new(m: &Metrics, name: &str, settings: &ProcessorSettings) -> Hot {
        if !m.enabled() {
            return Hot::default();
        }
        let types = settings
            .tasks
            .keys()
            .map(|t| {
                let labels = [name, t.as_str()];
                let metrics = TypeMetrics {
                    consumed: m.tasks_consumed.with_label_values(&labels),
                    succeeded: m.tasks_succeeded.with_label_values(&labels),
                    latency: m.task_latency.with_label_values(&labels),
                    handled: m
                        .handler_duration
                        .with_label_values(&[name, t.as_str(), "success"]),
                };
                (t.clone(), metrics)
            })
            .collect();
        Hot {
            in_flight: Some(m.tasks_in_flight.with_label_values(&[name])),
            paused: Some(m.partitions_paused.with_label_values(&[name])),
            breaker_open: Some(m.breaker_open.with_label_values(&[name])),
            produced: Some(
                delivery::RECORD_LABELS.map(|r| m.records_produced.with_label_values(&[name, r])),
            ),
            produce_retries: Some(m.produce_retries.with_label_values(&[name])),
            skipped: Some(m.records_skipped.with_label_values(&[name])),
            progress_overflow: Some(m.progress_overflow.with_label_values(&[name])),
            types,
        }
    }
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
    /// Tasks waiting for room in the producer queue: intake stops meanwhile.
    producer_blocked: AtomicUsize,
    status: Arc<ProcessorStatus>,
    dead_letter_topic: Arc<str>,
    /// The poison-pill breaker, when on.
    breaker: Mutex<Option<Breaker>>,
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
    /// Whether the records in flight reach `max_in_flight_bytes`: the poll
    /// thread stops taking records at once.
    bytes_full: AtomicBool,
    /// Produce failures in a row (reset by any acknowledgement): the
    /// backoff before producing again grows with it.
    failures_in_a_row: AtomicU32,
    /// When the processor started: dispatch ticks count from here.
    started: Instant,
    /// An error retrying cannot fix, met off the poll thread (producing):
    /// the poll thread stops the processor with it.
    fatal: Mutex<Option<String>>,
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
        self.bytes_full
            .store(state.ledger.over_bytes(), AtomicOrdering::Relaxed);
        if let Some(gauge) = &self.hot.in_flight {
            gauge.set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        }
    }

    /// Reads the committed offsets of newly assigned `partitions` with
    /// their metadata, and marks the offsets it records as finished for
    /// skipping (see [`progress`]). Metadata that is missing or not usable
    /// is said once per partition and counted; the partition is then read
    /// from the committed offset as usual. Poll thread only.
    fn restore_progress<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[TopicPartition],
    ) {
        if partitions.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(list, PROGRESS_READ_TIMEOUT) {
            Ok(committed) => committed,
            Err(e) => {
                warn!(processor = %self.name, error = %e,
                      "cannot read the committed offsets' metadata; work finished above them runs again");
                return;
            }
        };
        let mut restored = Vec::new();
        for element in committed.elements() {
            let Offset::Offset(offset) = element.offset() else {
                continue; // nothing committed yet
            };
            let (topic, partition) = (element.topic(), element.partition());
            // rdkafka panics on metadata that is not UTF-8, which another
            // client could have written.
            let metadata = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                element.metadata().to_owned()
            }))
            .map_err(|_| progress::Unusable::Invalid("not UTF-8"));
            let outcome = match metadata.and_then(|m| progress::decode(offset, &m)) {
                Ok(ranges) => {
                    let records: i64 = ranges.iter().map(|(s, e)| e - s).sum();
                    if records > 0 {
                        info!(processor = %self.name, topic, partition, committed = offset,
                              ranges = ranges.len(), offsets = records,
                              "skipping records above the committed offset that finished before");
                    }
                    restored.push(((Arc::from(topic), partition), ranges));
                    "used"
                }
                Err(progress::Unusable::Missing) => {
                    warn!(processor = %self.name, topic, partition, committed = offset,
                          "the committed offset carries no progress metadata (the broker may drop commit metadata):                            records above it that had finished run again");
                    "missing"
                }
                Err(e) => {
                    warn!(processor = %self.name, topic, partition, committed = offset, error = %e,
                          "progress metadata not used: records above the committed offset that had finished run again");
                    "invalid"
                }
            };
            if self.metrics.enabled() {
                self.metrics
                    .progress_restored
                    .with_label_values(&[&self.name, outcome])
                    .inc();
            }
        }
        let mut state = self.lock();
        for (tp, ranges) in restored {
            state.ledger.skip(&tp, ranges);
        }
    }

    fn publish_assigned(&self, assigned: usize) {
        self.status
            .assigned
            .store(assigned, AtomicOrdering::Relaxed);
        if self.metrics.enabled() {
            self.metrics
                .partitions_assigned
                .with_label_values(&[&self.name])
                .set(i64::try_from(assigned).unwrap_or(i64::MAX));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters torn (no
        // handler code runs under it); keep going with the data as it is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes one record into a lane; returns a job to start now, if any.
    /// `from`: the partition it was read from, when known.
    fn dispatch(
        &self,
        message: &BorrowedMessage<'_>,
        from: Option<&TopicPartition>,
    ) -> Option<Job> {
        let topic = message.topic();
        let partition = message.partition();
        let offset = message.offset();
        let tp: TopicPartition = match from {
            Some(tp) if tp.1 == partition && *tp.0 == *topic => tp.clone(),
            _ => (Arc::from(topic), partition),
        };
        let headers = headers::read(message);
        let arrival = Arrival {
            partition: &tp,
            offset,
            key: message.key(),
            bytes: message.payload_len(),
            parked: headers.not_before.is_some(),
        };
        let tick = self.tick();
        let mut state = self.lock();
        let admission = state.ledger.admit(arrival, tick, |ticket| Job {
            ticket,
            key: message.key().map(<[u8]>::to_vec),
            timestamp: message.timestamp().to_millis(),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers,
        });
        let start = match admission {
            Admission::Start(job) => Some(job),
            Admission::Queued => None,
            Admission::Skipped => {
                // Finished before a crash or rebalance, as the last
                // commit's metadata records: not run again, not produced
                // again.
                if let Some(skipped) = &self.hot.skipped {
                    skipped.inc();
                }
                return None;
            }
            Admission::Again(e) => {
                debug!(topic, partition, %e, "record delivered again; the first copy is in flight");
                return None;
            }
            Admission::NotOwned => {
                debug!(
                    topic,
                    partition, offset, "record of a partition not owned; left for its owner"
                );
                return None;
            }
            Admission::Closed => return None,
        };
        self.publish_in_flight(&state);
        start
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
    fn apply(&self, owned: &mut Vec<(TopicPartition, usize, u64)>) -> usize {
        let breaker_open = self.breaker_open();
        let blocked = self.producer_blocked.load(AtomicOrdering::Relaxed) > 0 || breaker_open;
        let room = self.lock().ledger.room(blocked, owned);
        if let Some(gauge) = &self.hot.paused {
            gauge.set(i64::try_from(room.closed).unwrap_or(i64::MAX));
        }
        room.total
    }

    /// Commits the progress (watermark, and the finished offsets above it
    /// in the metadata) of each chosen partition (all when `None`): those
    /// whose finished offsets changed since, or, with `all`, every one.
    /// Poll thread only.
    ///
    /// conveyor commits by itself instead of librdkafka's auto-commit,
    /// which sends nothing while the watermark stands still (a head that
    /// does not finish) although the metadata changes, and whose timer
    /// can send an older stored offset after a newer explicit commit.
    /// Asynchronous commits are sent in order from this thread; one that
    /// fails unseen is healed by the next full commit (every
    /// [`FULL_COMMIT_EVERY`] intervals) and by the synchronous commit of
    /// every drain, whose outcome is known.
    fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: Option<&[TopicPartition]>,
        mode: CommitMode,
        all: bool,
    ) -> Result<(), KafkaError> {
        let mut list = TopicPartitionList::new();
        let mut overflowed = 0;
        self.lock()
            .ledger
            .progress(partitions, all, |tp, watermark, encoded| {
                if encoded.left_out > 0 {
                    overflowed += 1;
                }
                if let Err(e) = list.add_partition_offset(&tp.0, tp.1, Offset::Offset(watermark)) {
                    // Left for the next commit; the others go now.
                    warn!(processor = %self.name, topic = %tp.0, partition = tp.1, error = %e,
                          "cannot put the partition's offset in a commit");
                    return false;
                }
                if let Some(mut element) = list.find_partition(&tp.0, tp.1) {
                    element.set_metadata(&encoded.metadata);
                }
                true
            });
        if overflowed > 0 {
            if let Some(counter) = &self.hot.progress_overflow {
                counter.inc_by(overflowed);
            }
        }
        if list.count() == 0 {
            return Ok(());
        }
        let outcome = consumer.commit(&list, mode);
        if outcome.is_err() {
            self.commit_failed(&list);
        }
        outcome
    }

    /// Marks the partitions of a failed commit for the next one.
    fn commit_failed(&self, list: &TopicPartitionList) {
        let mut state = self.lock();
        for element in list.elements() {
            let tp: TopicPartition = (Arc::from(element.topic()), element.partition());
            state.ledger.commit_failed(&tp);
        }
    }

    /// Seconds since the processor started: when records were dispatched.
    fn tick(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Stops intake on `partitions` (all when `None`), drops their records
    /// that have not started, waits until the running ones finish or the
    /// drain deadline passes, stores what finished and commits it
    /// synchronously. Poll thread only (it may be inside a rebalance).
    fn drain<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: Option<&[TopicPartition]>,
        why: &str,
    ) {
        // After an error that stops the processor, nothing that is still
        // running can be trusted to finish: commit what is safe and go.
        let wait = match self.fatal_error() {
            Some(_) => Duration::ZERO,
            None => Duration::from_millis(self.settings.drain_timeout_ms),
        };
        let deadline = Instant::now() + wait;
        let mut state = self.lock();
        state.draining = true;
        let not_started = state.ledger.begin_drain(partitions);
        let dropped = not_started.iter().filter(|j| !j.ticket.parked).count();
        drop(not_started);
        debug!(processor = %self.name, why, running = state.ledger.running(partitions), "draining");
        self.publish_in_flight(&state);
        loop {
            let running = state.ledger.running(partitions);
            let now = Instant::now();
            if running == 0 {
                info!(processor = %self.name, why, not_started = dropped, "drained");
                break;
            }
            if now >= deadline {
                warn!(
                    processor = %self.name,
                    why,
                    still_running = running,
                    drain_timeout_ms = self.settings.drain_timeout_ms,
                    "drain deadline passed; tasks still running will produce results but their offsets are not committed"
                );
                break;
            }
            state = match self.finished.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.draining = false;
        drop(state);
        if let Err(e) = self.commit(consumer, partitions, CommitMode::Sync, true) {
            self.status
                .drain_commit_failures
                .fetch_add(1, AtomicOrdering::Relaxed);
            warn!(processor = %self.name, why, error = %e, "synchronous commit failed");
        }
    }
}

/// The consumer's context: rebalance callbacks that drain and commit.
pub(crate) struct EngineContext {
    shared: Arc<Shared>,
}

impl ClientContext for EngineContext {
    /// Authentication and certificate failures stop the processor (exit
    /// 1) instead of being retried forever in the log.
    fn error(&self, error: KafkaError, reason: &str) {
        match crate::security::fatal_connection_error(error.rdkafka_error_code(), reason) {
            Some(message) => self.shared.fail(message),
            None => {
                warn!(processor = %self.shared.name, %error, reason, "librdkafka consumer error")
            }
        }
    }

    /// Consumer lag per owned partition, from librdkafka's statistics.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let shared = &self.shared;
        let now = shared.tick();
        let state = shared.lock();
        for ((topic, partition), tracker) in state.ledger.trackers() {
            let Some(stats) = statistics
                .topics
                .get(topic.as_ref())
                .and_then(|t| t.partitions.get(partition))
            else {
                continue;
            };
            let high = stats.hi_offset;
            if high < 0 {
                continue; // not known yet
            }
            // Nothing committed yet: everything from the log start is lag.
            let committed = if stats.committed_offset >= 0 {
                stats.committed_offset
            } else {
                stats.lo_offset.max(0)
            };
            let next_unfinished = tracker.watermark().unwrap_or(committed);
            let labels = [shared.name.as_str(), topic.as_ref(), &partition.to_string()];
            let m = &shared.metrics;
            let age = tracker
                .oldest_unfinished_tick()
                .map_or(0, |tick| now.saturating_sub(tick));
            m.oldest_unfinished
                .with_label_values(&labels)
                .set(i64::from(age));
            m.committed_lag
                .with_label_values(&labels)
                .set((high - committed).max(0));
            m.processing_lag
                .with_label_values(&labels)
                .set((high - next_unfinished).max(0));
        }
    }
}

impl ConsumerContext for EngineContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = topic_partitions(list);
                if consumer.assignment_lost() {
                    // Another member may own them already: committing now
                    // could move its offsets backwards. Just let go.
                    warn!(processor = %self.shared.name, partitions = ?partitions, "assignment lost; letting go without committing");
                } else {
                    info!(processor = %self.shared.name, partitions = ?partitions, "partitions revoked; draining");
                    self.shared.drain(consumer, Some(&partitions), "revoke");
                }
                let shared = &self.shared;
                let event = if consumer.assignment_lost() {
                    "lost"
                } else {
                    "revoked"
                };
                if shared.metrics.enabled() {
                    shared
                        .metrics
                        .rebalance_events
                        .with_label_values(&[&shared.name, event])
                        .inc_by(partitions.len() as u64);
                }
                shared.joins.forget(&partitions);
                let mut state = shared.lock();
                state.ledger.revoke(&partitions);
                for tp in &partitions {
                    // No stale lag series for partitions this member let go.
                    let labels = [shared.name.as_str(), tp.0.as_ref(), &tp.1.to_string()];
                    let _ = shared.metrics.committed_lag.remove_label_values(&labels);
                    let _ = shared.metrics.processing_lag.remove_label_values(&labels);
                    let _ = shared
                        .metrics
                        .oldest_unfinished
                        .remove_label_values(&labels);
                }
                shared.publish_assigned(state.ledger.owned());
                shared.publish_in_flight(&state);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                error!(processor = %self.shared.name, error = %e, "rebalance failed");
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        let shared = &self.shared;
        match result {
            Ok(()) => {
                if shared.metrics.enabled() {
                    shared
                        .metrics
                        .offset_commits
                        .with_label_values(&[&shared.name])
                        .inc();
                }
            }
            // Nothing was stored since the last commit: not a failure.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                shared.commit_failed(offsets);
                warn!(processor = %shared.name, error = %e, "offset commit failed");
                shared.count_error("commit");
                if shared.metrics.enabled() {
                    shared
                        .metrics
                        .offset_commit_failures
                        .with_label_values(&[&shared.name])
                        .inc();
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions = topic_partitions(list);
            info!(processor = %self.shared.name, partitions = ?partitions, "partitions assigned");
            let fresh = self.shared.lock().ledger.assign(partitions);
            // Before any record of these partitions is dispatched (that
            // happens on this thread, after this callback).
            self.shared.restore_progress(consumer, &fresh);
            let state = self.shared.lock();
            self.shared.publish_assigned(state.ledger.owned());
            if self.shared.metrics.enabled() {
                self.shared
                    .metrics
                    .rebalance_events
                    .with_label_values(&[&self.shared.name, "assigned"])
                    .inc_by(list.count() as u64);
            }
        }
    }
}

fn topic_partitions(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| (Arc::from(e.topic()), e.partition()))
        .collect()
}

/// Errors that no amount of retrying fixes; the rest are logged and
/// librdkafka recovers from them.
fn fatal_message(error: &KafkaError) -> Option<String> {
    let code = error.rdkafka_error_code()?;
    let advice = match code {
        RDKafkaErrorCode::UnknownTopicOrPartition => {
            "an input topic does not exist: create it, or fix processors[].input_topics \
             (retry topics, <input><retry_topic_suffix>, must exist too unless \
             retry_topic_threshold_ms = 0)"
        }
        RDKafkaErrorCode::TopicAuthorizationFailed => {
            "not authorized for an input topic: grant READ on it to this principal"
        }
        RDKafkaErrorCode::GroupAuthorizationFailed => {
            "not authorized for the consumer group: grant READ on the group to this principal"
        }
        RDKafkaErrorCode::SaslAuthenticationFailed | RDKafkaErrorCode::Authentication => {
            "authentication failed: check the security settings in [kafka.options]"
        }
        _ => return None,
    };
    Some(format!("{advice} ({error})"))
}

/// Runs one processor until `stop` is set, then drains, commits and
/// returns. Errors only for what retrying cannot fix.
pub async fn run(spec: ProcessorSpec, stop: Arc<AtomicBool>) -> Result<(), ProcessorError> {
    let status = spec.status.clone();
    let outcome = run_processor(spec, stop).await;
    if outcome.is_err() {
        status.failed.store(true, AtomicOrdering::Relaxed);
    }
    outcome
}

async fn run_processor(spec: ProcessorSpec, stop: Arc<AtomicBool>) -> Result<(), ProcessorError> {
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
    let group = spec
        .settings
        .group_id
        .clone()
        .unwrap_or_else(|| format!("conveyor.{name}"));
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
            ledger: Ledger::new(Bounds::of(&spec.settings)),
            draining: false,
        }),
        finished: Condvar::new(),
        producer_blocked: AtomicUsize::new(0),
        status: spec.status.clone(),
        dead_letter_topic: spec.settings.dead_letters_topic().into(),
        breaker: Mutex::new(spec.settings.breaker_config().map(Breaker::new)),
        metrics: spec.metrics.clone(),
        hot: Hot::new(&spec.metrics, &name, &spec.settings),
        workflows: spec.workflows.clone(),
        joins: join::Joins::new(spec.kafka.clone()),
        poll_thread: std::sync::OnceLock::new(),
        starved: AtomicBool::new(false),
        bytes_full: AtomicBool::new(false),
        failures_in_a_row: AtomicU32::new(0),
        started: Instant::now(),
        fatal: Mutex::new(None),
    });
    shared.producer.context().connect(&shared);
    zero_series(&spec.metrics, &name, &spec.settings);
    // Every topic this processor reads or writes must exist: a missing
    // output topic would otherwise hold every task (its offset is stored
    // only once the output is acknowledged) with nothing but warnings.
    let topics = spec.settings.read_topics();
    let topology = spec.settings.topology(&spec.workflows);
    let joins = topology
        .iter()
        .any(|t| t.kind == crate::topology::TopicKind::JoinChangelog);
    let needed: Vec<String> = topology.into_iter().map(|t| t.name).collect();
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
    let poll_shared = shared.clone();
    let outcome = tokio::task::spawn_blocking(move || poll_loop(&poll_shared, consumer, &stop))
        .await
        .map_err(|e| ProcessorError::Fatal {
            processor: name.clone(),
            message: format!("the poll thread failed: {e}"),
        })?;
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

/// Creates this processor's series at zero, so that dashboards and alerts
/// see "none yet" rather than "no data".
fn zero_series(m: &Metrics, name: &str, settings: &ProcessorSettings) {
    for counter in [
        &m.produce_retries,
        &m.records_skipped,
        &m.progress_overflow,
        &m.offset_commits,
        &m.offset_commit_failures,
    ] {
        counter.with_label_values(&[name]);
    }
    for gauge in [
        &m.tasks_in_flight,
        &m.partitions_assigned,
        &m.partitions_paused,
        &m.breaker_open,
    ] {
        gauge.with_label_values(&[name]);
    }
    for event in ["assigned", "revoked", "lost"] {
        m.rebalance_events.with_label_values(&[name, event]);
    }
    for kind in crate::codec::FailureKind::ALL.map(crate::codec::FailureKind::as_str) {
        m.errors.with_label_values(&[name, kind]);
    }
    for kind in crate::metrics::ENGINE_ERRORS {
        m.errors.with_label_values(&[name, kind]);
    }
    for record in ["result", "dead_letter", "retry", "workflow"] {
        m.records_produced.with_label_values(&[name, record]);
    }
    for task_type in settings.tasks.keys() {
        m.tasks_consumed.with_label_values(&[name, task_type]);
        m.tasks_succeeded.with_label_values(&[name, task_type]);
        for via in ["in_place", "retry_topic"] {
            m.tasks_retried.with_label_values(&[name, task_type, via]);
        }
    }
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

/// Most records taken from one partition's queue per pass, so that one
/// busy partition does not hold up the others.
const PARTITION_BATCH: usize = 64;

/// Most records taken from the main queue per pass.
const MAIN_BATCH: usize = 1024;

type Engine = BaseConsumer<EngineContext>;

/// What one read of a queue found.
enum Polled {
    /// Nothing there.
    Empty,
    /// A record, dispatched.
    Record,
    /// An error that ends the processor.
    Fatal(ProcessorError),
}

/// Dispatches what `polled` holds (read from `from`, when known); a job
/// to start now goes to `starts`.
fn take(
    shared: &Arc<Shared>,
    polled: Option<rdkafka::error::KafkaResult<BorrowedMessage<'_>>>,
    from: Option<&TopicPartition>,
    starts: &mut Vec<Job>,
) -> Polled {
    match polled {
        None => Polled::Empty,
        Some(Ok(message)) => {
            starts.extend(shared.dispatch(&message, from));
            Polled::Record
        }
        Some(Err(e)) => match fatal_message(&e) {
            Some(message) => {
                error!(processor = %shared.name, %message, "stopping");
                shared.count_error("fatal");
                Polled::Fatal(ProcessorError::Fatal {
                    processor: shared.name.clone(),
                    message,
                })
            }
            None => {
                warn!(processor = %shared.name, error = %e, "consumer error; continuing");
                shared.count_error("consumer");
                Polled::Record
            }
        },
    }
}

/// Serves the main queue (rebalances, statistics, commit callbacks, errors,
/// and records fetched before their partition's queue was split off) until
/// it is empty. Returns whether it held anything.
fn serve_main(shared: &Arc<Shared>, consumer: &Engine) -> Result<bool, ProcessorError> {
    let mut any = false;
    let mut starts = Vec::new();
    let mut outcome = Ok(());
    for _ in 0..MAIN_BATCH {
        match take(shared, consumer.poll(Duration::ZERO), None, &mut starts) {
            Polled::Empty => break,
            Polled::Record => any = true,
            Polled::Fatal(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    task::start(shared, starts);
    outcome.map(|()| any)
}

fn poll_loop(
    shared: &Arc<Shared>,
    consumer: Engine,
    stop: &AtomicBool,
) -> Result<(), ProcessorError> {
    let consumer = Arc::new(consumer);
    let this_thread = std::thread::current();
    let _ = shared.poll_thread.set(this_thread.clone());
    // Each partition's queue, with the generation of the assignment it was
    // split off in: a partition revoked and assigned again (both can happen
    // within one poll under the eager protocol) has its queue re-forwarded
    // to the main queue by librdkafka, so it is split off again.
    let mut queues: HashMap<TopicPartition, (u64, PartitionQueue<EngineContext>)> = HashMap::new();
    let mut owned = Vec::new();
    let mut turn = 0usize;
    let mut result = Ok(());
    let commit_interval = Duration::from_millis(shared.settings.commit_interval_ms);
    let mut next_commit = Instant::now() + commit_interval;
    let mut commits: u32 = 0;
    'outer: while !stop.load(AtomicOrdering::Relaxed) {
        shared.status.poll_loop_alive();
        if let Some(message) = shared.fatal_error() {
            result = Err(ProcessorError::Fatal {
                processor: shared.name.clone(),
                message,
            });
            break;
        }
        let mut any = match serve_main(shared, &consumer) {
            Ok(any) => any,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        // Set before the bounds are read: a task finishing from here on
        // wakes this thread (its unpark is kept until the next park).
        shared.starved.store(true, AtomicOrdering::Release);
        let mut room = shared.apply(&mut owned);
        if Instant::now() >= next_commit {
            commits = commits.wrapping_add(1);
            let all = commits.is_multiple_of(FULL_COMMIT_EVERY);
            if let Err(e) = shared.commit(&consumer, None, CommitMode::Async, all) {
                warn!(processor = %shared.name, error = %e, "offset commit not sent");
            }
            next_commit = Instant::now() + commit_interval;
        }
        if room > 0 && owned.iter().all(|(_, own_room, _)| *own_room > 0) {
            shared.starved.store(false, AtomicOrdering::Release);
        }

        // Split off the queues of newly assigned partitions, then empty the
        // main queue once more: records fetched before a split are there,
        // and must be dispatched before the partition queue's.
        queues.retain(|tp, (generation, _)| {
            owned
                .iter()
                .any(|(o, _, current)| o == tp && current == generation)
        });
        let mut split = false;
        for (tp, _, generation) in &owned {
            if queues.contains_key(tp) {
                continue;
            }
            match consumer.split_partition_queue(&tp.0, tp.1) {
                Some(mut queue) => {
                    let thread = this_thread.clone();
                    queue.set_nonempty_callback(move || thread.unpark());
                    queues.insert(tp.clone(), (*generation, queue));
                    split = true;
                }
                None => {
                    warn!(processor = %shared.name, topic = %tp.0, partition = tp.1,
                          "cannot split off the partition's queue; its records come through the main queue");
                }
            }
        }
        if split {
            match serve_main(shared, &consumer) {
                Ok(more) => any |= more,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            room = shared.apply(&mut owned);
        }

        // Read each partition with room, in turn from a rotating start so
        // that a small processor-wide room is shared out.
        if !owned.is_empty() {
            turn = turn.wrapping_add(1);
            let start = turn % owned.len();
            for i in 0..owned.len() {
                if room == 0 {
                    break;
                }
                let Some((tp, own_room, _)) = owned.get((start + i) % owned.len()) else {
                    continue;
                };
                let Some((_, queue)) = queues.get(tp) else {
                    continue;
                };
                let limit = (*own_room).min(room).min(PARTITION_BATCH);
                let mut starts = Vec::new();
                for _ in 0..limit {
                    match take(shared, queue.poll(Duration::ZERO), Some(tp), &mut starts) {
                        Polled::Empty => break,
                        Polled::Record => {
                            any = true;
                            room -= 1;
                            if shared.bytes_full.load(AtomicOrdering::Relaxed) {
                                room = 0;
                                break;
                            }
                        }
                        Polled::Fatal(e) => {
                            task::start(shared, starts);
                            result = Err(e);
                            break 'outer;
                        }
                    }
                }
                task::start(shared, starts);
            }
        }
        if !any {
            // Woken early by a partition queue receiving records or a task
            // finishing; the timeout serves the main queue's callbacks.
            std::thread::park_timeout(IDLE_POLL);
        }
    }
    drop(queues);
    let consumer = match Arc::try_unwrap(consumer) {
        Ok(consumer) => consumer,
        Err(_) => unreachable!("the partition queues holding the consumer were dropped"),
    };
    shared.lock().ledger.stop();
    shared.drain(&consumer, None, "shutdown");
    // A commit refused because the group is rebalancing (another member
    // joined or left just now) succeeds once the rebalance is through, and
    // that needs this member to keep polling. Nothing new is dispatched
    // while stopping. Without this, a clean stop could leave its last
    // offsets uncommitted, and a restart would redo that work.
    let deadline = Instant::now() + Duration::from_millis(shared.settings.drain_timeout_ms);
    while let Err(e) = shared.commit(&consumer, None, CommitMode::Sync, true) {
        let retriable = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::RebalanceInProgress
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::UnknownMemberId
            )
        );
        if !retriable || Instant::now() >= deadline {
            shared
                .status
                .drain_commit_failures
                .fetch_add(1, AtomicOrdering::Relaxed);
            warn!(processor = %shared.name, error = %e, "final commit failed; a restart will redo the work since the last commit");
            break;
        }
        debug!(processor = %shared.name, error = %e, "final commit refused during a rebalance; polling and trying again");
        let _ = consumer.poll(Duration::from_millis(100));
    }
    // Closing the consumer runs the revoke callback (nothing left to drain)
    // and leaves the group at once instead of after the session timeout.
    drop(consumer);
    result
}
