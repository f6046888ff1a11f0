//! The HTTP gateway: the front door for web applications.
//!
//! `POST /v1/tasks` checks a task, produces its [`TaskRequest`] with
//! `acks=all` and answers `202 {"id", "status": "queued", "status_url"}` only
//! once the broker has acknowledged it; `GET /v1/tasks/{id}` answers from a
//! status view the gateway materialises itself, optionally long-polling
//! (`?wait=10s`) until the task is terminal. The view is built by following
//! the results topic (terminal states), the task topics (queued tasks, and
//! the idempotency keys other replicas took) and the events topic, so every
//! replica sees every task: its live part in memory ([`view`]), everything
//! on local disk with the offsets applied ([`store`], SQLite), both fed by
//! one reader (`ingest.rs`); `GET /v1/tasks` and `GET /v1/workflows` list
//! from the store (`lists.rs`).
//!
//! The routes are listed in [`ROUTES`]; `openapi.json` beside this file
//! documents them and is served at `/openapi.json` (a test checks the two
//! agree).

pub mod api;
mod follow;
mod ingest;
mod lifecycle;
mod lists;
mod routes;
mod schedules;
mod secret;
mod status;
pub mod store;
mod submit;
mod ui;
pub mod view;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use serde_json::{json, Value};

use crate::codec::Codec;
use crate::delay::Tiers;
use crate::metrics::Metrics;
use crate::settings::{GatewaySettings, Settings};
use crate::shutdown::CancellationToken;
use crate::workflow::Workflows;
use api::Rules;
use view::{Limits, View};

