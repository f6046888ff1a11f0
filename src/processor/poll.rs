//! The poll thread: serves the consumer's main queue (callbacks, and
//! records fetched before a partition's queue was split off), splits off
//! each assigned partition's queue, takes from each as many records as the
//! ledger's room allows, dispatches them and sends the periodic commits;
//! on stop, drains and commits what finished.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;
use tracing::{debug, error, warn};

use super::ledger::TopicPartition;
use super::rebalance::EngineContext;
use super::{task, ProcessorError, Shared};
use crate::shutdown::CancellationToken;

/// Longest the poll thread sleeps when nothing arrives: the main queue's
/// callbacks (rebalances, statistics, commits) are served at least this
/// often. Records and finished tasks wake it at once.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Every this many commit intervals, every owned partition's progress is
/// committed, changed or not.
const FULL_COMMIT_EVERY: u32 = 5;

/// Most records taken from one partition's queue per pass, so that one
/// busy partition does not hold up the others.
const PARTITION_BATCH: usize = 64;

/// Most records taken from the main queue per pass.
const MAIN_BATCH: usize = 1024;

pub(super) type Engine = BaseConsumer<EngineContext>;

/// A consumer error: the error that ends the processor when nothing
/// fixes it; else it is logged and counted and librdkafka recovers.
fn consumer_error(shared: &Shared, e: &KafkaError) -> Option<ProcessorError> {
    match fatal_message(e) {
        Some(message) => {
            error!(processor = %shared.name, %message, "stopping");
            shared.count_error("fatal");
            Some(ProcessorError::Fatal {
                processor: shared.name.clone(),
                message,
            })
        }
        None => {
            warn!(processor = %shared.name, error = %e, "consumer error; continuing");
            shared.count_error("consumer");
            None
        }
    }
}

/// Records read but not taken for want of room, of one partition, in
/// offset order: offered again before anything later of the partition is
/// read. What is held is bounded by what librdkafka had fetched into the
/// main queue before the partition's queue was split off (its prefetch
/// limits), or by one batch of a partition queue; a partition whose queue
/// could not be split off is paused while it holds records.
struct Held {
    generation: u64,
    records: VecDeque<OwnedMessage>,
    /// Paused (its records come through the main queue).
    paused: bool,
}

/// A partition's own queue, split off the main queue.
struct Split {
    generation: u64,
    queue: PartitionQueue<EngineContext>,
    /// The main queue has been seen empty since the split: every record of
    /// the partition fetched before it was dispatched or held, so the
    /// partition's queue may be read without overtaking them.
    main_clear: bool,
}

/// What a pass over the main queue found.
struct Served {
    /// It held anything.
    any: bool,
    /// It was read to its end (not cut off after [`MAIN_BATCH`] records).
    emptied: bool,
}

