//! Getting records to the broker, and learning that they got there.
//!
//! One `ThreadedProducer` per processor. Its polling thread runs the
//! delivery callback for every record, with the record's [`Delivery`] as
//! the opaque:
//!
//! - a task's outputs (result, dead letter, parked retry, a workflow's next
//!   requests) share one [`Delivery::Task`], which holds the task's [`Job`]
//!   and counts the outputs not yet acknowledged; the last acknowledgement
//!   finishes the job right there (its offset may be stored, the next record
//!   of its lane starts). No future, channel or task wake-up per record:
//!   that was most of what the engine cost per record (BENCHMARKS.md).
//! - a record someone awaits (a join's changelog, its request)
//!   has a [`Delivery::Awaited`] with a channel to the awaiting task.
//!
//! A record the broker did not take is produced again (after
//! [`PRODUCE_RETRY`]) until it is: the input offset must not be stored
//! before its outputs are safe. A result too large for the broker is
//! replaced by a FAILED result saying so.
//!
//! The callback reaches the processor's shared state through a `Weak`: the
//! state owns the producer, so the polling thread must never hold the last
//! reference (dropping the producer there would join the thread from
//! itself).

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::channel::oneshot;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tracing::warn;

use super::{Job, Shared};
use crate::codec::{now_millis, TaskError, TaskStatus};

/// Wait between attempts to produce a record the broker did not take.
const PRODUCE_RETRY: Duration = Duration::from_millis(200);
/// Wait while the producer queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

/// The processor's producer.
pub(crate) type Producer = ThreadedProducer<Deliveries>;

/// The producer's context: routes each acknowledgement to its [`Delivery`].
#[derive(Default)]
pub(crate) struct Deliveries {
    shared: OnceLock<Weak<Shared>>,
}

impl Deliveries {
    /// Connects the callbacks to the processor's state, once it exists.
    pub(crate) fn connect(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Arc<Delivery>) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, message)) => Err((error.clone(), Outgoing::from_message(message))),
        };
        if let Delivery::Awaited(sender) = &*delivery {
            let sender = sender.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(sender) = sender {
                let _ = sender.send(outcome.map_err(|(e, _)| e));
            }
            return;
        }
        // Gone: the processor stopped; what was not acknowledged is read
        // again by the partitions' next owner.
        let Some(shared) = self.shared.get().and_then(Weak::upgrade) else {
            return;
        };
        match outcome {
            Ok(()) => {
                if let Delivery::Task(task) = &*delivery {
                    task.acknowledged(&shared);
                }
            }
            Err((error, record)) => {
                let runtime = shared.runtime.clone();
                let again = shared.clone();
                runtime.spawn(async move {
                    let record = recover(&again, &error, record).await;
                    send(&again, record, delivery).await;
                });
            }
        }
        // Never drop the state here: it owns this thread's producer.
        if let Some(last) = Arc::into_inner(shared) {
            std::thread::spawn(move || drop(last));
        }
    }
}

/// What one record's acknowledgement is for.
// Always behind an `Arc`: the small variant is the rare one, and boxing the
// large one would add an allocation per task.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Delivery {
    /// A task's outputs.
    Task(TaskOutputs),
    /// A record a task awaits.
    Awaited(Mutex<Option<oneshot::Sender<Result<(), KafkaError>>>>),
}

/// Kinds of records a task produces, as counted in
/// `conveyor_records_produced_total{record}`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Record {
    Result = 0,
    DeadLetter = 1,
    Retry = 2,
    Workflow = 3,
}

/// The label of each [`Record`].
pub(crate) const RECORD_LABELS: [&str; 4] = ["result", "dead_letter", "retry", "workflow"];

/// A task's outputs on their way: the last one acknowledged finishes the
/// task.
pub(crate) struct TaskOutputs {
    job: Mutex<Option<Job>>,
    remaining: AtomicUsize,
    /// Records of each kind, counted once all are acknowledged.
    kinds: [u32; 4],
    /// The task's latency histogram and the request's `submitted_at`,
    /// observed at the last acknowledgement.
    latency: Option<(prometheus::Histogram, i64)>,
}

impl TaskOutputs {
    fn acknowledged(&self, shared: &Arc<Shared>) {
        if self.remaining.fetch_sub(1, AtomicOrdering::AcqRel) != 1 {
            return;
        }
        let job = self.job.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((histogram, submitted_at)) = &self.latency {
            histogram.observe((now_millis() - submitted_at).max(0) as f64 / 1000.0);
        }
        if let Some(produced) = &shared.hot.produced {
            for (counter, n) in produced.iter().zip(self.kinds) {
                if n > 0 {
                    counter.inc_by(u64::from(n));
                }
            }
        }
        if let Some(job) = job {
            shared.finish(job);
        }
    }
}

/// One record to produce.
pub(crate) struct Outgoing {
    pub(crate) topic: Arc<str>,
    /// A fixed partition, else the partitioner's choice by key.
    pub(crate) partition: Option<i32>,
    pub(crate) key: Option<Vec<u8>>,
    /// `None`: a tombstone.
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Option<OwnedHeaders>,
}

impl Outgoing {
    /// The record a failed delivery carried, to produce it again (to the
    /// partitioner's choice: the partition it went to may be the problem).
    fn from_message(message: &BorrowedMessage<'_>) -> Outgoing {
        Outgoing {
            topic: Arc::from(message.topic()),
            partition: None,
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers: message.headers().map(|h| h.detach()),
        }
    }
}

