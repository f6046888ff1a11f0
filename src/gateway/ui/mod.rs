//! The dashboard, served under `/ui`: server-rendered HTML (maud
//! templates, every value from a record escaped), one stylesheet of its
//! own, no script at all, so the Content-Security-Policy allows none.
//!
//! Pages read what the API serves, through the API's own router in-process
//! (the same checks, merges and bounds as `GET /v1/...`), plus what only
//! the gateway holds: a task's payload (the status store) and its events
//! (the in-memory view), and the dead letters (read from the dead-letter
//! topics on demand, bounded).
//!
//! Actions (cancel, replay, login, logout) are forms posted with the
//! session's CSRF token; see [`session`] for sessions and tokens.

mod pages;
mod session;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::Markup;
use serde_json::Value;
use tower::ServiceExt;

use super::Shared;
use crate::codec::now_millis;
use session::{Keys, Session};

pub(crate) use session::Keys as UiKeys;

/// Most dead letters one dashboard replay takes.
pub(super) const MAX_REPLAY: usize = 100;
/// Most dead letters one page lists (each with the start of its payload:
/// a page stays under 100 KB).
const MAX_LETTERS_LISTED: usize = 50;
/// How long listing dead letters may read, at most.
const LETTERS_READ_BUDGET: Duration = Duration::from_secs(5);
/// Most dead-letter reads (a page or a replay, each a consumer of its own)
/// at once per gateway; one more is answered 503.
const MAX_LETTER_READS: usize = 4;
/// Most bytes of an API answer a page reads.
const MAX_API_BYTES: usize = 16 * 1024 * 1024;

/// What the dashboard's handlers share.
struct Ui {
    shared: Arc<Shared>,
    /// The API's routes, without the bearer-token check (the dashboard's
    /// session stands for it).
    api: Router,
    /// Dead-letter reads under way ([`MAX_LETTER_READS`]).
    letter_reads: Arc<tokio::sync::Semaphore>,
    /// The configuration's dead-letter topics, sorted (computed once).
    dead_letter_topics: Vec<String>,
}

/// The dashboard's routes (with their state), to merge into the gateway's.
pub(super) fn router(shared: Arc<Shared>, api: Router) -> Router {
    let ui = Arc::new(Ui {
        shared: shared.clone(),
        api,
        letter_reads: Arc::new(tokio::sync::Semaphore::new(MAX_LETTER_READS)),
        dead_letter_topics: dead_letter_topics(&shared),
    });
    Router::new()
        .route("/ui", get(workers_page))
        .route("/ui/", get(workers_page))
        .route("/ui/lag", get(lag_page))
        .route("/ui/tasks", get(tasks_page))
        .route("/ui/tasks/{id}", get(task_page))
        .route("/ui/tasks/{id}/cancel", post(cancel_action))
        .route("/ui/runs", get(runs_page))
        .route("/ui/runs/{id}", get(run_page))
        .route("/ui/schedules", get(schedules_page))
        .route("/ui/dlq", get(dlq_page))
        .route("/ui/dlq/replay", post(replay_action))
        .route("/ui/login", get(login_page).post(login_action))
        .route("/ui/logout", post(logout_action))
        .route("/ui/static/style.css", get(stylesheet))
        .route("/ui/static/icon.svg", get(icon))
        .layer(middleware::from_fn(secure_headers))
        .with_state(ui)
}

/// Every dashboard answer: no script, no framing, nothing cached.
async fn secure_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("style.css"),
    )
        .into_response()
}

/// The tab's icon: three boxes on a belt.
async fn icon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        concat!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">"##,
            r##"<rect x="1" y="12" width="14" height="2" fill="#1d2330"/>"##,
            r##"<rect x="2" y="7" width="3.5" height="4" fill="#2457c5"/>"##,
            r##"<rect x="6.3" y="7" width="3.5" height="4" fill="#2457c5"/>"##,
            r##"<rect x="10.6" y="7" width="3.5" height="4" fill="#2457c5"/></svg>"##
        ),
    )
        .into_response()
}

/// Who is asking: the session, and the cookie to set when it is new.
struct Visitor {
    set_cookie: Option<String>,
    csrf: String,
    /// Whether the gateway asks for tokens (a logout button is shown).
    auth: bool,
}

