//! The HTTP gateway: the front door for web applications.
//!
//! `POST /v1/tasks` checks a task, produces its [`TaskRequest`] with
//! `acks=all` and answers `202 {"id", "status": "queued", "status_url"}` only
//! once the broker has acknowledged it; `GET /v1/tasks/{id}` answers from a
//! status view the gateway materialises itself ([`view`]), optionally
//! long-polling (`?wait=10s`) until the task is terminal. No database: the
//! view is built by following the results topic (terminal states) and the
//! task topics (queued tasks, and the idempotency keys other replicas took),
//! so every replica sees every task.
//!
//! The routes are listed in [`ROUTES`]; `openapi.json` beside this file
//! documents them and is served at `/openapi.json` (a test checks the two
//! agree).

pub mod api;
mod follow;
pub mod view;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::codec::wire as headers;
use crate::codec::{now_millis, Codec, TaskRequest, WorkflowRef};
use crate::metrics::Metrics;
use crate::settings::{GatewaySettings, Settings};
use crate::workflow::Workflows;
use api::{ApiError, NewTask, Rules};
use view::{Limits, TaskView, View, IDEMPOTENCY_METADATA};

/// The OpenAPI 3 document of the API, as served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route the gateway serves: (method, path in OpenAPI's notation).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/tasks"),
    ("post", "/v1/tasks:batch"),
    ("get", "/v1/tasks/{id}"),
    ("post", "/v1/workflows/{workflow}"),
    ("get", "/v1/workflows/{workflow}"),
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
    metrics: Arc<Metrics>,
    /// The last broker check of `/readyz` and when it ran: however often
    /// the probe is asked (it needs no token), the broker is asked at most
    /// once per [`READY_CHECK_EVERY`].
    broker_check: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

/// How long `/readyz` reuses its broker check.
const READY_CHECK_EVERY: Duration = Duration::from_secs(1);

