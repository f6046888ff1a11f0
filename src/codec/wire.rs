//! conveyor's wire contract besides the Avro values: the names of the
//! record headers and request metadata keys it reads and writes, in one
//! place, and the plumbing for header lists.
//!
//! Dead letters carry why and where the task failed; retry-topic records
//! carry when they are due and where the task first came from, so that a
//! task that hops through the retry topic is still reported against its
//! original topic, partition and offset. `traceparent` (W3C trace context)
//! is passed along on every record a task causes.

use rdkafka::message::{Header, Headers, OwnedHeaders};

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
/// Delayed tasks (in a delay tier, and on their task topic once moved):
/// not to start before this time (ms since the epoch).
pub const RUN_AT: &str = "conveyor.run_at";
/// Delayed tasks in a delay tier: the task topic they go to when due.
pub const DELAY_DESTINATION: &str = "conveyor.delay.topic";

/// Request metadata: the idempotency key a submission gave (the gateway
/// writes it; a workflow's later steps do not inherit it).
pub const IDEMPOTENCY_KEY: &str = "conveyor.idempotency_key";
/// Request metadata of a join step: a child failed (its error).
pub const CHILD_FAILED: &str = "conveyor.workflow.child_failed";

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
