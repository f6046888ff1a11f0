//! The `http` handler against a real HTTP server on loopback: what it sends,
//! and how each kind of answer is classified.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is a failed test

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
            "/later",
            post(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "7")],
                    "come back later",
                )
            }),
        )
        .route(
            "/later-date",
            post(|| async {
                // A date long past: no wait, but still the handler's word.
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")],
                )
            }),
        )
        .route(
            "/refused-later",
            post(|| async {
                // A Retry-After on a permanent answer changes nothing.
                (StatusCode::BAD_REQUEST, [("retry-after", "5")], "no")
            }),
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
            "/huge-streamed",
            post(|| async {
                // 256 MiB in 64 KiB chunks, made as they are sent, with no
                // Content-Length: only reading in chunks can refuse it
                // without holding it.
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let chunks = futures::stream::iter(
                    (0..4096).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                axum::body::Body::from_stream(chunks)
            }),
        )
        .route(
            "/huge-declared",
            post(|| async { vec![b'y'; 2 * 1024 * 1024] }),
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
    let handler = Http::new(&format!("http://{addr}/ok"), 2_000, 1 << 20).unwrap();
    let t = task();
    let context = TaskContext::new(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    ));
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
        let handler = Http::new(&format!("http://{addr}{path}"), timeout_ms, 1 << 20).unwrap();
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
    let later = call("/later", 2_000).await.unwrap_err();
    assert!(
        matches!(&later, HandlerError::RetryAfter { message, after }
            if message.contains("503") && message.contains("come back later")
                && *after == Duration::from_secs(7)),
        "{later:?}"
    );
    let dated = call("/later-date", 2_000).await.unwrap_err();
    assert_eq!(dated.retry_after(), Some(Duration::ZERO), "{dated:?}");
    let refused = call("/refused-later", 2_000).await.unwrap_err();
    assert!(matches!(refused, HandlerError::Permanent(_)), "{refused:?}");
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
    let handler = Http::new(&format!("http://{addr}/x"), 1_000, 1 << 20).unwrap();
    let err = handler
        .handle(&task(), &TaskContext::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HandlerError::Retryable(m) if m.contains("cannot connect")),
        "{err:?}"
    );
}

/// Peak resident memory of this process so far, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_body_over_the_cap_fails_for_good_naming_its_size_and_is_never_held() {
    let (addr, _) = serve().await;
    let cap = 1 << 20;
    let before = peak_rss_kib();
    let streamed = Http::new(&format!("http://{addr}/huge-streamed"), 30_000, cap)
        .unwrap()
        .handle(&task(), &TaskContext::default())
        .await
        .unwrap_err();
    let after = peak_rss_kib();
    assert!(
        matches!(&streamed, HandlerError::Permanent(m)
            if m.contains("answered 200 OK with a body of more than")
                && m.contains("over max_response_bytes (1048576)")),
        "{streamed:?}"
    );
    let declared = Http::new(&format!("http://{addr}/huge-declared"), 30_000, cap)
        .unwrap()
        .handle(&task(), &TaskContext::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&declared, HandlerError::Permanent(m)
            if m.contains("with a body of 2097152 bytes, over max_response_bytes (1048576)")),
        "{declared:?}"
    );
    // The endpoint offered 256 MiB; the handler read at most the cap and
    // one chunk of it.
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "http handler: peak RSS grew by {grown_mib} MiB while refusing a 256 MiB body (cap 1 MiB)"
    );
    assert!(
        grown_mib < 64,
        "peak RSS grew by {grown_mib} MiB: the body was buffered"
    );
}

#[tokio::test]
async fn signed_requests_carry_an_hmac_of_the_time_and_the_body() {
    use hmac::Mac;
    let (addr, seen) = serve().await;
    let secrets =
        conveyor::handlers::Secrets::parse("old-secret-0123456789\nnew-secret-0123456789").unwrap();
    let handler = Http::new(&format!("http://{addr}/ok"), 2_000, 1 << 20)
        .unwrap()
        .signed(secrets);
    let t = task();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    handler.handle(&t, &TaskContext::default()).await.unwrap();
    let s = seen.lock().unwrap();
    let header = s.headers[0]["conveyor-signature"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut parts = header.split(',');
    let at: u64 = parts
        .next()
        .and_then(|p| p.strip_prefix("t="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(at >= before && at <= before + 5, "t={at}, sent at {before}");
    let signatures: Vec<&str> = parts.map(|p| p.strip_prefix("v1=").unwrap()).collect();
    for (secret, signature) in ["old-secret-0123456789", "new-secret-0123456789"]
        .iter()
        .zip(&signatures)
    {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{at}.").as_bytes());
        mac.update(&s.bodies[0]);
        assert_eq!(
            *signature,
            hex::encode(mac.finalize().into_bytes()),
            "{secret}"
        );
    }
    assert_eq!(signatures.len(), 2);
}
