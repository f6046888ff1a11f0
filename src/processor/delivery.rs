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
//! A record the broker did not take is classified ([`recover`]):
//! - **passing** (a broker down, a leader moving, a timeout): produced
//!   again after a capped, jittered backoff, counted in
//!   `conveyor_produce_retries_total`; the input offset must not be stored
//!   before its outputs are safe.
//! - **never taken** (too large for its topic): a result loses its output
//!   and becomes a FAILED `output_too_large` result; a dead letter is cut
//!   to fit (header `conveyor.original.size`); any other record (a retry,
//!   a workflow's next request) becomes a dead letter saying so, with a
//!   FAILED result for its task. The task then finishes as usual.
//! - **unknown topic or partition** (retriable in Kafka: a leader moving,
//!   metadata lagging): produced again like a passing failure while the
//!   cluster's metadata still lists the topic; fatal once it does not.
//! - **fatal** (not authorized, the topic does not exist, the idempotent
//!   producer failed for good): the processor stops with the error, exit
//!   status 1. The task's offset is never stored: its outputs were not all
//!   acknowledged.
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

/// First wait before producing again a record the broker did not take; it
/// doubles with each failure in a row, up to [`PRODUCE_RETRY_MAX`].
const PRODUCE_RETRY: Duration = Duration::from_millis(200);
/// Longest wait between produce attempts.
const PRODUCE_RETRY_MAX: Duration = Duration::from_secs(10);
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

