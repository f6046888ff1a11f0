//! `App`: conveyor as a library. A program registers its own Rust handlers
//! by name, a configuration names them like the built-ins, and `run` does
//! what `conveyor worker` does (conveyor's own binary is this with the
//! built-ins only):
//!
//! ```no_run
//! use conveyor::app::App;
//! use conveyor::handlers::{HandlerError, Output};
//!
//! fn main() -> std::process::ExitCode {
//!     App::from_config("worker.toml")
//!         .handler_fn("shout", |task| async move {
//!             let text = String::from_utf8(task.payload)
//!                 .map_err(|e| HandlerError::Permanent(format!("not UTF-8: {e}")))?;
//!             Ok(Output::text(text.to_uppercase()))
//!         })
//!         .run()
//! }
//! ```
//!
//! with `[processors.tasks.shout] handler = "shout"` in `worker.toml`. A
//! configuration naming a handler the program does not register is a
//! configuration error (exit 2) listing the ones it has.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::codec::TaskRequest;
use crate::handlers::{Handler, HandlerError, Named, Output, TaskContext};
use crate::processor::ProcessorSpec;
use crate::settings::{Settings, SettingsError};
use crate::shutdown::CancellationToken;
use crate::worker::{self, WorkerError};

/// Why an app could not run: the configuration (exit 2) or at run time
/// (exit 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The configuration file could not be read, or is not valid.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The configuration cannot run with this program's handlers, or a
    /// listener cannot bind.
    #[error("{0}")]
    Config(String),
    /// The cluster, a processor or the runtime failed.
    #[error("{0}")]
    Failed(String),
}

impl AppError {
    /// The process exit status for this error: 2 for configuration, 1 for
    /// a run-time failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Settings(_) | AppError::Config(_) => 2,
            AppError::Failed(_) => 1,
        }
    }
}

impl From<WorkerError> for AppError {
    fn from(error: WorkerError) -> Self {
        match error {
            WorkerError::Config(message) => AppError::Config(message),
            other => AppError::Failed(other.to_string()),
        }
    }
}

/// A worker program: a configuration and the handlers it registered.
pub struct App {
    settings: Result<Settings, SettingsError>,
    named: Named,
}

impl App {
    /// An app with the configuration in `path` (layered with the
    /// `CONVEYOR__…` environment variables, as `--config` is). A file that
    /// cannot be loaded is reported by `run`.
    pub fn from_config(path: impl AsRef<Path>) -> App {
        App {
            settings: Settings::load(Some(path.as_ref())),
            named: Named::new(),
        }
    }

    /// An app with these settings.
    pub fn from_settings(settings: Settings) -> App {
        App {
            settings: Ok(settings),
            named: Named::new(),
        }
    }

    /// Registers `handler` under `name`, for configurations to name with
    /// `handler = "<name>"`. A later registration of the same name wins.
    pub fn handler(mut self, name: impl Into<String>, handler: impl Handler) -> App {
        self.named.insert(name.into(), Arc::new(handler));
        self
    }

    /// Registers an async function as the handler `name`: it gets each
    /// attempt's request (id, type, payload, content type, attempt) and
    /// returns the output or a [`HandlerError`] (retryable errors are
    /// retried with backoff, permanent ones are not).
    pub fn handler_fn<F, Fut>(self, name: impl Into<String>, f: F) -> App
    where
        F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Output, HandlerError>> + Send + 'static,
    {
        self.handler(name, FnHandler(f))
    }

    /// The settings, once loaded.
    pub fn settings(&self) -> Result<&Settings, AppError> {
        self.settings
            .as_ref()
            .map_err(|e| AppError::Config(e.to_string()))
    }

    /// The processors this app runs, with their handlers: an error names a
    /// task type whose handler is neither built in nor registered.
    pub fn processor_specs(&self) -> Result<Vec<ProcessorSpec>, AppError> {
        Ok(worker::processor_specs_with(self.settings()?, &self.named)?)
    }

    /// Runs the worker until `stop` is set: connects (failing fast on
    /// authentication or TLS errors), serves `/metrics`, `/healthz` and
    /// `/readyz` on `metrics.listen`, runs every processor, then drains.
    pub async fn run_until(self, stop: CancellationToken) -> Result<(), AppError> {
        let specs = self.processor_specs()?;
        let settings = self.settings?;
        crate::kafka::connect(&settings.kafka)
            .await
            .map_err(AppError::Failed)?;
        serve_probes(&settings, &specs).await?;
        // The delay mover and the scheduler run beside the processors: a
        // failure of any stops them all, and so does `stop`.
        let worker_stop = stop.child_token();
        let companions = Companions::start(&settings, &specs, &stop, &worker_stop);
        let worked = worker::run(specs, worker_stop).await;
        let companions = companions.finish().await;
        worked?;
        companions
    }

    /// Sets up logging from the configuration, runs the worker until
    /// SIGINT or SIGTERM, and returns the process exit status (0, 1 on a
    /// run-time failure, 2 on a configuration error), printing the error.
    pub fn run(self) -> ExitCode {
        let (log, otlp) = match &self.settings {
            Ok(settings) => (settings.log.clone(), settings.otlp.clone()),
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::from(2);
            }
        };
        let _telemetry = match crate::telemetry::init(log.format, &log.level, &otlp) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::from(2);
            }
        };
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("cannot start the async runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        let outcome = runtime.block_on(async {
            let stop = CancellationToken::new();
            crate::shutdown::stop_on_signals(stop.clone());
            self.run_until(stop).await
        });
        runtime.shutdown_timeout(Duration::from_millis(100));
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(error.exit_code())
            }
        }
    }
}

