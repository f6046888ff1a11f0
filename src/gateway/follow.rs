//! The status view's source: a consumer outside any group that reads the
//! results and task topics from where the status store left off (or, for
//! a new store, from `gateway.retention_ms` ago), the events topic from a
//! look-back point, and follows them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::GatewayError;
use crate::codec::event::TaskEvent;
use crate::codec::wire as headers;
use crate::codec::{now_millis, Codec, TaskRequest, TaskResult};
use crate::kafka::{Read, Reader};
use crate::settings::KafkaSettings;
use crate::shutdown::CancellationToken;

/// How often the follower asks the broker how far behind it is, once
/// caught up.
const LAG_EVERY: Duration = Duration::from_secs(10);
/// Longest the follower spends asking for that lag.
const LAG_BUDGET: Duration = Duration::from_secs(2);

/// What to follow.
#[derive(Debug)]
pub(super) struct Spec {
    pub kafka: KafkaSettings,
    pub codec: Codec,
    pub task_topics: Vec<String>,
    /// Delay tiers: their records are tasks scheduled for later.
    pub delay_topics: Vec<String>,
    pub result_topics: Vec<String>,
    /// The events topic, when `[events]` is on.
    pub events_topic: Option<String>,
    /// How far back the events topic is read.
    pub lookback_ms: u64,
    /// The view's capacity: how far back to read an events partition whose
    /// timestamp lookup found nothing.
    pub max_tasks: usize,
    /// How far back the task and results topics are read where the store
    /// has no offset.
    pub retention_ms: u64,
    /// The store's offsets: (topic, partition) → the next to read.
    pub resume: HashMap<(String, i32), i64>,
}