impl Shared {
    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reserved(&self) -> MutexGuard<'_, HashSet<String>> {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner)
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
    stop: Arc<AtomicBool>,
) -> Result<Gateway, GatewayError> {
    let g = settings.gateway.clone();
    let codec = settings
        .codec
        .codec()
        .ok_or_else(|| GatewayError::Config("codec settings are incomplete".into()))?;
    let task_topics = settings.gateway_task_topics();
    // Where results are written: the processors' output topics, or the
    // default results topic for a gateway whose configuration runs none.
    let mut result_topics: Vec<String> = settings
        .processors
        .iter()
        .filter_map(|p| p.output_topic.clone())
        .collect();
    if result_topics.is_empty() {
        result_topics.push(settings.topics.results.clone());
    }
    result_topics.sort();
    result_topics.dedup();

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
    let shared = Arc::new(Shared {
        openapi,
        rules: Rules {
            task_topics: task_topics.clone(),
            max_payload_bytes: g.max_payload_bytes,
            max_batch: g.max_batch,
        },
        workflows: Workflows::from_settings(settings),
        codec,
        producer,
        broker_check: tokio::sync::Mutex::new(None),
        view: Mutex::new(View::new(Limits {
            max_tasks: g.view_max_tasks,
            max_age_ms: i64::try_from(g.view_max_age_ms).unwrap_or(i64::MAX),
            max_bytes: g.view_max_bytes,
            idempotency_window_ms: i64::try_from(g.idempotency_window_ms).unwrap_or(i64::MAX),
        })),
        reserved: Mutex::new(HashSet::new()),
        caught_up: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        metrics,
        settings: g.clone(),
    });

    let follow_spec = follow::Spec {
        kafka: settings.kafka.clone(),
        codec,
        task_topics: task_topics.values().cloned().collect(),
        result_topics,
        lookback_ms: g.view_lookback_ms,
        max_tasks: g.view_max_tasks,
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

    // The follower stops with the gateway's stop flag itself, not after the
    // server: long polls are answered at once on stop anyway, and a
    // blocking thread left running would hold up the runtime's shutdown.
    let follower_thread = {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            follower.run(&stop, |event| apply(&shared, event));
        })
    };

    let app = router(shared.clone());
    let server = tokio::spawn(async move {
        let stopping = shared.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
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

fn apply(shared: &Shared, event: follow::Event) {
    let now = now_millis();
    match event {
        follow::Event::Request {
            request,
            traceparent,
        } => shared.view().apply_request(&request, traceparent, now),
        follow::Event::Result(result) => shared.view().apply_result(result, now),
        follow::Event::CaughtUp => {
            tracing::info!("gateway status view caught up with the results and task topics");
            shared.caught_up.store(true, Ordering::Relaxed);
        }
        follow::Event::Tick => {
            let mut view = shared.view();
            view.evict(now);
            let m = &shared.metrics;
            m.gateway_view_tasks
                .with_label_values(&[] as &[&str])
                .set(i64::try_from(view.len()).unwrap_or(i64::MAX));
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/tasks", post(submit_one))
        .route("/v1/tasks:batch", post(submit_batch))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/workflows/{workflow}", post(start_run).get(get_run))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    let open = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .route(
            "/openapi.json",
            get(|State(shared): State<Arc<Shared>>| async move {
                (
                    [("content-type", "application/json")],
                    shared.openapi.clone(),
                )
            }),
        );
    api.merge(open)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such route; see /openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see /openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(shared.settings.max_body_bytes))
        .layer(middleware::from_fn_with_state(shared.clone(), time_limit))
        .layer(middleware::from_fn_with_state(shared.clone(), observe))
        .with_state(shared)
}

/// The route a path belongs to, from [`ROUTES`], or `unmatched`: a bounded
/// set of label values whatever paths clients send. (This runs before the
/// router, where axum's `MatchedPath` is not known yet.) The id route is
/// written `/v1/tasks/:id`: braces in label values trip up some
/// exposition-format parsers.
fn route_label(path: &str) -> &'static str {
    if let Some(id) = path.strip_prefix("/v1/tasks/") {
        if !id.is_empty() && !id.contains('/') {
            return "/v1/tasks/:id";
        }
    }
    if let Some(workflow) = path.strip_prefix("/v1/workflows/") {
        if !workflow.is_empty() && !workflow.contains('/') {
            return "/v1/workflows/:workflow";
        }
    }
    ROUTES
        .iter()
        .map(|(_, route)| *route)
        .find(|route| *route == path)
        .unwrap_or("unmatched")
}

/// Counts and times every request by route and status.
async fn observe(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let route = route_label(request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    let m = &shared.metrics;
    m.gateway_request_duration
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    m.gateway_requests
        .with_label_values(&[route, response.status().as_str()])
        .inc();
    response
}

/// Answers 503 when a request takes longer than `gateway.request_timeout_ms`.
async fn time_limit(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let limit = Duration::from_millis(shared.settings.request_timeout_ms);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than gateway.request_timeout_ms ({} ms)",
                limit.as_millis()
            ),
        )
        .into_response(),
    }
}

/// Requires `Authorization: Bearer <token>` with a configured token, when
/// tokens are configured.
async fn authenticate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let tokens = &shared.settings.auth_tokens;
    if tokens.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(presented) = presented else {
        return unauthorized("send the header `Authorization: Bearer <token>`");
    };
    // Compare with every token, each in constant time, so the answer's
    // timing says nothing about which token or how much of it matched.
    let matched = tokens.iter().fold(false, |any, token| {
        any | constant_time_eq(token.as_bytes(), presented.as_bytes())
    });
    if matched {
        next.run(request).await
    } else {
        unauthorized("the bearer token is not one of gateway.auth_tokens")
    }
}

fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    response
}

/// Equality whose time depends only on the lengths, not on where the bytes
/// differ (`subtle`'s constant-time comparison).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a, b))
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}

/// Ready when the broker answers a metadata request and the status view
/// has caught up.
async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let mut problems = Vec::new();
    if !shared.caught_up.load(Ordering::Relaxed) {
        problems.push("the status view is still catching up with the results topic".to_owned());
    }
    // Concurrent probes wait for one check instead of each making one.
    let mut check = shared.broker_check.lock().await;
    let fresh = check
        .as_ref()
        .filter(|(at, _)| at.elapsed() < READY_CHECK_EVERY)
        .map(|(_, outcome)| outcome.clone());
    let outcome = match fresh {
        Some(outcome) => outcome,
        None => {
            let producer = shared.producer.clone();
            let reachable = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(2))
                    .map(|_| ())
            })
            .await;
            let outcome = match reachable {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("the broker does not answer: {e}")),
                Err(e) => Err(format!("the broker check failed: {e}")),
            };
            *check = Some((Instant::now(), outcome.clone()));
            outcome
        }
    };
    drop(check);
    if let Err(problem) = outcome {
        problems.push(problem);
    }
    if problems.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "problems": problems})),
        )
            .into_response()
    }
}