impl Ui {
    fn keys(&self) -> &Keys {
        &self.shared.ui_keys
    }

    fn auth_on(&self) -> bool {
        !self.shared.settings.auth_tokens.is_empty()
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
        let value = session::cookie(cookies, session::COOKIE)?;
        self.keys().session_of(value, now_millis())
    }

    /// The position of the bearer token sent, if it is a configured one.
    fn bearer(&self, headers: &HeaderMap) -> Option<usize> {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|presented| self.token_of(presented.trim()))
    }

    /// The position of `presented` in `gateway.auth_tokens`: every token
    /// compared, each in constant time.
    fn token_of(&self, presented: &str) -> Option<usize> {
        super::secret::token_position(&self.shared.settings.auth_tokens, presented)
    }

    fn secure(headers: &HeaderMap) -> bool {
        headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
    }

    fn visitor(&self, session: Session, set_cookie: Option<String>) -> Visitor {
        Visitor {
            csrf: self.keys().csrf(&session),
            set_cookie,
            auth: self.auth_on(),
        }
    }

    /// The visitor of a page, or the login page (401) when tokens are
    /// configured and neither a logged-in session nor a bearer token came.
    fn admit(&self, headers: &HeaderMap, uri: &Uri) -> Result<Visitor, Box<Response>> {
        let path = uri.path_and_query().map_or("/ui", |p| p.as_str());
        let now = now_millis();
        match self.session(headers) {
            Some(s) if s.token.is_some() || !self.auth_on() => return Ok(self.visitor(s, None)),
            _ => {}
        }
        let token = self.bearer(headers);
        if self.auth_on() && token.is_none() {
            return Err(Box::new(self.login_form(
                headers,
                StatusCode::UNAUTHORIZED,
                path,
                "Sign in with one of the gateway's tokens (gateway.auth_tokens).",
            )));
        }
        let fresh = self.keys().new_session(token, now);
        let cookie = self.cookie_for(&fresh, headers);
        Ok(self.visitor(fresh, Some(cookie)))
    }

    /// The `Set-Cookie` value that hands `session` to the browser.
    fn cookie_for(&self, session: &Session, headers: &HeaderMap) -> String {
        session::set_cookie(
            &self.keys().cookie_value(session),
            session::SESSION_MS / 1000,
            Self::secure(headers),
        )
    }

    /// The login form, with a session of its own (not logged in) whose
    /// CSRF token the form carries.
    fn login_form(
        &self,
        headers: &HeaderMap,
        status: StatusCode,
        next: &str,
        note: &str,
    ) -> Response {
        let (session, cookie) = match self.session(headers) {
            Some(s) => (s, None),
            None => {
                let s = self.keys().new_session(None, now_millis());
                let c = self.cookie_for(&s, headers);
                (s, Some(c))
            }
        };
        let csrf = self.keys().csrf(&session);
        let mut response = html(status, pages::login(&csrf, safe_next(next), note));
        if let Some(cookie) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response.headers_mut().insert(header::SET_COOKIE, cookie);
        }
        response
    }

    /// The session of an action whose form carried `csrf`, or the refusal:
    /// 401 without a (logged-in, when tokens are on) session, 403 without
    /// the session's CSRF token or from another origin.
    fn act(
        &self,
        headers: &HeaderMap,
        csrf: Option<&str>,
        action: &str,
        logged_in: bool,
    ) -> Result<Session, Box<Response>> {
        let refuse = |status: StatusCode, why: &str| {
            self.count(action, "refused");
            tracing::warn!(action, why, "dashboard action refused");
            Box::new(html(status, pages::message("Refused", why)))
        };
        if !same_origin(headers) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "the form was posted from another site (Origin does not match Host)",
            ));
        }
        let Some(session) = self.session(headers) else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "no dashboard session: open the page again and repeat",
            ));
        };
        if logged_in && self.auth_on() && session.token.is_none() {
            return Err(refuse(StatusCode::UNAUTHORIZED, "sign in first"));
        }
        match csrf {
            Some(token) if self.keys().csrf_ok(&session, token) => Ok(session),
            Some(_) => Err(refuse(
                StatusCode::FORBIDDEN,
                "the form's CSRF token is not this session's: open the page again and repeat",
            )),
            None => Err(refuse(
                StatusCode::FORBIDDEN,
                "the form carried no CSRF token: actions are taken only from the dashboard's own forms",
            )),
        }
    }

    /// A turn to read dead letters, or the 503 page when
    /// [`MAX_LETTER_READS`] are under way (counted as a refused
    /// `dlq_read`).
    fn letter_read(
        &self,
        visitor: &Visitor,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, Box<Response>> {
        self.letter_reads.clone().try_acquire_owned().map_err(|_| {
            self.count("dlq_read", "refused");
            Box::new(page(
                visitor,
                StatusCode::SERVICE_UNAVAILABLE,
                pages::message(
                    "Dead letters",
                    &format!(
                        "{MAX_LETTER_READS} dead-letter reads are under way on this gateway; try again in a few seconds"
                    ),
                ),
            ))
        })
    }

    fn count(&self, action: &str, outcome: &str) {
        self.shared
            .metrics
            .gateway_ui_actions
            .with_label_values(&[action, outcome])
            .inc();
    }

    /// The API's answer for the one task or run `id` names (`{route}/{id}`),
    /// or the page saying why there is none (`title` heads it).
    async fn one(
        &self,
        visitor: &Visitor,
        id: &str,
        title: &str,
        route: &str,
    ) -> Result<(uuid::Uuid, Value), Box<Response>> {
        let Ok(id) = uuid::Uuid::try_parse(id) else {
            return Err(Box::new(page(
                visitor,
                StatusCode::BAD_REQUEST,
                pages::message(title, &format!("`{id}` is not an id (a UUID)")),
            )));
        };
        let (status, body) = self.api(&format!("{route}/{id}")).await;
        if !status.is_success() {
            return Err(Box::new(page(
                visitor,
                status,
                pages::message(title, &api_message(&body)),
            )));
        }
        Ok((id, body))
    }

    /// `GET uri` of the API: its status and JSON body.
    async fn api(&self, uri: &str) -> (StatusCode, Value) {
        let request = match Request::get(uri).body(Body::empty()) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, error_json(&e.to_string())),
        };
        let response = match self.api.clone().oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = response.status();
        match axum::body::to_bytes(response.into_body(), MAX_API_BYTES).await {
            Ok(bytes) => (
                status,
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| error_json(&String::from_utf8_lossy(&bytes))),
            ),
            Err(e) => (StatusCode::BAD_GATEWAY, error_json(&e.to_string())),
        }
    }
}