/// The OpenAPI 3 document of the API, as served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route the gateway serves: (method, path in OpenAPI's notation).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/tasks"),
    ("get", "/v1/tasks"),
    ("post", "/v1/tasks:batch"),
    ("get", "/v1/tasks/{id}"),
    ("post", "/v1/tasks/{id}:cancel"),
    ("post", "/v1/tasks/{id}/progress"),
    ("get", "/v1/tasks/{id}/events"),
    ("post", "/v1/workflows/{workflow}"),
    ("get", "/v1/workflows/{workflow}"),
    ("get", "/v1/workflows"),
    ("get", "/v1/schedules"),
    ("get", "/v1/workers"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The configuration cannot work (a listener that cannot bind, topics
    /// that do not exist).
    #[error("{0}")]
    Config(String),
    /// The cluster could not be reached or refused.
    #[error("{what}: {source}")]
    Kafka {
        /// What was being done.
        what: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// `gateway.listen` cannot be bound (the address is taken, or not
    /// this host's).
    #[error("gateway.listen = \"{address}\": cannot listen: {source}")]
    Bind {
        /// The address asked for.
        address: String,
        /// Why it could not be bound.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(String),
    /// The status store cannot be opened.
    #[error("{0} (gateway.store_path)")]
    Store(#[from] store::StoreError),
}

impl From<crate::kafka::ClientError> for GatewayError {
    fn from(error: crate::kafka::ClientError) -> Self {
        match error {
            crate::kafka::ClientError::Kafka { what, source } => {
                GatewayError::Kafka { what, source }
            }
            other => GatewayError::Config(other.to_string()),
        }
    }
}

/// What every request handler shares.
struct Shared {
    settings: GatewaySettings,
    /// `/openapi.json`: [`OPENAPI`] with this configuration's task types,
    /// workflows and batch size filled in ([`openapi_for`]).
    openapi: String,
    rules: Rules,
    /// The delay tiers, when delays are on.
    tiers: Option<Tiers>,
    workflows: Workflows,
    codec: Codec,
    producer: FutureProducer,
    view: Mutex<View>,
    /// Idempotency keys of submissions not yet acknowledged.
    reserved: Mutex<HashSet<String>>,
    /// Set once the follower has read every partition to its end.
    caught_up: AtomicBool,
    /// Set when the gateway stops: long polls answer at once.
    stopping: AtomicBool,
    /// Set from the stop signal until the listener closes
    /// (`gateway.shutdown_delay_ms`): `/readyz` answers 503 while every
    /// route still serves.
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    /// The last broker check of `/readyz` and when it ran: however often
    /// the probe is asked (it needs no token), the broker is asked at most
    /// once per [`READY_CHECK_EVERY`].
    broker_check: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    /// The configured schedules, for `GET /v1/schedules`.
    schedules: Vec<crate::schedule::Schedule>,
    /// The whole configuration (reading the schedule topic needs it).
    config: Settings,
    /// The last read of the schedule topic.
    schedule_reads: schedules::LastRead,
    /// The events topic, when `[events]` is on.
    events_topic: Option<String>,
    /// The control topic, when `[cancel]` is on.
    control_topic: Option<String>,
    /// `events.progress_max_bytes`.
    progress_max_bytes: usize,
    /// Open event streams.
    streams: std::sync::atomic::AtomicUsize,
    /// The status store (read side; the follower's thread writes).
    store: Arc<store::Store>,
    /// Why the store's last write failed, while it fails.
    store_failing: Mutex<Option<String>>,
    /// The workers' latest reports (`[workers]`).
    workers: Arc<crate::workers::Workers>,
    /// Signs the dashboard's sessions and CSRF tokens.
    ui_keys: ui::UiKeys,
}

/// How long `/readyz` reuses its broker check.
const READY_CHECK_EVERY: Duration = Duration::from_secs(1);

impl Shared {
    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn store_failing(&self) -> MutexGuard<'_, Option<String>> {
        self.store_failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn reserved(&self) -> MutexGuard<'_, HashSet<String>> {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The high watermark of `partition` of the events topic, if the
    /// broker answers within two seconds.
    async fn events_high(&self, partition: i32) -> Option<i64> {
        let topic = self.events_topic.clone()?;
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_watermarks(&topic, partition, Duration::from_secs(2))
                .ok()
                .map(|(_, high)| high)
        })
        .await
        .ok()
        .flatten()
    }
}

/// A running gateway.
pub struct Gateway {
    address: SocketAddr,
    server: tokio::task::JoinHandle<Result<(), GatewayError>>,
}

impl Gateway {
    /// The address the API listens on (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Waits until the gateway has stopped: no longer accepting, in-flight
    /// requests answered, the producer flushed.
    pub async fn finished(self) -> Result<(), GatewayError> {
        self.server
            .await
            .map_err(|e| GatewayError::Serve(e.to_string()))?
    }
}

/// Checks the topics, starts the status view's follower, binds
/// `gateway.listen` and serves until `stop` is set.
pub async fn start(
    settings: &Settings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<Gateway, GatewayError> {
    let g = settings.gateway.clone();
    let codec = crate::kafka::codec_of(settings)?;
    let task_topics = settings.gateway_task_topics();
    let result_topics = settings.gateway_result_topics();

    let producer: FutureProducer = crate::kafka::producer_config(&settings.kafka)
        .set("message.timeout.ms", g.produce_timeout_ms.to_string())
        .create()
        .map_err(|source| GatewayError::Kafka {
            what: "creating the producer".into(),
            source,
        })?;
    let workflow_names: Vec<String> = settings.workflows.iter().map(|w| w.name.clone()).collect();
    let openapi = openapi_for(
        &task_topics.keys().cloned().collect::<Vec<_>>(),
        &workflow_names,
        g.max_batch,
    );
    let tiers = settings
        .delays
        .enabled
        .then(|| Tiers::new(&settings.delays));
    let store_limits = store::StoreLimits {
        retention_ms: i64::try_from(g.retention_ms).unwrap_or(i64::MAX),
        max_bytes: g.store_max_bytes,
        max_output_bytes: g.store_max_output_bytes,
        idempotency_window_ms: i64::try_from(g.idempotency_window_ms).unwrap_or(i64::MAX),
    };
    let store_path = g.store_path.clone();
    let (store, writer, resume) = tokio::task::spawn_blocking(move || {
        let (store, writer) = store::Store::open(&store_path, store_limits)?;
        let resume = store.offsets()?;
        Ok::<_, store::StoreError>((store, writer, resume))
    })
    .await
    .map_err(|e| GatewayError::Serve(e.to_string()))??;
    if resume.is_empty() {
        tracing::info!(store = %store.path().display(), "the status store is new: it is built from the topics (gateway.retention_ms back)");
    } else {
        tracing::info!(store = %store.path().display(), partitions = resume.len(), "the status store resumes where it left off");
    }
    // The workers topic's reader stops when the server has stopped.
    let readers_stop = CancellationToken::new();
    let metrics_for_workers = metrics.clone();
    let shared = Arc::new(Shared {
        openapi,
        rules: Rules {
            task_topics: task_topics.clone(),
            max_payload_bytes: g.max_payload_bytes,
            max_batch: g.max_batch,
            max_delay_ms: tiers.as_ref().map(Tiers::max_delay_ms),
        },
        tiers: tiers.clone(),
        workflows: Workflows::from_settings(settings),
        codec,
        producer,
        broker_check: tokio::sync::Mutex::new(None),
        view: Mutex::new(View::new(Limits {
            max_tasks: g.view_max_tasks,
            max_age_ms: i64::try_from(g.view_max_age_ms.min(g.retention_ms)).unwrap_or(i64::MAX),
            max_bytes: g.view_max_bytes,
            idempotency_window_ms: i64::try_from(g.idempotency_window_ms).unwrap_or(i64::MAX),
        })),
        reserved: Mutex::new(HashSet::new()),
        caught_up: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        metrics,
        settings: g.clone(),
        schedules: crate::schedule::Schedule::all(settings).map_err(GatewayError::Config)?,
        config: settings.clone(),
        schedule_reads: tokio::sync::Mutex::new(None),
        events_topic: settings
            .events
            .enabled
            .then(|| settings.events.topic.clone()),
        control_topic: settings
            .cancel
            .enabled
            .then(|| settings.cancel.topic.clone()),
        progress_max_bytes: settings.events.progress_max_bytes,
        streams: std::sync::atomic::AtomicUsize::new(0),
        store,
        store_failing: Mutex::new(None),
        workers: crate::workers::Workers::start(
            &settings.workers,
            &settings.kafka,
            metrics_for_workers,
            &readers_stop,
        ),
        ui_keys: ui::UiKeys::derive(
            &g.auth_tokens,
            &format!("{}|{}", settings.kafka.brokers, settings.topics.results),
        ),
    });

    let follow_spec = follow::Spec {
        kafka: settings.kafka.clone(),
        codec,
        task_topics: task_topics.values().cloned().collect(),
        delay_topics: tiers
            .as_ref()
            .map(|t| t.topics().map(str::to_owned).collect())
            .unwrap_or_default(),
        result_topics,
        events_topic: settings
            .events
            .enabled
            .then(|| settings.events.topic.clone()),
        lookback_ms: g.view_lookback_ms,
        max_tasks: g.view_max_tasks,
        retention_ms: g.retention_ms,
        resume,
    };
    let follower = tokio::task::spawn_blocking(move || follow::Follower::new(&follow_spec))
        .await
        .map_err(|e| GatewayError::Serve(e.to_string()))??;

    let listener = tokio::net::TcpListener::bind(&g.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            address: g.listen.clone(),
            source,
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| GatewayError::Serve(e.to_string()))?;

    // On the stop signal the gateway first keeps serving for
    // `shutdown_delay_ms` while /readyz answers 503, so that load balancers
    // (a Kubernetes Service's endpoints) stop sending requests before the
    // listener closes; only then does `stop` reach the server and the
    // follower.
    let stop = {
        let signal = stop;
        let delayed = CancellationToken::new();
        let (shared, delayed_stop) = (shared.clone(), delayed.clone());
        let delay = Duration::from_millis(g.shutdown_delay_ms);
        tokio::spawn(async move {
            signal.cancelled().await;
            if !delay.is_zero() {
                shared.draining.store(true, Ordering::Relaxed);
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "gateway stopping: not ready from now, serving until the shutdown delay ends"
                );
                tokio::time::sleep(delay).await;
            }
            delayed_stop.cancel();
        });
        delayed
    };
    // The follower stops with the gateway's stop flag itself, not after the
    // server: long polls are answered at once on stop anyway, and a
    // blocking thread left running would hold up the runtime's shutdown.
    let follower_thread = {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let mut ingest = ingest::Ingest::new(writer, stop.clone());
            follower.run(&stop, |event| ingest.apply(&shared, event));
        })
    };

    let app = routes::router(shared.clone());
    let server = tokio::spawn(async move {
        let stopping = shared.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                tracing::info!("gateway stopping: no new connections, answering those in flight");
                stopping.stopping.store(true, Ordering::Relaxed);
                stopping.view().wake_all();
            })
            .await;
        let producer = shared.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5)))
            .await
            .map_err(|e| GatewayError::Serve(e.to_string()))?;
        if let Err(error) = flushed {
            tracing::warn!(%error, "the gateway's producer did not flush");
        }
        let _ = follower_thread.await;
        readers_stop.cancel();
        tracing::info!("gateway stopped");
        served.map_err(|e| GatewayError::Serve(e.to_string()))
    });
    Ok(Gateway { address, server })
}