/// The trace context of a submission: the caller's `traceparent` when it
/// is well-formed, else a new one.
fn traceparent_of(headers: &HeaderMap) -> String {
    headers
        .get(headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| crate::trace_context::is_valid(v))
        .map_or_else(crate::trace_context::generate, str::to_owned)
}

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "body_too_large",
                field: Some("body".into()),
                message: format!("the request body is over {limit} bytes (gateway.max_body_bytes)"),
            }
        } else {
            ApiError::new(rejection.status(), "bad_body", rejection.body_text())
        }
    })
}

async fn submit_one(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traceparent = traceparent_of(&headers);
    let outcome = async {
        let value = json_body(&shared, body)?;
        let task = api::parse_task(&value, "", &shared.rules, now_millis())?;
        submit_one_of(&shared, Submission::task(task), &traceparent).await
    }
    .await;
    accepted_or_refused(outcome, &traceparent)
}

async fn submit_batch(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traceparent = traceparent_of(&headers);
    let outcome = async {
        let value = json_body(&shared, body)?;
        let tasks = api::parse_batch(&value, &shared.rules, now_millis())?;
        let submissions = tasks.into_iter().map(Submission::task).collect();
        Ok(json!({ "tasks": submit(&shared, submissions, &traceparent).await? }))
    }
    .await;
    accepted_or_refused(outcome, &traceparent)
}

/// The request body as JSON, or the refusal naming what is wrong with it.
fn json_body(shared: &Shared, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body_bytes(body, shared.settings.max_body_bytes)?;
    api::parse_json(&body)
}

/// 202 with `accepted`, or the refusal; either way with the trace context.
fn accepted_or_refused(outcome: Result<Value, ApiError>, traceparent: &str) -> Response {
    let response = match outcome {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(error) => error.into_response(),
    };
    with_traceparent(response, traceparent)
}

fn with_traceparent(mut response: Response, traceparent: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(traceparent) {
        response.headers_mut().insert(headers::TRACEPARENT, value);
    }
    response
}

fn status_url(id: &Uuid) -> String {
    format!("/v1/tasks/{id}")
}

fn run_url(id: &Uuid) -> String {
    format!("/v1/workflows/{id}")
}

/// Releases idempotency keys reserved by a submission however it ends
/// (answered, failed, or its request dropped by the client or a timeout).
struct Reservation<'a> {
    shared: &'a Shared,
    keys: Vec<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.shared.reserved();
        for key in &self.keys {
            reserved.remove(key);
        }
    }
}

/// One request to produce: a task, or the first step of a workflow run.
struct Submission {
    topic: String,
    request: TaskRequest,
    idempotency_key: Option<String>,
}

impl Submission {
    fn task(task: NewTask) -> Self {
        let mut request = TaskRequest::new(&task.task_type, task.payload);
        request.key = task.key;
        request.deadline = task.deadline;
        if let Some(key) = &task.idempotency_key {
            request
                .metadata
                .insert(IDEMPOTENCY_METADATA.into(), key.clone());
        }
        Submission {
            topic: task.topic,
            request,
            idempotency_key: task.idempotency_key,
        }
    }
}

/// The answer for a submitted (or replayed) task or workflow run.
fn accepted(view: &View, id: Uuid, workflow: Option<&WorkflowRef>, replay: bool) -> Value {
    let mut answer = match workflow {
        Some(w) => json!({
            "id": w.id, "workflow": w.name,
            "status": run_status(&view.run(&w.id), w.id),
            "status_url": run_url(&w.id),
        }),
        None => json!({
            "id": id,
            "status": view.get(&id).map_or("queued", |t| t.phase.name()),
            "status_url": status_url(&id),
        }),
    };
    if replay {
        if let Some(map) = answer.as_object_mut() {
            map.insert("idempotent_replay".into(), json!(true));
        }
    }
    answer
}

/// [`submit`] for one submission: its answer.
async fn submit_one_of(
    shared: &Shared,
    submission: Submission,
    traceparent: &str,
) -> Result<Value, ApiError> {
    let mut accepted = submit(shared, vec![submission], traceparent).await?;
    accepted.pop().ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the submission got no answer",
        )
    })
}