fn error_json(message: &str) -> Value {
    serde_json::json!({"error": {"code": "internal", "message": message}})
}

/// An API answer as a page takes it: 200 and the body, or the API's
/// status and its error's message.
fn listed((status, body): (StatusCode, Value)) -> (StatusCode, Result<Value, String>) {
    if status.is_success() {
        (StatusCode::OK, Ok(body))
    } else {
        (status, Err(api_message(&body)))
    }
}

/// The API error's message, for a page.
fn api_message(body: &Value) -> String {
    body.pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("the gateway could not answer")
        .to_owned()
}

/// Where a login may send the browser on: a dashboard path, never another
/// site.
fn safe_next(next: &str) -> &str {
    if next.starts_with("/ui") && !next.starts_with("//") && !next.contains("://") {
        next
    } else {
        "/ui"
    }
}

/// A form posted by a page of this gateway: no `Origin`, or one whose
/// host is the request's `Host`.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

/// An HTML answer.
fn html(status: StatusCode, markup: Markup) -> Response {
    (status, axum::response::Html(markup.into_string())).into_response()
}

/// A page for `visitor`, with its cookie when new.
fn page(visitor: &Visitor, status: StatusCode, markup: Markup) -> Response {
    let mut response = html(status, markup);
    if let Some(cookie) = visitor
        .set_cookie
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// A query string of `params` (the non-empty ones), for the API.
fn query_of(params: &BTreeMap<String, String>, keys: &[&str]) -> String {
    let pairs: Vec<(&str, &str)> = keys
        .iter()
        .filter_map(|k| {
            params
                .get(*k)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(|v| (*k, v))
        })
        .collect();
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

async fn workers_page(State(ui): State<Arc<Ui>>, headers: HeaderMap, uri: Uri) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (status, body) = ui.api("/v1/workers").await;
    page(
        &visitor,
        StatusCode::OK,
        pages::workers(&visitor, status, &body, now_millis()),
    )
}

async fn lag_page(State(ui): State<Arc<Ui>>, headers: HeaderMap, uri: Uri) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (status, body) = ui.api("/v1/workers").await;
    page(
        &visitor,
        StatusCode::OK,
        pages::lag(&visitor, status, &body),
    )
}