/// The OpenAPI document of a gateway accepting `task_types`, starting
/// `workflows` and batches of at most `max_batch` tasks: [`OPENAPI`] with
/// those as the `type` enum, the workflow-name enum and `maxItems`, so that
/// every request the document allows is one this gateway accepts.
pub fn openapi_for(task_types: &[String], workflows: &[String], max_batch: usize) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(OPENAPI) else {
        return OPENAPI.to_owned();
    };
    if !task_types.is_empty() {
        if let Some(t) = doc.pointer_mut("/components/schemas/NewTask/properties/type") {
            t["enum"] = json!(task_types);
        }
    }
    if let Some(tasks) = doc.pointer_mut(
        "/paths/~1v1~1tasks:batch/post/requestBody/content/application~1json/schema/properties/tasks",
    ) {
        tasks["maxItems"] = json!(max_batch);
    }
    if !workflows.is_empty() {
        if let Some(Value::Array(parameters)) =
            doc.pointer_mut("/paths/~1v1~1workflows~1{workflow}/post/parameters")
        {
            for parameter in parameters.iter_mut() {
                if parameter["name"] == "workflow" {
                    parameter["schema"]["enum"] = json!(workflows);
                }
            }
        }
    }
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| OPENAPI.to_owned())
}

#[cfg(test)]
mod tests {
    use super::routes::*;
    use super::status::*;
    use super::view::TaskView;
    use super::*;
    use crate::codec::WorkflowRef;
    use uuid::Uuid;

