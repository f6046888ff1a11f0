//! The built-in handlers that need no outside service: `echo`, `sleep` and
//! `sha256`. They exist for demos, tests and benchmarks: `echo` measures the
//! engine alone, `sleep` stands in for I/O-bound work, `sha256` for
//! CPU-bound work.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Deserialize;
use sha2::Digest;

use super::{Handler, HandlerError, Output, TaskContext};
use crate::codec::TaskRequest;

/// Returns the payload unchanged, with its content type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Handler for Echo {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        let output = Output {
            bytes: task.payload.clone(),
            content_type: task.content_type.clone(),
        };
        std::future::ready(Ok(output)).boxed()
    }
}

/// Most a `sleep` task may ask for: an hour.
const MAX_SLEEP_MS: u64 = 3_600_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepPayload {
    ms: u64,
}

/// Waits `payload.ms` milliseconds (payload `{"ms": 250}`), then returns
/// `{"slept_ms": 250}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleep;

impl Handler for Sleep {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            let payload: SleepPayload = parse_json(&task.payload, "sleep", r#"{"ms": 250}"#)?;
            if payload.ms > MAX_SLEEP_MS {
                return Err(HandlerError::Permanent(format!(
                    "sleep: payload.ms is {}; at most {MAX_SLEEP_MS}",
                    payload.ms
                )));
            }
            // A cancelled task stops sleeping at once.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(payload.ms)) => {}
                () = context.cancelled() => {
                    return Err(HandlerError::Permanent("sleep: cancelled, woke early".into()));
                }
            }
            Ok(json_output(&serde_json::json!({ "slept_ms": payload.ms })))
        }
        .boxed()
    }
}

/// Most rounds a `sha256` task may ask for (a few seconds of one core).
const MAX_ROUNDS: u64 = 10_000_000;
const DEFAULT_ROUNDS: u64 = 1_000;

#[derive(Deserialize)]
struct Sha256Payload {
    rounds: Option<u64>,
}

/// Hashes the payload, then the hash, `rounds` times in all (payload
/// `{"rounds": 100000}`, default 1000; other fields are hashed along), and
/// returns `{"rounds": N, "sha256": "<hex>"}`. Runs on the blocking pool so
/// it does not hold up other tasks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sha256;

impl Handler for Sha256 {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        async move {
            let payload: Sha256Payload =
                parse_json(&task.payload, "sha256", r#"{"rounds": 100000}"#)?;
            let rounds = payload.rounds.unwrap_or(DEFAULT_ROUNDS);
            if !(1..=MAX_ROUNDS).contains(&rounds) {
                return Err(HandlerError::Permanent(format!(
                    "sha256: payload.rounds is {rounds}; must be 1 to {MAX_ROUNDS}"
                )));
            }
            let input = task.payload.clone();
            let digest = tokio::task::spawn_blocking(move || {
                let mut digest = sha2::Sha256::digest(&input);
                for _ in 1..rounds {
                    digest = sha2::Sha256::digest(digest);
                }
                hex::encode(digest)
            })
            .await
            .map_err(|e| HandlerError::Retryable(format!("sha256: worker thread failed: {e}")))?;
            Ok(json_output(
                &serde_json::json!({ "rounds": rounds, "sha256": digest }),
            ))
        }
        .boxed()
    }
}

/// Parses a JSON payload; a bad one is a permanent error that shows the
/// expected shape.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    handler: &str,
    example: &str,
) -> Result<T, HandlerError> {
    serde_json::from_slice(payload).map_err(|e| {
        HandlerError::Permanent(format!(
            "{handler}: payload is not the expected JSON ({e}); expected e.g. {example}"
        ))
    })
}

pub(super) fn json_output(value: &serde_json::Value) -> Output {
    Output {
        bytes: value.to_string().into_bytes(),
        content_type: "application/json".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(handler: &dyn Handler, payload: &str) -> Result<Output, HandlerError> {
        let task = TaskRequest::new("t", payload.as_bytes().to_vec());
        handler.handle(&task, &TaskContext::default()).await
    }

    #[tokio::test]
    async fn echo_returns_the_payload() {
        let out = run(&Echo, r#"{"a":1}"#).await.unwrap();
        assert_eq!(out.bytes, br#"{"a":1}"#);
        assert_eq!(out.content_type, "application/json");
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_waits_the_asked_time() {
        let started = tokio::time::Instant::now();
        let out = run(&Sleep, r#"{"ms": 1500}"#).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
        assert_eq!(out.bytes, br#"{"slept_ms":1500}"#);
    }

    #[tokio::test]
    async fn bad_payloads_are_permanent_errors_that_say_why() {
        let err = run(&Sleep, r#"{"msec": 5}"#).await.unwrap_err();
        assert!(
            matches!(&err, HandlerError::Permanent(m) if m.contains("unknown field `msec`")),
            "{err}"
        );
        let err = run(&Sleep, "not json").await.unwrap_err();
        assert_eq!(err.kind().as_str(), "permanent");
        let err = run(&Sha256, r#"{"rounds": 0}"#).await.unwrap_err();
        assert_eq!(
            err,
            HandlerError::Permanent("sha256: payload.rounds is 0; must be 1 to 10000000".into())
        );
    }

    #[tokio::test]
    async fn sha256_hashes_repeatedly() {
        let payload = r#"{"rounds": 3}"#;
        let out = run(&Sha256, payload).await.unwrap();
        let mut expected = sha2::Sha256::digest(payload.as_bytes());
        expected = sha2::Sha256::digest(expected);
        expected = sha2::Sha256::digest(expected);
        let value: serde_json::Value = serde_json::from_slice(&out.bytes).unwrap();
        assert_eq!(value["sha256"], hex::encode(expected));
        assert_eq!(value["rounds"], 3);
    }
}
