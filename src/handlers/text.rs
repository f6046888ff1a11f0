//! Built-in handlers for the demo workflow of `conveyor dev` (split a text,
//! count the words of each part in parallel, add the counts up), also
//! useful for trying fan-out and join with no code: `split_lines`,
//! `word_count` and `sum`.

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::Deserialize;

use super::{Handler, HandlerError, Output, TaskContext};
use crate::codec::TaskRequest;

/// Most lines a `split_lines` part may hold.
const MAX_LINES_PER_PART: usize = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitPayload {
    text: String,
    #[serde(default = "one")]
    lines: usize,
}

fn one() -> usize {
    1
}

/// Splits `payload.text` into parts of `payload.lines` lines (default 1)
/// and returns them as a JSON array of strings: a fan-out step.
#[derive(Debug, Clone, Copy, Default)]
pub struct SplitLines;

/// Runs `f`, which computes the output right away, as a handler's future.
fn at_once<'a>(
    f: impl FnOnce() -> Result<serde_json::Value, HandlerError>,
) -> BoxFuture<'a, Result<Output, HandlerError>> {
    std::future::ready(f().map(|v| super::builtin::json_output(&v))).boxed()
}

impl Handler for SplitLines {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        at_once(|| {
            let payload: SplitPayload = super::builtin::parse_json(
                &task.payload,
                "split_lines",
                r#"{"text": "one line\nanother", "lines": 1}"#,
            )?;
            if !(1..=MAX_LINES_PER_PART).contains(&payload.lines) {
                return Err(HandlerError::Permanent(format!(
                    "split_lines: payload.lines is {}; must be 1 to {MAX_LINES_PER_PART}",
                    payload.lines
                )));
            }
            let lines: Vec<&str> = payload.text.lines().collect();
            let parts: Vec<String> = lines
                .chunks(payload.lines)
                .map(|chunk| chunk.join("\n"))
                .collect();
            Ok(serde_json::json!(parts))
        })
    }
}

/// Counts the whitespace-separated words of the payload, a JSON string (or
/// `{"text": "..."}`), and returns the count as a JSON number.
#[derive(Debug, Clone, Copy, Default)]
pub struct WordCount;

impl Handler for WordCount {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        at_once(|| {
            let value: serde_json::Value = super::builtin::parse_json(
                &task.payload,
                "word_count",
                r#""some words" or {"text": "some words"}"#,
            )?;
            let text = match &value {
                serde_json::Value::String(s) => s.as_str(),
                serde_json::Value::Object(o) => match o.get("text") {
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    _ => {
                        return Err(HandlerError::Permanent(
                            "word_count: payload.text must be a string".into(),
                        ))
                    }
                },
                _ => {
                    return Err(HandlerError::Permanent(
                        "word_count: payload must be a JSON string or {\"text\": \"...\"}".into(),
                    ))
                }
            };
            let words = text.split_whitespace().count();
            Ok(serde_json::json!(words))
        })
    }
}

/// Adds up the payload, a JSON array of numbers (a join's input), and
/// returns the sum: an integer when every element is one, else a float.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sum;

impl Handler for Sum {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        at_once(|| {
            let values: Vec<serde_json::Value> =
                super::builtin::parse_json(&task.payload, "sum", "[1, 2, 3.5]")?;
            let mut integer: Option<i64> = Some(0);
            let mut float = 0.0f64;
            for (i, value) in values.iter().enumerate() {
                let serde_json::Value::Number(n) = value else {
                    return Err(HandlerError::Permanent(format!(
                        "sum: payload[{i}] is not a number: {value}"
                    )));
                };
                integer = integer.zip(n.as_i64()).and_then(|(a, b)| a.checked_add(b));
                float += n.as_f64().unwrap_or(f64::NAN);
            }
            let sum = match integer {
                Some(i) => serde_json::json!(i),
                None => serde_json::json!(float),
            };
            Ok(sum)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(handler: &dyn Handler, payload: &str) -> Result<String, HandlerError> {
        let task = TaskRequest::new("t", payload.as_bytes().to_vec());
        let out = handler.handle(&task, &TaskContext::default()).await?;
        Ok(String::from_utf8(out.bytes).unwrap())
    }

    #[tokio::test]
    async fn split_count_and_sum_make_a_word_count() {
        let parts = run(&SplitLines, r#"{"text": "a b\nc\n\nd e f", "lines": 1}"#)
            .await
            .unwrap();
        assert_eq!(parts, r#"["a b","c","","d e f"]"#);
        let two = run(&SplitLines, r#"{"text": "a\nb\nc", "lines": 2}"#)
            .await
            .unwrap();
        assert_eq!(two, r#"["a\nb","c"]"#);
        assert_eq!(run(&WordCount, r#""d e  f""#).await.unwrap(), "3");
        assert_eq!(run(&WordCount, r#"{"text": ""}"#).await.unwrap(), "0");
        assert_eq!(run(&Sum, "[2, 1, 0, 3]").await.unwrap(), "6");
        assert_eq!(run(&Sum, "[]").await.unwrap(), "0");
        assert_eq!(run(&Sum, "[1, 0.5]").await.unwrap(), "1.5");
    }

    #[tokio::test]
    async fn bad_payloads_say_what_is_wrong() {
        let err = run(&SplitLines, r#"{"text": "a", "lines": 0}"#)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            HandlerError::Permanent("split_lines: payload.lines is 0; must be 1 to 100000".into())
        );
        let err = run(&WordCount, "[1]").await.unwrap_err();
        assert_eq!(err.kind().as_str(), "permanent");
        let err = run(&Sum, r#"[1, "2"]"#).await.unwrap_err();
        assert_eq!(
            err,
            HandlerError::Permanent(r#"sum: payload[1] is not a number: "2""#.into())
        );
        let err = run(&Sum, &format!("[{}, 1]", i64::MAX)).await.unwrap();
        assert!(
            err.contains('e') || err.contains('.'),
            "overflow falls back to a float: {err}"
        );
    }
}
