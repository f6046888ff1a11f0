//! `[gateway]`: the HTTP API's listener, limits and tokens, with their
//! checks.

use super::*;

/// `[gateway]`: the HTTP front door (`conveyor gateway`, and part of
/// `conveyor dev`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Address the API listens on (`host:port`). `/metrics` is served here
    /// too.
    pub listen: String,
    /// Task types the gateway accepts besides those of `[[processors]]`
    /// (for a gateway whose configuration runs no processor). Each goes to
    /// `<topics.task_prefix><type>`.
    pub task_types: Vec<String>,
    /// Bearer tokens accepted on `/v1/…`; empty: no authentication.
    /// `/healthz`, `/readyz`, `/metrics` and `/openapi.json` stay open.
    pub auth_tokens: Vec<String>,
    /// A file of bearer tokens, one per line (blank lines and lines
    /// starting with `#` skipped), read at start into `auth_tokens`: a
    /// mounted Secret, so that no token sits in the configuration. Not
    /// with `auth_tokens`.
    pub auth_tokens_file: String,
    /// On SIGTERM, keep serving this long (milliseconds) while `/readyz`
    /// answers 503, then close the listener: a load balancer or a
    /// Kubernetes Service stops sending requests in the meantime, so none
    /// is refused during a rolling update. 0: close at once.
    pub shutdown_delay_ms: u64,
    /// Largest `payload` of one task, in bytes of JSON text (413 above).
    pub max_payload_bytes: usize,
    /// Largest request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Most tasks in one `POST /v1/tasks:batch`.
    pub max_batch: usize,
    /// Longest a request may take before it is answered 503, in
    /// milliseconds.
    pub request_timeout_ms: u64,
    /// Longest `?wait=` honoured, in milliseconds; below
    /// `request_timeout_ms`.
    pub max_wait_ms: u64,
    /// Longest a submitted task waits for the broker's acknowledgement
    /// before the request is answered 503 (librdkafka's
    /// `message.timeout.ms` of the gateway's producer).
    pub produce_timeout_ms: u64,
    /// How long an `idempotency_key` maps to its first task, in
    /// milliseconds.
    pub idempotency_window_ms: u64,
    /// At start, how far back the status view reads the events topic, in
    /// milliseconds (the task and results topics resume where the status
    /// store left off, or go back `retention_ms` for a new store).
    pub view_lookback_ms: u64,
    /// Most tasks the in-memory part of the status view keeps (live tasks,
    /// their events, the latest results); older ones are answered from the
    /// status store.
    pub view_max_tasks: usize,
    /// Longest the in-memory view keeps a task, in milliseconds.
    pub view_max_age_ms: u64,
    /// Most bytes of outputs, errors and events the in-memory view keeps.
    pub view_max_bytes: usize,
    /// The status store's file (SQLite). Empty: a temporary file removed
    /// when the gateway stops (`conveyor dev`, tests); a deployed gateway
    /// sets a path on a volume, so a restart resumes where it left off.
    pub store_path: String,
    /// How long the status store keeps a task after its latest record, in
    /// milliseconds (default 7 days); older tasks answer 404.
    pub retention_ms: u64,
    /// Most bytes of the status store in use; beyond it the oldest tasks
    /// are removed first.
    pub store_max_bytes: u64,
    /// Longest output the status store keeps whole, in bytes; a longer one
    /// is kept cut to it, marked with its full size (`result_truncated`).
    pub store_max_output_bytes: usize,
    /// Most open `GET /v1/tasks/{id}/events` streams; beyond it a new one
    /// is answered 503 naming this limit.
    pub max_event_streams: usize,
    /// The dashboard under `/ui` (on by default; behind `auth_tokens`
    /// when they are set, with a login form).
    pub ui: bool,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            listen: "127.0.0.1:8080".into(),
            task_types: Vec::new(),
            auth_tokens: Vec::new(),
            auth_tokens_file: String::new(),
            shutdown_delay_ms: 0,
            max_payload_bytes: 1 << 20,
            max_body_bytes: 8 << 20,
            max_batch: 100,
            request_timeout_ms: 30_000,
            max_wait_ms: 25_000,
            produce_timeout_ms: 5_000,
            idempotency_window_ms: 3_600_000,
            view_lookback_ms: 3_600_000,
            view_max_tasks: 10_000,
            view_max_age_ms: 3_600_000,
            view_max_bytes: 64 << 20,
            store_path: String::new(),
            retention_ms: 7 * 24 * 3_600_000,
            store_max_bytes: 16 << 30,
            store_max_output_bytes: 64 << 10,
            max_event_streams: 1000,
            ui: true,
        }
    }
}

