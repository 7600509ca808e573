//! The WebSocket session: backlog, `ready`, then live frames.
//!
//! A browser only listens on its socket. The session sends the room's
//! history (or exactly what followed `since`), a `ready` frame, then every
//! new message as it is published. Frames come pre-serialized from the hub
//! and are written in batches (feed, then one flush). A socket that falls
//! `ws_queue` frames behind, or whose writes block past `ws_write_timeout`,
//! is closed with 4008 and never slows anyone else; on shutdown every socket
//! is closed with 1001.

use crate::backend::CatchUp;
use crate::cursor::Position;
use crate::rooms::{Entry, Start};
use crate::AppState;
use app::{ServerFrame, CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER, DEFAULT_HISTORY};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::time::{timeout, Instant};

/// Most frames written before one flush: bounds the time one socket holds
/// its task between looks at shutdown and pings.
const MAX_BATCH: usize = 64;
/// How long a closing handshake may take to be written. Long enough for a
/// slow client to drain what it was sent before it sees the 4008.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the 1001 "going away" close may take at shutdown.
const SHUTDOWN_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The heartbeat frame, sent with every ping (see `ServerFrame::Heartbeat`).
const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// Incoming data is never expected (clients send only control frames), so
/// the read side is kept tiny: this is most of an idle socket's memory.
pub const READ_BUFFER_SIZE: usize = 1024;
/// Outgoing frames are written through this buffer.
pub const WRITE_BUFFER_SIZE: usize = 16 * 1024;
/// Bytes queued in the socket's own buffer before a write must wait; the
/// per-socket queue proper is the room's broadcast ring.
pub const MAX_WRITE_BUFFER_SIZE: usize = 1024 * 1024;
/// Largest frame a client may send us (control frames and stray text).
pub const MAX_INCOMING_MESSAGE: usize = 4096;

/// Why a session ended early.
enum Stop {
    /// The peer went away or the connection failed.
    Gone,
    /// The peer could not keep up.
    Slow,
}

struct Session {
    socket: WebSocket,
    state: AppState,
    /// The last cursor sent to this client (for `ready`).
    last_cursor: String,
}

impl Session {
    /// Writes frames with one flush, within the write timeout.
    async fn send_all<'a>(&mut self, frames: impl Iterator<Item = &'a Utf8Bytes> + Send) -> Result<(), Stop> {
        let socket = &mut self.socket;
        let write = async {
            for f in frames {
                socket.feed(Message::Text(f.clone())).await?;
            }
            socket.flush().await
        };
        match timeout(self.state.ws.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => Err(Stop::Slow),
        }
    }

    /// Writes message entries with one flush, and counts the deliveries.
    async fn send_entries(&mut self, entries: &[Arc<Entry>]) -> Result<(), Stop> {
        let Some(last) = entries.last() else { return Ok(()) };
        self.last_cursor.clone_from(&last.cursor);
        self.send_all(entries.iter().map(|e| &e.frame)).await?;
        self.state.metrics.deliveries.inc_by(entries.len() as u64);
        Ok(())
    }

    async fn send_frame(&mut self, frame: &ServerFrame) -> Result<(), Stop> {
        // Serializing plain strings cannot fail.
        let json = serde_json::to_string(frame).expect("serialize frame");
        self.send_all(std::iter::once(&Utf8Bytes::from(json))).await
    }

    async fn close(&mut self, code: u16, reason: &'static str, within: Duration) {
        let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
        let _best_effort = timeout(within, self.socket.send(Message::Close(Some(frame)))).await;
    }
}

/// Runs one socket until it closes, fails, lags or the server shuts down.
pub async fn run_session(socket: WebSocket, state: AppState, room: String, since: Option<String>) {
    state.metrics.sockets_open.inc();
    let mut s = Session { socket, state: state.clone(), last_cursor: String::new() };
    let result = serve(&mut s, &room, since).await;
    match result {
        Ok(()) => {}
        Err(Stop::Gone) => {}
        Err(Stop::Slow) => {
            state.metrics.slow_consumer_closes.inc();
            tracing::info!(%room, "closing slow consumer");
            s.close(CLOSE_SLOW_CONSUMER, "slow consumer", SLOW_CLOSE_TIMEOUT).await;
        }
    }
    state.metrics.sockets_open.dec();
}