    #[test]
    fn route_labels_are_templates_or_unmatched() {
        assert_eq!(route_label("/v1/tasks"), "/v1/tasks");
        assert_eq!(route_label("/v1/tasks:batch"), "/v1/tasks:batch");
        assert_eq!(route_label("/v1/tasks/abc"), "/v1/tasks/:id");
        assert_eq!(route_label("/v1/tasks/"), "unmatched");
        assert_eq!(route_label("/v1/tasks/a/b"), "unmatched");
        assert_eq!(route_label("/v1/tasks/a/events"), "/v1/tasks/:id/events");
        assert_eq!(
            route_label("/v1/tasks/a/progress"),
            "/v1/tasks/:id/progress"
        );
        assert_eq!(route_label("/v1/tasks//events"), "unmatched");
        assert_eq!(route_label("/v1/workflows/wc"), "/v1/workflows/:workflow");
        assert_eq!(route_label("/v1/workflows/"), "unmatched");
        assert_eq!(route_label("/metrics"), "/metrics");
        assert_eq!(route_label("/anything"), "unmatched");
    }

    #[test]
    fn a_step_lists_a_bounded_number_of_outputs_whatever_the_claimed_count() {
        let run = Uuid::new_v4();
        let child = TaskView {
            id: Uuid::new_v4(),
            task_type: "t".into(),
            phase: view::Phase::Succeeded,
            submitted_at: None,
            finished_at: None,
            attempts: Some(1),
            output: Some(b"7".to_vec()),
            content_type: None,
            error: None,
            traceparent: None,
            run_at: None,
            workflow: Some(WorkflowRef {
                id: run,
                name: "w".into(),
                step: 1,
                child_index: Some(2),
                child_count: Some(i32::MAX),
            }),
            attempt: None,
            progress: None,
            retry_at: None,
            events: Default::default(),
            events_partition: None,
            output_size: None,
            idempotency_key: None,
            payload: None,
            payload_size: None,
        };
        let step = render_step(1, "t", &[&child]);
        let outputs = step["outputs"].as_array().expect("outputs");
        assert_eq!(outputs.len(), MAX_LISTED_OUTPUTS);
        assert_eq!(outputs[2], 7);
        assert_eq!(step["children"]["count"], i32::MAX);
        assert_eq!(step["status"], "running");
    }

    #[test]
    fn the_served_document_lists_this_gateways_types_workflows_and_batch_size() {
        let text = openapi_for(&["echo".into(), "sleep".into()], &["wordcount".into()], 7);
        let doc: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(
            doc.pointer("/components/schemas/NewTask/properties/type/enum"),
            Some(&json!(["echo", "sleep"]))
        );
        assert_eq!(
            doc.pointer(
                "/paths/~1v1~1tasks:batch/post/requestBody/content/application~1json/schema/properties/tasks/maxItems"
            ),
            Some(&json!(7))
        );
        assert_eq!(
            doc.pointer("/paths/~1v1~1workflows~1{workflow}/post/parameters/0/schema/enum"),
            Some(&json!(["wordcount"]))
        );
        // Nothing configured: no empty enums (no request could be valid).
        let doc: Value = serde_json::from_str(&openapi_for(&[], &[], 1)).expect("JSON");
        assert!(doc
            .pointer("/components/schemas/NewTask/properties/type/enum")
            .is_none());
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths").iter() {
            for method in item.as_object().expect("path item").keys() {
                if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    documented.push((method.clone(), path.clone()));
                }
            }
        }
        documented.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        routes.sort();
        assert_eq!(documented, routes);
    }
}
