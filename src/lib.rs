//! conveyor: asynchronous task processing and workflows on Apache Kafka.
//!
//! A web application hands slow work to conveyor and answers its own user at
//! once; conveyor runs the work in a horizontally scalable Kafka consumer
//! group with at-least-once delivery and reports the outcome as a result
//! record. This crate is both the `conveyor` binary and a library.
//!
//! # Layout
//!
//! - [`codec`]: the wire contract. [`codec::TaskRequest`] and
//!   [`codec::TaskResult`] in Avro binary (schemas in `schemas/*.avsc`),
//!   optionally Confluent-framed. Pure; never panics on input.
//! - [`settings`]: the configuration tree (defaults → TOML file →
//!   `CONVEYOR__…` environment) and its validation, which names every bad key.
//! - [`offsets`]: [`offsets::OffsetTracker`], the contiguous-prefix rule that
//!   decides which offset may be committed. Pure.
//! - [`progress`]: the finished offsets above the committed one, written
//!   into each commit's metadata so that a restart skips them. Pure.
//! - [`health`]: a worker's `/healthz` and `/readyz`.
//! - [`processor`]: the engine. One consumer-group member: dispatch into
//!   ordering lanes, in-flight bounds (a partition at its bound is not
//!   read), results produced and acknowledged before offsets are stored,
//!   drain and commit on revoke and shutdown; workflow steps and joins.
//!   Inside: `ledger.rs` (lanes, bounds, room, offsets: pure, property-
//!   tested), `poll.rs` (the poll thread), `rebalance.rs` (callbacks,
//!   drains, commits, lag), `task.rs` (one record's task), `delivery.rs`
//!   (producing and acknowledgements), `join.rs`, `hot.rs` (metric handles),
//!   `lifecycle.rs` (task events and progress reports).
//! - [`control`]: cancellations, read whole from the control topic by every
//!   worker, with the tasks they concern watched while they wait or run.
//! - [`retry`]: backoff and the in-place / retry-topic / give-up decision.
//!   Pure.
//! - [`breaker`]: the poison-pill breaker's sliding window. Pure.
//! - [`handlers`]: the [`handlers::Handler`] trait, the registry and the
//!   built-ins (`echo`, `sleep`, `sha256`, `http`, and `split_lines`,
//!   `word_count`, `sum` for trying workflows).
//! - [`dlq`]: reading, filtering and replaying dead letters.
//! - [`worker`]: every configured processor side by side.
//! - [`workflow`]: workflow definitions and what a finished step asks for
//!   next (next step, fan-out children, join contributions, the run's
//!   result); the join state's changelog records. Pure; the processor side
//!   of joins is `processor::join`.
//! - [`gateway`]: the HTTP API (axum): submit tasks, status and results
//!   from a view it materialises from the results, task and events topics
//!   (live tasks in memory, every task in a SQLite store on local disk with
//!   the offsets applied; list queries);
//!   cancellation, progress reports and event streams (`lifecycle.rs`).
//! - [`metrics`]: the Prometheus registry, metric names (one
//!   `conveyor_errors_total{kind}` for every error met), `/metrics`.
//! - [`kafka`]: librdkafka client configuration shared by every client, and
//!   [`kafka::Reader`], the one way to read a topic to its end (tools, dead
//!   letters, the gateway's view, a join's changelog);
//!   [`security`]: the typed `[kafka.security]` (TLS, SASL, secrets) it
//!   applies, and what connection errors mean.
//! - [`tools`]: `conveyor submit` and `conveyor results`.
//! - [`topology`]: which topics a configuration needs (one place), and
//!   [`topics`]: `conveyor topics create|check` through the admin API.
//! - [`telemetry`]: the `tracing` subscriber (text or JSON) and the optional
//!   OTLP span exporter.
//! - [`dev`]: `conveyor dev`: the embedded Kafka-protocol cluster, and
//!   [`dev::run`] starting a worker and a gateway on it.
//! - [`shutdown`]: signals that ask for an orderly stop.
//!
//! `src/main.rs` is only the command line; it holds no logic of its own.
//!
//! # Status
//!
//! The contracts, configuration, logging, the processor engine with its
//! built-in handlers, failure handling (retries, retry topics, dead letters,
//! the breaker), Prometheus metrics, the HTTP gateway, workflows (chains,
//! fan-out and join) and the embedded dev cluster are here.

pub mod app;
pub mod breaker;
pub mod codec;
pub mod control;
pub mod delay;
pub mod dev;
pub mod dlq;
pub mod gateway;
pub mod handlers;
pub mod health;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod processor;
pub mod progress;
pub mod rate;
pub mod retry;
pub mod schedule;
pub mod security;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod tools;
pub mod topics;
pub mod topology;
pub mod trace_context;
pub mod worker;
pub mod workers;
pub mod workflow;

pub use codec::{Codec, DecodeError, TaskRequest, TaskResult, TaskStatus, WireFormat};
pub use settings::Settings;
