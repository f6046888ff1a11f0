//! Logging and tracing: a `tracing` subscriber writing human-readable text
//! or JSON lines to standard error, and — when `otlp.endpoint` is set — an
//! OpenTelemetry layer exporting spans over OTLP/HTTP (protobuf).
//!
//! The filter comes from `RUST_LOG` when it is set, otherwise from
//! `log.level` in the configuration; the format from `--log-format`, else
//! `log.format`. Exported spans pass the same filter.
//!
//! Each task's span is made a child of the W3C `traceparent` its request
//! carried ([`link_to_traceparent`]), so a trace started by a web
//! application continues through conveyor's workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, OtlpSettings};

/// Whether spans are exported, so the per-task parent lookup is skipped
/// when they are not.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// How long shutting down waits for the last spans to be sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The level or filter does not parse.
    #[error("log filter `{filter}` from {source_name}: {reason}")]
    BadFilter {
        /// The filter text.
        filter: String,
        /// Where it came from (`RUST_LOG` or `log.level`).
        source_name: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// The OTLP exporter could not be built.
    #[error("otlp.endpoint `{endpoint}`: {reason}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// The exporter's complaint.
        reason: String,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadyInitialised,
}

/// Keeps the span exporter running; dropping it sends the spans still
/// buffered (waiting up to a few seconds) and stops it.
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
                eprintln!("conveyor: could not send the last spans: {error}");
            }
        }
    }
}

/// Installs the global subscriber. `level` is the configured filter, used
/// when `RUST_LOG` is not set; `otlp` switches span export on when its
/// endpoint is not empty.
pub fn init(
    format: LogFormat,
    level: &str,
    otlp: &OtlpSettings,
) -> Result<Telemetry, TelemetryError> {
    let (filter_text, source_name) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
        _ => (level.to_owned(), "log.level"),
    };
    let filter =
        EnvFilter::builder()
            .parse(&filter_text)
            .map_err(|e| TelemetryError::BadFilter {
                filter: filter_text.clone(),
                source_name,
                reason: e.to_string(),
            })?;
    let provider = exporter(otlp)?;
    let spans = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("conveyor")));
    // Colours only on a terminal: escape codes in a log file or a
    // collector's stream are noise, and cost a formatting pass per field.
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(spans)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialised)?;
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

fn exporter(otlp: &OtlpSettings) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    if otlp.endpoint.is_empty() {
        return Ok(None);
    }
    let failed = |reason: String| TelemetryError::Exporter {
        endpoint: otlp.endpoint.clone(),
        reason,
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(otlp.endpoint.clone())
        .with_timeout(Duration::from_millis(otlp.timeout_ms))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(otlp.service_name.clone())
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// The target of each task's span while spans are not exported: the span
/// is then at `debug`, so at the default `info` a worker creates none (the
/// text subscriber formatted its seven fields into a string on every task,
/// about as many instructions as the rest of the task's work; see
/// BENCHMARKS.md). `log.level = "info,conveyor::task_span=debug"` (or
/// `RUST_LOG`) puts it back on every log line of a task.
pub const TASK_SPAN_TARGET: &str = "conveyor::task_span";

/// Whether spans are exported over OTLP: each task then has its span at
/// `info`, as the export needs.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `span` a child of the remote span named by `traceparent` (W3C
/// trace context, version 00), when spans are exported and the value is
/// well formed; otherwise does nothing.
pub fn link_to_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if !EXPORTING.load(Ordering::Relaxed) {
        return;
    }
    let Some(remote) = traceparent.and_then(parse_traceparent) else {
        return;
    };
    let context = opentelemetry::Context::new().with_remote_span_context(remote);
    // Fails only without the OpenTelemetry layer, which EXPORTING rules out.
    let _ = span.set_parent(context);
}

/// The span context a W3C `traceparent` names, if it is well formed
/// ([`crate::trace_context::parse`]).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let parts = crate::trace_context::parse(value)?;
    let context = SpanContext::new(
        TraceId::from_hex(parts.trace_id).ok()?,
        SpanId::from_hex(parts.parent_id).ok()?,
        TraceFlags::new(parts.flags),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_into_span_contexts() {
        let context =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        assert!(context.is_remote());
        // What is well formed is trace_context's to say (tested there);
        // here, that a refusal there is no span context here.
        for bad in [
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} parsed");
        }
    }
}
