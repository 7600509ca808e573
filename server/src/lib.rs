//! # kinesis-chat server
//!
//! Follow one message from a browser's POST to every browser's socket:
//!
//! 1. `POST /api/messages` arrives at [`api::post_message`] (`api.rs`). The
//!    body is read by hand (≤ 16 KiB, JSON only), checked with the shared
//!    rules in `app::validate`, and turned into a `ChatMessage` (id, time).
//! 2. The message goes to the stream through the [`backend::Backend`] seam
//!    (`backend/mod.rs`): the embedded `backend/memory.rs`, or Kinesis. The
//!    POST is answered 201 with the message's cursor only after the stream
//!    accepted it; otherwise 503 and the message never appears. On Kinesis
//!    (`backend/kinesis/`), `producer.rs` batches POSTs into `PutRecords`
//!    and `reader.rs` reads every shard on every instance into step 3.
//! 3. Whatever the stream holds is fed, in stream order, into the hub
//!    [`rooms::Rooms`] (`rooms.rs`): deduplicated by id, encoded once into
//!    a whole WebSocket `message` frame (`wsframe.rs`: server frames are
//!    unmasked, so the bytes are the same for every socket), and kept in
//!    the room's bounded window.
//! 4. The fan-out (`fanout.rs`) writes that frame to every socket of the
//!    room: one worker per core owns a share of the sockets and
//!    `try_write`s the bytes straight into each; only a socket whose kernel
//!    buffer is full gets them queued for its session. A socket that falls
//!    too far behind is closed with 4008.
//! 5. Each browser's WebSocket is a session in `ws.rs`: the room's history
//!    (or exactly what followed its `since` cursor, see `cursor.rs`), then a
//!    `ready` frame, then it hands the socket to the fan-out and wakes only
//!    to finish blocked writes, answer the client's control frames and
//!    ping. On shutdown all get 1001. `serve.rs` accepts the connections
//!    (hyper HTTP/1.1, `TCP_NODELAY`) and turns `/ws` requests into raw
//!    sockets for the session.
//!
//! Around that: `config.rs` (flags and env vars), `error.rs` (every error a
//! client can see), `ratelimit.rs` (429s), `metrics.rs` (`/metrics`),
//! `plain.rs` (the fallback client at `/plain/`), `ssr.rs` (the Leptos
//! client at `/`: server-rendered with the room's history, hydrated by the
//! wasm under `/pkg/`, and the HTML 404 page), and `main.rs`, which only
//! parses the config, binds and calls [`run`].

pub mod api;
pub mod backend;
pub mod config;
pub mod cursor;
pub mod error;
pub mod fanout;
pub mod metrics;
pub mod plain;
pub mod ratelimit;
pub mod rooms;
pub mod serve;
pub mod ssr;
pub mod ws;
pub mod wsframe;

use crate::backend::memory::MemoryBackend;
use crate::backend::Backend;
use crate::config::{BackendKind, Config};
use crate::metrics::{Labels, Metrics};
use crate::ratelimit::RateLimiter;
use crate::rooms::{Rooms, RoomsConfig};
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// WebSocket timing, from the config.
#[derive(Debug, Clone)]
pub struct WsSettings {
    pub ping_interval: Duration,
    pub write_timeout: Duration,
}

/// Everything a request handler or socket session needs.
pub struct Shared {
    pub backend: Arc<dyn Backend>,
    pub rooms: Arc<Rooms>,
    pub metrics: Arc<Metrics>,
    pub limiter: RateLimiter,
    pub ws: WsSettings,
    /// Cancelled once, on shutdown; every long-lived task watches it.
    pub shutdown: CancellationToken,
    /// Open socket sessions, so shutdown can wait for their 1001 closes.
    pub sessions: TaskTracker,
    /// How long shutdown waits for sessions.
    pub shutdown_grace: Duration,
}

/// Cheap to clone; handed to every handler.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Builds the hub and the configured backend.
    pub async fn build(config: &Config, shutdown: CancellationToken) -> anyhow::Result<AppState> {
        let metrics = Arc::new(Metrics::new());
        let rooms_config = RoomsConfig {
            window: config.history_per_room as usize,
            socket_queue: config.ws_queue as usize,
            max_rooms: config.max_rooms as usize,
            max_messages: config.max_messages as usize,
            dedup_ids: config.max_messages as usize,
            max_bytes: rooms::DEFAULT_MAX_BYTES,
        };
        let rooms = Arc::new(Rooms::new(rooms_config, metrics.clone()));
        let backend: Arc<dyn Backend> = match config.backend {
            BackendKind::Memory => Arc::new(MemoryBackend::new(rooms.clone())),
            BackendKind::Kinesis => Arc::new(
                backend::kinesis::KinesisBackend::start(config, rooms.clone(), metrics.clone(), shutdown.clone())
                    .await?,
            ),
        };
        Ok(Self::with_backend(config, backend, rooms, metrics, shutdown))
    }

    /// Assembles a state around an existing backend (tests use this to
    /// put a fake stream behind the seam).
    pub fn with_backend(
        config: &Config,
        backend: Arc<dyn Backend>,
        rooms: Arc<Rooms>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> AppState {
        AppState(Arc::new(Shared {
            backend,
            rooms,
            metrics,
            limiter: RateLimiter::new(config.rate_limit, config.rate_burst),
            ws: WsSettings { ping_interval: config.ws_ping_interval, write_timeout: config.ws_write_timeout },
            shutdown,
            sessions: TaskTracker::new(),
            shutdown_grace: config.shutdown_grace,
        }))
    }
}

/// The whole HTTP surface, ready for `oneshot` tests or `serve`.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/messages", get(api::get_messages).post(api::post_message))
        .route("/ws", get(api::websocket))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/plain", get(plain::add_slash))
        .route("/plain/", get(plain::index))
        .route("/plain/plain.js", get(plain::script))
        .route("/plain/plain.css", get(plain::style))
        .merge(ssr::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), record_latency))
        .method_not_allowed_fallback(api::method_not_allowed);
    api.fallback(ssr::fallback).with_state(state)
}

async fn record_latency(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let labels: Labels = vec![
        ("route".into(), route),
        ("status".into(), format!("{}xx", response.status().as_u16() / 100)),
    ];
    state.metrics.http_latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}

/// Serves until `state.shutdown` is cancelled, then drains: stops
/// accepting, finishes in-flight requests, closes sockets with 1001 and
/// waits (at most the grace period) for them.
pub async fn run(listener: TcpListener, state: AppState) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    let sessions = state.sessions.clone();
    let grace = state.shutdown_grace;
    ssr::log_site();
    serve::serve(listener, app(state), shutdown).await?;
    sessions.close();
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!("some sockets did not close within the shutdown grace period");
    }
    Ok(())
}
