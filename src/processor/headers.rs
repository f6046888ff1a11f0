//! What the engine reads from a record's headers (their names, and the
//! helpers for header lists, are `codec::wire`'s, re-exported here).

use rdkafka::message::{Headers, Message};

pub use crate::codec::wire::*;

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

fn text<'a, M: Message>(message: &'a M, name: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn number<T: std::str::FromStr, M: Message>(message: &M, name: &str) -> Option<T> {
    text(message, name).and_then(|t| t.trim().parse().ok())
}

/// Reads conveyor's headers; malformed ones are ignored, never an error.
pub fn read<M: Message>(message: &M) -> Incoming {
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
