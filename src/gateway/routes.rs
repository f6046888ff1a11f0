//! The router: routes, the middleware every request passes (metrics, time
//! limit, bearer token), and the probe and metrics routes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use rdkafka::producer::Producer;
use serde_json::json;

use super::api::ApiError;
use super::status::{get_run, get_task};
use super::submit::{start_run, submit_batch, submit_one};
use super::*;

/// The API's authenticated routes, without the token check (the
/// dashboard calls them in-process on behalf of its sessions).
fn api_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/tasks", post(submit_one).get(super::lists::list_tasks))
        .route("/v1/tasks:batch", post(submit_batch))
        // `/v1/tasks/{id}` (GET) and `/v1/tasks/{id}:cancel` (POST) share
        // one router path (a parameter cannot carry a suffix there): the
        // method is chosen here, so each answers 405 with its own `Allow`.
        .route("/v1/tasks/{id}", any(task_route))
        .route("/v1/tasks/{id}/events", get(super::lifecycle::task_events))
        .route("/v1/workflows/{workflow}", post(start_run).get(get_run))
        .route("/v1/workflows", get(super::lists::list_runs))
        .route("/v1/schedules", get(super::schedules::list_schedules))
        .route("/v1/workers", get(list_workers))
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    let api =
        api_routes().route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    // Authenticated by the attempt's progress token, not a bearer token:
    // the user's app reports progress with what conveyor sent it.
    let open = Router::new()
        .route(
            "/v1/tasks/{id}/progress",
            post(super::lifecycle::post_progress),
        )
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
    let dashboard = if shared.settings.ui {
        super::ui::router(shared.clone(), api_routes().with_state(shared.clone()))
    } else {
        Router::new()
    };
    api.merge(open)
        .with_state(shared.clone())
        .merge(dashboard)
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
        .layer(middleware::from_fn_with_state(shared, observe))
}

/// `GET /v1/workers`: every worker the gateway knows of, live ones first.
async fn list_workers(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let now = crate::codec::now_millis();
    let directory = shared.workers.directory();
    let workers: Vec<serde_json::Value> = directory
        .list(now)
        .iter()
        .map(|(liveness, report)| crate::workers::to_json(*liveness, report))
        .collect();
    Json(json!({
        "workers": workers,
        "caught_up": directory.caught_up(),
        "enabled": shared.config.workers.enabled,
    }))
}

/// `GET /v1/tasks/{id}` and `POST /v1/tasks/{id}:cancel`.
async fn task_route(
    state: State<Arc<Shared>>,
    method: axum::http::Method,
    id: axum::extract::Path<String>,
    query: axum::extract::Query<std::collections::BTreeMap<String, String>>,
) -> Response {
    use axum::http::Method;
    let cancel = id.0.strip_suffix(":cancel");
    match (cancel, &method) {
        (None, &Method::GET | &Method::HEAD) => get_task(state, id, query).await,
        (Some(task), &Method::POST) => super::lifecycle::cancel_task(&state.0, task).await,
        _ => {
            let mut response = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see /openapi.json",
            )
            .into_response();
            let allow = if cancel.is_some() { "POST" } else { "GET,HEAD" };
            response
                .headers_mut()
                .insert("allow", HeaderValue::from_static(allow));
            response
        }
    }
}

/// The route a path belongs to, from [`ROUTES`], or `unmatched`: a bounded
/// set of label values whatever paths clients send. (This runs before the
/// router, where axum's `MatchedPath` is not known yet.) The id route is
/// written `/v1/tasks/:id`: braces in label values trip up some
/// exposition-format parsers.
pub(super) fn route_label(path: &str) -> &'static str {
    if path == "/ui" || path.starts_with("/ui/") {
        return "/ui";
    }
    if let Some(id) = path.strip_prefix("/v1/tasks/") {
        if !id.is_empty() && !id.contains('/') {
            return match id.strip_suffix(":cancel") {
                Some(id) if !id.is_empty() => "/v1/tasks/:id:cancel",
                _ => "/v1/tasks/:id",
            };
        }
        match id.split_once('/') {
            Some((id, "progress")) if !id.is_empty() => return "/v1/tasks/:id/progress",
            Some((id, "events")) if !id.is_empty() => return "/v1/tasks/:id/events",
            _ => {}
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
pub(super) async fn observe(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
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
pub(super) async fn time_limit(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
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
pub(super) async fn authenticate(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
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
    if super::secret::token_position(tokens, presented).is_some() {
        next.run(request).await
    } else {
        unauthorized("the bearer token is not one of gateway.auth_tokens")
    }
}

pub(super) fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    response
}

pub(super) async fn metrics_text(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}

/// Ready when the broker answers a metadata request and the status view
/// has caught up.
pub(super) async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let mut problems = Vec::new();
    if shared.draining.load(Ordering::Relaxed) {
        problems.push(
            "the gateway is stopping (gateway.shutdown_delay_ms): it serves what comes, \
             but takes no new traffic"
                .to_owned(),
        );
    }
    if !shared.caught_up.load(Ordering::Relaxed) {
        let behind = shared
            .metrics
            .gateway_store_behind
            .with_label_values(&[] as &[&str])
            .get();
        problems.push(format!(
            "the status store is still catching up with the results and task topics \
             ({behind} records behind at the last count)"
        ));
    }
    if let Some(why) = shared.store_failing().clone() {
        problems.push(format!("the status store cannot write: {why}"));
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
