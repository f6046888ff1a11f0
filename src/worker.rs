//! A worker: every configured processor, run side by side until a stop is
//! requested, then drained in order.

use std::sync::Arc;

use crate::handlers::{Named, Registry};
use crate::metrics::Metrics;
use crate::processor::{self, ProcessorError, ProcessorSpec};
use crate::settings::Settings;
use crate::shutdown::CancellationToken;

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration cannot run a worker.
    #[error("{0}")]
    Config(String),
    /// A processor stopped with an error.
    #[error(transparent)]
    Processor(#[from] ProcessorError),
    /// A processor's task ended abnormally (it panicked or was cancelled):
    /// a run-time failure (exit 1), not the configuration's.
    #[error("a processor task failed: {0}")]
    Crashed(String),
}

/// This process's identity in results and client ids:
/// `<kafka.client_id>-<host>-<pid>`.
pub fn worker_id(client_id: &str) -> String {
    format!("{client_id}-{}-{}", host_name(), std::process::id())
}

/// This machine's host name (the pod's name in Kubernetes).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The processors `settings` describes, ready to run, with the built-in
/// handlers.
pub fn processor_specs(settings: &Settings) -> Result<Vec<ProcessorSpec>, WorkerError> {
    processor_specs_with(settings, &Named::new())
}

/// The processors `settings` describes, ready to run, with the built-in
/// handlers and those of `named`.
pub fn processor_specs_with(
    settings: &Settings,
    named: &Named,
) -> Result<Vec<ProcessorSpec>, WorkerError> {
    if settings.processors.is_empty() {
        return Err(WorkerError::Config(
            "no processors configured: add a [[processors]] section (see conveyor.example.toml)"
                .into(),
        ));
    }
    let codec = crate::kafka::codec_of(settings).map_err(|e| WorkerError::Config(e.to_string()))?;
    let worker = worker_id(&settings.kafka.client_id);
    let workflows = Arc::new(crate::workflow::Workflows::from_settings(settings));
    let metrics = Arc::new(if settings.metrics.enabled {
        Metrics::new()
    } else {
        Metrics::disabled()
    });
    let cancels = settings.cancel.enabled.then(|| {
        Arc::new(crate::control::Cancels::new(
            settings.cancel.clone(),
            settings.kafka.clone(),
            metrics.clone(),
        ))
    });
    // The worker's prefetch budget, shared by its processors.
    let mut kafka = settings.kafka.clone();
    let processors = u64::try_from(settings.processors.len()).unwrap_or(u64::MAX);
    kafka.prefetch_bytes = (settings.kafka.prefetch_bytes / processors.max(1)).max(1);
    settings
        .processors
        .iter()
        .map(|p| {
            let registry = Registry::from_settings_with(p, named)
                .map_err(|e| WorkerError::Config(format!("processor `{}`: {e}", p.name)))?;
            Ok(ProcessorSpec {
                settings: p.clone(),
                kafka: kafka.clone(),
                codec,
                registry,
                worker: worker.clone(),
                status: Default::default(),
                metrics: metrics.clone(),
                lag_interval_ms: settings.metrics.lag_interval_ms,
                workflows: workflows.clone(),
                delay_tiers: settings
                    .delays
                    .enabled
                    .then(|| crate::delay::Tiers::new(&settings.delays)),
                rate_limits: Arc::new(crate::rate::Limits::of(p, |t| {
                    settings.topics.task_topic(t)
                })),
                events: settings.events.clone(),
                cancels: cancels.clone(),
            })
        })
        .collect()
}

/// Runs every processor until `stop` is set (each then drains and commits)
/// or one fails; a failure stops the others too.
pub async fn run(specs: Vec<ProcessorSpec>, stop: CancellationToken) -> Result<(), WorkerError> {
    // A failure stops this worker's processors, not what else `stop` stops.
    let stop = stop.child_token();
    let mut running = tokio::task::JoinSet::new();
    for spec in specs {
        running.spawn(processor::run(spec, stop.clone()));
    }
    let mut first_error = None;
    while let Some(joined) = running.join_next().await {
        let outcome = joined.map_err(|e| WorkerError::Crashed(e.to_string()));
        if let Err(e) = outcome.and_then(|r| r.map_err(WorkerError::from)) {
            stop.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
