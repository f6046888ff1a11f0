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
//! A 408, 429 or 503 with a `Retry-After` (seconds, or an HTTP date) is
//! retried no sooner than it says: the wait replaces the backoff, capped
//! by the type's `max_backoff_ms` (a long one goes through the retry topic
//! like any long backoff).
//!
//! A 2xx body larger than `max_response_bytes` is a permanent error naming
//! its size; the body is read in chunks and never held past the limit.
//!
//! With signing secrets set (`signing_secret_env` / `signing_secret_file`)
//! every request carries `Conveyor-Signature: t=<unix seconds>,v1=<hex>`:
//! HMAC-SHA256, keyed with the secret, of the timestamp, a `.` and the
//! body — the webhook-signature scheme of Stripe and others. With two
//! secrets (a rotation) it carries one `v1=` per secret; a receiver takes
//! the request when any matches one of its own.
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

/// Most secrets in force at once (the current one and the next, while
/// rotating).
pub const MAX_SECRETS: usize = 2;
/// Shortest secret taken, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// The secrets `http` requests are signed with. Never printed: its
/// `Debug` shows only how many there are.
#[derive(Clone)]
pub struct Secrets(Vec<Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} hidden)", self.0.len())
    }
}

impl Secrets {
    /// Reads one secret, or two separated by a comma or a line break
    /// (surrounding white space ignored). The error never quotes them.
    pub fn parse(text: &str) -> Result<Secrets, String> {
        let secrets: Vec<Vec<u8>> = text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        if secrets.is_empty() {
            return Err("holds no secret".into());
        }
        if secrets.len() > MAX_SECRETS {
            return Err(format!(
                "holds {} secrets; at most {MAX_SECRETS} (the current one and the next)",
                secrets.len()
            ));
        }
        if let Some(i) = secrets.iter().position(|s| s.len() < MIN_SECRET_BYTES) {
            return Err(format!(
                "secret {} is shorter than {MIN_SECRET_BYTES} bytes; make one with \
                 `openssl rand -hex 32`",
                i + 1
            ));
        }
        Ok(Secrets(secrets))
    }

    /// The `Conveyor-Signature` value of `body` sent at `at` (seconds
    /// since the epoch): `t=<at>,v1=<hex>` with one `v1` per secret.
    pub fn sign(&self, at: i64, body: &[u8]) -> String {
        use hmac::Mac;
        let mut header = format!("t={at}");
        for secret in &self.0 {
            // HMAC takes keys of any length; this cannot fail.
            let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) else {
                continue;
            };
            mac.update(at.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            header.push_str(",v1=");
            header.push_str(&hex::encode(mac.finalize().into_bytes()));
        }
        header
    }
}

/// The signing secrets a task type's settings point to, read now: from
/// the environment variable `signing_secret_env` or the file
/// `signing_secret_file`; `None` when neither is set. Errors name the
/// setting and the problem, never the secret.
pub fn secrets_of(task: &crate::settings::TaskSettings) -> Result<Option<Secrets>, String> {
    if let Some(name) = &task.signing_secret_env {
        let text = std::env::var(name)
            .map_err(|e| format!("signing_secret_env: the environment variable {name}: {e}"))?;
        return Secrets::parse(&text)
            .map(Some)
            .map_err(|why| format!("signing_secret_env: the environment variable {name} {why}"));
    }
    if let Some(path) = &task.signing_secret_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("signing_secret_file: cannot read {path}: {e}"))?;
        return Secrets::parse(&text)
            .map(Some)
            .map_err(|why| format!("signing_secret_file: {path} {why}"));
    }
    Ok(None)
}

/// POSTs tasks to one URL.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    url: reqwest::Url,
    max_body: u64,
    secrets: Option<Secrets>,
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
            secrets: None,
        })
    }

    /// Signs every request with `secrets` (see the module's docs).
    pub fn signed(mut self, secrets: Secrets) -> Http {
        self.secrets = Some(secrets);
        self
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
            if let Some(secrets) = &self.secrets {
                let now = crate::codec::now_millis().div_euclid(1000);
                request = request.header("Conveyor-Signature", secrets.sign(now, &task.payload));
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
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = self.read_body(response, status).await?;
            if status.is_success() {
                return Ok(Output {
                    bytes: body,
                    content_type,
                });
            }
            let message = format!("POST {} answered {status}: {}", self.url, quote(&body));
            if !is_retryable(status) {
                return Err(HandlerError::Permanent(message));
            }
            let asked = retry_after
                .as_deref()
                .filter(|_| honours_retry_after(status))
                .and_then(|text| parse_retry_after(text, crate::codec::now_millis()));
            Err(match asked {
                Some(after) => HandlerError::RetryAfter { message, after },
                None => HandlerError::Retryable(message),
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

/// The answers whose `Retry-After` is a wait for the same request
/// (RFC 9110 §10.2.3 names 503; RFC 6585 429; 408 closes with it too).
fn honours_retry_after(status: StatusCode) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// Longest `Retry-After` read (a day); past it the processor's
/// `max_backoff_ms` caps it anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// A `Retry-After` value (RFC 9110 §10.2.3): whole seconds, or an HTTP date
/// (a date in the past is no wait). `now_ms`: the time now. Anything else
/// is ignored (the backoff stands).
fn parse_retry_after(text: &str, now_ms: i64) -> Option<Duration> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let at = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    let wait = at.timestamp_millis().saturating_sub(now_ms).max(0);
    Some(Duration::from_millis(u64::try_from(wait).unwrap_or(0)).min(MAX_RETRY_AFTER))
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
    fn retry_after_reads_seconds_and_http_dates() {
        // 2015-10-21T07:28:00Z
        let now = 1_445_412_480_000;
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:03 GMT", now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        for bad in ["", "-5", "1.5", "soon", "Wed, 21 Oct"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn signatures_cover_the_time_and_the_body_with_every_secret() {
        let one = Secrets::parse("0123456789abcdef-one").unwrap();
        let header = one.sign(1_700_000_000, b"{}");
        assert!(header.starts_with("t=1700000000,v1="), "{header}");
        assert_eq!(header.matches("v1=").count(), 1);
        assert_ne!(header, one.sign(1_700_000_001, b"{}"));
        assert_ne!(header, one.sign(1_700_000_000, b"{ }"));
        let two = Secrets::parse(" 0123456789abcdef-one ,\n0123456789abcdef-two\n").unwrap();
        let both = two.sign(1_700_000_000, b"{}");
        assert!(both.starts_with(&header), "{both}");
        assert_eq!(both.matches("v1=").count(), 2);
    }

    #[test]
    fn bad_secrets_are_refused_without_quoting_them() {
        for (text, says) in [
            ("", "no secret"),
            (" , \n", "no secret"),
            ("short-secret", "shorter than 16"),
            (
                "0123456789abcdef,0123456789abcdeg,0123456789abcdeh",
                "at most 2",
            ),
        ] {
            let error = Secrets::parse(text).unwrap_err();
            assert!(error.contains(says), "{text:?}: {error}");
            assert!(
                !error.contains("short-secret") && !error.contains("0123"),
                "{error}"
            );
        }
        let debug = format!("{:?}", Secrets::parse("0123456789abcdef-one").unwrap());
        assert_eq!(debug, "Secrets(1 hidden)");
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
