//! The `http` handler against a real HTTP server on loopback: what it sends,
//! and how each kind of answer is classified.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use conveyor::codec::TaskRequest;
use conveyor::handlers::{Handler, HandlerError, Http, TaskContext};

#[derive(Default)]
struct Seen {
    headers: Vec<HeaderMap>,
    bodies: Vec<Bytes>,
}

async fn serve() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    let app = Router::new()
        .route(
            "/ok",
            post(move |headers: HeaderMap, body: Bytes| {
                let record = record.clone();
                async move {
                    let mut s = record.lock().unwrap();
                    s.headers.push(headers);
                    s.bodies.push(body.clone());
                    (
                        [("content-type", "application/json")],
                        format!(r#"{{"got":{}}}"#, body.len()),
                    )
                }
            }),
        )
        .route(
            "/busy",
            post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "try later") }),
        )
        .route(
            "/throttled",
            post(|| async { StatusCode::TOO_MANY_REQUESTS }),
        )
        .route(
            "/bad",
            post(|| async { (StatusCode::UNPROCESSABLE_ENTITY, "field `w` is missing") }),
        )
        .route(
            "/moved",
            post(|| async { (StatusCode::MOVED_PERMANENTLY, [("location", "/ok")]) }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, seen)
}

fn task() -> TaskRequest {
    let mut t = TaskRequest::new("resize", br#"{"w":640}"#.to_vec());
    t.attempt = 2;
    t
}

#[tokio::test]
async fn success_sends_the_task_and_returns_the_body() {
    let (addr, seen) = serve().await;
    let handler = Http::new(&format!("http://{addr}/ok"), 2_000).unwrap();
    let t = task();
    let context = TaskContext {
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    };
    let out = handler
        .handle(&t, &context)
        .await
        .expect("2xx is a success");
    assert_eq!(out.bytes, br#"{"got":9}"#);
    assert_eq!(out.content_type, "application/json");

    // A second task reuses the client (and its connection pool).
    handler.handle(&t, &context).await.expect("second call");
    let s = seen.lock().unwrap();
    assert_eq!(s.bodies.len(), 2);
    assert_eq!(&s.bodies[0][..], &br#"{"w":640}"#[..]);
    let h = &s.headers[0];
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["conveyor-task-id"], t.id.to_string().as_str());
    assert_eq!(h["conveyor-task-type"], "resize");
    assert_eq!(h["conveyor-attempt"], "2");
    assert_eq!(
        h["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
}

#[tokio::test]
async fn answers_are_classified_retryable_or_permanent() {
    let (addr, _) = serve().await;
    let call = |path: &str, timeout_ms| {
        let handler = Http::new(&format!("http://{addr}{path}"), timeout_ms).unwrap();
        async move { handler.handle(&task(), &TaskContext::default()).await }
    };
    let busy = call("/busy", 2_000).await.unwrap_err();
    assert!(
        matches!(&busy, HandlerError::Retryable(m) if m.contains("503") && m.contains("try later")),
        "{busy:?}"
    );
    let throttled = call("/throttled", 2_000).await.unwrap_err();
    assert!(
        matches!(throttled, HandlerError::Retryable(_)),
        "{throttled:?}"
    );
    let bad = call("/bad", 2_000).await.unwrap_err();
    assert!(
        matches!(&bad, HandlerError::Permanent(m) if m.contains("422") && m.contains("field `w` is missing")),
        "{bad:?}"
    );
    let moved = call("/moved", 2_000).await.unwrap_err();
    assert!(
        matches!(&moved, HandlerError::Permanent(m) if m.contains("301")),
        "{moved:?}"
    );
    let slow = call("/slow", 300).await.unwrap_err();
    assert!(
        matches!(&slow, HandlerError::Retryable(m) if m.contains("timed out")),
        "{slow:?}"
    );
}

#[tokio::test]
async fn connection_refused_is_retryable() {
    // Bind and drop a listener to find a port nothing listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let handler = Http::new(&format!("http://{addr}/x"), 1_000).unwrap();
    let err = handler
        .handle(&task(), &TaskContext::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HandlerError::Retryable(m) if m.contains("cannot connect")),
        "{err:?}"
    );
}
