//! The status view's source: a consumer outside any group that reads the
//! results and task topics from a look-back point and follows them.

use std::collections::{HashMap, HashSet};
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
    pub lookback_ms: u64,
    /// The view's capacity: how far back to read a partition whose
    /// timestamp lookup found nothing.
    pub max_tasks: usize,
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
    },
    /// A task result.
    Result(TaskResult),
    /// A step of a task (a task event), with where it was read in the
    /// events topic.
    Step {
        event: TaskEvent,
        partition: i32,
        offset: i64,
    },
    /// Every partition has been read to the end it had at start.
    CaughtUp,
    /// About once a second, for housekeeping.
    Tick,
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
    /// Records older than this (ms since the epoch) are skipped.
    start: i64,
    /// Partitions not yet read up to the high watermark they had at start,
    /// with that watermark.
    behind: HashMap<(String, i32), i64>,
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
        let start =
            now_millis().saturating_sub(i64::try_from(spec.lookback_ms).unwrap_or(i64::MAX));
        let mut times = TopicPartitionList::new();
        for topic in &wanted {
            let found = metadata.topics().iter().find(|t| {
                t.name() == topic.as_str() && t.error().is_none() && !t.partitions().is_empty()
            });
            match found {
                None => missing.push(topic.as_str()),
                Some(t) => {
                    for p in t.partitions() {
                        times
                            .add_partition_offset(topic, p.id(), Offset::Offset(start))
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
        let partitions = times.count();
        let assignment = match consumer.offsets_for_times(times.clone(), Duration::from_secs(10)) {
            Ok(found) => {
                // No record at or after the time: start at the end.
                let mut list = TopicPartitionList::new();
                for e in found.elements() {
                    let offset = match e.offset() {
                        Offset::Offset(o) if o >= 0 => Offset::Offset(o),
                        _ => Offset::End,
                    };
                    list.add_partition_offset(e.topic(), e.partition(), offset)
                        .map_err(kafka_error("building the assignment"))?;
                }
                list
            }
            Err(error) => {
                tracing::warn!(%error, "cannot look up offsets by time; the status view reads the topics from their start");
                let mut list = TopicPartitionList::new();
                for e in times.elements() {
                    list.add_partition_offset(e.topic(), e.partition(), Offset::Beginning)
                        .map_err(kafka_error("building the assignment"))?;
                }
                list
            }
        };
        // A lookup that finds no record after the time answers End; some
        // brokers (librdkafka's mock cluster) answer End whatever the time.
        // Either way, read back at most this view's share of the partition
        // and skip what is older than the look-back by record timestamp.
        let share = i64::try_from(spec.max_tasks / partitions.max(1))
            .unwrap_or(i64::MAX)
            .max(1_000);
        let mut behind = HashMap::new();
        let mut from_offsets = TopicPartitionList::new();
        for e in assignment.elements() {
            let (low, high) = consumer
                .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))
                .map_err(kafka_error("reading the followed topics' watermarks"))?;
            let from = match e.offset() {
                Offset::Offset(o) => o.max(low),
                _ => high.saturating_sub(share).max(low),
            };
            from_offsets
                .add_partition_offset(e.topic(), e.partition(), Offset::Offset(from))
                .map_err(kafka_error("building the assignment"))?;
            if from < high {
                behind.insert((e.topic().to_owned(), e.partition()), high);
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
            behind,
        })
    }

    /// Polls until `stop`, handing what it reads to `apply`.
    pub fn run(mut self, stop: &CancellationToken, mut apply: impl FnMut(Event)) {
        let mut caught_up = false;
        let mut last_tick = Instant::now();
        while !stop.is_cancelled() {
            if !caught_up && self.behind.is_empty() {
                caught_up = true;
                apply(Event::CaughtUp);
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                apply(Event::Tick);
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
                        if self
                            .behind
                            .get(&at)
                            .is_some_and(|high| message.offset() + 1 >= *high)
                        {
                            self.behind.remove(&at);
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
                Ok(result) => Some(Event::Result(result)),
                Err(error) => {
                    tracing::debug!(%error, topic, "status view: skipping an undecodable result");
                    None
                }
            };
        }
        if self.events_topic.as_deref() == Some(topic) {
            return match crate::codec::event::decode_event(bytes) {
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
                })
            }
            Err(error) => {
                tracing::debug!(%error, topic, "status view: skipping an undecodable request");
                None
            }
        }
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
            if let (Offset::Offset(o), Some(high)) = (e.offset(), self.behind.get(&at)) {
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