/// Starts the metrics and health listener of `specs` unless
/// `metrics.listen` is empty (with metrics off it still serves the probes;
/// `/metrics` is then all zeros). Returns the address it listens on.
pub async fn serve_probes(
    settings: &Settings,
    specs: &[ProcessorSpec],
) -> Result<Option<SocketAddr>, AppError> {
    let Some(spec) = specs.first() else {
        return Ok(None);
    };
    if settings.metrics.listen.is_empty() {
        return Ok(None);
    }
    let health = crate::health::WorkerHealth {
        processors: specs
            .iter()
            .map(|s| (s.settings.name.clone(), s.status.clone()))
            .collect(),
        stall: Duration::from_millis(settings.metrics.poll_stall_ms),
    };
    let (address, _server) =
        crate::metrics::serve(&settings.metrics.listen, spec.metrics.clone(), Some(health))
            .await
            .map_err(|e| AppError::Config(e.to_string()))?;
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    Ok(Some(address))
}

/// An async function as a [`Handler`].
struct FnHandler<F>(F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(TaskRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Output, HandlerError>> + Send + 'static,
{
    fn handle<'a>(
        &'a self,
        task: &'a TaskRequest,
        _context: &'a TaskContext,
    ) -> BoxFuture<'a, Result<Output, HandlerError>> {
        (self.0)(task.clone()).boxed()
    }
}

/// What runs beside a worker's processors: the delay mover (when
/// `[delays]` is on) and the scheduler (when there are `[[schedules]]`).
pub(crate) struct Companions {
    mover: Option<Beside<crate::delay::MoverError>>,
    scheduler: Option<Beside<crate::schedule::SchedulerError>>,
    /// The worker's reports to the workers topic (`[workers]`).
    presence: Option<crate::workers::Presence>,
}

impl Companions {
    /// Starts them for the worker running `specs`, each stopping when
    /// `stop` is set and setting `on_failure` if it fails (no processor:
    /// nothing started).
    pub(crate) fn start(
        settings: &Settings,
        specs: &[ProcessorSpec],
        stop: &CancellationToken,
        on_failure: &CancellationToken,
    ) -> Self {
        let metrics = specs.first().map(|spec| spec.metrics.clone());
        let presence = metrics.as_ref().and_then(|metrics| {
            crate::workers::Presence::start(
                &settings.workers,
                &settings.kafka,
                specs,
                metrics.clone(),
            )
        });
        let mover = match &metrics {
            Some(metrics) if settings.delays.enabled => {
                let mover_spec = crate::delay::MoverSpec {
                    settings: settings.clone(),
                    metrics: metrics.clone(),
                };
                Some(Beside::spawn(stop, on_failure, move |mover_stop| {
                    crate::delay::run(mover_spec, mover_stop)
                }))
            }
            _ => None,
        };
        let scheduler = match &metrics {
            Some(metrics) if !settings.schedules.is_empty() => {
                let (settings, metrics) = (settings.clone(), metrics.clone());
                Some(Beside::spawn(stop, on_failure, move |scheduler_stop| {
                    crate::schedule::run(settings, metrics, scheduler_stop)
                }))
            }
            _ => None,
        };
        Companions {
            mover,
            scheduler,
            presence,
        }
    }

    /// Stops them and says how they ended: a set-up problem is a
    /// configuration error (exit 2), anything else a run-time failure.
    pub(crate) async fn finish(self) -> Result<(), AppError> {
        // The last report says the worker stopped (its processors have
        // drained by now).
        if let Some(presence) = self.presence {
            presence.stop().await;
        }
        let moved = Beside::finish(self.mover, "the delay mover").await?;
        let scheduled = Beside::finish(self.scheduler, "the scheduler").await?;
        moved.map_err(|e| match e {
            crate::delay::MoverError::Setup(_) => AppError::Config(e.to_string()),
            crate::delay::MoverError::Move { .. } => AppError::Failed(e.to_string()),
        })?;
        scheduled.map_err(|e| match e {
            crate::schedule::SchedulerError::Setup(_) => AppError::Config(e.to_string()),
            crate::schedule::SchedulerError::Fire(_) => AppError::Failed(e.to_string()),
        })
    }
}

/// A task run beside the processors (the delay mover, the scheduler): its
/// failure stops the processors; it stops with them.
struct Beside<E> {
    task: tokio::task::JoinHandle<Result<(), E>>,
    stop: CancellationToken,
}

impl<E: Send + 'static> Beside<E> {
    fn spawn<F, Fut>(stop: &CancellationToken, worker_stop: &CancellationToken, run: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let own_stop = stop.child_token();
        let on_failure = worker_stop.clone();
        let running = run(own_stop.clone());
        let task = tokio::spawn(async move {
            let outcome = running.await;
            if outcome.is_err() {
                on_failure.cancel();
            }
            outcome
        });
        Beside {
            task,
            stop: own_stop,
        }
    }

    /// Stops it (the processors have stopped) and returns how it ended.
    async fn finish(beside: Option<Self>, what: &str) -> Result<Result<(), E>, AppError> {
        let Some(beside) = beside else {
            return Ok(Ok(()));
        };
        beside.stop.cancel();
        beside
            .task
            .await
            .map_err(|e| AppError::Failed(format!("{what} crashed: {e}")))
    }
}
