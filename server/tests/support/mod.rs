//! Test harness: real servers on 127.0.0.1:0, real HTTP and WebSocket
//! clients. Each test binary includes this with `mod support;`.
#![allow(dead_code)]

pub mod emulator;
pub mod fault_proxy;
pub mod suite;

use app::{ChatMessage, ServerFrame};
use futures_util::StreamExt;
use serde_json::Value;
use server::config::Config;
use server::AppState;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// How long any single expectation may wait before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// A config for tests: free port, no rate limit, fast pings.
pub fn test_config() -> Config {
    let mut c = Config::for_tests();
    c.rate_limit = 0.0;
    c.shutdown_grace = Duration::from_secs(5);
    c
}

/// A real server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    http: reqwest::Client,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let shutdown = CancellationToken::new();
        let state = AppState::build(&config, shutdown.clone()).await.expect("build server state");
        Self::start_with_state(state, shutdown).await
    }

    pub async fn start_with_state(state: AppState, shutdown: CancellationToken) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let handle = tokio::spawn(server::run(listener, state.clone()));
        TestServer { addr, state, shutdown, handle: Some(handle), http: reqwest::Client::new() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Shuts the server down and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(WAIT, handle).await.expect("server stops in time").expect("server task")
    }

    /// POSTs a JSON body; returns status and parsed JSON body.
    pub async fn post(&self, body: &Value) -> (u16, Value) {
        let resp = self.http.post(self.url("/api/messages")).json(body).send().await.expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON answer"))
    }

    /// POSTs a message and expects 201; returns (message, cursor).
    pub async fn send(&self, room: &str, author: &str, text: &str) -> (ChatMessage, String) {
        let (status, body) = self.post(&serde_json::json!({"room": room, "author": author, "text": text})).await;
        assert_eq!(status, 201, "POST answered {status}: {body}");
        let message: ChatMessage = serde_json::from_value(body["message"].clone()).expect("message");
        (message, body["cursor"].as_str().expect("cursor").to_owned())
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    /// Opens `/ws?<query>`.
    pub async fn ws(&self, query: &str) -> WsClient {
        let url = format!("ws://{}/ws?{}", self.addr, query);
        let (stream, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("ws connect in time")
            .expect("ws connect");
        WsClient { stream }
    }

    /// Opens a socket in `room` and reads up to `ready`.
    pub async fn ws_ready(&self, room: &str) -> (WsClient, Backlog) {
        let mut c = self.ws(&format!("room={room}")).await;
        let b = c.until_ready().await;
        (c, b)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What a socket received before `ready`.
#[derive(Debug, Default)]
pub struct Backlog {
    pub reset: bool,
    pub messages: Vec<(String, ChatMessage)>,
    pub ready_cursor: String,
}

impl Backlog {
    pub fn texts(&self) -> Vec<String> {
        self.messages.iter().map(|(_, m)| m.text.clone()).collect()
    }
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a socket ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(Option<u16>),
    Dropped,
}

impl WsClient {
    /// The next protocol frame (answering pings along the way).
    pub async fn next_frame(&mut self) -> ServerFrame {
        match tokio::time::timeout(WAIT, self.next_frame_or_end()).await.expect("frame in time") {
            Ok(f) => f,
            Err(end) => panic!("socket ended while a frame was expected: {end:?}"),
        }
    }

    /// The next frame, or how the socket ended.
    pub async fn next_frame_or_end(&mut self) -> Result<ServerFrame, Ended> {
        loop {
            match self.stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    match serde_json::from_str(t.as_str()) {
                        Ok(ServerFrame::Heartbeat) => continue,
                        Ok(frame) => return Ok(frame),
                        Err(e) => panic!("frame is not protocol JSON ({e}): {t}"),
                    }
                }
                Some(Ok(Message::Close(frame))) => return Err(Ended::Closed(frame.map(|f| u16::from(f.code)))),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected frame {other:?}"),
                Some(Err(_)) | None => return Err(Ended::Dropped),
            }
        }
    }

    /// Reads the backlog up to and including `ready`.
    pub async fn until_ready(&mut self) -> Backlog {
        let mut b = Backlog::default();
        loop {
            match self.next_frame().await {
                ServerFrame::Reset { .. } => {
                    assert!(b.messages.is_empty(), "reset after messages");
                    b.reset = true;
                }
                ServerFrame::Message { cursor, message } => b.messages.push((cursor, message)),
                ServerFrame::Ready { cursor } => {
                    b.ready_cursor = cursor;
                    return b;
                }
                ServerFrame::Heartbeat => unreachable!("next_frame skips heartbeats"),
            }
        }
    }

    /// Expects exactly the next `n` frames to be messages.
    pub async fn messages(&mut self, n: usize) -> Vec<(String, ChatMessage)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next_frame().await {
                ServerFrame::Message { cursor, message } => out.push((cursor, message)),
                other => panic!("expected a message, got {other:?}"),
            }
        }
        out
    }

    /// Asserts no frame arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(r) = tokio::time::timeout(quiet, self.next_frame_or_end()).await {
            panic!("expected silence, got {r:?}");
        }
    }

    /// Reads (and discards) frames until the socket ends; returns how.
    pub async fn until_end(&mut self) -> Ended {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Err(end) = self.next_frame_or_end().await {
                    return end;
                }
            }
        })
        .await
        .expect("socket ends in time")
    }

    pub async fn close(mut self) {
        // Best effort: the server may already have gone.
        let _ = self.stream.close(None).await;
    }
}

/// The close code as a number.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}
