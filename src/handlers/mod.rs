//! Handlers: the code that runs a task. The [`Handler`] trait for Rust code,
//! a [`Registry`] from task type to handler, and the built-ins the binary
//! offers by name: `echo`, `sleep`, `sha256` and `http`.
//!
//! A handler returns an [`Output`] or a [`HandlerError`] that says whether
//! trying again could help ([`HandlerError::Retryable`]) or not
//! ([`HandlerError::Permanent`]). The engine enforces the per-attempt
//! timeout and catches panics, so a handler need not.

mod builtin;
mod http;
mod text;

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::codec::TaskRequest;
use crate::settings::{HandlerKind, ProcessorSettings};

pub use builtin::{Echo, Sha256, Sleep};
pub use http::{secrets_of as http_secrets, Http, Secrets};

/// What a successful task produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The output bytes (the result's `output`).
    pub bytes: Vec<u8>,
    /// Their media type (the result's `content_type`).
    pub content_type: String,
}

impl Output {
    /// A JSON output (`application/json`).
    pub fn json(bytes: impl Into<Vec<u8>>) -> Output {
        Output {
            bytes: bytes.into(),
            content_type: crate::codec::DEFAULT_CONTENT_TYPE.into(),
        }
    }

    /// A text output (`text/plain; charset=utf-8`).
    pub fn text(text: impl Into<String>) -> Output {
        Output {
            bytes: text.into().into_bytes(),
            content_type: "text/plain; charset=utf-8".into(),
        }
    }
}

/// Why a task failed, and whether another attempt could succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// A passing condition (a timeout, an unavailable service): worth
    /// another attempt.
    #[error("{0}")]
    Retryable(String),
    /// The task itself is wrong (a malformed payload, a refused request):
    /// another attempt would fail the same way.
    #[error("{0}")]
    Permanent(String),
    /// Worth another attempt, not before `after` (an HTTP `Retry-After`):
    /// the wait replaces the backoff, capped by the task type's
    /// `max_backoff_ms`; a long one goes through the retry topic as a
    /// long backoff would.
    #[error("{message}")]
    RetryAfter {
        /// Why it failed.
        message: String,
        /// The shortest wait before the next attempt.
        after: std::time::Duration,
    },
}

impl HandlerError {
    /// The failure class as written in a result's `error.kind`.
    pub fn kind(&self) -> crate::codec::FailureKind {
        match self {
            HandlerError::Retryable(_) | HandlerError::RetryAfter { .. } => {
                crate::codec::FailureKind::Retryable
            }
            HandlerError::Permanent(_) => crate::codec::FailureKind::Permanent,
        }
    }

    /// The wait the handler asked for before another attempt, if any.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            HandlerError::RetryAfter { after, .. } => Some(*after),
            _ => None,
        }
    }
}

/// Where the task came from and what travels with it, beside the request:
/// its trace context, whether it has been cancelled, and a way to report
/// progress.
#[derive(Clone, Default)]
pub struct TaskContext {
    /// W3C trace context of the request record, if it had one.
    pub traceparent: Option<String>,
    cancel: Option<CancellationToken>,
    progress: Option<Arc<dyn ProgressSink>>,
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("traceparent", &self.traceparent)
            .field("cancelled", &self.is_cancelled())
            .field("reports_progress", &self.progress.is_some())
            .finish()
    }
}

/// Where a task's progress reports go (the engine's events topic).
pub trait ProgressSink: Send + Sync {
    /// Reports `value` (JSON text): written now, or coalesced with the
    /// next report when reports come faster than the configured interval
    /// (the last one is always written).
    fn report(&self, value: Vec<u8>) -> Result<(), ProgressError>;
    /// The attempt's progress token, which the gateway's
    /// `POST /v1/tasks/{id}/progress` asks for.
    fn token(&self) -> &str;
}

/// A progress report that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProgressError {
    /// The value's JSON text is larger than `events.progress_max_bytes`.
    #[error("progress: the value is {size} bytes of JSON; events.progress_max_bytes allows {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// The task's events are not written (`[events]` is off, or the
    /// handler runs outside the engine).
    #[error("progress: this task has no events topic to report to ([events] enabled = false)")]
    Off,
}

impl TaskContext {
    /// A context with this trace context, never cancelled, reporting
    /// progress nowhere (for running a handler outside the engine).
    pub fn new(traceparent: Option<String>) -> Self {
        TaskContext {
            traceparent,
            ..TaskContext::default()
        }
    }

    /// The engine's context: `cancel` is cancelled when the task is.
    pub(crate) fn running(
        traceparent: Option<String>,
        cancel: Option<CancellationToken>,
        progress: Option<Arc<dyn ProgressSink>>,
    ) -> Self {
        TaskContext {
            traceparent,
            cancel,
            progress,
        }
    }

