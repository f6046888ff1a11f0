//! `[log]`, `[metrics]` and `[otlp]`: what a worker tells its operators,
//! with their checks.

use super::*;

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// Level or `tracing` filter (`info`, `conveyor=debug,rdkafka=warn`).
    /// The `RUST_LOG` environment variable, when set, wins.
    pub level: String,
    /// `text` for people, `json` for log pipelines; `--log-format` wins.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Whether workers record metrics at all. `false` records none and
    /// serves no `/metrics` (it exists to measure what recording costs).
    pub enabled: bool,
    /// Address of the `/metrics` listener (`host:port`); empty: none.
    pub listen: String,
    /// How often consumer lag is refreshed from librdkafka's statistics, in
    /// milliseconds.
    pub lag_interval_ms: u64,
    /// A worker's `/healthz` fails when a processor's poll loop has not gone
    /// round for this long, in milliseconds (a consumer that is alive but
    /// has silently stopped consuming). Must exceed every processor's
    /// `drain_timeout_ms`: a revoke blocks the poll loop while it drains.
    pub poll_stall_ms: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            lag_interval_ms: 5_000,
            poll_stall_ms: 60_000,
        }
    }
}

/// `[otlp]`: exporting `tracing` spans (one per task, children of the
/// request's `traceparent`) to an OpenTelemetry collector over OTLP/HTTP
/// with protobuf bodies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpSettings {
    /// Full URL spans are posted to, e.g. `http://127.0.0.1:4318/v1/traces`;
    /// empty: no export.
    pub endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// How long one export request may take, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for OtlpSettings {
    fn default() -> Self {
        OtlpSettings {
            endpoint: String::new(),
            service_name: "conveyor".into(),
            timeout_ms: 10_000,
        }
    }
}

impl Settings {
    /// The problems of `[log]`, `[metrics]` and `[otlp]`.
    pub(super) fn validate_telemetry(&self, bad: &mut impl FnMut(String, &str)) {
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            bad(
                "metrics.listen".into(),
                "must be an IP address and port, like 127.0.0.1:9464 (or \"\" for none)",
            );
        }
        let endpoint = &self.otlp.endpoint;
        let web_url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !endpoint.is_empty() && !web_url {
            bad(
                "otlp.endpoint".into(),
                "must be an http:// or https:// URL, like http://127.0.0.1:4318/v1/traces (or \"\" for no export)",
            );
        }
        if self.otlp.service_name.trim().is_empty() {
            bad("otlp.service_name".into(), "must not be empty");
        }
        if self.otlp.timeout_ms == 0 {
            bad("otlp.timeout_ms".into(), "must be at least 1");
        }
        if self.metrics.lag_interval_ms < 100 {
            bad("metrics.lag_interval_ms".into(), "must be at least 100");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            bad("log.level".into(), &format!("not a valid filter: {e}"));
        }
    }
}