/// Produces `tasks` (those whose idempotency key is not already taken) and
/// answers once the broker acknowledged every one.
async fn submit(
    shared: &Shared,
    tasks: Vec<Submission>,
    traceparent: &str,
) -> Result<Vec<Value>, ApiError> {
    let now = now_millis();
    // Idempotency keys: already known (here or from another replica through
    // the task topics) → the original task; being submitted right now by
    // another request → 409, as the outcome is not known yet.
    let mut reservation = Reservation {
        shared,
        keys: Vec::new(),
    };
    let mut answers: Vec<Option<Value>> = vec![None; tasks.len()];
    // A key used again later in the same batch answers like a key seen
    // before: the first task with it, as a replay (tasks[j] → tasks[i]).
    let mut repeats: Vec<(usize, usize)> = Vec::new();
    {
        let view = shared.view();
        let mut reserved = shared.reserved();
        let mut first_with: HashMap<&str, usize> = HashMap::new();
        for (i, task) in tasks.iter().enumerate() {
            let Some(key) = &task.idempotency_key else {
                continue;
            };
            if let Some(&first) = first_with.get(key.as_str()) {
                repeats.push((i, first));
                continue;
            }
            first_with.insert(key, i);
            if let Some(id) = view.idempotent(key, now) {
                let workflow = view.get(&id).and_then(|t| t.workflow.as_ref());
                answers[i] = Some(accepted(&view, id, workflow, true));
            } else if !reserved.insert(key.clone()) {
                return Err(ApiError::field(
                    field_of(tasks.len(), i, "idempotency_key"),
                    "a request with this idempotency_key is being submitted right now; retry shortly",
                )
                .with(StatusCode::CONFLICT, "idempotency_key_in_use"));
            } else {
                reservation.keys.push(key.clone());
            }
        }
    }

    let mut pending = Vec::new();
    let mut failure = None;
    for (i, task) in tasks.iter().enumerate() {
        if answers[i].is_some() || repeats.iter().any(|&(j, _)| j == i) {
            continue;
        }
        let request = task.request.clone();
        let mut value = Vec::with_capacity(request.payload.len() + 96);
        shared.codec.encode_request(&request, &mut value);
        let record_key = request
            .key
            .clone()
            .unwrap_or_else(|| request.id.to_string());
        let record = FutureRecord::to(&task.topic)
            .key(&record_key)
            .payload(&value)
            .headers(headers::build([(
                headers::TRACEPARENT,
                Some(traceparent.to_owned()),
            )]));
        match shared.producer.send_result(record) {
            Ok(delivery) => pending.push((i, request, delivery)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                failure = Some("the gateway's producer queue is full; retry shortly".to_owned());
                break;
            }
            Err((e, _)) => {
                failure = Some(format!("cannot produce to {}: {e}", task.topic));
                break;
            }
        }
    }

    // Tasks already handed to the producer are awaited even after a
    // failure, so the answer says which of them were written.
    let mut acknowledged = Vec::new();
    for (i, request, delivery) in pending {
        match delivery.await {
            Ok(Ok(_)) => {
                shared
                    .metrics
                    .gateway_tasks_submitted
                    .with_label_values(&[request.task_type.as_str()])
                    .inc();
                let mut view = shared.view();
                view.apply_request(&request, Some(traceparent.to_owned()), now_millis());
                answers[i] = Some(accepted(
                    &view,
                    request.id,
                    request.workflow.as_ref(),
                    false,
                ));
                drop(view);
                acknowledged.push(request.id);
            }
            Ok(Err((e, _))) => {
                failure
                    .get_or_insert_with(|| format!("the broker did not acknowledge the task: {e}"));
            }
            Err(_) => {
                failure.get_or_insert_with(|| "the producer stopped".to_owned());
            }
        }
    }
    drop(reservation);
    if let Some(message) = failure {
        return Err(unavailable(&acknowledged, message));
    }
    for (repeat, first) in repeats {
        let mut answer = answers.get(first).cloned().flatten();
        if let Some(Value::Object(map)) = answer.as_mut() {
            map.insert("idempotent_replay".into(), json!(true));
        }
        if let Some(slot) = answers.get_mut(repeat) {
            *slot = answer;
        }
    }
    Ok(answers.into_iter().flatten().collect())
}

