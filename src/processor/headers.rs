//! Record headers conveyor reads and writes, beside the Avro value.
//!
//! Dead letters carry why and where the task failed; retry-topic records
//! carry when they are due and where the task first came from, so that a
//! task that hops through the retry topic is still reported against its
//! original topic, partition and offset. `traceparent` (W3C trace context)
//! is passed along on every record a task causes.

use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};

/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Dead letters: the failure class (`permanent`, `timeout`, `decode`…).
pub const ERROR_KIND: &str = "conveyor.error.kind";
/// Dead letters: the failure, in words.
pub const ERROR_MESSAGE: &str = "conveyor.error.message";
/// Dead letters: how many attempts ran.
pub const ATTEMPTS: &str = "conveyor.attempts";
/// Where the task was first read: topic.
pub const ORIGINAL_TOPIC: &str = "conveyor.original.topic";
/// Where the task was first read: partition.
pub const ORIGINAL_PARTITION: &str = "conveyor.original.partition";
/// Where the task was first read: offset.
pub const ORIGINAL_OFFSET: &str = "conveyor.original.offset";
/// Where the task was first read: the record's timestamp (ms).
pub const ORIGINAL_TIMESTAMP: &str = "conveyor.original.timestamp";
/// Dead letters: the processor that gave up.
pub const PROCESSOR: &str = "conveyor.processor";
/// Dead letters: the worker that gave up.
pub const WORKER: &str = "conveyor.worker";
/// When the task first failed (ms since the epoch).
pub const FIRST_FAILURE_AT: &str = "conveyor.failure.first_at";
/// Dead letters: when the task failed for the last time (ms).
pub const LAST_FAILURE_AT: &str = "conveyor.failure.last_at";
/// Dead letters whose payload was cut to fit the dead-letter topic: the
/// payload's size in bytes before it was cut. Absent when it is whole.
pub const ORIGINAL_SIZE: &str = "conveyor.original.size";
/// Retry-topic records: not to run before this time (ms since the epoch).
pub const NOT_BEFORE: &str = "conveyor.retry.not_before";

/// Where a record was first read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record timestamp in ms, if it had one.
    pub timestamp: Option<i64>,
}

/// What conveyor reads from a record's headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// Set on retry-topic records.
    pub not_before: Option<i64>,
    /// Set on retry-topic records: where the task was first read.
    pub origin: Option<Origin>,
    /// Set on retry-topic records.
    pub first_failure_at: Option<i64>,
}

fn text<'a>(message: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn number<T: std::str::FromStr>(message: &BorrowedMessage<'_>, name: &str) -> Option<T> {
    text(message, name).and_then(|t| t.trim().parse().ok())
}

/// Reads conveyor's headers; malformed ones are ignored, never an error.
pub fn read(message: &BorrowedMessage<'_>) -> Incoming {
    if message.headers().is_none() {
        return Incoming::default();
    }
    let origin = match (
        text(message, ORIGINAL_TOPIC),
        number(message, ORIGINAL_PARTITION),
        number(message, ORIGINAL_OFFSET),
    ) {
        (Some(topic), Some(partition), Some(offset)) => Some(Origin {
            topic: topic.to_owned(),
            partition,
            offset,
            timestamp: number(message, ORIGINAL_TIMESTAMP),
        }),
        _ => None,
    };
    Incoming {
        traceparent: text(message, TRACEPARENT).map(str::to_owned),
        not_before: number(message, NOT_BEFORE),
        origin,
        first_failure_at: number(message, FIRST_FAILURE_AT),
    }
}

/// The value of header `key` in `headers`, as text.
pub fn value(headers: &OwnedHeaders, key: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// `headers` with header `key` set to `value` (replacing it if present).
pub fn replace(headers: OwnedHeaders, key: &str, value: &str) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(headers.count() + 1);
    for h in headers.iter().filter(|h| h.key != key) {
        out = out.insert(Header {
            key: h.key,
            value: h.value,
        });
    }
    out.insert(Header {
        key,
        value: Some(value.as_bytes()),
    })
}

/// Builds a header list from name/value pairs, skipping absent values.
pub fn build<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<String>)>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for (key, value) in pairs {
        if let Some(value) = value {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
    }
    headers
}