/// Hands a task's `records` to the producer; the job finishes (see
/// [`Shared::finish`]) once every one is acknowledged, at once when there
/// are none. `latency`: the task latency to observe then.
pub(super) async fn deliver(
    shared: &Arc<Shared>,
    mut job: Job,
    records: Vec<(Record, Outgoing)>,
    latency: Option<(prometheus::Histogram, i64)>,
) {
    // Not needed any more: freed here rather than on the producer's thread,
    // which finishes every task.
    job.payload = Vec::new();
    job.key = None;
    if records.is_empty() {
        shared.finish(job);
        return;
    }
    let mut kinds = [0u32; 4];
    for (kind, _) in &records {
        if let Some(n) = kinds.get_mut(*kind as usize) {
            *n += 1;
        }
    }
    let delivery = Arc::new(Delivery::Task(TaskOutputs {
        job: Mutex::new(Some(job)),
        remaining: AtomicUsize::new(records.len()),
        kinds,
        latency,
    }));
    let mut records = records.into_iter().map(|(_, record)| record);
    // The producer takes records at once unless its queue is full: the
    // waiting and retrying is boxed, so that it does not weigh on every
    // task's future.
    while let Some(record) = records.next() {
        if let Err(refused) = offer(shared, &record, delivery.clone()) {
            Box::pin(send_after(shared, refused, record, records, delivery)).await;
            return;
        }
    }
}

/// Sends `record`, which the producer refused with `refused`, then `rest`.
async fn send_after(
    shared: &Shared,
    refused: KafkaError,
    record: Outgoing,
    rest: impl Iterator<Item = Outgoing>,
    delivery: Arc<Delivery>,
) {
    let record = if is_queue_full(&refused) {
        record
    } else {
        recover(shared, &refused, record).await
    };
    send(shared, record, delivery.clone()).await;
    for record in rest {
        send(shared, record, delivery.clone()).await;
    }
}

/// Produces one record and returns once the broker acknowledged it,
/// producing it again for as long as it takes.
pub(crate) async fn produce(shared: &Shared, mut record: Outgoing) {
    loop {
        let (sender, receiver) = oneshot::channel();
        let delivery = Arc::new(Delivery::Awaited(Mutex::new(Some(sender))));
        let failure = match hand_over(shared, &record, delivery).await {
            Ok(()) => match receiver.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => KafkaError::Canceled,
            },
            Err(e) => e,
        };
        record = recover(shared, &failure, record).await;
    }
}

/// Hands `record` to the producer until it takes it; its acknowledgement
/// goes to `delivery`.
async fn send(shared: &Shared, mut record: Outgoing, delivery: Arc<Delivery>) {
    while let Err(failure) = hand_over(shared, &record, delivery.clone()).await {
        record = Box::pin(recover(shared, &failure, record)).await;
    }
}

/// Hands `record` to the producer, waiting while its queue is full (and
/// holding intake meanwhile). An error is the producer refusing it.
async fn hand_over(
    shared: &Shared,
    record: &Outgoing,
    delivery: Arc<Delivery>,
) -> Result<(), KafkaError> {
    let mut blocked = false;
    let result = loop {
        match offer(shared, record, delivery.clone()) {
            Ok(()) => break Ok(()),
            Err(e) if is_queue_full(&e) => {
                if !blocked {
                    blocked = true;
                    shared
                        .producer_blocked
                        .fetch_add(1, AtomicOrdering::Relaxed);
                }
                Box::pin(tokio::time::sleep(QUEUE_FULL_WAIT)).await;
            }
            Err(e) => break Err(e),
        }
    };
    if blocked {
        shared
            .producer_blocked
            .fetch_sub(1, AtomicOrdering::Relaxed);
    }
    result
}

/// Hands `record` to the producer once.
fn offer(shared: &Shared, record: &Outgoing, delivery: Arc<Delivery>) -> Result<(), KafkaError> {
    let mut base = BaseRecord::<[u8], [u8], Arc<Delivery>>::with_opaque_to(&record.topic, delivery);
    if let Some(value) = &record.value {
        base = base.payload(value);
    }
    if let Some(partition) = record.partition {
        base = base.partition(partition);
    }
    if let Some(key) = &record.key {
        base = base.key(key);
    }
    if let Some(h) = &record.headers {
        base = base.headers(h.clone());
    }
    shared.producer.send(base).map_err(|(e, _)| e)
}

fn is_queue_full(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
    )
}

/// What to produce after `failure`: a result too large for the broker
/// becomes a FAILED result without its output, at once; anything else is
/// counted and produced again after [`PRODUCE_RETRY`].
async fn recover(shared: &Shared, failure: &KafkaError, mut record: Outgoing) -> Outgoing {
    if is_too_large(failure) {
        if let Some((bytes, smaller)) = record
            .value
            .as_ref()
            .and_then(|v| Some((v.len(), without_output(shared, v, failure)?)))
        {
            warn!(topic = %record.topic, bytes, "result too large for the broker; reporting a failure instead");
            record.value = Some(smaller);
            return record;
        }
    }
    if let Some(errors) = &shared.hot.produce_errors {
        errors.inc();
    }
    warn!(topic = %record.topic, error = %failure, "record not acknowledged; producing it again");
    tokio::time::sleep(PRODUCE_RETRY).await;
    record
}

/// For an encoded result with an output, the same result FAILED with kind
/// `output_too_large` and no output.
fn without_output(shared: &Shared, value: &[u8], failure: &KafkaError) -> Option<Vec<u8>> {
    let mut result = shared.codec.decode_result(value).ok()?;
    result.output.as_ref()?;
    result.output = None;
    result.status = TaskStatus::Failed;
    result.error = Some(TaskError {
        kind: "output_too_large".into(),
        message: format!(
            "the result ({} bytes) is larger than the broker accepts ({failure})",
            value.len()
        ),
    });
    let mut encoded = Vec::new();
    shared.codec.encode_result(&result, &mut encoded);
    Some(encoded)
}

fn is_too_large(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
    )
}
