//! `GET /v1/tasks` and `GET /v1/workflows`: pages of the status store,
//! newest first, with filters and a cursor.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::api::ApiError;
use super::status::store_unavailable;
use super::store::{Cursor, Filter, Page, StoreError};
use super::view::{Phase, TaskView};
use super::Shared;

/// Items per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// Most items per page.
pub const MAX_LIMIT: usize = 1_000;
/// Longest text filter (a type, a workflow name, an idempotency key).
const MAX_FILTER_CHARS: usize = 256;

/// Every task status a filter may name.
pub(super) const TASK_STATUSES: [&str; 7] = [
    "scheduled",
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
];
/// Every run status the store keeps.
pub(super) const RUN_STATUSES: [&str; 5] =
    ["queued", "running", "succeeded", "failed", "cancelled"];

fn invalid(field: &str, why: impl Into<String>) -> ApiError {
    ApiError::field(field, why).with(StatusCode::BAD_REQUEST, "invalid_parameter")
}

/// A time filter: ms since the epoch, or an RFC 3339 time.
fn parse_time(field: &str, text: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            invalid(
                field,
                "must be ms since the epoch or an RFC 3339 time such as \"2026-12-03T12:00:00Z\"",
            )
        })
}

/// Reads a list query: `name_param` names the type or workflow filter,
/// `statuses` the statuses it may ask for; `key` is taken when `keys`.
fn parse_filter(
    params: &BTreeMap<String, String>,
    name_param: &str,
    statuses: &[&str],
    keys: bool,
) -> Result<Filter, ApiError> {
    let known: &[&str] = if keys {
        &["type", "status", "key", "since", "until", "limit", "cursor"]
    } else {
        &["name", "status", "since", "until", "limit", "cursor"]
    };
    if let Some(unknown) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(invalid(
            unknown,
            format!(
                "unknown query parameter; this route takes {}",
                known.join(", ")
            ),
        ));
    }
    let text = |field: &str| -> Result<Option<String>, ApiError> {
        match params.get(field) {
            None => Ok(None),
            Some(v) if v.is_empty() => Err(invalid(field, "must not be empty")),
            Some(v) if v.chars().count() > MAX_FILTER_CHARS => Err(invalid(
                field,
                format!("must be at most {MAX_FILTER_CHARS} characters"),
            )),
            Some(v) => Ok(Some(v.clone())),
        }
    };
    let status = match params.get("status") {
        None => None,
        Some(s) if statuses.contains(&s.as_str()) => Some(s.clone()),
        Some(s) => {
            return Err(invalid(
                "status",
                format!(
                    "unknown status {:?}; one of {}",
                    s.chars().take(40).collect::<String>(),
                    statuses.join(", ")
                ),
            ))
        }
    };
    let since = params
        .get("since")
        .map(|t| parse_time("since", t))
        .transpose()?;
    let until = params
        .get("until")
        .map(|t| parse_time("until", t))
        .transpose()?;
    if let (Some(since), Some(until)) = (since, until) {
        if since > until {
            return Err(invalid("since", "must not be after until"));
        }
    }
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(invalid(
                    "limit",
                    format!("must be a whole number from 1 to {MAX_LIMIT}"),
                ))
            }
        },
    };
    let cursor = match params.get("cursor") {
        None => None,
        Some(text) => Some(Cursor::decode(text).ok_or_else(|| {
            invalid(
                "cursor",
                "not a cursor (time.sequence, as next_cursor gives it); pass next_cursor from the previous page as it is",
            )
        })?),
    };
    Ok(Filter {
        name: text(name_param)?,
        status,
        key: if keys { text("key")? } else { None },
        since,
        until,
        limit,
        cursor,
    })
}

/// A task as a list shows it: no output (a page stays small), the rest
/// of what `GET /v1/tasks/{id}` shows.
fn summary(task: &TaskView) -> Value {
    let mut value = super::status::head(task);
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "status_url".into(),
            json!(super::submit::status_url(&task.id)),
        );
        if let Some(error) = &task.error {
            map.insert(
                "error".into(),
                json!({"kind": error.kind, "message": error.message}),
            );
        }
        if let Some(attempt) = &task.attempt {
            map.insert("started_at".into(), json!(attempt.started_at));
            map.insert("worker".into(), json!(attempt.worker));
        }
        if let Some(w) = &task.workflow {
            map.insert(
                "workflow".into(),
                json!({"id": w.id, "name": w.name, "step": w.step}),
            );
        }
        if let Some(key) = &task.idempotency_key {
            map.insert("idempotency_key".into(), json!(key));
        }
        if task.phase == Phase::Scheduled {
            map.insert("run_at".into(), json!(task.run_at));
        }
    }
    value
}