async fn serve(s: &mut Session, room: &str, since: Option<String>) -> Result<(), Stop> {
    let since_pos = since.as_deref().map(Position::decode);
    let state = s.state.clone();
    let sub = state.rooms.subscribe(room, since_pos.as_ref().and_then(Option::as_ref), DEFAULT_HISTORY);
    let mut live = sub.live;
    // Ids sent while splicing a catch-up read; a live frame already sent
    // that way is skipped.
    let mut spliced: HashSet<String> = HashSet::new();

    match (since_pos, sub.start) {
        (Some(None), _) => {
            // Not a cursor we issued: start over from history.
            s.send_frame(&ServerFrame::Reset { reason: "The cursor is not valid here.".into() }).await?;
            let history = tail(&sub.backlog, DEFAULT_HISTORY);
            s.send_entries(history).await?;
        }
        (Some(Some(pos)), Start::OutOfWindow) => {
            let stop_at = sub.backlog.first().map(|e| e.pos.clone());
            match state.backend.catch_up(room, &pos, stop_at.as_ref()).await {
                CatchUp::Messages(older) => {
                    s.last_cursor = pos.encode();
                    let older: Vec<Arc<Entry>> =
                        older.into_iter().map(|(p, m)| Arc::new(Entry::new(p, m))).collect();
                    spliced.extend(older.iter().map(|e| e.message.id.clone()));
                    s.send_entries(&older).await?;
                    let rest: Vec<Arc<Entry>> =
                        sub.backlog.iter().filter(|e| !spliced.contains(&e.message.id)).cloned().collect();
                    s.send_entries(&rest).await?;
                }
                CatchUp::Gone => {
                    s.send_frame(&ServerFrame::Reset {
                        reason: "The cursor is too old or unknown; here is the recent history.".into(),
                    })
                    .await?;
                    s.send_entries(tail(&sub.backlog, DEFAULT_HISTORY)).await?;
                }
            }
        }
        (Some(Some(pos)), _) => {
            // Found in the window: exactly what follows.
            s.last_cursor = pos.encode();
            s.send_entries(&sub.backlog).await?;
        }
        (None, _) => s.send_entries(&sub.backlog).await?,
    }
    let ready = ServerFrame::Ready { cursor: s.last_cursor.clone() };
    s.send_frame(&ready).await?;

    let ping_every = state.ws.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut batch: Vec<Arc<Entry>> = Vec::with_capacity(MAX_BATCH);

    loop {
        tokio::select! {
            biased;
            () = state.shutdown.cancelled() => {
                s.close(CLOSE_GOING_AWAY, "server shutting down", SHUTDOWN_CLOSE_TIMEOUT).await;
                return Ok(());
            }
            received = live.recv() => {
                batch.clear();
                match received {
                    Ok(e) => batch.push(e),
                    Err(RecvError::Lagged(_)) => return Err(Stop::Slow),
                    // The hub never drops a room with a subscriber.
                    Err(RecvError::Closed) => return Err(Stop::Gone),
                }
                while batch.len() < MAX_BATCH {
                    match live.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Lagged(_)) => return Err(Stop::Slow),
                        Err(TryRecvError::Closed) => return Err(Stop::Gone),
                    }
                }
                if !spliced.is_empty() {
                    batch.retain(|e| !spliced.remove(&e.message.id));
                }
                s.send_entries(&batch).await?;
            }
            incoming = s.socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Err(Stop::Gone),
                // Pongs, and anything else a client sends, prove it is alive.
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every * 2 {
                    tracing::debug!(%room, "dropping a socket that stopped answering pings");
                    return Err(Stop::Gone);
                }
                // A ping for the peer's TCP stack, a heartbeat for the page.
                let write = async {
                    s.socket.feed(Message::Ping(Default::default())).await?;
                    s.socket.feed(Message::Text(Utf8Bytes::from_static(HEARTBEAT))).await?;
                    s.socket.flush().await
                };
                match timeout(state.ws.write_timeout, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(Stop::Gone),
                    Err(_) => return Err(Stop::Slow),
                }
            }
        }
    }
}

fn tail(entries: &[Arc<Entry>], n: usize) -> &[Arc<Entry>] {
    &entries[entries.len().saturating_sub(n)..]
}