/// Where a record was read: what the store records as applied.
#[derive(Debug, Clone)]
pub(super) struct Position {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

/// What the follower saw.
pub(super) enum Event {
    /// A task request.
    Request {
        request: TaskRequest,
        traceparent: Option<String>,
        /// Read from a delay tier: when it is to start (ms since the
        /// epoch).
        scheduled: Option<i64>,
        at: Position,
    },
    /// A task result.
    Result(TaskResult, Position),
    /// A record of a stored topic that changes nothing (too old, not a
    /// task, undecodable): read all the same.
    Skipped(Position),
    /// A step of a task (a task event), with where it was read in the
    /// events topic.
    Step {
        event: TaskEvent,
        partition: i32,
        offset: i64,
    },
    /// Every partition has been read to the end it had at start.
    CaughtUp,
    /// About once a second, for housekeeping, with how many records are
    /// left to read before the follower is caught up.
    Tick { behind: i64 },
}

pub(super) struct Follower {
    reader: Reader,
    codec: Codec,
    result_topics: HashSet<String>,
    events_topic: Option<String>,
    delay_topics: HashSet<String>,
    /// The task topics followed: a tier record bound elsewhere (a retry
    /// waiting out its backoff, bound for a retry topic) is not a task
    /// scheduled for later, and is skipped.
    task_topics: HashSet<String>,
    /// Records of the task and results topics older than this (ms since
    /// the epoch) are skipped.
    start: i64,
    /// Events older than this are skipped.
    events_start: i64,
    /// Partitions not yet read up to the high watermark they had at start:
    /// (that watermark, the next offset to read).
    behind: HashMap<(String, i32), (i64, i64)>,
    /// The followed topics' names, shared by the positions.
    names: HashMap<String, Arc<str>>,
}

impl Follower {
    /// Checks that every topic exists and assigns all their partitions from
    /// `lookback_ms` ago.
    pub fn new(spec: &Spec) -> Result<Self, GatewayError> {
        let kafka_error = |what: &str| {
            let what = what.to_owned();
            move |source| GatewayError::Kafka { what, source }
        };
        let reader = Reader::new(&spec.kafka, "gateway")?;
        let consumer = reader.client();
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(kafka_error("reading the cluster's metadata"))?;
        let mut wanted: Vec<&String> = spec
            .result_topics
            .iter()
            .chain(&spec.task_topics)
            .chain(&spec.delay_topics)
            .chain(&spec.events_topic)
            .collect();
        wanted.sort();
        wanted.dedup();
        let mut missing = Vec::new();
        let ago = |ms: u64| now_millis().saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
        let (start, events_start) = (ago(spec.retention_ms), ago(spec.lookback_ms));
        let is_events = |topic: &str| spec.events_topic.as_deref() == Some(topic);
        let mut times = TopicPartitionList::new();
        let mut events_partitions = 0usize;
        for topic in &wanted {
            let found = metadata.topics().iter().find(|t| {
                t.name() == topic.as_str() && t.error().is_none() && !t.partitions().is_empty()
            });
            match found {
                None => missing.push(topic.as_str()),
                Some(t) => {
                    let from = if is_events(topic) {
                        events_partitions += t.partitions().len();
                        events_start
                    } else {
                        start
                    };
                    for p in t.partitions() {
                        times
                            .add_partition_offset(topic, p.id(), Offset::Offset(from))
                            .map_err(kafka_error("building the assignment"))?;
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Err(GatewayError::Config(format!(
                "these topics do not exist: {} (`conveyor topics create` makes them; or fix [topics], \
                 [[processors]] or [delays]: with enabled = false no delay tier topic is needed)",
                missing.join(", ")
            )));
        }
        let by_time = match consumer.offsets_for_times(times.clone(), Duration::from_secs(10)) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "cannot look up offsets by time; the status view reads the topics from their start");
                times.clone()
            }
        };
        // The events topic: at most the view's share of each partition
        // when the time lookup found nothing (some brokers, librdkafka's
        // mock cluster among them, answer End whatever the time). The
        // stored topics: the store's offset, else the time lookup's, else
        // the start of the partition (records older than the retention are
        // skipped by their timestamp).
        let share = i64::try_from(spec.max_tasks / events_partitions.max(1))
            .unwrap_or(i64::MAX)
            .max(1_000);
        let mut behind = HashMap::new();
        let mut from_offsets = TopicPartitionList::new();
        for e in by_time.elements() {
            let (low, high) = consumer
                .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))
                .map_err(kafka_error("reading the followed topics' watermarks"))?;
            let found = match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            };
            let resume = spec.resume.get(&(e.topic().to_owned(), e.partition()));
            let from = match (is_events(e.topic()), resume, found) {
                (true, _, Some(o)) => o.max(low),
                (true, _, None) => high.saturating_sub(share).max(low),
                (false, Some(next), _) => (*next).clamp(low, high.max(low)),
                (false, None, Some(o)) => o.max(low),
                (false, None, None) => low,
            };
            from_offsets
                .add_partition_offset(e.topic(), e.partition(), Offset::Offset(from))
                .map_err(kafka_error("building the assignment"))?;
            if from < high {
                behind.insert((e.topic().to_owned(), e.partition()), (high, from));
            }
        }
        tracing::debug!(?from_offsets, "status view starts from these offsets");
        reader.assign_list(&from_offsets)?;
        Ok(Follower {
            reader,
            codec: spec.codec,
            result_topics: spec.result_topics.iter().cloned().collect(),
            events_topic: spec.events_topic.clone(),
            delay_topics: spec.delay_topics.iter().cloned().collect(),
            task_topics: spec.task_topics.iter().cloned().collect(),
            start,
            events_start,
            behind,
            names: wanted
                .iter()
                .map(|t| ((*t).clone(), Arc::from(t.as_str())))
                .collect(),
        })
    }

    /// Polls until `stop`, handing what it reads to `apply`.
    pub fn run(mut self, stop: &CancellationToken, mut apply: impl FnMut(Event)) {
        let mut caught_up = false;
        let mut last_tick = Instant::now();
        // Once caught up: the lag of the stored topics, asked of the broker
        // every LAG_EVERY.
        let mut lag = (0, Instant::now());
        while !stop.is_cancelled() {
            if !caught_up && self.behind.is_empty() {
                caught_up = true;
                apply(Event::CaughtUp);
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                let behind = if caught_up {
                    if lag.1.elapsed() >= LAG_EVERY {
                        lag = (self.lag(), Instant::now());
                    }
                    lag.0
                } else {
                    self.behind
                        .values()
                        .map(|(high, next)| high.saturating_sub(*next).max(0))
                        .sum()
                };
                apply(Event::Tick { behind });
                last_tick = Instant::now();
            }
            match self.reader.read(Duration::from_millis(100)) {
                Read::Idle => {}
                Read::End(partition) => self.reached_end(partition),
                Read::Error(error) => {
                    tracing::warn!(%error, "status view: reading the followed topics");
                }
                Read::Record(message) => {
                    if !self.behind.is_empty() {
                        let at = (message.topic().to_owned(), message.partition());
                        let next = message.offset() + 1;
                        match self.behind.get_mut(&at) {
                            Some((high, _)) if next >= *high => {
                                self.behind.remove(&at);
                            }
                            Some((_, read)) => *read = next,
                            None => {}
                        }
                    }
                    if let Some(event) = self.decode(&message) {
                        apply(event);
                    }
                }
            }
        }
    }

    fn decode(&self, message: &BorrowedMessage<'_>) -> Option<Event> {
        let topic = message.topic();
        if self.events_topic.as_deref() == Some(topic) {
            if message
                .timestamp()
                .to_millis()
                .is_some_and(|t| t < self.events_start)
            {
                return None;
            }
            return match crate::codec::event::decode_event(message.payload().unwrap_or_default()) {
                Ok(event) => Some(Event::Step {
                    event,
                    partition: message.partition(),
                    offset: message.offset(),
                }),
                Err(error) => {
                    tracing::debug!(%error, topic, "status view: skipping an undecodable event");
                    None
                }
            };
        }
        let at = Position {
            topic: self
                .names
                .get(topic)
                .cloned()
                .unwrap_or_else(|| Arc::from(topic)),
            partition: message.partition(),
            offset: message.offset(),
        };
        Some(
            self.decode_stored(message, at.clone())
                .unwrap_or(Event::Skipped(at)),
        )
    }

    /// A record of a task, delay or results topic, if it changes anything.
    fn decode_stored(&self, message: &BorrowedMessage<'_>, at: Position) -> Option<Event> {
        if message
            .timestamp()
            .to_millis()
            .is_some_and(|t| t < self.start)
        {
            return None;
        }
        let bytes = message.payload().unwrap_or_default();
        let topic = message.topic();
        if self.result_topics.contains(topic) {
            return match self.codec.decode_result(bytes) {
                Ok(result) => Some(Event::Result(result, at)),
                Err(error) => {
                    tracing::debug!(%error, topic, "status view: skipping an undecodable result");
                    None
                }
            };
        }
        if self.delay_topics.contains(topic)
            && header_text(message, headers::DELAY_DESTINATION)
                .is_some_and(|to| !self.task_topics.contains(to))
        {
            return None;
        }
        match self.codec.decode_request(bytes) {
            Ok(request) => {
                let traceparent = header_text(message, headers::TRACEPARENT).map(str::to_owned);
                let scheduled = if self.delay_topics.contains(topic) {
                    let run_at =
                        header_text(message, headers::RUN_AT).and_then(|v| v.parse::<i64>().ok());
                    // A tier record always says when; one that does not is
                    // at least not queued yet.
                    Some(run_at.unwrap_or(0))
                } else {
                    None
                };
                Some(Event::Request {
                    request,
                    traceparent,
                    scheduled,
                    at,
                })
            }
            Err(error) => {
                tracing::debug!(%error, topic, "status view: skipping an undecodable request");
                None
            }
        }
    }

    /// Records of the task and results topics not read yet: each
    /// partition's high watermark less the reader's position. The broker
    /// is asked for at most [`LAG_BUDGET`] in all (the reading waits
    /// meanwhile): partitions it did not answer for in time count 0.
    fn lag(&self) -> i64 {
        let Ok(position) = self.reader.client().position() else {
            return 0;
        };
        let started = Instant::now();
        let mut lag = 0i64;
        for e in position.elements() {
            let left = LAG_BUDGET.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let Offset::Offset(at) = e.offset() else {
                continue;
            };
            if self.events_topic.as_deref() == Some(e.topic()) {
                continue;
            }
            if let Ok((_, high)) = self.reader.client().fetch_watermarks(
                e.topic(),
                e.partition(),
                left.min(Duration::from_secs(1)),
            ) {
                lag = lag.saturating_add(high.saturating_sub(at).max(0));
            }
        }
        lag
    }

    /// A partition numbered `partition` (of some followed topic) is at its
    /// end: every such partition whose position passed its start-time high
    /// watermark is caught up (offsets can have gaps, so the last record's
    /// offset alone may never reach it).
    fn reached_end(&mut self, partition: i32) {
        if self.behind.is_empty() {
            return;
        }
        let Ok(position) = self.reader.client().position() else {
            return;
        };
        for e in position.elements() {
            if e.partition() != partition {
                continue;
            }
            let at = (e.topic().to_owned(), e.partition());
            if let (Offset::Offset(o), Some((high, _))) = (e.offset(), self.behind.get(&at)) {
                if o >= *high {
                    self.behind.remove(&at);
                }
            }
        }
    }
}

/// The value of header `key` of `message`, if it is UTF-8 text.
fn header_text<'a>(message: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
