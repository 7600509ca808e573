//! A fault-injecting HTTP proxy for the Kinesis JSON protocol, between a
//! server under test and the emulator (which never throttles).
//!
//! Requests are `POST /` with `X-Amz-Target: Kinesis_20131202.<Op>` and an
//! `application/x-amz-json-1.1` body. On command the proxy:
//!
//! - refuses a fraction of `PutRecords` entries the way Kinesis does
//!   (`ErrorCode: ProvisionedThroughputExceededException` per entry,
//!   `FailedRecordCount`), forwarding only the others, so a refused entry is
//!   really not written;
//! - throttles whole `PutRecords` or `GetRecords` calls (400,
//!   `__type: ProvisionedThroughputExceededException`);
//! - answers `GetRecords` with `ExpiredIteratorException`;
//! - hangs: accepts requests and never answers;
//! - breaks one shard: its GetRecords and GetShardIterator answer 500;
//! - enforces Kinesis's read limit: a shared budget of N `GetRecords` per
//!   second per shard across every client (the benchmarks use this too).
//!
//! It counts calls per operation so tests can see what happened.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use parking_lot::Mutex;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What the proxy does to the traffic; change it at any time.
#[derive(Debug, Default, Clone)]
pub struct FaultPlan {
    /// Fraction (0..=1) of PutRecords entries refused with throughput errors.
    pub put_entry_failure: f64,
    /// The next N PutRecords calls are throttled as a whole.
    pub throttle_puts: u32,
    /// Fraction (0..=1) of GetRecords calls throttled.
    pub get_records_throttle: f64,
    /// The next N GetRecords calls answer ExpiredIteratorException.
    pub expire_iterators: u32,
    /// Every request is accepted and never answered.
    pub hang: bool,
    /// At most this many GetRecords per second per shard, across clients.
    pub get_records_per_shard_per_sec: Option<u32>,
    /// GetRecords and GetShardIterator on this shard fail (HTTP 500).
    pub broken_shard: Option<String>,
}

/// What the proxy saw and did.
#[derive(Debug, Default, Clone)]
pub struct FaultStats {
    /// Calls per operation (including refused ones).
    pub calls: HashMap<String, u64>,
    /// PutRecords entries refused.
    pub entries_refused: u64,
    /// PutRecords calls throttled whole.
    pub puts_throttled: u64,
    /// GetRecords calls throttled (by fraction or by budget).
    pub get_records_throttled: u64,
    /// GetRecords answered with ExpiredIteratorException.
    pub iterators_expired: u64,
}

impl FaultStats {
    pub fn calls(&self, op: &str) -> u64 {
        self.calls.get(op).copied().unwrap_or(0)
    }
}

#[derive(Default)]
struct Inner {
    plan: FaultPlan,
    stats: FaultStats,
    /// Which shard an iterator belongs to (learnt from the answers).
    iterator_shard: HashMap<String, String>,
    /// Recent GetRecords calls per shard, for the budget.
    recent_reads: HashMap<String, VecDeque<Instant>>,
}

struct Proxy {
    upstream: Mutex<String>,
    inner: Mutex<Inner>,
    http: reqwest::Client,
}

/// A running proxy; stops on drop.
pub struct FaultProxy {
    pub addr: SocketAddr,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1:0 in front of `upstream` (an emulator URL).
    pub async fn start(upstream: &str) -> FaultProxy {
        let proxy = Arc::new(Proxy {
            upstream: Mutex::new(upstream.trim_end_matches('/').to_owned()),
            inner: Mutex::new(Inner::default()),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client"),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(proxy.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { until.cancelled().await }).await;
        });
        FaultProxy { addr, proxy, stop }
    }

    /// `http://127.0.0.1:<port>`: give this to the server as its endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the fault plan.
    pub fn set(&self, plan: FaultPlan) {
        self.proxy.inner.lock().plan = plan;
    }

    /// Changes the fault plan in place.
    pub fn update(&self, f: impl FnOnce(&mut FaultPlan)) {
        f(&mut self.proxy.inner.lock().plan);
    }

    /// Back to a faithful proxy.
    pub fn clear(&self) {
        self.set(FaultPlan::default());
    }

    pub fn stats(&self) -> FaultStats {
        self.proxy.inner.lock().stats.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn kinesis_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"__type": kind, "message": message}).to_string();
    let mut r = (status, body).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/x-amz-json-1.1"));
    r.headers_mut().insert("x-amzn-errortype", HeaderValue::from_str(kind).expect("ascii error type"));
    r
}

fn json_answer(value: &Value) -> Response {
    let mut r = (StatusCode::OK, value.to_string()).into_response();
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/x-amz-json-1.1"));
    r
}

