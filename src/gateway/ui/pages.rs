//! The dashboard's pages, as maud templates: every value interpolated is
//! escaped by maud; nothing here writes raw HTML but the doctype.

use std::collections::BTreeMap;

use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use super::Visitor;
use crate::gateway::lists::{RUN_STATUSES, TASK_STATUSES};
use crate::gateway::view::LiveEvent;

/// Most bytes of a payload, result or progress value a page shows.
const SHOWN_BYTES: usize = 16 * 1024;
/// Most bytes of an event's progress value, or of a dead letter's payload
/// in a list.
const SHOWN_SMALL: usize = 512;
/// Most children's outputs a run page shows per step.
const SHOWN_OUTPUTS: usize = 20;
/// Most workers the workers page lists (live ones first).
const SHOWN_WORKERS: usize = 100;
/// Most partitions the lag page lists (the most lagging first).
const SHOWN_PARTITIONS: usize = 250;

const NAV: &[(&str, &str)] = &[
    ("/ui", "Workers"),
    ("/ui/lag", "Lag"),
    ("/ui/tasks", "Tasks"),
    ("/ui/runs", "Workflow runs"),
    ("/ui/schedules", "Schedules"),
    ("/ui/dlq", "Dead letters"),
];

fn layout(v: &Visitor, title: &str, active: &str, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) " · conveyor" }
                link rel="icon" href="/ui/static/icon.svg";
                link rel="stylesheet" href="/ui/static/style.css";
            }
            body {
                header {
                    span.brand { "conveyor" }
                    nav {
                        @for (href, name) in NAV {
                            a href=(href) class=[(*href == active).then_some("on")] { (name) }
                        }
                    }
                    @if v.auth {
                        form.logout method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(v.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page with a title and one sentence (a refusal, a lookup that failed).
pub(super) fn message(title: &str, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · conveyor" }
                link rel="icon" href="/ui/static/icon.svg";
                link rel="stylesheet" href="/ui/static/style.css";
            }
            body {
                main {
                    h1 { (title) }
                    p.error { (text) }
                    p { a href="/ui" { "Back to the dashboard" } }
                }
            }
        }
    }
}

pub(super) fn login(csrf: &str, next: &str, note: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Sign in · conveyor" }
                link rel="icon" href="/ui/static/icon.svg";
                link rel="stylesheet" href="/ui/static/style.css";
            }
            body {
                main.login {
                    h1 { "conveyor" }
                    p { (note) }
                    form method="post" action="/ui/login" {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="next" value=(next);
                        label { "Token " input type="password" name="token" autocomplete="current-password" required; }
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

/// A time in ms since the epoch as UTC, to the millisecond.
fn at(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

fn at_value(value: &Value) -> String {
    at(value.as_i64())
}

/// A JSON value as indented text, at most [`SHOWN_BYTES`] of it.
fn json_text(value: &Value) -> String {
    cut(
        serde_json::to_string_pretty(value).unwrap_or_default(),
        SHOWN_BYTES,
    )
}

/// `text`, at most `most` bytes of it (cut at a character's boundary).
fn cut(text: String, most: usize) -> String {
    if text.len() <= most {
        return text;
    }
    let mut end = most;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n… ({} bytes in all; the first {most} shown)",
        &text[..end],
        text.len()
    )
}

/// Bytes as a page shows them, at most `most` of them: indented JSON when
/// they are JSON, else the text (invalid UTF-8 replaced).
fn bytes_text(bytes: &[u8], most: usize) -> String {
    let text = match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    };
    cut(text, most)
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

fn badge(status: &str) -> Markup {
    html! { span class=(format!("badge s-{status}")) { (status) } }
}

fn error_box(text: &str) -> Markup {
    html! { p.error { (text) } }
}

pub(super) fn workers(
    v: &Visitor,
    status: axum::http::StatusCode,
    body: &Value,
    now: i64,
) -> Markup {
    let list = body
        .get("workers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let content = html! {
        @if !status.is_success() {
            (error_box(&super::api_message(body)))
        }
        p.note { "Every worker reports itself to the workers topic every few seconds; one silent for three intervals is listed as silent. This page refreshes every 5 s." }
        table {
            thead { tr { th { "State" } th { "Worker" } th { "Version" } th { "Started" } th { "Last report" } th { "Processors" } } }
            tbody {
                @for w in list.iter().take(SHOWN_WORKERS) {
                    tr {
                        td { (badge(str_of(w, "state"))) }
                        td { code { (str_of(w, "worker")) } br; small { (str_of(w, "host")) " pid " (w.get("pid").and_then(Value::as_u64).unwrap_or(0)) } }
                        td { (str_of(w, "version")) }
                        td { (at_value(&w["started_at"])) }
                        td { (at_value(&w["at"])) " " small { "(" (now.saturating_sub(w["at"].as_i64().unwrap_or(now)) / 1000) " s ago)" } }
                        td {
                            @for p in w.get("processors").and_then(Value::as_array).into_iter().flatten() {
                                div {
                                    b { (str_of(p, "name")) } " — "
                                    (p["assigned"].as_u64().unwrap_or(0)) " partitions, "
                                    (p["in_flight"].as_u64().unwrap_or(0)) " in flight, "
                                    (p["tasks_per_s"].as_f64().unwrap_or(0.0)) " tasks/s"
                                    @if p["breaker_open"].as_bool().unwrap_or(false) { " " span.badge.s-failed { "breaker open" } }
                                }
                            }
                        }
                    }
                }
                @if list.is_empty() {
                    tr { td colspan="6" { "No worker has reported yet." } }
                }
            }
        }
        @if list.len() > SHOWN_WORKERS {
            p.note { "The first " (SHOWN_WORKERS) " of " (list.len()) " workers are listed; GET /v1/workers has them all." }
        }
    };
    layout(v, "Workers", "/ui", Some(5), content)
}

pub(super) fn lag(v: &Visitor, status: axum::http::StatusCode, body: &Value) -> Markup {
    let list = body
        .get("workers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // Per processor over the live workers: throughput, in flight, lag.
    let mut totals: BTreeMap<String, (f64, u64, i64, i64)> = BTreeMap::new();
    let mut rows = Vec::new();
    for w in list.iter().filter(|w| str_of(w, "state") == "live") {
        for p in w
            .get("processors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = str_of(p, "name").to_owned();
            let entry = totals.entry(name.clone()).or_default();
            entry.0 += p["tasks_per_s"].as_f64().unwrap_or(0.0);
            entry.1 += p["in_flight"].as_u64().unwrap_or(0);
            for part in p
                .get("partitions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let committed = part["committed_lag"].as_i64().unwrap_or(0);
                let processing = part["processing_lag"].as_i64().unwrap_or(0);
                entry.2 += committed;
                entry.3 += processing;
                rows.push((
                    name.clone(),
                    str_of(part, "topic").to_owned(),
                    part["partition"].as_i64().unwrap_or(0),
                    committed,
                    processing,
                    str_of(w, "worker").to_owned(),
                ));
            }
        }
    }
    // The most lagging first, then in order.
    rows.sort_by(|a, b| b.3.cmp(&a.3).then_with(|| a.cmp(b)));
    let all_rows = rows.len();
    rows.truncate(SHOWN_PARTITIONS);
    let content = html! {
        @if !status.is_success() {
            (error_box(&super::api_message(body)))
        }
        p.note { "From the live workers' reports (lag from librdkafka's statistics, every metrics.lag_interval_ms); no Prometheus needed. This page refreshes every 5 s." }
        h2 { "Processors" }
        table {
            thead { tr { th { "Processor" } th.num { "Tasks/s" } th.num { "In flight" } th.num { "Committed lag" } th.num { "Processing lag" } } }
            tbody {
                @for (name, (rate, in_flight, committed, processing)) in &totals {
                    tr { td { (name) } td.num { (format!("{rate:.1}")) } td.num { (in_flight) } td.num { (committed) } td.num { (processing) } }
                }
                @if totals.is_empty() { tr { td colspan="5" { "No live worker." } } }
            }
        }
        h2 { "Partitions" small { " (the most lagging first)" } }
        table {
            thead { tr { th { "Processor" } th { "Topic" } th.num { "Partition" } th.num { "Committed lag" } th.num { "Processing lag" } th { "Worker" } } }
            tbody {
                @for (name, topic, partition, committed, processing, worker) in &rows {
                    tr { td { (name) } td { (topic) } td.num { (partition) } td.num { (committed) } td.num { (processing) } td { code { (worker) } } }
                }
                @if rows.is_empty() { tr { td colspan="6" { "No partition reported yet." } } }
            }
        }
        @if all_rows > SHOWN_PARTITIONS {
            p.note { "The " (SHOWN_PARTITIONS) " most lagging of " (all_rows) " partitions are listed." }
        }
    };
    layout(v, "Lag and throughput", "/ui/lag", Some(5), content)
}

fn field(params: &BTreeMap<String, String>, key: &str) -> String {
    params.get(key).cloned().unwrap_or_default()
}

/// A link to the next page of a list: the same filters, the cursor.
fn next_link(base: &str, params: &BTreeMap<String, String>, keys: &[&str], cursor: &str) -> String {
    let filters = super::query_of(params, keys);
    let cursor = serde_urlencoded::to_string([("cursor", cursor)]).unwrap_or_default();
    if filters.is_empty() {
        format!("{base}?{cursor}")
    } else {
        format!("{base}?{filters}&{cursor}")
    }
}

pub(super) fn tasks(
    v: &Visitor,
    params: &BTreeMap<String, String>,
    listed: Result<Value, String>,
) -> Markup {
    let status = field(params, "status");
    let content = html! {
        form.filters method="get" action="/ui/tasks" {
            label { "Id " input name="id" placeholder="task id" value=(field(params, "id")); }
            label { "Type " input name="type" value=(field(params, "type")); }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in &TASK_STATUSES {
                        option value=(s) selected[status == *s] { (s) }
                    }
                }
            }
            label { "Key " input name="key" value=(field(params, "key")); }
            label { "Since " input name="since" placeholder="2026-12-03T10:00:00Z" value=(field(params, "since")); }
            label { "Until " input name="until" value=(field(params, "until")); }
            button type="submit" { "Filter" }
        }
        @match &listed {
            Err(why) => (error_box(why)),
            Ok(body) => {
                table {
                    thead { tr { th { "Task" } th { "Type" } th { "Status" } th { "Submitted" } th { "Finished" } th.num { "Attempts" } th { "Error" } } }
                    tbody {
                        @for t in body.get("tasks").and_then(Value::as_array).into_iter().flatten() {
                            tr {
                                td { a href=(format!("/ui/tasks/{}", str_of(t, "id"))) { code { (str_of(t, "id")) } } }
                                td { (str_of(t, "type")) }
                                td { (badge(str_of(t, "status"))) }
                                td { (at_value(&t["submitted_at"])) }
                                td { (at_value(&t["finished_at"])) }
                                td.num { (t["attempts"].as_i64().map(|a| a.to_string()).unwrap_or_default()) }
                                td { (t.pointer("/error/kind").and_then(Value::as_str).unwrap_or("")) }
                            }
                        }
                    }
                }
                @if let Some(cursor) = body.get("next_cursor").and_then(Value::as_str) {
                    p { a.next href=(next_link("/ui/tasks", params, &["type", "status", "key", "since", "until"], cursor)) { "Older tasks →" } }
                }
            }
        }
    };
    layout(v, "Tasks", "/ui/tasks", None, content)
}

pub(super) fn task(
    v: &Visitor,
    t: &Value,
    payload: Option<(Vec<u8>, Option<usize>)>,
    events: &[LiveEvent],
    note: Option<&str>,
) -> Markup {
    let id = str_of(t, "id");
    let status = str_of(t, "status");
    let live = matches!(status, "scheduled" | "queued" | "running" | "retrying");
    let content = html! {
        @if note == Some("cancel") {
            p.ok { "Cancellation requested: the task ends cancelled once its worker sees it." }
        }
        table.facts {
            tr { th { "Id" } td { code { (id) } } }
            tr { th { "Type" } td { (str_of(t, "type")) } }
            tr { th { "Status" } td { (badge(status)) } }
            tr { th { "Submitted" } td { (at_value(&t["submitted_at"])) } }
            @if t.get("run_at").is_some() { tr { th { "Runs at" } td { (at_value(&t["run_at"])) } } }
            @if t.get("started_at").is_some() { tr { th { "Started" } td { (at_value(&t["started_at"])) } } }
            tr { th { "Finished" } td { (at_value(&t["finished_at"])) } }
            tr { th { "Attempts" } td { (t["attempts"].as_i64().or(t["attempt"].as_i64()).map(|a| a.to_string()).unwrap_or_default()) } }
            tr { th { "Worker" } td { code { (str_of(t, "worker")) } } }
            tr { th { "Trace" } td { code { (str_of(t, "traceparent")) } } }
            @if let Some(w) = t.get("workflow") {
                tr { th { "Workflow run" } td { a href=(format!("/ui/runs/{}", str_of(w, "id"))) { (str_of(w, "name")) } } }
            }
        }
        @if live {
            form.action method="post" action=(format!("/ui/tasks/{id}/cancel")) {
                input type="hidden" name="csrf" value=(v.csrf);
                button.danger type="submit" { "Cancel this task" }
            }
        }
        h2 { "Payload" }
        @match &payload {
            Some((bytes, size)) => {
                pre.payload { (bytes_text(bytes, SHOWN_BYTES)) }
                @if let Some(size) = size { p.note { "The status store keeps the first " (bytes.len()) " of " (size) " bytes." } }
            }
            None => p.note { "Not known here (the task's request was not read by this gateway, or the store no longer has it)." },
        }
        @if let Some(progress) = t.get("progress") {
            h2 { "Progress" }
            pre { (json_text(progress)) }
        }
        @if let Some(result) = t.get("result") {
            h2 { "Result" }
            pre.result { (json_text(result)) }
        }
        @if let Some(error) = t.get("error") {
            h2 { "Error" }
            pre.error-text { (str_of(error, "kind")) ": " (cut(str_of(error, "message").to_owned(), SHOWN_BYTES)) }
        }
        @if status == "failed" {
            p { a href=(format!("/ui/dlq?task={id}")) { "Its dead letter, if it has one →" } }
        }
        h2 { "Events" }
        table {
            thead { tr { th { "When" } th { "Event" } th.num { "Attempt" } th { "Worker" } th { "Detail" } } }
            tbody {
                @for e in events {
                    tr {
                        td { (at(Some(e.at))) }
                        td { (e.kind) }
                        td.num { (e.attempt) }
                        td { code { (e.worker) } }
                        td {
                            @if let Some(p) = &e.progress { code { (bytes_text(p, SHOWN_SMALL)) } }
                            @if let Some(due) = e.due { "due " (at(Some(due))) }
                            @if let Some(m) = &e.message { " " (m) }
                        }
                    }
                }
                @if events.is_empty() { tr { td colspan="5" { "No events held for it (the gateway keeps them for recent tasks only)." } } }
            }
        }
    };
    layout(v, "Task", "/ui/tasks", None, content)
}

pub(super) fn runs(
    v: &Visitor,
    params: &BTreeMap<String, String>,
    listed: Result<Value, String>,
) -> Markup {
    let status = field(params, "status");
    let content = html! {
        form.filters method="get" action="/ui/runs" {
            label { "Workflow " input name="name" value=(field(params, "name")); }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in &RUN_STATUSES { option value=(s) selected[status == *s] { (s) } }
                }
            }
            label { "Since " input name="since" value=(field(params, "since")); }
            label { "Until " input name="until" value=(field(params, "until")); }
            button type="submit" { "Filter" }
        }
        @match &listed {
            Err(why) => (error_box(why)),
            Ok(body) => {
                table {
                    thead { tr { th { "Run" } th { "Workflow" } th { "Status" } th { "Started" } th { "Finished" } } }
                    tbody {
                        @for r in body.get("workflows").and_then(Value::as_array).into_iter().flatten() {
                            tr {
                                td { a href=(format!("/ui/runs/{}", str_of(r, "id"))) { code { (str_of(r, "id")) } } }
                                td { (str_of(r, "workflow")) }
                                td { (badge(str_of(r, "status"))) }
                                td { (at_value(&r["created_at"])) }
                                td { (at_value(&r["finished_at"])) }
                            }
                        }
                    }
                }
                @if let Some(cursor) = body.get("next_cursor").and_then(Value::as_str) {
                    p { a.next href=(next_link("/ui/runs", params, &["name", "status", "since", "until"], cursor)) { "Older runs →" } }
                }
            }
        }
    };
    layout(v, "Workflow runs", "/ui/runs", None, content)
}

pub(super) fn run(v: &Visitor, r: &Value) -> Markup {
    let content = html! {
        table.facts {
            tr { th { "Id" } td { code { (str_of(r, "id")) } } }
            tr { th { "Workflow" } td { (str_of(r, "workflow")) } }
            tr { th { "Status" } td { (badge(str_of(r, "status"))) } }
            tr { th { "Finished" } td { (at_value(&r["finished_at"])) } }
        }
        h2 { "Steps" }
        table {
            thead { tr { th.num { "#" } th { "Task type" } th { "Status" } th { "Children" } th { "Output" } } }
            tbody {
                @for s in r.get("steps").and_then(Value::as_array).into_iter().flatten() {
                    tr {
                        td.num { (s["index"].as_i64().unwrap_or(0)) }
                        td { (str_of(s, "type")) }
                        td { (badge(str_of(s, "status"))) }
                        td {
                            @if let Some(c) = s.get("children") {
                                (c["count"].as_i64().unwrap_or(0)) " fanned out: "
                                (c["succeeded"].as_i64().unwrap_or(0)) " succeeded, "
                                (c["failed"].as_i64().unwrap_or(0)) " failed"
                            }
                        }
                        td {
                            @if let Some(output) = s.get("output") { code { (json_text(output)) } }
                            @if let Some(outputs) = s.get("outputs").and_then(Value::as_array) {
                                code { (json_text(&Value::Array(outputs.iter().take(SHOWN_OUTPUTS).cloned().collect()))) }
                                @if outputs.len() > SHOWN_OUTPUTS { " … " (outputs.len()) " in all" }
                            }
                            @if let Some(error) = s.get("error") { span.error-text { (str_of(error, "kind")) ": " (cut(str_of(error, "message").to_owned(), SHOWN_BYTES)) } }
                        }
                    }
                }
            }
        }
        @if let Some(result) = r.get("result") {
            h2 { "Result (the join's)" }
            pre.result { (json_text(result)) }
        }
        @if let Some(error) = r.get("error") {
            h2 { "Error" }
            pre.error-text { (str_of(error, "kind")) ": " (cut(str_of(error, "message").to_owned(), SHOWN_BYTES)) }
        }
    };
    layout(v, "Workflow run", "/ui/runs", None, content)
}

pub(super) fn schedules(v: &Visitor, listed: Result<Value, String>) -> Markup {
    let content = html! {
        @match &listed {
            Err(why) => (error_box(why)),
            Ok(body) => {
                table {
                    thead { tr { th { "Schedule" } th { "Cron" } th { "Zone" } th { "Task type" } th { "Misfire" } th { "Next fire" } th { "Last fired" } } }
                    tbody {
                        @let list = body.get("schedules").and_then(Value::as_array).cloned().unwrap_or_default();
                        @for s in &list {
                            tr {
                                td { (str_of(s, "name")) }
                                td { code { (str_of(s, "cron")) } }
                                td { (str_of(s, "timezone")) }
                                td { (str_of(s, "type")) }
                                td { (str_of(s, "misfire")) }
                                td { (str_of(s, "next")) }
                                td { (str_of(s, "last_fired")) }
                            }
                        }
                        @if list.is_empty() { tr { td colspan="7" { "No [[schedules]] configured." } } }
                    }
                }
            }
        }
    };
    layout(v, "Schedules", "/ui/schedules", None, content)
}

type Letters = (String, (Vec<crate::dlq::DeadLetter>, bool));

pub(super) fn dlq(
    v: &Visitor,
    topics: &[String],
    params: &BTreeMap<String, String>,
    read: Result<Letters, String>,
) -> Markup {
    let chosen = field(params, "topic");
    let content = html! {
        form.filters method="get" action="/ui/dlq" {
            label { "Topic "
                select name="topic" {
                    @for t in topics { option value=(t) selected[chosen == *t] { (t) } }
                }
            }
            label { "Type " input name="type" value=(field(params, "type")); }
            label { "Error kind " input name="kind" value=(field(params, "kind")); }
            label { "Partition " input name="partition" size="4" value=(field(params, "partition")); }
            label { "From offset " input name="from" size="8" value=(field(params, "from")); }
            label { "To offset " input name="to" size="8" value=(field(params, "to")); }
            label { "Task " input name="task" placeholder="task id" value=(field(params, "task")); }
            button type="submit" { "Filter" }
        }
        @match &read {
            Err(why) => (error_box(why)),
            Ok((topic, (letters, more))) => {
                form method="post" action="/ui/dlq/replay" {
                    input type="hidden" name="csrf" value=(v.csrf);
                    table {
                        thead { tr { th { "" } th { "Letter" } th { "Task" } th { "Type" } th { "Error" } th.num { "Attempts" } th { "From" } } }
                        tbody {
                            @for l in letters {
                                @let s = l.summary();
                                tr {
                                    td { input type="checkbox" name="letter" value=(format!("{topic}/{}/{}", l.partition, l.offset)); }
                                    td { code { (l.partition) "/" (l.offset) } }
                                    td { @if let Some(id) = s["id"].as_str() { a href=(format!("/ui/tasks/{id}")) { code { (id) } } } }
                                    td { (str_of(&s, "type")) }
                                    td { b { (str_of(&s, "kind")) } " " (cut(str_of(&s, "error").to_owned(), SHOWN_SMALL)) }
                                    td.num { (str_of(&s, "attempts")) }
                                    td { code { (str_of(&s, "original")) } }
                                }
                                tr.detail {
                                    td {}
                                    td colspan="6" { details { summary { "Payload" } pre.payload { (letter_payload(l)) } } }
                                }
                            }
                            @if letters.is_empty() { tr { td colspan="7" { "No dead letter matches." } } }
                        }
                    }
                    @if *more { p.note { "More may match: the first " (letters.len()) " are listed; narrow the filters." } }
                    @if !letters.is_empty() {
                        p { button type="submit" { "Replay selected…" } " " small { "(a preview comes first; nothing is produced until you confirm)" } }
                    }
                }
            }
        }
    };
    layout(v, "Dead letters", "/ui/dlq", None, content)
}

fn letter_payload(letter: &crate::dlq::DeadLetter) -> String {
    match &letter.request {
        Ok(request) => bytes_text(&request.payload, SHOWN_SMALL),
        Err(e) => format!("not a task request: {e}"),
    }
}

pub(super) fn replay(
    v: &Visitor,
    selected: &[(String, i32, i64)],
    lines: &[Value],
    confirmed: bool,
    missing: usize,
) -> Markup {
    let content = html! {
        @if confirmed {
            p.ok { "Replayed: each task below was produced again to its topic with its attempt reset to 1." }
        } @else {
            p.note { "Preview (a dry run): nothing has been produced yet. Replays are not de-duplicated: confirming twice runs these tasks twice." }
        }
        @if missing > 0 {
            p.error { (missing) " selected dead letter(s) were not found (the topic no longer has them)." }
        }
        table {
            thead { tr { th { "Letter" } th { "Task" } th { "To" } th { "Outcome" } } }
            tbody {
                @for l in lines {
                    tr {
                        td { code { (l["partition"].as_i64().unwrap_or(0)) "/" (l["offset"].as_i64().unwrap_or(0)) } }
                        td { @if let Some(id) = l["id"].as_str() { a href=(format!("/ui/tasks/{id}")) { code { (id) } } } }
                        td { (str_of(l, "to")) }
                        td { (str_of(l, "status")) }
                    }
                }
            }
        }
        @if !confirmed && !lines.is_empty() {
            form method="post" action="/ui/dlq/replay" {
                input type="hidden" name="csrf" value=(v.csrf);
                input type="hidden" name="confirm" value="yes";
                @for (topic, partition, offset) in selected {
                    input type="hidden" name="letter" value=(format!("{topic}/{partition}/{offset}"));
                }
                button.danger type="submit" { "Confirm: replay " (lines.len()) }
                " " a href="/ui/dlq" { "Cancel" }
            }
        }
    };
    layout(
        v,
        if confirmed {
            "Replayed"
        } else {
            "Replay: preview"
        },
        "/ui/dlq",
        None,
        content,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visitor() -> Visitor {
        Visitor {
            set_cookie: None,
            csrf: "c".repeat(64),
            auth: true,
        }
    }

    #[test]
    fn text_is_cut_at_a_character_boundary() {
        let text = "é".repeat(10); // 20 bytes
        let shown = cut(text, 5);
        assert!(shown.starts_with("éé\n…"), "{shown}");
        assert!(shown.contains("20 bytes in all"));
        assert_eq!(bytes_text(b"{\"a\":1}", 100), "{\n  \"a\": 1\n}");
        assert_eq!(bytes_text(&[0xff, b'x'], 100), "\u{fffd}x");
    }

    #[test]
    fn a_task_page_stays_under_100_kb_whatever_the_task_holds() {
        let big = "x".repeat(1 << 20);
        let t = serde_json::json!({
            "id": "i", "type": "t", "status": "running",
            "result": big, "progress": big,
            "error": {"kind": "k", "message": big},
        });
        let events: Vec<LiveEvent> = (0..crate::gateway::view::MAX_TASK_EVENTS as i64)
            .map(|i| LiveEvent {
                offset: i,
                kind: "progress".into(),
                at: i,
                attempt: 1,
                worker: "w".into(),
                progress: Some(format!("\"{}\"", "p".repeat(64 * 1024)).into_bytes()),
                due: None,
                message: None,
            })
            .collect();
        let page = task(
            &visitor(),
            &t,
            Some((big.clone().into_bytes(), Some(1 << 20))),
            &events,
            None,
        )
        .into_string();
        assert!(page.len() < 100_000, "{} bytes", page.len());
    }
}
