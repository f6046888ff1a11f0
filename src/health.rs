//! A worker's health probes, served beside `/metrics` on `metrics.listen`:
//!
//! - `/healthz` (liveness): every processor's poll loop went round within
//!   `metrics.poll_stall_ms`. A consumer whose poll loop is stuck (a
//!   blocked callback, a lock never released) looks alive to the broker
//!   until its session times out, and may never recover: restart it.
//! - `/readyz` (readiness): every processor owns at least one partition
//!   and none stopped on an error retrying cannot fix.
//!
//! Each answers 200 `{"status":"ok"}` or 503 `{"status":…,"reason":…}`
//! naming the processor and what is wrong.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::processor::ProcessorStatus;

/// The processors a worker runs, by name, and how long a poll loop may go
/// without going round.
#[derive(Debug, Clone)]
pub struct WorkerHealth {
    /// Each processor's name and live figures.
    pub processors: Vec<(String, Arc<ProcessorStatus>)>,
    /// Longest time a poll loop may not go round before `/healthz` fails.
    pub stall: Duration,
}

impl WorkerHealth {
    /// `Ok`, or why the worker should be restarted.
    pub fn live(&self) -> Result<(), String> {
        for (name, status) in &self.processors {
            if let Some(since) = status.since_last_poll() {
                if since > self.stall {
                    return Err(format!(
                        "processor `{name}`: the poll loop has not gone round for {} ms (metrics.poll_stall_ms = {})",
                        since.as_millis(),
                        self.stall.as_millis()
                    ));
                }
            }
        }
        Ok(())
    }

    /// `Ok`, or why the worker should not count as ready.
    pub fn ready(&self) -> Result<(), String> {
        for (name, status) in &self.processors {
            if status.failed() {
                return Err(format!(
                    "processor `{name}` stopped on an error (see the log)"
                ));
            }
            if status.assigned_partitions() == 0 {
                return Err(format!("processor `{name}` owns no partition yet"));
            }
        }
        Ok(())
    }

    /// `/healthz` and `/readyz`.
    pub fn routes(self) -> Router {
        let live = self.clone();
        Router::new()
            .route(
                "/healthz",
                get(move || {
                    let outcome = live.live();
                    async move { answer(outcome, "stalled") }
                }),
            )
            .route(
                "/readyz",
                get(move || {
                    let outcome = self.ready();
                    async move { answer(outcome, "not_ready") }
                }),
            )
    }
}

fn answer(outcome: Result<(), String>, bad: &str) -> (StatusCode, Json<serde_json::Value>) {
    match outcome {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": bad, "reason": reason})),
        ),
    }
}
