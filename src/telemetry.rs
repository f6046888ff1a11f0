//! Logging: a `tracing` subscriber writing human-readable text or JSON lines
//! to standard error.
//!
//! The filter comes from `RUST_LOG` when it is set, otherwise from
//! `log.level` in the configuration; the format from `--log-format`, else
//! `log.format`.

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

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
    /// A global subscriber was already installed.
    #[error("logging was already initialised")]
    AlreadyInitialised,
}

/// Installs the global subscriber. `level` is the configured filter, used
/// when `RUST_LOG` is not set.
pub fn init(format: LogFormat, level: &str) -> Result<(), TelemetryError> {
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    installed.map_err(|_| TelemetryError::AlreadyInitialised)
}