async fn tasks_page(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    uri: Uri,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if let Some(id) = params.get("id").map(|i| i.trim()).filter(|i| !i.is_empty()) {
        return match uuid::Uuid::try_parse(id) {
            Ok(id) => Redirect::to(&format!("/ui/tasks/{id}")).into_response(),
            Err(_) => page(
                &visitor,
                StatusCode::BAD_REQUEST,
                pages::tasks(
                    &visitor,
                    &params,
                    Err(format!("id: `{id}` is not a task id (a UUID)")),
                ),
            ),
        };
    }
    let query = query_of(
        &params,
        &["type", "status", "key", "since", "until", "cursor"],
    );
    let (code, listed) = listed(ui.api(&format!("/v1/tasks?limit=50&{query}")).await);
    page(&visitor, code, pages::tasks(&visitor, &params, listed))
}

async fn task_page(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let (id, body) = match ui.one(&visitor, &id, "Task", "/v1/tasks").await {
        Ok(found) => found,
        Err(r) => return *r,
    };
    // What only the gateway holds: the payload (the store) and the events
    // (the in-memory view).
    let store = ui.shared.store.clone();
    let stored = tokio::task::spawn_blocking(move || store.get(&id))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let payload = stored
        .as_ref()
        .and_then(|t| t.payload.clone().map(|p| (p, t.payload_size)));
    let events: Vec<super::view::LiveEvent> = ui
        .shared
        .view()
        .get(&id)
        .map(|t| t.events.iter().cloned().collect())
        .unwrap_or_default();
    let note = params.get("done").map(String::as_str);
    page(
        &visitor,
        StatusCode::OK,
        pages::task(&visitor, &body, payload, &events, note),
    )
}

#[derive(serde::Deserialize)]
struct ActionForm {
    csrf: Option<String>,
}

async fn cancel_action(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let session = match ui.act(&headers, form.csrf.as_deref(), "cancel", true) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    match super::lifecycle::cancel(&ui.shared, &id).await {
        Ok(_) => {
            ui.count("cancel", "done");
            tracing::info!(task = %id, session = %short(&session), who = %who(&session), "dashboard: cancellation requested");
            Redirect::to(&format!("/ui/tasks/{id}?done=cancel")).into_response()
        }
        Err(error) => {
            ui.count("cancel", "failed");
            let body = error.body();
            html(error.status, pages::message("Cancel", &api_message(&body)))
        }
    }
}

/// A session's name in logs: the start of its nonce.
fn short(session: &Session) -> &str {
    session.nonce.get(..8).unwrap_or(&session.nonce)
}

/// Who a session's actions are logged as: the token it signed in with
/// (its position in `gateway.auth_tokens`, never the token), or nobody in
/// particular when the gateway asks for no token.
fn who(session: &Session) -> String {
    session.token.map_or_else(
        || "anonymous (no gateway.auth_tokens)".to_owned(),
        |t| format!("gateway.auth_tokens[{t}]"),
    )
}

async fn runs_page(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    uri: Uri,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let query = query_of(&params, &["name", "status", "since", "until", "cursor"]);
    let (code, listed) = listed(ui.api(&format!("/v1/workflows?limit=50&{query}")).await);
    page(&visitor, code, pages::runs(&visitor, &params, listed))
}

async fn run_page(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match ui.one(&visitor, &id, "Workflow run", "/v1/workflows").await {
        Ok((_, body)) => page(&visitor, StatusCode::OK, pages::run(&visitor, &body)),
        Err(r) => *r,
    }
}

async fn schedules_page(State(ui): State<Arc<Ui>>, headers: HeaderMap, uri: Uri) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    // A schedule topic that cannot be read is said on the page, which
    // still answers 200 (the schedules themselves are known).
    let (_, listed) = listed(ui.api("/v1/schedules").await);
    page(&visitor, StatusCode::OK, pages::schedules(&visitor, listed))
}