    /// Whether the task has been cancelled (`POST /v1/tasks/{id}:cancel`
    /// or `conveyor cancel`): a handler that sees it should stop and
    /// return an error; it is dropped after `cancel.grace_ms` otherwise.
    pub fn is_cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// Completes when the task is cancelled (never, when it is not).
    pub async fn cancelled(&self) {
        match &self.cancel {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Reports how far the task got: any JSON value, such as
    /// `{"done": 37, "of": 120}`, shown by `GET /v1/tasks/{id}` and the
    /// task's event stream. Reports closer together than
    /// `events.progress_interval_ms` are coalesced (the last one always
    /// lands); a value over `events.progress_max_bytes` is refused.
    pub fn progress(&self, value: &serde_json::Value) -> Result<(), ProgressError> {
        let sink = self.progress.as_ref().ok_or(ProgressError::Off)?;
        sink.report(value.to_string().into_bytes())
    }

    /// The attempt's progress token, for a handler that reports through
    /// the gateway instead (the `http` handler sends it to the user's app
    /// in the `Conveyor-Progress-Token` header).
    pub fn progress_token(&self) -> Option<&str> {
        self.progress.as_ref().map(|p| p.token())
    }
}

/// Runs tasks of one or more types.
///
/// `handle` may be called concurrently for different tasks. The returned
/// future may be dropped before it completes (on timeout or shutdown): it
/// must not leave shared state half-changed when cancelled.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of `task`.
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>>;
}

/// Task type → handler.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut types: Vec<&String> = self.handlers.keys().collect();
        types.sort();
        f.debug_struct("Registry").field("types", &types).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `task_type`, replacing any earlier one.
    pub fn register(&mut self, task_type: impl Into<String>, handler: Arc<dyn Handler>) {
        self.handlers.insert(task_type.into(), handler);
    }

    /// The handler of `task_type`.
    pub fn get(&self, task_type: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(task_type)
    }

    /// The built-in handlers a processor's `tasks` table names.
    pub fn from_settings(processor: &ProcessorSettings) -> Result<Registry, HandlerBuildError> {
        Self::from_settings_with(processor, &Named::new())
    }

    /// The handlers a processor's `tasks` table names: built-ins, and
    /// those of `named` (handlers the program registered by name). A
    /// name that is neither is an error listing the ones there are.
    pub fn from_settings_with(
        processor: &ProcessorSettings,
        named: &Named,
    ) -> Result<Registry, HandlerBuildError> {
        let mut registry = Registry::new();
        for (task_type, task) in &processor.tasks {
            let handler: Arc<dyn Handler> = match &task.handler {
                HandlerKind::Custom(name) => match named.get(name) {
                    Some(handler) => handler.clone(),
                    None => {
                        let mut known: Vec<&str> = HandlerKind::BUILT_IN.to_vec();
                        known.extend(named.keys().map(String::as_str));
                        known.sort_unstable();
                        return Err(HandlerBuildError {
                            task_type: task_type.clone(),
                            message: format!(
                                "no handler `{name}` in this program; it has: {}",
                                known.join(", ")
                            ),
                        });
                    }
                },
                HandlerKind::Echo => Arc::new(Echo),
                HandlerKind::Sleep => Arc::new(Sleep),
                HandlerKind::Sha256 => Arc::new(Sha256),
                HandlerKind::SplitLines => Arc::new(text::SplitLines),
                HandlerKind::WordCount => Arc::new(text::WordCount),
                HandlerKind::Sum => Arc::new(text::Sum),
                HandlerKind::Http => {
                    let url = task.url.as_deref().ok_or_else(|| HandlerBuildError {
                        task_type: task_type.clone(),
                        message: "the http handler needs a url".into(),
                    })?;
                    let failed = |message| HandlerBuildError {
                        task_type: task_type.clone(),
                        message,
                    };
                    let mut http =
                        Http::new(url, task.timeout_ms, task.max_response_bytes).map_err(failed)?;
                    if let Some(secrets) = http_secrets(task).map_err(failed)? {
                        http = http.signed(secrets);
                    }
                    Arc::new(http)
                }
            };
            registry.register(task_type.clone(), handler);
        }
        Ok(registry)
    }
}

/// Handlers a program registered by name, for configurations to name
/// (`handler = "<name>"`).
pub type Named = std::collections::BTreeMap<String, Arc<dyn Handler>>;

/// A handler that could not be built from its settings.
#[derive(Debug, Clone, thiserror::Error)]
#[error("task type `{task_type}`: {message}")]
pub struct HandlerBuildError {
    /// The task type whose handler failed.
    pub task_type: String,
    /// Why.
    pub message: String,
}