impl Settings {
    pub(super) fn validate_gateway(&self, bad: &mut impl FnMut(String, &str)) {
        let g = &self.gateway;
        if g.listen.parse::<std::net::SocketAddr>().is_err() {
            bad(
                "gateway.listen".into(),
                "must be an IP address and port, like 127.0.0.1:8080",
            );
        }
        for (i, task_type) in g.task_types.iter().enumerate() {
            if let Err(why) = check_topic_name(task_type) {
                bad(
                    format!("gateway.task_types[{i}]"),
                    &format!("task type {why}"),
                );
            }
        }
        for (i, token) in g.auth_tokens.iter().enumerate() {
            if !token_fits(token) {
                bad(
                    format!("gateway.auth_tokens[{i}]"),
                    "must be at least 16 printable ASCII characters without spaces",
                );
            }
        }
        if g.shutdown_delay_ms > MAX_SHUTDOWN_DELAY_MS {
            bad(
                "gateway.shutdown_delay_ms".into(),
                &format!("must be at most {MAX_SHUTDOWN_DELAY_MS} (a minute)"),
            );
        }
        for (key, zero) in [
            ("gateway.max_payload_bytes", g.max_payload_bytes == 0),
            ("gateway.max_body_bytes", g.max_body_bytes == 0),
            ("gateway.max_batch", g.max_batch == 0),
            ("gateway.view_max_tasks", g.view_max_tasks == 0),
            ("gateway.view_max_bytes", g.view_max_bytes == 0),
            ("gateway.max_event_streams", g.max_event_streams == 0),
            ("gateway.request_timeout_ms", g.request_timeout_ms == 0),
            ("gateway.produce_timeout_ms", g.produce_timeout_ms == 0),
            (
                "gateway.idempotency_window_ms",
                g.idempotency_window_ms == 0,
            ),
            ("gateway.view_max_age_ms", g.view_max_age_ms == 0),
            ("gateway.retention_ms", g.retention_ms == 0),
            (
                "gateway.store_max_output_bytes",
                g.store_max_output_bytes == 0,
            ),
        ] {
            if zero {
                bad(key.into(), "must be > 0");
            }
        }
        if g.store_max_bytes < 1 << 20 {
            bad(
                "gateway.store_max_bytes".into(),
                "must be at least 1048576 (1 MiB)",
            );
        }
        if g.max_wait_ms >= g.request_timeout_ms {
            bad(
                "gateway.max_wait_ms".into(),
                &format!(
                    "must be below gateway.request_timeout_ms ({}), or a long poll is cut off",
                    g.request_timeout_ms
                ),
            );
        }
        if g.produce_timeout_ms >= g.request_timeout_ms {
            bad(
                "gateway.produce_timeout_ms".into(),
                &format!(
                    "must be below gateway.request_timeout_ms ({}), so a broker outage is answered 503 with its reason",
                    g.request_timeout_ms
                ),
            );
        }
    }
}

/// Whether `token` may be a bearer token: at least 16 printable ASCII
/// characters, no spaces (whether from `auth_tokens` or its file).
fn token_fits(token: &str) -> bool {
    token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Longest `gateway.shutdown_delay_ms`.
pub const MAX_SHUTDOWN_DELAY_MS: u64 = 60_000;

impl GatewaySettings {
    /// Reads `auth_tokens_file` into `auth_tokens`. An error names the key
    /// and the line, never a token.
    pub fn read_token_file(&mut self) -> Result<(), (String, String)> {
        if self.auth_tokens_file.is_empty() {
            return Ok(());
        }
        let key = "gateway.auth_tokens_file".to_owned();
        if !self.auth_tokens.is_empty() {
            return Err((
                key,
                "set either auth_tokens or auth_tokens_file, not both".into(),
            ));
        }
        let path = &self.auth_tokens_file;
        let text = std::fs::read_to_string(path)
            .map_err(|e| (key.clone(), format!("cannot read {path}: {e}")))?;
        for (n, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if !token_fits(token) {
                return Err((
                    key,
                    format!(
                        "{path} line {}: a token must be at least 16 printable ASCII characters without spaces",
                        n + 1
                    ),
                ));
            }
            self.auth_tokens.push(token.to_owned());
        }
        if self.auth_tokens.is_empty() {
            return Err((key, format!("{path} holds no token")));
        }
        Ok(())
    }
}
