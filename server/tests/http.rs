//! The HTTP surface on a real server: every row of the protocol's error
//! table, health, readiness, metrics and the plain client's assets.

mod support;

use serde_json::{json, Value};
use server::backend::{AppendError, Appended, Backend, CatchUp};
use server::cursor::Position;
use server::metrics::Metrics;
use server::rooms::{Rooms, RoomsConfig};
use server::AppState;
use std::sync::Arc;
use support::{test_config, TestServer};
use tokio_util::sync::CancellationToken;

/// Sends raw bytes with a content type; returns status, headers, JSON body.
async fn raw_post(s: &TestServer, content_type: Option<&str>, body: Vec<u8>) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().post(s.url("/api/messages")).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text:?}"));
    (status, headers, v)
}

/// Asserts the protocol's error shape: a non-empty sentence, maybe a field.
fn assert_error(body: &Value, field: Option<&str>) {
    let sentence = body["error"].as_str().unwrap_or_else(|| panic!("no error sentence in {body}"));
    assert!(sentence.len() > 5, "{body}");
    match field {
        Some(f) => assert_eq!(body["field"], f, "{body}"),
        None => assert!(body.get("field").is_none(), "{body}"),
    }
}

#[tokio::test]
async fn every_bad_post_is_a_json_4xx_and_changes_nothing() {
    let s = TestServer::start(test_config()).await;
    let json_ct = Some("application/json");
    let emoji_4001 = "😀".repeat(4001);
    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16, Option<&str>)> = vec![
        ("not JSON", json_ct, b"{\"author\": ".to_vec(), 400, None),
        ("not an object", json_ct, b"[1,2]".to_vec(), 400, None),
        ("empty body", json_ct, Vec::new(), 400, None),
        ("author wrong type", json_ct, br#"{"author":5,"text":"x"}"#.to_vec(), 400, Some("author")),
        ("text wrong type", json_ct, br#"{"author":"a","text":["x"]}"#.to_vec(), 400, Some("text")),
        ("room wrong type", json_ct, br#"{"room":1,"author":"a","text":"x"}"#.to_vec(), 400, Some("room")),
        ("client_id wrong type", json_ct, br#"{"author":"a","text":"x","client_id":7}"#.to_vec(), 400, Some("client_id")),
        ("missing author", json_ct, br#"{"text":"x"}"#.to_vec(), 400, Some("author")),
        ("missing text", json_ct, br#"{"author":"a"}"#.to_vec(), 400, Some("text")),
        ("invalid room", json_ct, br#"{"room":"Bad Room","author":"a","text":"x"}"#.to_vec(), 400, Some("room")),
        ("empty author", json_ct, br#"{"author":"   ","text":"x"}"#.to_vec(), 400, Some("author")),
        ("author too long", json_ct, json!({"author": "x".repeat(41), "text": "x"}).to_string().into_bytes(), 400, Some("author")),
        ("author control char", json_ct, br#"{"author":"a\u0007","text":"x"}"#.to_vec(), 400, Some("author")),
        ("empty text", json_ct, br#"{"author":"a","text":" \n "}"#.to_vec(), 400, Some("text")),
        ("text 4001 emoji", json_ct, json!({"author": "a", "text": emoji_4001}).to_string().into_bytes(), 400, Some("text")),
        ("text control char", json_ct, br#"{"author":"a","text":"a\u0000b"}"#.to_vec(), 400, Some("text")),
        ("client_id not a uuid", json_ct, br#"{"author":"a","text":"x","client_id":"abc"}"#.to_vec(), 400, Some("client_id")),
        ("lone surrogate", json_ct, br#"{"author":"a","text":"\ud800"}"#.to_vec(), 400, None),
        ("lone trailing surrogate", json_ct, br#"{"author":"a","text":"x\udc00y"}"#.to_vec(), 400, None),
        ("invalid UTF-8", json_ct, b"{\"author\":\"a\",\"text\":\"\xff\xfe\"}".to_vec(), 400, None),
        (
            "body over 16 KiB",
            json_ct,
            json!({"author": "a", "text": "x".repeat(17 * 1024)}).to_string().into_bytes(),
            413,
            None,
        ),
        ("text/plain", Some("text/plain"), br#"{"author":"a","text":"x"}"#.to_vec(), 415, None),
        ("form", Some("application/x-www-form-urlencoded"), b"author=a&text=x".to_vec(), 415, None),
        ("no content type", None, br#"{"author":"a","text":"x"}"#.to_vec(), 415, None),
    ];
    for (name, ct, body, status, field) in cases {
        let (got, _, v) = raw_post(&s, ct, body).await;
        assert_eq!(got, status, "{name}: {v}");
        assert_error(&v, field);
    }

    // A text of exactly 4000 four-byte characters is accepted (16,000+ bytes of JSON).
    let (status, v) = s.post(&json!({"author": "a", "text": "😀".repeat(4000)})).await;
    assert_eq!(status, 201, "{v}");
    // charset parameter is fine
    let (status, _, _) = raw_post(&s, Some("application/json; charset=utf-8"), br#"{"author":"a","text":"ok"}"#.to_vec()).await;
    assert_eq!(status, 201);

    // Nothing bad was stored; the server still serves.
    let (_, page) = s.get_json("/api/messages?room=lobby").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");
    let (status, _) = s.get_json("/readyz").await;
    assert_eq!(status, 200);
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(metrics.contains(r#"chat_messages_rejected_total{reason="invalid"} 20"#), "{metrics}");
    assert!(metrics.contains(r#"chat_messages_rejected_total{reason="too_large"} 1"#));
    assert!(metrics.contains(r#"chat_messages_rejected_total{reason="unsupported_type"} 3"#));
    assert!(metrics.contains("chat_messages_accepted_total 2"));
}

#[tokio::test]
async fn bad_queries_are_json_400s() {
    let s = TestServer::start(test_config()).await;
    for (path, field) in [
        ("/api/messages?limit=0", Some("limit")),
        ("/api/messages?limit=501", Some("limit")),
        ("/api/messages?limit=ten", Some("limit")),
        ("/api/messages?limit=-1", Some("limit")),
        ("/api/messages?before=%00garbage", Some("before")),
        ("/api/messages?room=Nope", Some("room")),
        ("/ws?room=UPPER", Some("room")),
        ("/ws?room=lobby", None), // not an upgrade request
    ] {
        let (status, v) = s.get_json(path).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_error(&v, field);
    }
    let (status, v) = s.get_json("/api/nothing").await;
    assert_eq!(status, 404);
    assert_error(&v, None);
    let resp = reqwest::Client::new().delete(s.url("/api/messages")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_error(&resp.json().await.unwrap(), None);
    let (status, v) = s.get_json("/api/messages?limit=500&room=empty-room").await;
    assert_eq!((status, v), (200, json!({"messages": []})));
}

#[tokio::test]
async fn too_many_requests_is_429_with_retry_after_and_per_client() {
    let mut config = test_config();
    config.rate_limit = 0.5;
    config.rate_burst = 2;
    let s = TestServer::start(config).await;
    let body = br#"{"author":"a","text":"x"}"#;
    for _ in 0..2 {
        let (status, _, _) = raw_post(&s, Some("application/json"), body.to_vec()).await;
        assert_eq!(status, 201);
    }
    let (status, headers, v) = raw_post(&s, Some("application/json"), body.to_vec()).await;
    assert_eq!(status, 429, "{v}");
    assert_error(&v, None);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Reading is not limited.
    let (status, _) = s.get_json("/api/messages").await;
    assert_eq!(status, 200);
}

/// A stream that refuses every append, as Kinesis does when unreachable.
struct RefusingStream;

#[async_trait::async_trait]
impl Backend for RefusingStream {
    fn name(&self) -> &'static str {
        "refusing"
    }
    async fn append(&self, _: app::ChatMessage) -> Result<Appended, AppendError> {
        Err(AppendError::Unavailable { reason: "The stream is unreachable; please retry.".into(), retry_after_secs: 3 })
    }
    async fn catch_up(&self, _: &str, _: &Position, _: Option<&Position>) -> CatchUp {
        CatchUp::Gone
    }
    fn readiness(&self) -> Result<(), String> {
        Err("the stream is unreachable".into())
    }
}

#[tokio::test]
async fn unavailable_stream_is_503_with_retry_after_and_not_ready() {
    let config = test_config();
    let metrics = Arc::new(Metrics::new());
    let rooms = Arc::new(Rooms::new(RoomsConfig::default(), metrics.clone()));
    let shutdown = CancellationToken::new();
    let state = AppState::with_backend(&config, Arc::new(RefusingStream), rooms, metrics, shutdown.clone());
    let s = TestServer::start_with_state(state, shutdown).await;
    let (status, headers, v) = raw_post(&s, Some("application/json"), br#"{"author":"a","text":"x"}"#.to_vec()).await;
    assert_eq!(status, 503);
    assert_error(&v, None);
    assert_eq!(headers["retry-after"], "3");
    let (_, page) = s.get_json("/api/messages").await;
    assert_eq!(page["messages"], json!([]), "a refused message never appears");
    let (status, v) = s.get_json("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(v["error"], "the stream is unreachable");
    let (status, _) = s.get_json("/healthz").await;
    assert_eq!(status, 200, "healthz stays 200 while the process serves");
}

#[tokio::test]
async fn health_metrics_and_plain_client_are_served() {
    let s = TestServer::start(test_config()).await;
    assert_eq!(s.get_json("/healthz").await, (200, json!({"status": "ok"})));
    assert_eq!(s.get_json("/readyz").await, (200, json!({"status": "ready", "backend": "memory"})));
    let (_ws, _) = s.ws_ready("lobby").await;
    s.send("lobby", "ana", "counted").await;
    let (status, metrics) = s.get_text("/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "chat_messages_accepted_total 1",
        "chat_sockets_open 1",
        "chat_deliveries_total",
        "chat_slow_consumer_closes_total 0",
        "chat_http_request_duration_seconds_bucket",
        "# EOF",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in\n{metrics}");
    }

    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = client.get(s.url("/plain/")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(resp.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    let html = resp.text().await.unwrap();
    assert!(html.contains("plain.js"), "the page loads its script");
    for asset in ["/plain/plain.js", "/plain/plain.css"] {
        let resp = client.get(s.url(asset)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{asset}");
    }
    let resp = client.get(s.url("/plain?room=x")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 308);
    assert_eq!(resp.headers()["location"], "/plain/?room=x");
}

/// Reads an HTTP response head from a raw connection (status line first).
async fn raw_status(tcp: &mut tokio::net::TcpStream, within: std::time::Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(within, tcp.read(&mut chunk)).await.expect("an answer in time").unwrap();
        assert!(n > 0, "the connection closed without an answer");
        head.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string()
}

/// A declared body over 16 KiB is refused before it is read, and a body
/// that never finishes does not hold the connection beyond the body
/// timeout. Neither posts anything.
#[tokio::test]
async fn oversized_and_stalled_bodies_are_answered_without_waiting_for_them() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(test_config()).await;
    let head = |len: u64| {
        format!(
            "POST /api/messages HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n{{",
            s.addr
        )
    };

    let mut big = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    big.write_all(head(99_999_999_999).as_bytes()).await.unwrap();
    let status = raw_status(&mut big, Duration::from_secs(2)).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");

    let mut stalled = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stalled.write_all(head(100).as_bytes()).await.unwrap();
    let started = Instant::now();
    let status = raw_status(&mut stalled, server::api::BODY_TIMEOUT + Duration::from_secs(5)).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(started.elapsed() >= server::api::BODY_TIMEOUT - Duration::from_millis(500), "{:?}", started.elapsed());

    let (_, page) = s.get_json("/api/messages?room=lobby").await;
    assert_eq!(page["messages"], json!([]), "nothing was posted");
}