/// The dead-letter topics of this configuration.
fn dead_letter_topics(shared: &Shared) -> Vec<String> {
    let mut topics: Vec<String> = shared
        .config
        .topology()
        .into_iter()
        .filter(|t| t.kind == crate::topology::TopicKind::DeadLetter)
        .map(|t| t.name)
        .collect();
    topics.sort();
    topics.dedup();
    topics
}

/// The dead letters a page asks for: which topic, and the `conveyor dlq`
/// filters (`type`, `kind`, `partition`, `from` and `to` offsets) plus a
/// task id.
#[derive(Debug, Clone, Default)]
struct LetterQuery {
    topic: String,
    filter: crate::dlq::Filter,
    task: Option<uuid::Uuid>,
}

fn letter_query(
    topics: &[String],
    params: &BTreeMap<String, String>,
) -> Result<LetterQuery, String> {
    let get = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let topic = match get("topic") {
        None => topics.first().cloned().unwrap_or_default(),
        Some(t) if topics.iter().any(|known| known == t) => t.to_owned(),
        Some(t) => {
            return Err(format!(
                "topic: `{t}` is not a dead-letter topic of this configuration ({})",
                topics.join(", ")
            ))
        }
    };
    let partition = match get("partition") {
        None => None,
        Some(p) => Some(
            p.parse::<i32>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| format!("partition: `{p}` is not a partition number"))?,
        ),
    };
    let offset = |key: &str| -> Result<Option<i64>, String> {
        match get(key) {
            None => Ok(None),
            Some(o) => o
                .parse::<i64>()
                .ok()
                .filter(|o| *o >= 0)
                .map(Some)
                .ok_or_else(|| format!("{key}: `{o}` is not an offset")),
        }
    };
    let (from_offset, to_offset) = (offset("from")?, offset("to")?);
    let task = match get("task") {
        None => None,
        Some(t) => Some(
            uuid::Uuid::try_parse(t)
                .map_err(|_| format!("task: `{t}` is not a task id (a UUID)"))?,
        ),
    };
    Ok(LetterQuery {
        topic,
        filter: crate::dlq::Filter {
            partition,
            from_offset,
            to_offset,
            task_type: get("type").map(str::to_owned),
            kind: get("kind").map(str::to_owned),
        },
        task,
    })
}

/// Reads the dead letters `query` selects, at most `limit` of them and for
/// at most [`LETTERS_READ_BUDGET`]; says whether it stopped early.
fn read_letters(
    settings: &crate::settings::Settings,
    query: &LetterQuery,
    limit: usize,
) -> Result<(Vec<crate::dlq::DeadLetter>, bool), String> {
    let mut letters = crate::dlq::Letters::open(settings, &query.topic, &query.filter)
        .map_err(|e| e.to_string())?;
    letters.stop_at(Instant::now() + LETTERS_READ_BUDGET);
    let mut found = Vec::new();
    while let Some(letter) = letters.next_letter().map_err(|e| e.to_string())? {
        let wanted = query
            .task
            .is_none_or(|id| letter.request.as_ref().is_ok_and(|r| r.id == id));
        if wanted {
            found.push(letter);
            if found.len() >= limit {
                return Ok((found, true));
            }
        }
    }
    let cut_short = letters.cut_short();
    Ok((found, cut_short))
}

async fn dlq_page(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    uri: Uri,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let visitor = match ui.admit(&headers, &uri) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let topics = &ui.dead_letter_topics;
    let query = match letter_query(topics, &params) {
        Ok(q) => q,
        Err(why) => {
            return page(
                &visitor,
                StatusCode::BAD_REQUEST,
                pages::dlq(&visitor, topics, &params, Err(why)),
            )
        }
    };
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(MAX_LETTERS_LISTED)
        .clamp(1, MAX_LETTERS_LISTED);
    let turn = match ui.letter_read(&visitor) {
        Ok(turn) => turn,
        Err(r) => return *r,
    };
    let settings = ui.shared.config.clone();
    let read = {
        let query = query.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            read_letters(&settings, &query, limit)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    };
    let code = if read.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    page(
        &visitor,
        code,
        pages::dlq(&visitor, topics, &params, read.map(|r| (query.topic, r))),
    )
}