fn field_of(count: usize, i: usize, name: &str) -> String {
    if count == 1 {
        name.to_owned()
    } else {
        format!("tasks[{i}].{name}")
    }
}

/// 503: the broker did not take the tasks. `acknowledged` lists those of a
/// batch that were written all the same.
fn unavailable(acknowledged: &[Uuid], cause: String) -> ApiError {
    // The cause (librdkafka's words, topic names) is for the operator's
    // log, not for the client.
    tracing::warn!(%cause, written = acknowledged.len(), "submission answered 503");
    let mut message = "the broker did not acknowledge the submission in time \
                       (gateway.produce_timeout_ms); retry, with the same idempotency_key"
        .to_owned();
    if !acknowledged.is_empty() {
        message = format!(
            "{message}; these tasks of the batch were written: {}",
            acknowledged
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        message,
    )
}

/// `POST /v1/workflows/{name}`: starts a run of the workflow `name`.
async fn start_run(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let traceparent = traceparent_of(&headers);
    let outcome = async {
        if shared.workflows.get(&name).is_none() {
            let known: Vec<&str> = shared
                .workflows
                .definitions()
                .map(|w| w.name.as_str())
                .collect();
            return Err(ApiError::field(
                "name",
                format!(
                    "no workflow `{name}` is defined; this gateway knows: {}",
                    if known.is_empty() {
                        "none (configure [[workflows]])".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            )
            .with(StatusCode::NOT_FOUND, "unknown_workflow"));
        }
        let value = json_body(&shared, body)?;
        let run = api::parse_run(&value, shared.settings.max_payload_bytes)?;
        // A run's key lives in a namespace of its own (per workflow), so
        // that a task submitted with the same key is not taken for it.
        let idempotency_key = run
            .idempotency_key
            .map(|key| format!("{RUN_KEY_PREFIX}{name}/{key}"));
        let mut metadata = BTreeMap::new();
        if let Some(key) = &idempotency_key {
            metadata.insert(IDEMPOTENCY_METADATA.to_owned(), key.clone());
        }
        let (topic, request) = shared
            .workflows
            .start(
                &name,
                run.payload,
                crate::codec::DEFAULT_CONTENT_TYPE.into(),
                metadata,
            )
            .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "unknown_workflow", e.to_string()))?;
        let submission = Submission {
            topic,
            request,
            idempotency_key,
        };
        submit_one_of(&shared, submission, &traceparent).await
    }
    .await;
    accepted_or_refused(outcome, &traceparent)
}

/// What a workflow run's idempotency key is stored under:
/// `conveyor.run/<workflow>/<key>`.
const RUN_KEY_PREFIX: &str = "conveyor.run/";

/// `GET /v1/workflows/{id}`: a run's status, step by step, optionally
/// waiting (`?wait=`) until it is over.
async fn get_run(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let outcome = async {
        let run = api::parse_id(&id, "workflow run id")?;
        let wait = wait_of(&shared, &params)?;
        // The run's own result has the run's id: it wakes the wait.
        let tasks = long_poll(&shared, run, wait, |view| {
            let tasks: Vec<TaskView> = view.run(&run).into_iter().cloned().collect();
            if tasks.is_empty() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_workflow_run",
                    format!(
                        "no workflow run {run} is known here: never started, or older than \
                         the status view keeps (gateway.view_max_age_ms, view_max_tasks)"
                    ),
                ));
            }
            let over = tasks.iter().any(|t| t.id == run);
            Ok((tasks, over))
        })
        .await?;
        Ok::<_, ApiError>(render_run(&shared.workflows, run, &tasks))
    }
    .await;
    match outcome {
        Ok(value) => Json(value).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `succeeded` or `failed` once the run's own result is known, `running`
/// once any of its steps finished, else `queued`.
fn run_status(tasks: &[&TaskView], run: Uuid) -> &'static str {
    if let Some(result) = tasks.iter().find(|t| t.id == run) {
        return result.phase.name();
    }
    if tasks.iter().any(|t| t.phase.is_terminal()) {
        "running"
    } else {
        "queued"
    }
}

