//! What the metrics cost per task: `cargo bench --bench metrics`.
//!
//! The engine records every metric unconditionally (there is no switch to
//! turn recording off), so "throughput with metrics on vs off" is not
//! measurable end to end. This measures the same thing from the other side:
//! the exact metric updates the engine makes for one successful task
//! (tasks consumed, handler duration, result produced, tasks succeeded,
//! end-to-end latency: five `with_label_values` lookups, three counter
//! increments and two histogram observations), on a registry holding the
//! series a busy worker has, compared with the whole per-task CPU cost the
//! pipeline benchmark measures (BENCHMARKS.md).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that cannot run stops

use std::hint::black_box;

use conveyor::metrics::Metrics;
use criterion::{criterion_group, criterion_main, Criterion};

fn per_task(c: &mut Criterion) {
    let m = Metrics::new();
    // A registry with the series of a worker running eight task types.
    let types: Vec<String> = (0..8).map(|i| format!("type_{i}")).collect();
    for t in &types {
        m.tasks_consumed.with_label_values(&["p", t]).inc();
        for outcome in ["success", "retryable", "permanent", "timeout", "panic"] {
            m.handler_duration
                .with_label_values(&["p", t, outcome])
                .observe(0.001);
        }
    }
    let name = "p".to_owned();
    let task_type = types[3].as_str();
    c.bench_function("metric updates of one successful task", |b| {
        b.iter(|| {
            m.tasks_consumed
                .with_label_values(&[black_box(&name), task_type])
                .inc();
            m.handler_duration
                .with_label_values(&[&name, task_type, "success"])
                .observe(black_box(0.0004));
            m.records_produced
                .with_label_values(&[&name, "result"])
                .inc();
            m.tasks_succeeded
                .with_label_values(&[&name, task_type])
                .inc();
            m.task_latency
                .with_label_values(&[&name, task_type])
                .observe(black_box(0.012));
        })
    });
    // The same updates through handles looked up once: what caching the
    // handles per processor and task type would leave.
    let consumed = m.tasks_consumed.with_label_values(&[&name, task_type]);
    let duration = m
        .handler_duration
        .with_label_values(&[&name, task_type, "success"]);
    let produced = m.records_produced.with_label_values(&[&name, "result"]);
    let succeeded = m.tasks_succeeded.with_label_values(&[&name, task_type]);
    let latency = m.task_latency.with_label_values(&[&name, task_type]);
    c.bench_function("same updates through cached handles", |b| {
        b.iter(|| {
            consumed.inc();
            duration.observe(black_box(0.0004));
            produced.inc();
            succeeded.inc();
            latency.observe(black_box(0.012));
        })
    });
}

criterion_group!(benches, per_task);
criterion_main!(benches);