/// One selected dead letter: `topic/partition/offset`.
fn parse_letter(text: &str) -> Option<(String, i32, i64)> {
    let (rest, offset) = text.rsplit_once('/')?;
    let (topic, partition) = rest.rsplit_once('/')?;
    let partition = partition.parse().ok().filter(|p: &i32| *p >= 0)?;
    let offset = offset.parse().ok().filter(|o: &i64| *o >= 0)?;
    Some((topic.to_owned(), partition, offset))
}

/// Reads exactly the dead letters `selected` names (grouped by partition,
/// one read of each partition's range).
fn read_selected(
    settings: &crate::settings::Settings,
    selected: &[(String, i32, i64)],
) -> Result<Vec<crate::dlq::DeadLetter>, String> {
    let mut by_partition: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    for (topic, partition, offset) in selected {
        by_partition
            .entry((topic.clone(), *partition))
            .or_default()
            .push(*offset);
    }
    let mut found = Vec::new();
    let deadline = Instant::now() + LETTERS_READ_BUDGET * 2;
    for ((topic, partition), offsets) in by_partition {
        let (Some(&from), Some(&to)) = (offsets.iter().min(), offsets.iter().max()) else {
            continue;
        };
        let filter = crate::dlq::Filter {
            partition: Some(partition),
            from_offset: Some(from),
            to_offset: Some(to),
            ..Default::default()
        };
        let mut letters =
            crate::dlq::Letters::open(settings, &topic, &filter).map_err(|e| e.to_string())?;
        letters.stop_at(deadline);
        while let Some(letter) = letters.next_letter().map_err(|e| e.to_string())? {
            if offsets.contains(&letter.offset) {
                found.push(letter);
            }
        }
        if letters.cut_short() {
            return Err(format!(
                "reading {topic} partition {partition} took longer than {} s; select fewer or closer letters",
                LETTERS_READ_BUDGET.as_secs() * 2
            ));
        }
    }
    Ok(found)
}

async fn replay_action(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    // Repeated fields (`letter`): read the form as pairs.
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let session = match ui.act(&headers, field("csrf"), "replay", true) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let visitor = ui.visitor(session.clone(), None);
    let topics = &ui.dead_letter_topics;
    let mut selected = Vec::new();
    for (_, text) in pairs.iter().filter(|(k, _)| k == "letter") {
        match parse_letter(text) {
            Some(l) if topics.contains(&l.0) => selected.push(l),
            _ => {
                return page(
                    &visitor,
                    StatusCode::BAD_REQUEST,
                    pages::message(
                        "Replay",
                        &format!("letter: `{text}` is not a dead letter of this configuration (topic/partition/offset)"),
                    ),
                )
            }
        }
    }
    selected.sort();
    selected.dedup();
    if selected.is_empty() {
        return page(
            &visitor,
            StatusCode::BAD_REQUEST,
            pages::message("Replay", "letter: select at least one dead letter"),
        );
    }
    if selected.len() > MAX_REPLAY {
        return page(
            &visitor,
            StatusCode::BAD_REQUEST,
            pages::message(
                "Replay",
                &format!(
                    "letter: {} selected; one replay takes at most {MAX_REPLAY}",
                    selected.len()
                ),
            ),
        );
    }
    let confirmed = field("confirm") == Some("yes");
    let turn = match ui.letter_read(&visitor) {
        Ok(turn) => turn,
        Err(r) => return *r,
    };
    let settings = ui.shared.config.clone();
    let wanted = selected.clone();
    let read = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        read_selected(&settings, &wanted)
    });
    let letters = match read.await {
        Ok(Ok(letters)) => letters,
        Ok(Err(why)) => {
            ui.count("replay", "failed");
            return page(
                &visitor,
                StatusCode::SERVICE_UNAVAILABLE,
                pages::message("Replay", &format!("cannot read the dead letters: {why}")),
            );
        }
        Err(e) => {
            ui.count("replay", "failed");
            return page(
                &visitor,
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::message("Replay", &e.to_string()),
            );
        }
    };
    let replayer = match crate::dlq::Replayer::new(&ui.shared.config, !confirmed) {
        Ok(r) => r,
        Err(e) => {
            ui.count("replay", "failed");
            return page(
                &visitor,
                StatusCode::SERVICE_UNAVAILABLE,
                pages::message("Replay", &e.to_string()),
            );
        }
    };
    let lines = match replayer.replay(&letters).await {
        Ok(lines) => lines,
        Err(e) => {
            ui.count("replay", "failed");
            return page(
                &visitor,
                StatusCode::SERVICE_UNAVAILABLE,
                pages::message("Replay", &format!("the replay stopped: {e}")),
            );
        }
    };
    if confirmed {
        ui.count("replay", "done");
        let ids: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.get("id").and_then(Value::as_str))
            .collect();
        tracing::info!(
            session = %short(&session),
            who = %who(&session),
            letters = ?selected.iter().map(|(t, p, o)| format!("{t}/{p}/{o}")).collect::<Vec<_>>(),
            tasks = ?ids,
            "dashboard: dead letters replayed"
        );
    }
    let missing = selected.len().saturating_sub(letters.len());
    page(
        &visitor,
        StatusCode::OK,
        pages::replay(&visitor, &selected, &lines, confirmed, missing),
    )
}