/// Serves the main queue (rebalances, statistics, commit callbacks, errors,
/// and records fetched before their partition's queue was split off) for
/// up to [`MAIN_BATCH`] events. A record without room is held (see
/// [`Held`]), as is every later record of its partition.
///
/// Unlike a partition's queue, read in batches in `poll_loop`, each record
/// here is admitted before the next poll: a poll of the main queue may run
/// a rebalance callback, and a record read before a revocation must not be
/// admitted into the assignment that follows it.
fn serve_main(
    shared: &Arc<Shared>,
    consumer: &Engine,
    held: &mut HashMap<TopicPartition, Held>,
) -> Result<Served, ProcessorError> {
    let mut served = Served {
        any: false,
        emptied: false,
    };
    let mut starts = Vec::new();
    let mut outcome = Ok(());
    for _ in 0..shared.status.main_batch(MAIN_BATCH) {
        let message = match consumer.poll(Duration::ZERO) {
            // rust-rdkafka's poll answers `None` also after serving a
            // rebalance, a commit's result, statistics or a log line, with
            // records possibly queued behind it.
            None if main_queue_len(consumer) == 0 => {
                served.emptied = true;
                break;
            }
            None => continue,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                served.any = true;
                if let Some(e) = consumer_error(shared, &e) {
                    outcome = Err(e);
                    break;
                }
                continue;
            }
        };
        served.any = true;
        shared
            .status
            .from_main_queue
            .fetch_add(1, AtomicOrdering::Relaxed);
        if !held.is_empty() {
            let tp: TopicPartition = (Arc::from(message.topic()), message.partition());
            if let Some(h) = held.get_mut(&tp) {
                if shared.generation_of(&tp) == Some(h.generation) {
                    h.records.push_back(message.detach());
                    continue;
                }
                // Held in an earlier assignment: not this one's to run.
                if held.remove(&tp).is_some_and(|h| h.paused) {
                    let mut list = TopicPartitionList::new();
                    list.add_partition(&tp.0, tp.1);
                    resume(shared, consumer, &list);
                }
            }
        }
        match shared.dispatch(std::slice::from_ref(&message), None, &mut starts) {
            Ok(0) => {
                let tp: TopicPartition = (Arc::from(message.topic()), message.partition());
                if let Some(generation) = shared.generation_of(&tp) {
                    let mut records = VecDeque::new();
                    records.push_back(message.detach());
                    held.insert(
                        tp,
                        Held {
                            generation,
                            records,
                            paused: false,
                        },
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    task::start(shared, starts);
    outcome.map(|()| served)
}

/// Events (records, callbacks) waiting in the consumer's main queue: the
/// one way to tell an empty queue from a poll that served an event, which
/// rust-rdkafka does not expose.
#[allow(unsafe_code)]
fn main_queue_len(consumer: &Engine) -> usize {
    let client = consumer.client().native_ptr();
    // SAFETY: `client` is the live handle `consumer` owns, borrowed for
    // this call. `rd_kafka_queue_get_consumer` returns a new reference to
    // the consumer queue (NULL if there is none); `rd_kafka_queue_length`
    // reads its length under the queue's lock; `rd_kafka_queue_destroy`
    // releases the reference taken here and leaves the queue itself alone.
    unsafe {
        let queue = rdkafka::bindings::rd_kafka_queue_get_consumer(client);
        if queue.is_null() {
            return 0;
        }
        let len = rdkafka::bindings::rd_kafka_queue_length(queue);
        rdkafka::bindings::rd_kafka_queue_destroy(queue);
        len
    }
}

/// Resumes `partitions`, paused while they held records (librdkafka keeps
/// an application's pause across assignments, so this is done also when
/// the records are dropped with their assignment).
fn resume(shared: &Shared, consumer: &Engine, partitions: &TopicPartitionList) {
    if partitions.count() == 0 {
        return;
    }
    if let Err(e) = consumer.resume(partitions) {
        warn!(processor = %shared.name, error = %e, "cannot resume partitions paused while holding records");
    }
}

/// Offers each partition's held records again, in order, as far as there
/// is room; resumes a paused partition whose held records are all taken.
/// Returns whether any record was taken.
fn offer_held(
    shared: &Arc<Shared>,
    consumer: &Engine,
    held: &mut HashMap<TopicPartition, Held>,
) -> Result<bool, ProcessorError> {
    let mut starts = Vec::new();
    let mut outcome = Ok(false);
    let mut resumed = TopicPartitionList::new();
    held.retain(|tp, h| {
        if outcome.is_err() {
            return true;
        }
        let taken = match shared.dispatch(h.records.make_contiguous(), Some(tp), &mut starts) {
            Ok(taken) => taken,
            Err(e) => {
                outcome = Err(e);
                return true;
            }
        };
        if taken > 0 {
            outcome = Ok(true);
        }
        h.records.drain(..taken.min(h.records.len()));
        if !h.records.is_empty() {
            return true;
        }
        if h.paused {
            resumed.add_partition(&tp.0, tp.1);
        }
        false
    });
    task::start(shared, starts);
    resume(shared, consumer, &resumed);
    outcome
}

pub(super) fn poll_loop(
    shared: &Arc<Shared>,
    consumer: Engine,
    stop: &CancellationToken,
) -> Result<(), ProcessorError> {
    let consumer = Arc::new(consumer);
    let this_thread = std::thread::current();
    let _ = shared.poll_thread.set(this_thread.clone());
    // Each partition's queue, with the generation of the assignment it was
    // split off in: a partition revoked and assigned again (both can happen
    // within one poll under the eager protocol) has its queue re-forwarded
    // to the main queue by librdkafka, so it is split off again.
    let mut queues: HashMap<TopicPartition, Split> = HashMap::new();
    let mut held: HashMap<TopicPartition, Held> = HashMap::new();
    // Partitions whose queue could not be split off, with the generation
    // it was tried in (said once per assignment).
    let mut unsplit: HashMap<TopicPartition, u64> = HashMap::new();
    let mut owned = Vec::new();
    let mut turn = 0usize;
    let mut result = Ok(());
    let commit_interval = Duration::from_millis(shared.settings.commit_interval_ms);
    let mut next_commit = Instant::now() + commit_interval;
    let mut commits: u32 = 0;
    'outer: while !stop.is_cancelled() {
        shared.status.poll_loop_alive();
        if let Some(message) = shared.fatal_error() {
            result = Err(ProcessorError::Fatal {
                processor: shared.name.clone(),
                message,
            });
            break;
        }
        let mut any = match serve_main(shared, &consumer, &mut held) {
            Ok(served) => {
                if served.emptied {
                    queues.values_mut().for_each(|q| q.main_clear = true);
                }
                served.any
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        // Set before the bounds are read: a task finishing from here on
        // wakes this thread (its unpark is kept until the next park).
        shared.starved.store(true, AtomicOrdering::Release);
        let granted = shared.apply(&mut owned);
        let (mut room, mut bytes_room) = (granted.total, granted.bytes);
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

        // Forget what belongs to partitions gone or assigned again.
        let current = |tp: &TopicPartition, generation: u64| {
            owned
                .iter()
                .any(|(o, _, current)| o == tp && *current == generation)
        };
        queues.retain(|tp, split| current(tp, split.generation));
        let mut resumed = TopicPartitionList::new();
        held.retain(|tp, h| {
            let keep = current(tp, h.generation);
            if !keep && h.paused {
                resumed.add_partition(&tp.0, tp.1);
            }
            keep
        });
        resume(shared, &consumer, &resumed);
        unsplit.retain(|tp, generation| current(tp, *generation));

        // Split off the queues of newly assigned partitions, then empty the
        // main queue once more: records fetched before a split are there,
        // and must be dispatched before the partition queue's.
        let mut split = false;
        if let Some(delay) = shared.status.split_delay() {
            if owned.iter().any(|(tp, _, _)| !queues.contains_key(tp)) {
                std::thread::sleep(delay);
            }
        }
        for (tp, _, generation) in &owned {
            if queues.contains_key(tp) {
                continue;
            }
            match consumer.split_partition_queue(&tp.0, tp.1) {
                Some(mut queue) => {
                    let thread = this_thread.clone();
                    queue.set_nonempty_callback(move || thread.unpark());
                    queues.insert(
                        tp.clone(),
                        Split {
                            generation: *generation,
                            queue,
                            main_clear: false,
                        },
                    );
                    unsplit.remove(tp);
                    split = true;
                }
                None => {
                    if unsplit.insert(tp.clone(), *generation).is_none() {
                        shared.count_error("split");
                        warn!(processor = %shared.name, topic = %tp.0, partition = tp.1,
                              "cannot split off the partition's queue; its records come through the main queue, \
                               and the partition is paused while any of them wait for room");
                    }
                }
            }
        }
        shared.publish_queues(queues.len(), unsplit.len());
        if split {
            if let Some(delay) = shared.status.split_delay() {
                // (Test hook) the split-off queues fill meanwhile.
                std::thread::sleep(delay);
            }
            match serve_main(shared, &consumer, &mut held) {
                Ok(served) => {
                    any |= served.any;
                    if served.emptied {
                        queues.values_mut().for_each(|q| q.main_clear = true);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // A partition whose records come through the main queue stops
        // fetching while it holds records (librdkafka drops what it had
        // fetched past them and fetches it again on resume).
        let mut pause = TopicPartitionList::new();
        for (tp, h) in &mut held {
            if !h.paused && !queues.contains_key(tp) {
                h.paused = true;
                pause.add_partition(&tp.0, tp.1);
            }
        }
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                warn!(processor = %shared.name, error = %e, "cannot pause partitions holding records");
            }
        }
        if !held.is_empty() {
            // Only records taken count as progress: held records without
            // room wait, like an unread queue, for a finishing task to wake
            // this thread (`starved`), not in a busy loop.
            match offer_held(shared, &consumer, &mut held) {
                Ok(took) => any |= took,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if split || !held.is_empty() {
            let granted = shared.apply(&mut owned);
            (room, bytes_room) = (granted.total, granted.bytes);
        }

        // Read each partition with room, in turn from a rotating start so
        // that a small processor-wide room is shared out; not one whose
        // records fetched before its split may still be in the main queue,
        // nor one holding records.
        if !owned.is_empty() {
            turn = turn.wrapping_add(1);
            let start = turn % owned.len();
            for i in 0..owned.len() {
                if room == 0 {
                    break;
                }
                let Some((tp, own_room, generation)) = owned.get((start + i) % owned.len()) else {
                    continue;
                };
                let Some(split) = queues.get(tp) else {
                    continue;
                };
                if !split.main_clear || held.contains_key(tp) {
                    continue;
                }
                // Read a batch, then take it under one lock.
                let limit = (*own_room).min(room).min(PARTITION_BATCH);
                let mut batch = Vec::with_capacity(limit);
                let mut fatal = None;
                for _ in 0..limit {
                    match split.queue.poll(Duration::ZERO) {
                        None => break,
                        Some(Ok(message)) => {
                            any = true;
                            room -= 1;
                            bytes_room = bytes_room.saturating_sub(message.payload_len());
                            batch.push(message);
                            if bytes_room == 0 {
                                // `max_in_flight_bytes` reached with this one.
                                room = 0;
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            any = true;
                            if let Some(e) = consumer_error(shared, &e) {
                                fatal = Some(e);
                                break;
                            }
                        }
                    }
                }
                let mut starts = Vec::new();
                let taken = shared.dispatch(&batch, Some(tp), &mut starts);
                task::start(shared, starts);
                match taken {
                    Ok(taken) if taken < batch.len() => {
                        // The bounds moved since they were read: hold the
                        // rest, in order.
                        let records = batch.iter().skip(taken).map(|m| m.detach()).collect();
                        held.insert(
                            tp.clone(),
                            Held {
                                generation: *generation,
                                records,
                                paused: false,
                            },
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e);
                        break 'outer;
                    }
                }
                drop(batch);
                if let Some(e) = fatal {
                    result = Err(e);
                    break 'outer;
                }
            }
        }
        if !any {
            // Woken early by a partition queue receiving records or a task
            // finishing; the timeout serves the main queue's callbacks.
            std::thread::park_timeout(IDLE_POLL);
        }
    }
    drop(queues);
    drop(held);
    shared.publish_queues(0, 0);
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