/// `GET /v1/tasks`: tasks newest first (by submission, or by when the
/// store first read of them), filtered by `type`, `status`, `key`,
/// `since`/`until`; `limit` per page, `cursor` for the next.
pub(super) async fn list_tasks(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let filter = match parse_filter(&params, "type", &TASK_STATUSES, true) {
        Ok(filter) => filter,
        Err(error) => return error.into_response(),
    };
    let store = shared.store.clone();
    let status = filter.status.clone();
    let page = tokio::task::spawn_blocking(move || store.tasks(&filter)).await;
    let page = page.map(|page| page.map(|page| newest(&shared, page, status.as_deref())));
    answer(page, "tasks", summary)
}

/// A page of the store brought up to the in-memory view, which is ahead
/// of the store by up to one write batch (~100 ms): a task the caller
/// saw finish through `GET /v1/tasks/{id}` lists as finished too. A task
/// that has moved past the `status` filter asked for since the store
/// wrote it leaves the page (it lists under its new status).
fn newest(shared: &Shared, mut page: Page<TaskView>, status: Option<&str>) -> Page<TaskView> {
    let view = shared.view();
    page.items = page
        .items
        .into_iter()
        .filter_map(|stored| {
            let live = view.get(&stored.id).map(TaskView::summary);
            super::status::merge(live.as_ref(), Some(&stored))
        })
        .filter(|task| status.is_none_or(|s| task.phase.name() == s))
        .collect();
    page
}

/// A page as JSON under `name`, with its `next_cursor`; a store error 503.
fn answer<T>(
    page: Result<Result<Page<T>, StoreError>, tokio::task::JoinError>,
    name: &str,
    item: impl Fn(&T) -> Value,
) -> Response {
    match page {
        Ok(Ok(page)) => Json(json!({
            name: page.items.iter().map(item).collect::<Vec<_>>(),
            "next_cursor": page.next.map(Cursor::encode),
        }))
        .into_response(),
        Ok(Err(error)) => store_unavailable(&error).into_response(),
        Err(error) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            error.to_string(),
        )
        .into_response(),
    }
}

/// `GET /v1/workflows`: workflow runs newest first, filtered by `name`,
/// `status`, `since`/`until`.
pub(super) async fn list_runs(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let filter = match parse_filter(&params, "name", &RUN_STATUSES, false) {
        Ok(filter) => filter,
        Err(error) => return error.into_response(),
    };
    let store = shared.store.clone();
    let page = tokio::task::spawn_blocking(move || store.runs(&filter)).await;
    answer(page, "workflows", |run| {
        json!({
            "id": run.id,
            "workflow": run.name,
            "status": run.status,
            "created_at": run.created_at,
            "finished_at": run.finished_at,
            "status_url": super::submit::run_url(&run.id),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn refusal(pairs: &[(&str, &str)]) -> (String, String) {
        let error =
            parse_filter(&params(pairs), "type", &TASK_STATUSES, true).expect_err("refused");
        let body = error.body();
        (
            body["error"]["field"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }

    #[test]
    fn bad_list_queries_are_refused_naming_the_field() {
        for (pairs, field, says) in [
            (vec![("limit", "0")], "limit", "from 1 to 1000"),
            (vec![("limit", "1001")], "limit", "from 1 to 1000"),
            (vec![("limit", "ten")], "limit", "whole number"),
            (vec![("cursor", "nope")], "cursor", "not a cursor"),
            (
                vec![("since", "20"), ("until", "10")],
                "since",
                "after until",
            ),
            (
                vec![("status", "done")],
                "status",
                "unknown status \"done\"",
            ),
            (vec![("since", "yesterday")], "since", "RFC 3339"),
            (vec![("type", "")], "type", "not be empty"),
            (vec![("colour", "red")], "colour", "unknown query parameter"),
        ] {
            let (got_field, message) = refusal(&pairs);
            assert_eq!(got_field, field, "{pairs:?}: {message}");
            assert!(message.contains(says), "{pairs:?}: {message}");
        }
    }

    #[test]
    fn a_good_query_reads_every_filter() {
        let cursor = parse_filter(&params(&[("limit", "1")]), "type", &TASK_STATUSES, true)
            .map(|f| f.limit)
            .unwrap();
        assert_eq!(cursor, 1);
        let filter = parse_filter(
            &params(&[
                ("type", "echo"),
                ("status", "failed"),
                ("key", "k"),
                ("since", "2026-12-03T00:00:00Z"),
                ("until", "1796256000000"),
            ]),
            "type",
            &TASK_STATUSES,
            true,
        )
        .unwrap();
        assert_eq!(filter.name.as_deref(), Some("echo"));
        assert_eq!(filter.status.as_deref(), Some("failed"));
        assert_eq!(filter.key.as_deref(), Some("k"));
        assert_eq!(filter.since, Some(1_796_256_000_000));
        assert_eq!(filter.until, Some(1_796_256_000_000));
        assert_eq!(filter.limit, DEFAULT_LIMIT);
    }
}
