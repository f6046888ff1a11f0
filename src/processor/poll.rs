//! The poll thread: serves the consumer's main queue (callbacks, and
//! records fetched before a partition's queue was split off), splits off
//! each assigned partition's queue, takes from each as many records as the
//! ledger's room allows, dispatches them and sends the periodic commits;
//! on stop, drains and commits what finished.

use std::collections::HashMap;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use tracing::{debug, error, warn};

use super::ledger::TopicPartition;
use super::rebalance::EngineContext;
use super::{task, Job, ProcessorError, Shared};
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
            shared.dispatch(std::slice::from_ref(&message), from, starts);
            Polled::Record
        }
        Some(Err(e)) => consumer_error(shared, &e),
    }
}

/// A consumer error: ends the processor when nothing fixes it, else it
/// is logged and counted and librdkafka recovers.
fn consumer_error(shared: &Shared, e: &KafkaError) -> Polled {
    match fatal_message(e) {
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
    }
}

/// Serves the main queue (rebalances, statistics, commit callbacks, errors,
/// and records fetched before their partition's queue was split off) until
/// it is empty. Returns whether it held anything.
///
/// Unlike a partition's queue, read in batches in `poll_loop`, each record
/// here is admitted before the next poll: a poll of the main queue may run
/// a rebalance callback, and a record read before a revocation must not be
/// admitted into the assignment that follows it.
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
    let mut queues: HashMap<TopicPartition, (u64, PartitionQueue<EngineContext>)> = HashMap::new();
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
        shared
            .status
            .reading
            .store(queues.len(), AtomicOrdering::Relaxed);
        if split {
            match serve_main(shared, &consumer) {
                Ok(more) => any |= more,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            let granted = shared.apply(&mut owned);
            (room, bytes_room) = (granted.total, granted.bytes);
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
                // Read a batch, then take it under one lock.
                let limit = (*own_room).min(room).min(PARTITION_BATCH);
                let mut batch = Vec::with_capacity(limit);
                let mut fatal = None;
                for _ in 0..limit {
                    match queue.poll(Duration::ZERO) {
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
                            if let Polled::Fatal(e) = consumer_error(shared, &e) {
                                fatal = Some(e);
                                break;
                            }
                        }
                    }
                }
                let mut starts = Vec::new();
                shared.dispatch(&batch, Some(tp), &mut starts);
                drop(batch);
                task::start(shared, starts);
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
    shared.status.reading.store(0, AtomicOrdering::Relaxed);
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
