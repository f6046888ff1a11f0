//! `conveyor dlq`: list, inspect and replay dead letters.
//!
//! A dead letter is the original task record (value and key unchanged) with
//! headers saying why it failed, how often it ran, and where it was first
//! read (see [`crate::codec::wire`]). Replaying one produces the
//! request again to its original topic with the attempt number reset to 1.
//! Replays are not de-duplicated: replaying the same dead letters twice runs
//! their tasks twice (with the same task ids), so select with the filters.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Offset;
use serde_json::json;

use crate::codec::render::embed_bytes;
use crate::codec::wire as h;
use crate::codec::{Codec, DecodeError, TaskRequest};
use crate::kafka;
use crate::kafka::{codec_of, kafka_error, ClientError, Read, Reader};
use crate::settings::Settings;

/// One dead letter as read back.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// The original record key.
    pub key: Option<Vec<u8>>,
    /// The original record value.
    pub value: Vec<u8>,
    /// Every header, as text.
    pub headers: BTreeMap<String, String>,
    /// The value decoded as a task request, if it is one.
    pub request: Result<TaskRequest, DecodeError>,
}

impl DeadLetter {
    fn from_message(record: &BorrowedMessage<'_>, codec: &Codec) -> DeadLetter {
        let value = record.payload().unwrap_or_default().to_vec();
        let headers = record
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|hd| {
                        let v = hd.value.map(|v| String::from_utf8_lossy(v).into_owned());
                        (hd.key.to_owned(), v.unwrap_or_default())
                    })
                    .collect()
            })
            .unwrap_or_default();
        DeadLetter {
            partition: record.partition(),
            offset: record.offset(),
            key: record.key().map(<[u8]>::to_vec),
            request: codec.decode_request(&value),
            value,
            headers,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// The task type, when the request decodes.
    pub fn task_type(&self) -> Option<&str> {
        self.request.as_ref().ok().map(|r| r.task_type.as_str())
    }

    /// The error kind header.
    pub fn kind(&self) -> Option<&str> {
        self.header(h::ERROR_KIND)
    }

    /// One line for `dlq list`.
    pub fn summary(&self) -> serde_json::Value {
        json!({
            "partition": self.partition,
            "offset": self.offset,
            "id": self.request.as_ref().ok().map(|r| r.id.to_string()),
            "type": self.task_type(),
            "kind": self.kind(),
            "error": self.header(h::ERROR_MESSAGE),
            "attempts": self.header(h::ATTEMPTS),
            "original": format!(
                "{}/{}/{}",
                self.header(h::ORIGINAL_TOPIC).unwrap_or("?"),
                self.header(h::ORIGINAL_PARTITION).unwrap_or("?"),
                self.header(h::ORIGINAL_OFFSET).unwrap_or("?"),
            ),
        })
    }

    /// Everything, for `dlq show`: headers and the decoded request.
    pub fn detail(&self) -> serde_json::Value {
        let mut value = json!({
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "headers": self.headers,
        });
        if let Some(map) = value.as_object_mut() {
            match &self.request {
                Ok(r) => {
                    let mut request = serde_json::Map::new();
                    request.insert("id".into(), json!(r.id.to_string()));
                    request.insert("type".into(), json!(r.task_type));
                    request.insert("key".into(), json!(r.key));
                    request.insert("content_type".into(), json!(r.content_type));
                    request.insert("attempt".into(), json!(r.attempt));
                    request.insert("submitted_at".into(), json!(r.submitted_at));
                    request.insert("deadline".into(), json!(r.deadline));
                    request.insert("metadata".into(), json!(r.metadata));
                    embed_bytes(&mut request, "payload", &r.payload, &r.content_type);
                    map.insert("request".into(), serde_json::Value::Object(request));
                }
                Err(e) => {
                    map.insert("undecodable".into(), json!(e.to_string()));
                    embed_bytes(map, "value", &self.value, "application/octet-stream");
                }
            }
        }
        value
    }
}

/// Which dead letters a command applies to; unset fields match all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Partition of the dead-letter topic.
    pub partition: Option<i32>,
    /// Lowest offset, inclusive.
    pub from_offset: Option<i64>,
    /// Highest offset, inclusive.
    pub to_offset: Option<i64>,
    /// Task type.
    pub task_type: Option<String>,
    /// Error kind.
    pub kind: Option<String>,
}

impl Filter {
    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.partition.is_none_or(|p| p == letter.partition)
            && self.from_offset.is_none_or(|o| letter.offset >= o)
            && self.to_offset.is_none_or(|o| letter.offset <= o)
            && self
                .task_type
                .as_deref()
                .is_none_or(|t| letter.task_type() == Some(t))
            && self
                .kind
                .as_deref()
                .is_none_or(|k| letter.kind() == Some(k))
    }
}

/// The dead letters of a topic that a [`Filter`] selects, read one
/// partition after the other in offset order, one record at a time: memory
/// stays flat however many there are. A partition filter reads only that
/// partition, and `from_offset` seeks to it.
pub struct Letters {
    reader: Reader,
    topic: String,
    filter: Filter,
    codec: Codec,
    /// Partitions still to read, in order.
    partitions: std::collections::VecDeque<i32>,
    /// The partition being read.
    current: Option<i32>,
    /// When reading gives up (see [`Letters::stop_at`]).
    deadline: Option<std::time::Instant>,
    /// Whether it gave up at the deadline.
    cut_short: bool,
}