/// A run as the API shows it: overall status, then each step's status,
/// attempts and outputs so far (a fan-out's children counted, their
/// outputs in child order), and the final output or error.
fn render_run(workflows: &Workflows, run: Uuid, tasks: &[TaskView]) -> Value {
    let refs: Vec<&TaskView> = tasks.iter().collect();
    let name = tasks
        .iter()
        .find_map(|t| t.workflow.as_ref().map(|w| w.name.clone()))
        .unwrap_or_default();
    let definition = workflows.get(&name);
    let mut value = json!({
        "id": run,
        "workflow": name,
        "status": run_status(&refs, run),
    });
    let Some(map) = value.as_object_mut() else {
        return value;
    };
    if let Some(result) = tasks.iter().find(|t| t.id == run) {
        map.insert("finished_at".into(), json!(result.finished_at));
        insert_outcome(map, result, "result");
    }
    let steps: Vec<Value> = definition
        .map(|d| {
            d.steps
                .iter()
                .enumerate()
                .map(|(index, step)| {
                    let index = i32::try_from(index).unwrap_or(i32::MAX);
                    let at_step: Vec<&TaskView> = tasks
                        .iter()
                        .filter(|t| t.id != run)
                        .filter(|t| t.workflow.as_ref().is_some_and(|w| w.step == index))
                        // A join's contributions are the children's, not the join's.
                        .filter(|t| {
                            !(step.join
                                && t.workflow.as_ref().is_some_and(|w| w.child_index.is_some()))
                        })
                        .collect();
                    render_step(index, &step.task, &at_step)
                })
                .collect()
        })
        .unwrap_or_default();
    map.insert("steps".into(), json!(steps));
    value
}

/// Most children's outputs one step of a run lists (as many as the
/// status view holds tasks by default).
const MAX_LISTED_OUTPUTS: usize = 100_000;

fn render_step(index: i32, task_type: &str, tasks: &[&TaskView]) -> Value {
    let mut step = json!({"index": index, "type": task_type});
    let Some(map) = step.as_object_mut() else {
        return step;
    };
    let count = tasks
        .iter()
        .find_map(|t| t.workflow.as_ref().and_then(|w| w.child_count));
    match (count, tasks) {
        (None, []) => {
            map.insert("status".into(), json!("pending"));
        }
        (None, [task, ..]) => {
            map.insert("status".into(), json!(task.phase.name()));
            map.insert("task_id".into(), json!(task.id));
            map.insert("attempts".into(), json!(task.attempts));
            insert_outcome(map, task, "output");
        }
        (Some(count), _) => {
            let count = usize::try_from(count).unwrap_or(0);
            // The count comes from the records, which anyone can write:
            // never allocate by it beyond a fixed limit.
            let listed = count.min(MAX_LISTED_OUTPUTS);
            let mut outputs = vec![Value::Null; listed];
            let (mut succeeded, mut failed, mut attempts) = (0usize, 0usize, 0i64);
            for task in tasks {
                let child = task
                    .workflow
                    .as_ref()
                    .and_then(|w| w.child_index)
                    .and_then(|c| usize::try_from(c).ok());
                attempts += i64::from(task.attempts.unwrap_or(0));
                match task.phase {
                    view::Phase::Succeeded => {
                        succeeded += 1;
                        if let (Some(slot), Some(output)) =
                            (child.and_then(|c| outputs.get_mut(c)), &task.output)
                        {
                            *slot = crate::workflow::output_as_json(output);
                        }
                    }
                    view::Phase::Failed => failed += 1,
                    view::Phase::Queued => {}
                }
            }
            let status = if failed > 0 {
                "failed"
            } else if succeeded >= count {
                "succeeded"
            } else {
                "running"
            };
            map.insert("status".into(), json!(status));
            map.insert("attempts".into(), json!(attempts));
            map.insert(
                "children".into(),
                json!({"count": count, "succeeded": succeeded, "failed": failed}),
            );
            map.insert("outputs".into(), json!(outputs));
        }
    }
    step
}

async fn get_task(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    match lookup(&shared, &id, &params).await {
        Ok(task) => Json(render(&task)).into_response(),
        Err(error) => error.into_response(),
    }
}

/// The `wait` query parameter (the only one the status routes take),
/// capped at `gateway.max_wait_ms`; zero when absent.
fn wait_of(shared: &Shared, params: &BTreeMap<String, String>) -> Result<Duration, ApiError> {
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "wait") {
        return Err(ApiError::field(
            unknown.clone(),
            "unknown query parameter; this route takes `wait`",
        )
        .with(StatusCode::BAD_REQUEST, "invalid_parameter"));
    }
    Ok(match params.get("wait") {
        None => Duration::ZERO,
        Some(text) => api::parse_duration(text)
            .map_err(|why| {
                ApiError::field("wait", why).with(StatusCode::BAD_REQUEST, "invalid_parameter")
            })?
            .min(Duration::from_millis(shared.settings.max_wait_ms)),
    })
}

