//! The engine's metric handles: looked up once per processor, and every
//! series created at zero when it starts.

use std::collections::HashMap;

use super::delivery;
use crate::metrics::Metrics;
use crate::settings::ProcessorSettings;

/// Metric handles looked up once, for what the engine records per record
/// (a `with_label_values` lookup hashes every label each time). `None`
/// and empty with metrics off.
#[derive(Default)]
pub(super) struct Hot {
    pub(super) in_flight: Option<prometheus::IntGauge>,
    pub(super) paused: Option<prometheus::IntGauge>,
    pub(super) unsplit: Option<prometheus::IntGauge>,
    pub(super) metadata_refused: Option<prometheus::IntCounter>,
    pub(super) breaker_open: Option<prometheus::IntGauge>,
    /// By [`delivery::Record`].
    pub(super) produced: Option<[prometheus::IntCounter; 4]>,
    pub(super) produce_retries: Option<prometheus::IntCounter>,
    /// Records skipped because they finished before this assignment.
    pub(super) skipped: Option<prometheus::IntCounter>,
    /// Commits whose finished offsets did not all fit in the metadata.
    pub(super) progress_overflow: Option<prometheus::IntCounter>,
    /// Per configured task type.
    pub(super) types: HashMap<String, TypeMetrics>,
}

/// One task type's per-task series.
pub(super) struct TypeMetrics {
    pub(super) consumed: prometheus::IntCounter,
    pub(super) succeeded: prometheus::IntCounter,
    pub(super) latency: prometheus::Histogram,
    /// Handler duration of successful attempts.
    pub(super) handled: prometheus::Histogram,
}

impl Hot {
    pub(super) fn new(m: &Metrics, name: &str, settings: &ProcessorSettings) -> Hot {
        if !m.enabled() {
            return Hot::default();
        }
        let types = settings
            .tasks
            .keys()
            .map(|t| {
                let labels = [name, t.as_str()];
                let metrics = TypeMetrics {
                    consumed: m.tasks_consumed.with_label_values(&labels),
                    succeeded: m.tasks_succeeded.with_label_values(&labels),
                    latency: m.task_latency.with_label_values(&labels),
                    handled: m
                        .handler_duration
                        .with_label_values(&[name, t.as_str(), "success"]),
                };
                (t.clone(), metrics)
            })
            .collect();
        Hot {
            in_flight: Some(m.tasks_in_flight.with_label_values(&[name])),
            paused: Some(m.partitions_paused.with_label_values(&[name])),
            unsplit: Some(m.partitions_unsplit.with_label_values(&[name])),
            metadata_refused: Some(m.commit_metadata_refused.with_label_values(&[name])),
            breaker_open: Some(m.breaker_open.with_label_values(&[name])),
            produced: Some(
                delivery::RECORD_LABELS.map(|r| m.records_produced.with_label_values(&[name, r])),
            ),
            produce_retries: Some(m.produce_retries.with_label_values(&[name])),
            skipped: Some(m.records_skipped.with_label_values(&[name])),
            progress_overflow: Some(m.progress_overflow.with_label_values(&[name])),
            types,
        }
    }
}

/// Creates this processor's series at zero, so that dashboards and alerts
/// see "none yet" rather than "no data".
pub(super) fn zero_series(m: &Metrics, name: &str, settings: &ProcessorSettings) {
    for counter in [
        &m.produce_retries,
        &m.records_skipped,
        &m.progress_overflow,
        &m.offset_commits,
        &m.offset_commit_failures,
        &m.commit_metadata_refused,
    ] {
        counter.with_label_values(&[name]);
    }
    for gauge in [
        &m.tasks_in_flight,
        &m.partitions_assigned,
        &m.partitions_paused,
        &m.partitions_unsplit,
        &m.breaker_open,
    ] {
        gauge.with_label_values(&[name]);
    }
    for event in ["assigned", "revoked", "lost"] {
        m.rebalance_events.with_label_values(&[name, event]);
    }
    for kind in crate::codec::FailureKind::ALL.map(crate::codec::FailureKind::as_str) {
        m.errors.with_label_values(&[name, kind]);
    }
    for kind in crate::metrics::ENGINE_ERRORS {
        m.errors.with_label_values(&[name, kind]);
    }
    for record in ["result", "dead_letter", "retry", "workflow"] {
        m.records_produced.with_label_values(&[name, record]);
    }
    for task_type in settings.tasks.keys() {
        m.tasks_consumed.with_label_values(&[name, task_type]);
        m.tasks_succeeded.with_label_values(&[name, task_type]);
        for via in ["in_place", "retry_topic"] {
            m.tasks_retried.with_label_values(&[name, task_type, via]);
        }
    }
}