async fn handle(State(proxy): State<Arc<Proxy>>, headers: HeaderMap, body: Bytes) -> Response {
    let op = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_owned();
    let plan = {
        let mut inner = proxy.inner.lock();
        *inner.stats.calls.entry(op.clone()).or_default() += 1;
        inner.plan.clone()
    };
    if plan.hang {
        std::future::pending::<()>().await;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match op.as_str() {
        "PutRecords" => put_records(&proxy, &plan, &headers, request, body).await,
        "GetRecords" => get_records(&proxy, &plan, &headers, request, body).await,
        "GetShardIterator" => {
            let shard = request["ShardId"].as_str().unwrap_or("").to_owned();
            if plan.broken_shard.as_deref() == Some(shard.as_str()) {
                return raw(StatusCode::INTERNAL_SERVER_ERROR, None);
            }
            let (status, answer) = forward(&proxy, &headers, body).await;
            if let Some(it) = answer.as_ref().and_then(|a| a["ShardIterator"].as_str()) {
                proxy.inner.lock().iterator_shard.insert(it.to_owned(), shard);
            }
            raw(status, answer)
        }
        _ => {
            let (status, answer) = forward(&proxy, &headers, body).await;
            raw(status, answer)
        }
    }
}

async fn put_records(proxy: &Proxy, plan: &FaultPlan, headers: &HeaderMap, request: Value, body: Bytes) -> Response {
    {
        let mut inner = proxy.inner.lock();
        if inner.plan.throttle_puts > 0 {
            inner.plan.throttle_puts -= 1;
            inner.stats.puts_throttled += 1;
            return kinesis_error(StatusCode::BAD_REQUEST, "ProvisionedThroughputExceededException", "Rate exceeded for stream.");
        }
    }
    let entries = request["Records"].as_array().cloned().unwrap_or_default();
    if plan.put_entry_failure <= 0.0 || entries.is_empty() {
        let (status, answer) = forward(proxy, headers, body).await;
        return raw(status, answer);
    }
    let refused: Vec<bool> = {
        let mut rng = rand::rng();
        entries.iter().map(|_| rng.random_bool(plan.put_entry_failure.min(1.0))).collect()
    };
    let kept: Vec<Value> = entries.iter().zip(&refused).filter(|(_, r)| !**r).map(|(e, _)| e.clone()).collect();
    let mut accepted: VecDeque<Value> = VecDeque::new();
    if !kept.is_empty() {
        let mut reduced = request.clone();
        reduced["Records"] = Value::Array(kept);
        let (status, answer) = forward(proxy, headers, Bytes::from(reduced.to_string())).await;
        let Some(answer) = answer.filter(|_| status == StatusCode::OK) else {
            return raw(status, None);
        };
        accepted = answer["Records"].as_array().cloned().unwrap_or_default().into();
    }
    let mut failed = 0;
    let records: Vec<Value> = refused
        .iter()
        .map(|r| {
            if *r {
                failed += 1;
                json!({"ErrorCode": "ProvisionedThroughputExceededException",
                       "ErrorMessage": "Rate exceeded for shard in stream (fault proxy)."})
            } else {
                let a = accepted.pop_front().unwrap_or(Value::Null);
                if a.get("ErrorCode").is_some_and(|c| !c.is_null()) {
                    failed += 1;
                }
                a
            }
        })
        .collect();
    proxy.inner.lock().stats.entries_refused += refused.iter().filter(|r| **r).count() as u64;
    json_answer(&json!({"FailedRecordCount": failed, "Records": records, "EncryptionType": "NONE"}))
}

async fn get_records(proxy: &Proxy, plan: &FaultPlan, headers: &HeaderMap, request: Value, body: Bytes) -> Response {
    let iterator = request["ShardIterator"].as_str().unwrap_or("").to_owned();
    {
        let mut inner = proxy.inner.lock();
        if inner.plan.expire_iterators > 0 {
            inner.plan.expire_iterators -= 1;
            inner.stats.iterators_expired += 1;
            return kinesis_error(
                StatusCode::BAD_REQUEST,
                "ExpiredIteratorException",
                "Iterator expired. The iterator was created at time X while right now it is Y (fault proxy).",
            );
        }
        if plan.broken_shard.is_some() && inner.iterator_shard.get(&iterator) == plan.broken_shard.as_ref() {
            return raw(StatusCode::INTERNAL_SERVER_ERROR, None);
        }
        if plan.get_records_throttle > 0.0 && rand::rng().random_bool(plan.get_records_throttle.min(1.0)) {
            inner.stats.get_records_throttled += 1;
            return throttled();
        }
        if let Some(budget) = plan.get_records_per_shard_per_sec {
            let shard = inner.iterator_shard.get(&iterator).cloned().unwrap_or_else(|| "unknown".into());
            let now = Instant::now();
            let calls = inner.recent_reads.entry(shard).or_default();
            while calls.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
                calls.pop_front();
            }
            if calls.len() >= budget as usize {
                inner.stats.get_records_throttled += 1;
                return throttled();
            }
            calls.push_back(now);
        }
    }
    let (status, answer) = forward(proxy, headers, body).await;
    if let Some(next) = answer.as_ref().and_then(|a| a["NextShardIterator"].as_str()) {
        let mut inner = proxy.inner.lock();
        if let Some(shard) = inner.iterator_shard.get(&iterator).cloned() {
            inner.iterator_shard.insert(next.to_owned(), shard);
        }
    }
    raw(status, answer)
}

fn throttled() -> Response {
    kinesis_error(
        StatusCode::BAD_REQUEST,
        "ProvisionedThroughputExceededException",
        "Rate exceeded for shard in stream (fault proxy).",
    )
}

/// Sends the request on; the answer's status and JSON body (`None` when
/// the body is empty or not JSON, or the upstream is unreachable: 502).
async fn forward(proxy: &Proxy, headers: &HeaderMap, body: Bytes) -> (StatusCode, Option<Value>) {
    let upstream = proxy.upstream.lock().clone();
    let mut req = proxy.http.post(format!("{upstream}/")).body(body);
    for (name, value) in headers {
        let n = name.as_str();
        if n.starts_with("x-amz") || n == "authorization" || n == "content-type" || n == "user-agent" {
            req = req.header(name, value);
        }
    }
    match req.send().await {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let bytes = resp.bytes().await.unwrap_or_default();
            (status, serde_json::from_slice(&bytes).ok())
        }
        Err(_) => (StatusCode::BAD_GATEWAY, None),
    }
}

fn raw(status: StatusCode, answer: Option<Value>) -> Response {
    let mut r = match answer {
        Some(v) => (status, v.to_string()).into_response(),
        None => (status, String::new()).into_response(),
    };
    r.headers_mut().insert("content-type", HeaderValue::from_static("application/x-amz-json-1.1"));
    r
}
