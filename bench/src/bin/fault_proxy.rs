//! `fault-proxy`: an HTTP proxy for the Kinesis JSON protocol in front of an
//! emulator (which never throttles), enforcing Kinesis's read limit: a
//! budget of N `GetRecords` calls per second per shard, shared by every
//! caller, answered beyond it with HTTP 400
//! `ProvisionedThroughputExceededException`. The budget mode of the test
//! helper `server/tests/support/fault_proxy.rs`, as a process for
//! `bench/run` (workload 5).
//!
//! ```text
//! fault-proxy --upstream http://127.0.0.1:4568 [--listen 127.0.0.1:0] [--get-records-per-shard 5]
//! ```
//!
//! Prints `fault-proxy listening on http://127.0.0.1:PORT`; `GET /__stats`
//! answers its counters as JSON.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Kinesis proxy enforcing a shared GetRecords budget per shard (bench workload 5)")]
struct Args {
    /// The emulator's URL.
    #[arg(long)]
    upstream: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// GetRecords calls per second per shard, across every caller.
    #[arg(long, default_value_t = 5)]
    get_records_per_shard: usize,
}

#[derive(Default)]
struct Inner {
    /// Calls per operation (including throttled ones).
    calls: HashMap<String, u64>,
    get_records_allowed: u64,
    get_records_throttled: u64,
    /// GetRecords whose iterator was never seen in an answer.
    get_records_unknown_shard: u64,
    /// Which shard an iterator belongs to, learnt from the answers.
    iterator_shard: HashMap<String, String>,
    /// Allowed GetRecords calls per shard within the last second.
    recent_reads: HashMap<String, VecDeque<Instant>>,
}

struct Proxy {
    upstream: String,
    budget: usize,
    inner: Mutex<Inner>,
    http: reqwest::Client,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let proxy = Arc::new(Proxy {
        upstream: args.upstream.trim_end_matches('/').to_owned(),
        budget: args.get_records_per_shard,
        inner: Mutex::new(Inner::default()),
        http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
    });
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("fault-proxy listening on http://{}", listener.local_addr()?);
    let app = Router::new().route("/__stats", get(stats)).fallback(handle).with_state(proxy);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn stats(State(proxy): State<Arc<Proxy>>) -> Response {
    let inner = proxy.inner.lock().expect("proxy state");
    let attempts = inner.get_records_allowed + inner.get_records_throttled;
    let body = json!({
        "budget_per_shard_per_s": proxy.budget,
        "calls": inner.calls,
        "get_records_allowed": inner.get_records_allowed,
        "get_records_throttled": inner.get_records_throttled,
        "get_records_unknown_shard": inner.get_records_unknown_shard,
        "throttle_rate": if attempts == 0 { 0.0 } else { inner.get_records_throttled as f64 / attempts as f64 },
    });
    ([("content-type", "application/json")], body.to_string()).into_response()
}

async fn handle(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    let op = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_owned();
    *proxy.inner.lock().expect("proxy state").calls.entry(op.clone()).or_default() += 1;
    match op.as_str() {
        "GetShardIterator" => {
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let shard = request["ShardId"].as_str().unwrap_or("").to_owned();
            let (status, answer) = forward(&proxy, &headers, body).await;
            if let Some(it) = serde_json::from_slice::<Value>(&answer).ok().and_then(|a| a["ShardIterator"].as_str().map(str::to_owned)) {
                proxy.inner.lock().expect("proxy state").iterator_shard.insert(it, shard);
            }
            raw(status, answer)
        }
        "GetRecords" => get_records(&proxy, &headers, body).await,
        _ => {
            let (status, answer) = forward(&proxy, &headers, body).await;
            raw(status, answer)
        }
    }
}

async fn get_records(proxy: &Proxy, headers: &HeaderMap, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let iterator = request["ShardIterator"].as_str().unwrap_or("").to_owned();
    let shard = {
        let mut inner = proxy.inner.lock().expect("proxy state");
        let shard = match inner.iterator_shard.get(&iterator) {
            Some(s) => s.clone(),
            None => {
                inner.get_records_unknown_shard += 1;
                "unknown".to_owned()
            }
        };
        let now = Instant::now();
        let calls = inner.recent_reads.entry(shard.clone()).or_default();
        while calls.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
            calls.pop_front();
        }
        if calls.len() >= proxy.budget {
            inner.get_records_throttled += 1;
            let kind = "ProvisionedThroughputExceededException";
            let body = json!({"__type": kind, "message": "Rate exceeded for shard"}).to_string();
            let mut r = (StatusCode::BAD_REQUEST, body).into_response();
            r.headers_mut().insert("content-type", HeaderValue::from_static("application/x-amz-json-1.1"));
            r.headers_mut().insert("x-amzn-errortype", HeaderValue::from_static(kind));
            return r;
        }
        calls.push_back(now);
        inner.get_records_allowed += 1;
        shard
    };
    let (status, answer) = forward(proxy, headers, body).await;
    if let Some(next) = serde_json::from_slice::<Value>(&answer).ok().and_then(|a| a["NextShardIterator"].as_str().map(str::to_owned)) {
        let mut inner = proxy.inner.lock().expect("proxy state");
        // The used iterator is done with; its successor inherits the shard.
        inner.iterator_shard.remove(&iterator);
        inner.iterator_shard.insert(next, shard);
    }
    raw(status, answer)
}

/// Sends the request on; the answer's status and body (502 when the
/// upstream is unreachable).
async fn forward(proxy: &Proxy, headers: &HeaderMap, body: Bytes) -> (StatusCode, Bytes) {
    let mut req = proxy.http.post(format!("{}/", proxy.upstream)).body(body);
    for (name, value) in headers {
        let n = name.as_str();
        if n.starts_with("x-amz") || n == "authorization" || n == "content-type" || n == "user-agent" {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, resp.bytes().await.unwrap_or_default())
        }
        Err(_) => (StatusCode::BAD_GATEWAY, Bytes::new()),
    }
}

fn raw(status: StatusCode, body: Bytes) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/x-amz-json-1.1"));
    r
}
