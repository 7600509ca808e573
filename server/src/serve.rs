//! Accepting connections and the WebSocket upgrade.
//!
//! Connections are served by hyper's HTTP/1.1 server directly rather than
//! through `axum::serve`, for two reasons: every connection gets
//! `TCP_NODELAY` (a chat frame must not wait for Nagle), and after a `/ws`
//! handshake the session gets the plain `TcpStream` back (hyper's
//! `Upgraded::downcast` only works when it knows the I/O type), so the
//! fan-out can write pre-encoded frames to it with one system call each
//! (see `fanout.rs`, `wsframe.rs`).

use crate::error::ApiError;
use crate::wsframe;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Serves `router` on `listener` until `shutdown`, then lets in-flight
/// requests finish (keep-alive connections close when idle) and returns.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: wait for some to free up.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        connections.spawn(serve_connection(stream, remote, router.clone(), shutdown.clone()));
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection(stream: TcpStream, remote: SocketAddr, router: Router, shutdown: CancellationToken) {
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        router.clone().oneshot(request)
    });
    // The timer arms hyper's default 30 s limit on reading a request's
    // headers, so a client that trickles them cannot hold a connection.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %remote, "connection ended with an error");
    }
}

/// A checked WebSocket handshake, ready to answer 101.
pub struct Handshake {
    accept: String,
    on_upgrade: OnUpgrade,
}

impl Handshake {
    /// Checks an upgrade request (RFC 6455 §4.2.1). The error says what
    /// is missing.
    pub fn from_request<B>(request: &mut Request<B>) -> Result<Handshake, ApiError> {
        let bad = |what: &str| {
            ApiError::bad_request(format!("/ws takes a WebSocket upgrade request ({what})."), None)
        };
        let headers = request.headers();
        if !has_token(headers, header::CONNECTION, "upgrade") {
            return Err(bad("Connection header did not contain 'upgrade'"));
        }
        if !has_token(headers, header::UPGRADE, "websocket") {
            return Err(bad("Upgrade header did not contain 'websocket'"));
        }
        if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
            return Err(bad("Sec-WebSocket-Version header must be 13"));
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(bad("Sec-WebSocket-Key header missing"));
        };
        if !is_websocket_key(key.as_bytes()) {
            return Err(bad("Sec-WebSocket-Key must be 16 bytes in base64"));
        }
        let accept = wsframe::accept_key(key.as_bytes());
        let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
            return Err(bad("this connection cannot be upgraded"));
        };
        Ok(Handshake { accept, on_upgrade })
    }

    /// Answers 101 and runs `session` on the raw stream once the response
    /// is out. `session` also gets any bytes the client sent after its
    /// handshake. The task is tracked by `sessions` (shutdown waits).
    pub fn respond<F, Fut>(self, sessions: &TaskTracker, session: F) -> Response<axum::body::Body>
    where
        F: FnOnce(TcpStream, Bytes) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        sessions.spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => session(parts.io.into_inner(), parts.read_buf).await,
                // Only `serve` above runs the app over real sockets.
                Err(_) => tracing::error!("WebSocket upgrade on a connection not served by serve::serve"),
            }
        });
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        // Base64 is always a valid header value.
        h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&self.accept).expect("base64 header"));
        response
    }
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 6455 §4.2.1: the key is 16 random bytes in base64, so 24
/// characters ending in `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}