impl ClientContext for Deliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        // The idempotent producer failed for good (e.g. sequence numbers
        // out of step): nothing it holds will be delivered.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            if let Some(shared) = self.shared.get().and_then(Weak::upgrade) {
                shared.fail(format!(
                    "the producer failed for good: {reason} ({error}); restart the worker"
                ));
                if let Some(last) = Arc::into_inner(shared) {
                    std::thread::spawn(move || drop(last));
                }
            }
            return;
        }
        if let Some(message) =
            crate::security::fatal_connection_error(error.rdkafka_error_code(), reason)
        {
            if let Some(shared) = self.shared.get().and_then(Weak::upgrade) {
                shared.fail(message);
                if let Some(last) = Arc::into_inner(shared) {
                    std::thread::spawn(move || drop(last));
                }
            }
            return;
        }
        tracing::error!(%error, reason, "librdkafka producer error");
    }
}

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
        if let Delivery::Event(kind, in_flight) = &*delivery {
            // Not part of any task's unit: counted, not produced again.
            if let Err((error, _)) = &outcome {
                super::lifecycle::event_failed(&shared, kind, error);
            }
            if let Some(in_flight) = in_flight {
                in_flight.done();
            }
            if let Some(last) = Arc::into_inner(shared) {
                std::thread::spawn(move || drop(last));
            }
            return;
        }
        match outcome {
            Ok(()) => {
                if shared.failures_in_a_row.load(AtomicOrdering::Relaxed) > 0 {
                    shared.failures_in_a_row.store(0, AtomicOrdering::Relaxed);
                }
                if let Delivery::Task(task) = &*delivery {
                    task.acknowledged(&shared);
                }
            }
            Err((error, record)) => {
                let runtime = shared.runtime.clone();
                let again = shared.clone();
                runtime.spawn(async move {
                    if let Some(records) = recover(&again, &error, record, Some(&delivery)).await {
                        let _ = send_all(&again, records, delivery).await;
                    }
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
    /// A task event (its kind): written once, counted if refused; the
    /// count of its task's events in flight, when kept.
    Event(&'static str, Option<Arc<super::lifecycle::InFlight>>),
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

impl Delivery {
    /// `more` records are now part of this delivery (replacing one that
    /// was not acknowledged, which still counts).
    fn expect(&self, more: usize) {
        if let Delivery::Task(task) = self {
            task.remaining.fetch_add(more, AtomicOrdering::AcqRel);
        }
    }
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
/// are none. `latency`: the task latency to observe then. Awaiting what it
/// returns gives the next record of the job's lane when letting go of the
/// lane started one: the caller runs it.
///
/// Not asynchronous itself: the producer takes records at once unless its
/// queue is full, and only then is the rest (the waiting and producing
/// again) a boxed future. As a future of its own it weighed 608 bytes on
/// every task's state, waiting in a handler or not; awaiting what it
/// returns weighs 240 (the `Job` it may hand back).
pub(super) fn deliver<'a>(
    shared: &'a Arc<Shared>,
    mut job: Job,
    records: Vec<(Record, Outgoing)>,
    latency: Option<(prometheus::Histogram, i64)>,
) -> Handed<'a> {
    // Not needed any more: freed here rather than on the producer's thread,
    // which finishes every task.
    job.payload = Vec::new();
    job.key = None;
    if records.is_empty() {
        return Handed::Now(shared.complete(&job));
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
    while let Some(record) = records.next() {
        if let Err(refused) = offer(shared, &record, delivery.clone()) {
            let rest: Vec<Outgoing> = records.collect();
            return Handed::Later(Box::pin(async move {
                let handed =
                    send_after(shared, refused, record, rest.into_iter(), delivery.clone()).await;
                if handed {
                    advance(shared, &delivery)
                } else {
                    None
                }
            }));
        }
    }
    Handed::Now(advance(shared, &delivery))
}

/// What [`deliver`] came to: awaited, the next record of the lane.
// Returned and awaited at once (the awaiting state keeps it only while
// it is awaited); boxing the job would cost an allocation per task.
#[allow(clippy::large_enum_variant)]
pub(super) enum Handed<'a> {
    /// Every record is with the producer.
    Now(Option<Job>),
    /// The producer's queue was full, or it refused a record: the rest.
    Later(futures::future::BoxFuture<'a, Option<Job>>),
}

impl<'a> std::future::IntoFuture for Handed<'a> {
    type Output = Option<Job>;
    type IntoFuture = futures::future::Either<
        std::future::Ready<Option<Job>>,
        futures::future::BoxFuture<'a, Option<Job>>,
    >;

    fn into_future(self) -> Self::IntoFuture {
        match self {
            Handed::Now(next) => futures::future::Either::Left(std::future::ready(next)),
            Handed::Later(rest) => futures::future::Either::Right(rest),
        }
    }
}

/// Every output of the task `delivery` is for is with the idempotent
/// producer, which keeps their order per partition: the next record of
/// the task's lane may start now. Its offset still counts as finished
/// only once every output is acknowledged (the acknowledgement that
/// finishes the job finds the lane already let go). Waiting for the
/// acknowledgement here cost a linger and a round trip per record per
/// lane: ~150 tasks/s per partition under `ordering = "partition"`.
///
/// Returns that next record: the caller runs it next, in the same tokio
/// task (see `task::run_lane`).
fn advance(shared: &Arc<Shared>, delivery: &Delivery) -> Option<Job> {
    let Delivery::Task(task) = delivery else {
        return None;
    };
    let mut job = task.job.lock().unwrap_or_else(|p| p.into_inner());
    // `None`: every output was acknowledged already and the job finished,
    // its lane with it.
    job.as_mut().and_then(|job| shared.let_go_of_lane(job))
}

/// Sends `record`, which the producer refused with `refused`, then `rest`.
/// Returns whether all were handed over (not after a fatal failure).
async fn send_after(
    shared: &Shared,
    refused: KafkaError,
    record: Outgoing,
    rest: impl Iterator<Item = Outgoing>,
    delivery: Arc<Delivery>,
) -> bool {
    let records = if is_queue_full(&refused) {
        vec![record]
    } else {
        match recover(shared, &refused, record, Some(&delivery)).await {
            Some(records) => records,
            None => return false,
        }
    };
    if !send_all(shared, records, delivery.clone()).await {
        return false;
    }
    for record in rest {
        if !send_all(shared, vec![record], delivery.clone()).await {
            return false;
        }
    }
    true
}

/// Produces one record and returns once the broker acknowledged it (or
/// what replaced it, see [`recover`]), producing it again for as long as
/// a passing failure lasts. After a fatal one it never returns: the
/// processor is stopping, and the caller must not go on as if the record
/// were written.
pub(crate) async fn produce(shared: &Shared, record: Outgoing) {
    let mut queue = vec![record];
    while let Some(record) = queue.pop() {
        let (sender, receiver) = oneshot::channel();
        let delivery = Arc::new(Delivery::Awaited(Mutex::new(Some(sender))));
        let failure = match hand_over(shared, &record, delivery).await {
            Ok(()) => match receiver.await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => KafkaError::Canceled,
            },
            Err(e) => e,
        };
        match Box::pin(recover(shared, &failure, record, None)).await {
            Some(records) => queue.extend(records),
            None => std::future::pending::<()>().await,
        }
    }
}

/// Hands `records`, which together take the place of one record of
/// `delivery`, to the producer until it takes each (or what replaces it).
/// Returns false early after a fatal failure, leaving the delivery
/// unfinished.
async fn send_all(shared: &Shared, records: Vec<Outgoing>, delivery: Arc<Delivery>) -> bool {
    delivery.expect(records.len().saturating_sub(1));
    let mut queue = records;
    while let Some(record) = queue.pop() {
        if let Err(failure) = hand_over(shared, &record, delivery.clone()).await {
            match Box::pin(recover(shared, &failure, record, Some(&delivery))).await {
                Some(records) => {
                    delivery.expect(records.len().saturating_sub(1));
                    queue.extend(records);
                }
                None => return false,
            }
        }
    }
    true
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
                    shared
                        .status
                        .producer_waits
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

/// Hands a task event (of metric label `kind`) to the producer once,
/// without waiting: a full queue refuses it (the caller counts it), and
/// what the broker refuses later is counted by the delivery callback.
pub(super) fn offer_event(
    shared: &Shared,
    record: &Outgoing,
    kind: &'static str,
    in_flight: Option<Arc<super::lifecycle::InFlight>>,
) -> Result<(), KafkaError> {
    offer(shared, record, Arc::new(Delivery::Event(kind, in_flight)))
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

/// What to produce instead of `record`, which the broker did not take
/// with `failure` (see the module's documentation); `None` after a fatal
/// failure, once the processor has been told to stop. `delivery`: what the
/// record was for (a task's outputs name the task a dead letter is about).
async fn recover(
    shared: &Shared,
    failure: &KafkaError,
    record: Outgoing,
    delivery: Option<&Delivery>,
) -> Option<Vec<Outgoing>> {
    match classify(failure) {
        Class::Fatal(advice) => {
            shared.fail(format!(
                "cannot produce to topic `{}`: {failure}; {advice}",
                record.topic
            ));
            None
        }
        Class::TooLarge => match replace_too_large(shared, failure, record, delivery) {
            Ok(records) => {
                shared.count_error(OUTPUT_TOO_LARGE);
                Some(records)
            }
            Err(message) => {
                shared.fail(message);
                None
            }
        },
        Class::Unknown if topic_exists(shared, &record.topic).await == Some(false) => {
            shared.fail(format!(
                "cannot produce to topic `{}`: {failure}; {TOPIC_GONE}",
                record.topic
            ));
            None
        }
        Class::Passing | Class::Unknown => {
            if let Some(retries) = &shared.hot.produce_retries {
                retries.inc();
            }
            shared.count_error("produce");
            let failures = shared
                .failures_in_a_row
                .fetch_add(1, AtomicOrdering::Relaxed);
            let wait = backoff(failures, fastrand::f64());
            warn!(topic = %record.topic, error = %failure, wait_ms = wait.as_millis() as u64,
                  "record not acknowledged; producing it again");
            tokio::time::sleep(wait).await;
            Some(vec![record])
        }
    }
}

/// The wait before the next produce attempt after `failures` failures in
/// a row (0 for the first), with `jitter` from 0 to 1 spreading it ±20%.
fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = PRODUCE_RETRY
        .saturating_mul(1 << failures.min(16))
        .min(PRODUCE_RETRY_MAX);
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

/// How a failure to produce is handled.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// Retrying cannot fix it: stop, saying what to do.
    Fatal(&'static str),
    /// The broker will never take the record as it is.
    TooLarge,
    /// Produce it again after a backoff.
    Passing,
    /// The topic or partition is not known to the broker now: passing
    /// while the cluster's metadata still has the topic, else fatal.
    Unknown,
}

const TOPIC_GONE: &str = "the topic does not exist (was it deleted?): create it";

/// Longest wait for the cluster's metadata when a topic is said unknown.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the cluster's metadata has `topic`: `None` when it cannot be
/// read (the broker is unreachable: a passing failure too).
async fn topic_exists(shared: &Shared, topic: &str) -> Option<bool> {
    use rdkafka::producer::Producer as _;
    let shared = shared
        .producer
        .context()
        .shared
        .get()
        .and_then(Weak::upgrade)?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let metadata = shared
            .producer
            .client()
            .fetch_metadata(Some(&topic), TOPIC_CHECK_TIMEOUT)
            .ok()?;
        let found = metadata.topics().iter().find(|t| t.name() == topic)?;
        Some(found.error().is_none() && !found.partitions().is_empty())
    })
    .await
    .ok()
    .flatten()
}

fn classify(error: &KafkaError) -> Class {
    use RDKafkaErrorCode as E;
    match error.rdkafka_error_code() {
        Some(E::TopicAuthorizationFailed | E::ClusterAuthorizationFailed) => {
            Class::Fatal("grant WRITE on the topic to this principal")
        }
        // Kafka marks these retriable: a leader moving, metadata not yet
        // propagated. Only the cluster's metadata can say the topic is gone.
        Some(E::UnknownTopicOrPartition | E::UnknownTopic) => Class::Unknown,
        Some(E::InvalidTopic) => Class::Fatal(TOPIC_GONE),
        Some(E::SaslAuthenticationFailed | E::Authentication) => {
            Class::Fatal("authentication failed: check the security settings in [kafka.options]")
        }
        Some(E::Fatal | E::InvalidProducerEpoch | E::ProducerFenced) => {
            Class::Fatal("the idempotent producer cannot go on: restart the worker")
        }
        Some(E::MessageSizeTooLarge) => Class::TooLarge,
        _ => Class::Passing,
    }
}

/// What replaces a record too large for the broker: a result without
/// its output, a dead letter cut in half, or (any other record) a dead
/// letter saying so and, when it is a task request, a FAILED result for
/// that task. An error when nothing smaller can be made.
fn replace_too_large(
    shared: &Shared,
    failure: &KafkaError,
    mut record: Outgoing,
    delivery: Option<&Delivery>,
) -> Result<Vec<Outgoing>, String> {
    let size = record.value.as_ref().map_or(0, Vec::len);
    let topic = record.topic.clone();
    if topic == shared.output_topic {
        let smaller = record
            .value
            .as_ref()
            .and_then(|v| without_output(shared, v, failure))
            .ok_or_else(|| {
                format!(
                    "a result of {size} bytes without an output is larger than topic `{topic}` accepts ({failure}); \
                     raise its max.message.bytes"
                )
            })?;
        warn!(topic = %topic, bytes = size, "result too large for the broker; reporting a failure instead");
        record.value = Some(smaller);
        return Ok(vec![record]);
    }
    if topic == shared.dead_letter_topic {
        if size == 0 {
            return Err(format!(
                "a dead letter with no payload is larger than topic `{topic}` accepts ({failure}); \
                 raise its max.message.bytes"
            ));
        }
        // Halving until it fits: at most ~log2(size) attempts.
        let original = record
            .headers
            .as_ref()
            .and_then(|h| super::headers::value(h, super::headers::ORIGINAL_SIZE))
            .unwrap_or_else(|| size.to_string());
        if let Some(value) = &mut record.value {
            value.truncate(size / 2);
        }
        let headers = record.headers.take().unwrap_or_default();
        record.headers = Some(super::headers::replace(
            headers,
            super::headers::ORIGINAL_SIZE,
            &original,
        ));
        warn!(topic = %topic, bytes = size, original_bytes = %original,
              "dead letter too large for its topic; cutting its payload in half");
        return Ok(vec![record]);
    }
    let message = format!(
        "a record of {size} bytes for topic `{topic}` is larger than the broker accepts ({failure})"
    );
    warn!(topic = %topic, bytes = size, "record too large for its topic; dead-lettering it");
    let mut records = Vec::with_capacity(2);
    let request = record
        .value
        .as_ref()
        .and_then(|v| shared.codec.decode_request(v).ok());
    let attempts = request.as_ref().map_or(0, |r| r.attempt.saturating_sub(1));
    if let Some(request) = request {
        let now = now_millis();
        let result = crate::codec::TaskResult {
            id: request.id,
            task_type: request.task_type.clone(),
            status: TaskStatus::Failed,
            output: None,
            content_type: String::new(),
            error: Some(TaskError {
                kind: OUTPUT_TOO_LARGE.into(),
                message: message.clone(),
            }),
            attempts: request.attempt.saturating_sub(1),
            started_at: now,
            finished_at: now,
            worker: shared.worker.clone(),
            workflow: request.workflow.clone(),
        };
        let mut value = Vec::new();
        shared.codec.encode_result(&result, &mut value);
        records.push(Outgoing {
            topic: shared.output_topic.clone(),
            partition: None,
            key: Some(crate::codec::uuid_key(&request.id)),
            value: Some(value),
            headers: None,
        });
    }
    // The same headers as every dead letter, about the task whose output
    // this was (its record's origin, its trace context).
    // (The job cannot finish meanwhile: this record is not acknowledged.)
    let job = match delivery {
        Some(Delivery::Task(task)) => Some(task.job.lock().unwrap_or_else(|p| p.into_inner())),
        _ => None,
    };
    let headers = super::task::dead_letter_headers(
        shared,
        job.as_ref().and_then(|j| j.as_ref()),
        OUTPUT_TOO_LARGE,
        &message,
        attempts,
        None,
    );
    drop(job);
    records.push(Outgoing {
        topic: shared.dead_letter_topic.clone(),
        partition: None,
        key: record.key,
        value: record.value,
        headers: Some(headers),
    });
    Ok(records)
}

/// The error kind of a record the broker will never take.
const OUTPUT_TOO_LARGE: &str = crate::codec::FailureKind::OutputTooLarge.as_str();

/// For an encoded result with an output, the same result FAILED with kind
/// `output_too_large` and no output.
fn without_output(shared: &Shared, value: &[u8], failure: &KafkaError) -> Option<Vec<u8>> {
    let mut result = shared.codec.decode_result(value).ok()?;
    result.output.as_ref()?;
    result.output = None;
    result.status = TaskStatus::Failed;
    result.error = Some(TaskError {
        kind: OUTPUT_TOO_LARGE.into(),
        message: format!(
            "the result ({} bytes) is larger than the broker accepts ({failure})",
            value.len()
        ),
    });
    let mut encoded = Vec::new();
    shared.codec.encode_result(&result, &mut encoded);
    Some(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_what_fixes_them() {
        let produce = |code| KafkaError::MessageProduction(code);
        assert!(matches!(
            classify(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)),
            Class::Fatal(advice) if advice.contains("grant WRITE")
        ));
        assert!(matches!(
            classify(&produce(RDKafkaErrorCode::InvalidTopic)),
            Class::Fatal(advice) if advice.contains("does not exist")
        ));
        for unknown in [
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
        ] {
            assert_eq!(
                classify(&produce(unknown)),
                Class::Unknown,
                "retried while the topic exists"
            );
        }
        assert!(matches!(
            classify(&produce(RDKafkaErrorCode::Fatal)),
            Class::Fatal(_)
        ));
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::MessageSizeTooLarge)),
            Class::TooLarge
        );
        for passing in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            assert_eq!(classify(&produce(passing)), Class::Passing);
        }
    }

    #[test]
    fn the_produce_backoff_doubles_up_to_its_cap_with_jitter() {
        assert_eq!(backoff(0, 0.5), PRODUCE_RETRY);
        assert_eq!(backoff(1, 0.5), PRODUCE_RETRY * 2);
        assert_eq!(backoff(30, 0.5), PRODUCE_RETRY_MAX);
        assert_eq!(backoff(u32::MAX, 0.5), PRODUCE_RETRY_MAX);
        assert!(backoff(0, 0.0) < backoff(0, 1.0));
        assert!(backoff(40, 1.0) <= PRODUCE_RETRY_MAX.mul_f64(1.2));
    }
}
