//! `[events]` (the task events topic: started, progress, retrying,
//! cancelled) and `[cancel]` (the compacted control topic that carries
//! cancellations to every worker) and `[workers]` (the compacted topic
//! every worker reports itself to, for `GET /v1/workers` and the
//! dashboard).

use super::*;

/// `[events]`: workers write each task's life to an events topic, which
/// the gateway folds into its status view (`running`, progress) and its
/// event streams.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    /// Workers write events and gateways read them (on by default). Off:
    /// no events topic is needed; a task looks `queued` until its result
    /// and progress is refused.
    pub enabled: bool,
    /// The events topic, keyed by task id.
    pub topic: String,
    /// Largest progress value (JSON text) a handler may report, in bytes;
    /// a larger one is refused to the handler with an error.
    pub progress_max_bytes: usize,
    /// Shortest time between two progress events of one task, in ms: a
    /// handler reporting more often has its reports coalesced, the last
    /// one always written.
    pub progress_interval_ms: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            enabled: true,
            topic: "conveyor.events".into(),
            progress_max_bytes: 4096,
            progress_interval_ms: 200,
        }
    }
}

/// Most `progress_max_bytes`: 64 KiB.
pub const MAX_PROGRESS_BYTES: usize = 64 * 1024;

/// `[cancel]`: cancellations, written to a compacted control topic that
/// every worker reads whole.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CancelSettings {
    /// Tasks can be cancelled (on by default). Off: no control topic is
    /// needed and a cancellation is refused.
    pub enabled: bool,
    /// The control topic (compacted), keyed by task or workflow-run id.
    pub topic: String,
    /// A cancellation is forgotten this long after it was made, in ms
    /// (1 day by default); `conveyor topics create` gives the control topic
    /// this retention.
    pub max_age_ms: u64,
    /// Most cancellations a worker keeps; past it the oldest are forgotten
    /// (counted in `conveyor_cancellations_dropped_total`).
    pub max_entries: usize,
    /// How long a running handler asked to stop has to answer before it is
    /// dropped, in ms.
    pub grace_ms: u64,
}

impl Default for CancelSettings {
    fn default() -> Self {
        CancelSettings {
            enabled: true,
            topic: "conveyor.control".into(),
            max_age_ms: 24 * 3600 * 1000,
            max_entries: 100_000,
            grace_ms: 5_000,
        }
    }
}

impl EventSettings {
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, &str)) {
        if let Err(why) = check_topic_name(&self.topic) {
            bad("events.topic".into(), &why);
        }
        if !(1..=MAX_PROGRESS_BYTES).contains(&self.progress_max_bytes) {
            bad(
                "events.progress_max_bytes".into(),
                &format!("must be 1 to {MAX_PROGRESS_BYTES}"),
            );
        }
        if self.progress_interval_ms > 60_000 {
            bad(
                "events.progress_interval_ms".into(),
                "must be at most 60000",
            );
        }
    }
}

impl CancelSettings {
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, &str)) {
        if let Err(why) = check_topic_name(&self.topic) {
            bad("cancel.topic".into(), &why);
        }
        if self.max_age_ms < 1_000 {
            bad("cancel.max_age_ms".into(), "must be at least 1000");
        }
        if !(1..=10_000_000).contains(&self.max_entries) {
            bad("cancel.max_entries".into(), "must be 1 to 10000000");
        }
        if self.grace_ms > 600_000 {
            bad("cancel.grace_ms".into(), "must be at most 600000");
        }
    }
}

/// `[workers]`: every worker process reports itself (processors,
/// partitions, lag, in flight, tasks a second) to a compacted topic;
/// gateways list them at `GET /v1/workers` and on the dashboard.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Workers report and gateways read (on by default). Off: no workers
    /// topic is needed and no worker is listed.
    pub enabled: bool,
    /// The workers topic (compacted), keyed by worker id.
    pub topic: String,
    /// How often a worker reports, in ms; a worker silent for three
    /// intervals is listed as gone.
    pub report_interval_ms: u64,
    /// Most workers a gateway lists; past it the one heard from least
    /// recently is dropped (`conveyor_gateway_workers_dropped_total`).
    pub max_workers: usize,
    /// A gone worker is listed this long after its last report, in ms (1
    /// hour by default); `conveyor topics create` gives the workers topic
    /// this retention.
    pub forget_after_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            enabled: true,
            topic: "conveyor.workers".into(),
            report_interval_ms: 5_000,
            max_workers: 1_000,
            forget_after_ms: 3_600_000,
        }
    }
}

impl WorkerSettings {
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, &str)) {
        if let Err(why) = check_topic_name(&self.topic) {
            bad("workers.topic".into(), &why);
        }
        if !(100..=300_000).contains(&self.report_interval_ms) {
            bad("workers.report_interval_ms".into(), "must be 100 to 300000");
        }
        if !(1..=100_000).contains(&self.max_workers) {
            bad("workers.max_workers".into(), "must be 1 to 100000");
        }
        if self.forget_after_ms < self.report_interval_ms.saturating_mul(3) {
            bad(
                "workers.forget_after_ms".into(),
                "must be at least three report intervals (workers.report_interval_ms)",
            );
        }
    }
}