async fn lookup(
    shared: &Shared,
    id: &str,
    params: &BTreeMap<String, String>,
) -> Result<TaskView, ApiError> {
    let id = api::parse_id(id, "task id")?;
    let wait = wait_of(shared, params)?;
    long_poll(shared, id, wait, |view| {
        let task = view.get(&id).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_task",
                format!(
                    "no task {id} is known here: never submitted, or older than the status \
                     view keeps (gateway.view_max_age_ms, view_max_tasks)"
                ),
            )
        })?;
        let over = task.phase.is_terminal();
        Ok((task, over))
    })
    .await
}

/// The long poll behind `?wait=`: `look` reads the view (locked) and says
/// what it found and whether that is final; until it is, the request
/// waits for a change of the task `id` (its result arriving), at most
/// `wait`, and looks again. What `look` last found is the answer when the
/// wait runs out or the gateway stops; its error is answered at once.
async fn long_poll<T>(
    shared: &Shared,
    id: Uuid,
    wait: Duration,
    mut look: impl FnMut(&View) -> Result<(T, bool), ApiError>,
) -> Result<T, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notify;
        let mut woken;
        {
            let mut view = shared.view();
            let (found, over) = look(&view)?;
            if over
                || tokio::time::Instant::now() >= deadline
                || shared.stopping.load(Ordering::Relaxed)
            {
                return Ok(found);
            }
            notify = view.waiter(id);
            // Registered before the view is unlocked, so a result applied
            // in between still wakes this request.
            woken = Box::pin(notify.notified());
            woken.as_mut().enable();
        }
        let _ = tokio::time::timeout_at(deadline, woken).await;
        drop(notify);
        shared.view().release_waiter(&id);
    }
}

/// The media type of `task`'s output.
fn content_type_of(task: &TaskView) -> &str {
    task.content_type
        .as_deref()
        .unwrap_or(crate::codec::DEFAULT_CONTENT_TYPE)
}

/// Adds `task`'s output (under `name`, embedded as its content type
/// allows) and its error, when it has them.
fn insert_outcome(map: &mut serde_json::Map<String, Value>, task: &TaskView, name: &str) {
    if let Some(output) = &task.output {
        crate::codec::render::embed_bytes(map, name, output, content_type_of(task));
    }
    if let Some(error) = &task.error {
        map.insert(
            "error".into(),
            json!({"kind": error.kind, "message": error.message}),
        );
    }
}

fn render(task: &TaskView) -> Value {
    let mut value = json!({
        "id": task.id,
        "type": task.task_type,
        "status": task.phase.name(),
        "attempts": task.attempts,
        "submitted_at": task.submitted_at,
        "finished_at": task.finished_at,
    });
    if let Some(map) = value.as_object_mut() {
        if task.output.is_some() {
            map.insert("content_type".into(), json!(content_type_of(task)));
        }
        insert_outcome(map, task, "result");
        if let Some(traceparent) = &task.traceparent {
            map.insert("traceparent".into(), json!(traceparent));
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_templates_or_unmatched() {
        assert_eq!(route_label("/v1/tasks"), "/v1/tasks");
        assert_eq!(route_label("/v1/tasks:batch"), "/v1/tasks:batch");
        assert_eq!(route_label("/v1/tasks/abc"), "/v1/tasks/:id");
        assert_eq!(route_label("/v1/tasks/"), "unmatched");
        assert_eq!(route_label("/v1/tasks/a/b"), "unmatched");
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
            workflow: Some(WorkflowRef {
                id: run,
                name: "w".into(),
                step: 1,
                child_index: Some(2),
                child_count: Some(i32::MAX),
            }),
        };
        let step = render_step(1, "t", &[&child]);
        let outputs = step["outputs"].as_array().expect("outputs");
        assert_eq!(outputs.len(), MAX_LISTED_OUTPUTS);
        assert_eq!(outputs[2], 7);
        assert_eq!(step["children"]["count"], i32::MAX);
        assert_eq!(step["status"], "running");
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
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