impl Letters {
    /// Opens `topic` for reading with `filter`.
    pub fn open(settings: &Settings, topic: &str, filter: &Filter) -> Result<Letters, ClientError> {
        let codec = codec_of(settings)?;
        let reader = Reader::new(&settings.kafka, "dlq")?;
        let partitions = reader
            .partitions(topic)?
            .into_iter()
            .filter(|p| filter.partition.is_none_or(|only| only == *p))
            .collect();
        Ok(Letters {
            reader,
            topic: topic.to_owned(),
            filter: filter.clone(),
            codec,
            partitions,
            current: None,
            deadline: None,
            cut_short: false,
        })
    }

    /// Stops reading at `deadline`: [`Letters::next_letter`] then answers
    /// `None` as at the end, and [`Letters::cut_short`] says so (the
    /// dashboard bounds its reads with it).
    pub fn stop_at(&mut self, deadline: std::time::Instant) {
        self.deadline = Some(deadline);
    }

    /// Whether reading stopped at the deadline rather than at the end.
    pub fn cut_short(&self) -> bool {
        self.cut_short
    }

    /// The next selected dead letter, or `None` after the last.
    pub fn next_letter(&mut self) -> Result<Option<DeadLetter>, ClientError> {
        loop {
            if self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
            {
                self.cut_short = true;
                return Ok(None);
            }
            let partition = match self.current {
                Some(p) => p,
                None => match self.partitions.pop_front() {
                    None => return Ok(None),
                    Some(p) => {
                        self.assign(p)?;
                        p
                    }
                },
            };
            match self.reader.read(Duration::from_millis(200)) {
                Read::Idle => {}
                Read::End(p) if p == partition => self.current = None,
                Read::End(_) => {}
                Read::Error(e) => return Err(kafka_error(format!("reading {}", self.topic))(e)),
                Read::Record(message) if message.partition() == partition => {
                    if self
                        .filter
                        .to_offset
                        .is_some_and(|to| message.offset() >= to)
                    {
                        // Nothing past `to_offset` is wanted here.
                        self.current = None;
                    }
                    if self
                        .filter
                        .to_offset
                        .is_some_and(|to| message.offset() > to)
                    {
                        continue;
                    }
                    let letter = DeadLetter::from_message(&message, &self.codec);
                    if self.filter.matches(&letter) {
                        return Ok(Some(letter));
                    }
                }
                Read::Record(_) => {}
            }
        }
    }

    fn assign(&mut self, partition: i32) -> Result<(), ClientError> {
        let start = self
            .filter
            .from_offset
            .map_or(Offset::Beginning, |o| Offset::Offset(o.max(0)));
        self.reader.assign(&self.topic, &[partition], start)?;
        self.current = Some(partition);
        Ok(())
    }
}

/// Replays dead letters to their original topics with the attempt reset
/// to 1, or (dry run) only says what it would do.
pub struct Replayer {
    codec: Codec,
    /// `None`: a dry run.
    producer: Option<FutureProducer>,
}

impl Replayer {
    /// A replayer for `settings`' cluster; a dry run produces nothing.
    pub fn new(settings: &Settings, dry_run: bool) -> Result<Replayer, ClientError> {
        let producer = if dry_run {
            None
        } else {
            Some(
                kafka::producer_config(&settings.kafka)
                    .create()
                    .map_err(kafka_error("creating the producer"))?,
            )
        };
        Ok(Replayer {
            codec: codec_of(settings)?,
            producer,
        })
    }

    /// Replays `letters`; one line per letter saying what happened to it.
    pub async fn replay(
        &self,
        letters: &[DeadLetter],
    ) -> Result<Vec<serde_json::Value>, ClientError> {
        replay(&self.codec, self.producer.as_ref(), letters).await
    }
}

async fn replay(
    codec: &Codec,
    producer: Option<&FutureProducer>,
    letters: &[DeadLetter],
) -> Result<Vec<serde_json::Value>, ClientError> {
    let mut report = Vec::new();
    for letter in letters {
        let mut line = json!({ "partition": letter.partition, "offset": letter.offset });
        let outcome = match (&letter.request, letter.header(h::ORIGINAL_TOPIC)) {
            (Err(e), _) => Err(format!(
                "skipped: not a task request ({e}); fix and produce it by hand"
            )),
            (Ok(_), None) => Err(format!("skipped: no {} header", h::ORIGINAL_TOPIC)),
            (Ok(request), Some(topic)) => Ok((request, topic)),
        };
        match outcome {
            Err(why) => {
                line["status"] = json!(why);
            }
            Ok((request, topic)) => {
                line["id"] = json!(request.id.to_string());
                line["to"] = json!(topic);
                let mut fresh = request.clone();
                fresh.attempt = 1;
                let mut value = Vec::new();
                codec.encode_request(&fresh, &mut value);
                match producer {
                    None => line["status"] = json!("would replay"),
                    Some(producer) => {
                        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(&value);
                        if let Some(key) = &letter.key {
                            record = record.key(key);
                        }
                        producer
                            .send(record, Duration::from_secs(30))
                            .await
                            .map_err(|(e, _)| kafka_error(format!("replaying to {topic}"))(e))?;
                        line["status"] = json!("replayed");
                    }
                }
            }
        }
        report.push(line);
    }
    Ok(report)
}
