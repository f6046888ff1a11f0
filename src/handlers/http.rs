//! The `http` handler: POSTs each task to an endpoint of the user's own web
//! application, so handlers can be written in any language.
//!
//! The request body is the task's payload with its `Content-Type`; headers
//! carry `Conveyor-Task-Id`, `Conveyor-Task-Type`, `Conveyor-Attempt` and,
//! when the task has one, the W3C `traceparent`; with `[events]` on,
//! `Conveyor-Progress-Token` too, with which the app may report progress
//! to the gateway (`POST /v1/tasks/{id}/progress`). A task cancelled while
//! its request is out aborts the request (the connection is closed) and
//! ends cancelled. The answer decides the outcome:
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | success; the body is the output, with the response's content type |
//! | 408, 429, 5xx, timeout, connection failure | retryable error |
//! | any other status (4xx, and 3xx: redirects are not followed) | permanent error |
//!
//! A 2xx body larger than `max_response_bytes` is a permanent error naming
//! its size; the body is read in chunks and never held past the limit.
//!
//! One connection pool per handler is reused across tasks.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use reqwest::StatusCode;

use super::{Handler, HandlerError, Output, TaskContext};
use crate::codec::TaskRequest;

/// Most of an error response's body quoted in the error message.
const MAX_QUOTED_BODY: usize = 512;

/// POSTs tasks to one URL.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    url: reqwest::Url,
    max_body: u64,
}

impl Http {
    /// A handler for `url`, each request bounded by `timeout_ms`, each
    /// response body by `max_body` bytes.
    pub fn new(url: &str, timeout_ms: u64, max_body: u64) -> Result<Http, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("url `{url}`: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url `{url}`: scheme must be http or https"));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms))
            .connect_timeout(Duration::from_millis(timeout_ms.min(10_000)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("conveyor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Http {
            client,
            url,
            max_body,
        })
    }
}

impl Handler for Http {
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        let run = async move {
            let mut request = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, &task.content_type)
                .header("Conveyor-Task-Id", task.id.to_string())
                .header("Conveyor-Task-Type", &task.task_type)
                .header("Conveyor-Attempt", task.attempt.to_string())
                .body(task.payload.clone());
            if let Some(traceparent) = &context.traceparent {
                request = request.header("traceparent", traceparent);
            }
            if let Some(token) = context.progress_token() {
                request = request.header("Conveyor-Progress-Token", token);
            }
            let response = request.send().await.map_err(|e| {
                HandlerError::Retryable(format!("POST {}: {}", self.url, describe(&e)))
            })?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            let body = self.read_body(response, status).await?;
            if status.is_success() {
                return Ok(Output {
                    bytes: body,
                    content_type,
                });
            }
            let message = format!("POST {} answered {status}: {}", self.url, quote(&body));
            Err(if is_retryable(status) {
                HandlerError::Retryable(message)
            } else {
                HandlerError::Permanent(message)
            })
        };
        async move {
            tokio::select! {
                biased;
                () = context.cancelled() => Err(HandlerError::Permanent(format!(
                    "the request to {} was aborted: the task was cancelled",
                    self.url
                ))),
                answer = run => answer,
            }
        }
        .boxed()
    }
}

impl Http {
    /// The response's body, read chunk by chunk: past `max_body` bytes the
    /// task fails for good (an error answer's body is only quoted, so just
    /// its start is kept).
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        status: StatusCode,
    ) -> Result<Vec<u8>, HandlerError> {
        let limit = if status.is_success() {
            self.max_body
        } else {
            MAX_QUOTED_BODY as u64 + 4
        };
        let too_large = |size: u64, known: bool| {
            HandlerError::Permanent(format!(
                "POST {} answered {status} with a body of {}{size} bytes, over max_response_bytes ({})",
                self.url,
                if known { "" } else { "more than " },
                self.max_body
            ))
        };
        if let Some(length) = response.content_length().filter(|&l| l > limit) {
            if status.is_success() {
                return Err(too_large(length, true));
            }
        }
        let mut body = Vec::new();
        loop {
            let chunk = response.chunk().await.map_err(|e| {
                HandlerError::Retryable(format!(
                    "POST {}: reading the response body: {}",
                    self.url,
                    describe(&e)
                ))
            })?;
            let Some(chunk) = chunk else {
                return Ok(body);
            };
            let room = usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .saturating_sub(body.len());
            if chunk.len() > room {
                if !status.is_success() {
                    // Enough to quote.
                    body.extend_from_slice(chunk.get(..room).unwrap_or_default());
                    return Ok(body);
                }
                return Err(too_large((body.len() + chunk.len()) as u64, false));
            }
            body.extend_from_slice(&chunk);
        }
    }
}

/// 408 Request Timeout, 429 Too Many Requests and server errors may pass.
fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

fn describe(error: &reqwest::Error) -> String {
    use std::error::Error;
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "cannot connect".to_owned()
    } else {
        error.to_string()
    };
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The start of a response body, for an error message.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(MAX_QUOTED_BODY);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text.get(..end) {
        Some(head) if end < text.len() => format!("{head}…"),
        _ => text.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        for code in [408u16, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [301u16, 400, 401, 403, 404, 409, 422] {
            assert!(!is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }

    #[test]
    fn long_bodies_are_cut_on_a_character_boundary() {
        let body = "é".repeat(400);
        let quoted = quote(body.as_bytes());
        assert!(quoted.ends_with('…'));
        assert!(quoted.len() <= MAX_QUOTED_BODY + '…'.len_utf8());
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(Http::new("ftp://x/y", 1000, 1)
            .unwrap_err()
            .contains("scheme"));
        assert!(Http::new("not a url", 1000, 1).is_err());
    }
}