async fn login_page(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let next = params.get("next").map_or("/ui", String::as_str);
    if !ui.auth_on() {
        return Redirect::to(safe_next(next)).into_response();
    }
    ui.login_form(
        &headers,
        StatusCode::OK,
        next,
        "Sign in with one of the gateway's tokens.",
    )
}

#[derive(serde::Deserialize)]
struct LoginForm {
    csrf: Option<String>,
    token: Option<String>,
    next: Option<String>,
}

async fn login_action(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Err(refused) = ui.act(&headers, form.csrf.as_deref(), "login", false) {
        return *refused;
    }
    let next = safe_next(form.next.as_deref().unwrap_or("/ui")).to_owned();
    if !ui.auth_on() {
        return Redirect::to(&next).into_response();
    }
    let Some(token) = form.token.as_deref().and_then(|t| ui.token_of(t.trim())) else {
        ui.count("login", "refused");
        return ui.login_form(
            &headers,
            StatusCode::UNAUTHORIZED,
            &next,
            "That token is not one of gateway.auth_tokens.",
        );
    };
    ui.count("login", "done");
    let session = ui.keys().new_session(Some(token), now_millis());
    tracing::info!(session = %short(&session), who = %who(&session), "dashboard: signed in");
    let cookie = ui.cookie_for(&session, &headers);
    let mut response = Redirect::to(&next).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn logout_action(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(refused) = ui.act(&headers, form.csrf.as_deref(), "logout", false) {
        return *refused;
    }
    let mut response = Redirect::to("/ui/login").into_response();
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie("", 0, Ui::secure(&headers))) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_sends_the_browser_only_within_the_dashboard() {
        assert_eq!(
            safe_next("/ui/tasks?status=failed"),
            "/ui/tasks?status=failed"
        );
        for bad in [
            "https://evil.example/ui",
            "//evil.example",
            "/v1/tasks",
            "/ui/../x://y",
        ] {
            assert_eq!(safe_next(bad), "/ui", "{bad}");
        }
    }

    #[test]
    fn forms_from_another_origin_are_told_apart() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h), "no Origin: a same-site form or a tool");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
    }

    #[test]
    fn dead_letter_reads_stop_at_their_bound_and_free_their_turn() {
        let reads = Arc::new(tokio::sync::Semaphore::new(MAX_LETTER_READS));
        let turns: Vec<_> = (0..MAX_LETTER_READS)
            .map(|_| reads.clone().try_acquire_owned().expect("a turn"))
            .collect();
        assert!(
            reads.clone().try_acquire_owned().is_err(),
            "one more is refused"
        );
        drop(turns);
        assert!(
            reads.clone().try_acquire_owned().is_ok(),
            "a finished read frees its turn"
        );
    }

    #[test]
    fn selected_letters_are_read_strictly() {
        assert_eq!(
            parse_letter("conveyor.dlq/3/120"),
            Some(("conveyor.dlq".into(), 3, 120))
        );
        for bad in ["", "conveyor.dlq/3", "t/-1/2", "t/1/x", "t/1/-5"] {
            assert_eq!(parse_letter(bad), None, "{bad}");
        }
    }
}
