//! The WebSocket session: backlog, `ready`, then live frames.
//!
//! A browser only listens on its socket. The session sends the room's
//! history (or exactly what followed `since`), a `ready` frame, then lets
//! the fan-out (`fanout.rs`) write every new message straight to the
//! socket. The session task itself wakes only to finish writes the socket
//! could not take at once, to read the client's control frames, and to
//! ping. A socket that falls `ws_queue` frames behind, or whose writes
//! block past `ws_write_timeout`, is closed with 4008 and never slows
//! anyone else; on shutdown every socket is closed with 1001.

use crate::backend::CatchUp;
use crate::cursor::Position;
use crate::fanout::{Frame, Outlet, Status};
use crate::rooms::{Entry, Start};
use crate::wsframe::{self, Decoder, Event};
use crate::AppState;
use app::{ServerFrame, CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER, DEFAULT_HISTORY};
use bytes::Bytes;
use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// How long a closing handshake may take to be written. Long enough for a
/// slow client to drain what it was sent before it sees the 4008.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the 1001 "going away" close may take at shutdown.
const SHUTDOWN_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long other closes (protocol errors, answering the client's close)
/// may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// After our close frame, how long we read (and drop) what the client
/// still sends, so that closing does not reset the connection under it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The heartbeat frame, sent with every ping (see `ServerFrame::Heartbeat`).
const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// Largest frame a client may send us (control frames and stray text).
pub const MAX_INCOMING_MESSAGE: usize = 4096;
/// Bytes read from a client at a time (it only sends control frames).
const READ_CHUNK: usize = 256;
/// Reads of [`READ_CHUNK`] per wake-up before the session yields.
const READS_PER_TURN: usize = 16;

/// Why a session ended early.
enum Stop {
    /// The peer went away or the connection failed.
    Gone,
    /// The peer could not keep up.
    Slow,
    /// Close with this code: the client closed, or broke the protocol.
    Close(u16, &'static str),
}

struct Session {
    outlet: Arc<Outlet>,
    state: AppState,
    /// The last cursor sent to this client (for `ready`).
    last_cursor: String,
    decoder: Decoder,
    events: Vec<Event>,
    last_heard: Instant,
}

impl Session {
    /// Writes everything queued, within the write timeout.
    async fn flush(&mut self) -> Result<(), Stop> {
        match timeout(self.state.ws.write_timeout, self.outlet.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => Err(Stop::Slow),
        }
    }

    /// Writes message entries, and counts the deliveries.
    async fn send_entries(&mut self, entries: &[Arc<Entry>]) -> Result<(), Stop> {
        let Some(last) = entries.last() else { return Ok(()) };
        self.last_cursor.clone_from(&last.cursor);
        self.outlet.push(entries.iter().cloned().map(Frame::Entry));
        self.flush().await?;
        self.state.metrics.deliveries.inc_by(entries.len() as u64);
        Ok(())
    }

    async fn send_frame(&mut self, frame: &ServerFrame) -> Result<(), Stop> {
        // Serializing plain strings cannot fail.
        let json = serde_json::to_string(frame).expect("serialize frame");
        self.outlet.push([Frame::Bytes(wsframe::text(&json))]);
        self.flush().await
    }

    /// Reads what the client sent, answering pings. Errors end the session.
    /// Reads at most [`READS_PER_TURN`] chunks, then lets the pongs be
    /// written and other tasks run: a client flooding pings gets TCP
    /// backpressure, not this thread.
    fn read_incoming(&mut self) -> Result<(), Stop> {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_TURN {
            match self.outlet.stream.try_read(&mut buf) {
                Ok(0) => return Err(Stop::Gone),
                Ok(n) => self.decode(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Stop::Gone),
            }
        }
        Ok(())
    }

    /// Decodes client bytes and acts on each frame.
    fn decode(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        if let Err(v) = self.decoder.feed(bytes, &mut self.events) {
            tracing::debug!(violation = ?v, "closing a socket that broke the WebSocket protocol");
            return Err(Stop::Close(v.close_code(), v.close_reason()));
        }
        // Only the newest ping not yet answered gets a pong (RFC 6455
        // §5.5.3 allows it): a client flooding pings without reading the
        // pongs queues one pong, not one per ping.
        let mut pong = None;
        for event in self.events.drain(..) {
            self.last_heard = Instant::now();
            match event {
                Event::Ping(payload) => pong = Some(payload),
                Event::Pong | Event::Data => {}
                Event::Close(code) => return Err(Stop::Close(echo_code(code), "")),
            }
        }
        if let Some(payload) = pong {
            self.outlet.push_pong(wsframe::pong(&payload));
        }
        Ok(())
    }

    /// Sends a close frame after what is already being written, then
    /// ends the connection.
    async fn close(&mut self, code: u16, reason: &'static str, within: Duration) {
        self.outlet.replace_queue(wsframe::close(code, reason));
        if matches!(timeout(within, self.outlet.flush()).await, Ok(Ok(()))) {
            // Half-close, then drop what the client still sends until it
            // closes too (or briefly), so its close reply is not met by a
            // reset that could discard our close frame on its side.
            let _ = socket2::SockRef::from(&self.outlet.stream).shutdown(std::net::Shutdown::Write);
            let _ = timeout(CLOSE_LINGER, drain(&self.outlet.stream)).await;
        }
    }
}

/// Reads and drops until end of stream.
async fn drain(stream: &TcpStream) {
    let mut buf = [0u8; READ_CHUNK];
    while stream.readable().await.is_ok() {
        match stream.try_read(&mut buf) {
            Ok(0) => return, // the client closed too
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// The code to answer a client's close with: its own, when it may be sent.
fn echo_code(code: Option<u16>) -> u16 {
    match code {
        Some(c @ (1000..=1003 | 1007..=1014 | 3000..=4999)) => c,
        _ => wsframe::CLOSE_NORMAL,
    }
}

/// Runs one socket until it closes, fails, lags or the server shuts down.
/// `early` holds bytes the client sent right after its handshake.
pub async fn run_session(stream: TcpStream, early: Bytes, state: AppState, room: String, since: Option<String>) {
    state.metrics.sockets_open.inc();
    let outlet = Outlet::new(stream, state.rooms.config().socket_queue);
    let mut s = Session {
        outlet: outlet.clone(),
        state: state.clone(),
        last_cursor: String::new(),
        decoder: Decoder::new(MAX_INCOMING_MESSAGE),
        events: Vec::new(),
        last_heard: Instant::now(),
    };
    let result = serve(&mut s, &room, since, early).await;
    state.rooms.unsubscribe(&room, &outlet);
    match result {
        Ok(()) | Err(Stop::Gone) => {}
        Err(Stop::Slow) => {
            state.metrics.slow_consumer_closes.inc();
            tracing::info!(%room, "closing slow consumer");
            s.close(CLOSE_SLOW_CONSUMER, "slow consumer", SLOW_CLOSE_TIMEOUT).await;
        }
        Err(Stop::Close(code, reason)) => s.close(code, reason, CLOSE_TIMEOUT).await,
    }
    state.metrics.sockets_open.dec();
}

async fn serve(s: &mut Session, room: &str, since: Option<String>, early: Bytes) -> Result<(), Stop> {
    let since_pos = since.as_deref().map(Position::decode);
    let state = s.state.clone();
    let sub = state.rooms.subscribe(room, since_pos.as_ref().and_then(Option::as_ref), DEFAULT_HISTORY, s.outlet.clone());
    s.decode(&early)?;
    // `early` may be a view into hyper's whole read buffer (kilobytes);
    // an idle socket must not keep it for its lifetime.
    drop(early);
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
    drop(sub.backlog); // its list is not needed for the socket's life
    let ready = ServerFrame::Ready { cursor: s.last_cursor.clone() };
    s.send_frame(&ready).await?;

    // Go live: what was published meanwhile follows `ready`. While some
    // spliced ids may still come live, this session filters live entries
    // itself; otherwise the fan-out writes them straight to the socket.
    let mut filtering = !spliced.is_empty();
    s.outlet.release(filtering, |e| !spliced.remove(&e.message.id));
    if filtering && spliced.is_empty() {
        filtering = false;
        s.outlet.release(false, |_| true);
    }
    s.flush().await?;
    s.outlet.shrink();

    let ping_every = state.ws.ping_interval;
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    s.last_heard = Instant::now();

    loop {
        tokio::select! {
            biased;
            () = state.shutdown.cancelled() => {
                s.close(CLOSE_GOING_AWAY, "server shutting down", SHUTDOWN_CLOSE_TIMEOUT).await;
                return Ok(());
            }
            () = s.outlet.wake.notified() => {
                match s.outlet.status() {
                    Status::Open => {}
                    Status::Slow => return Err(Stop::Slow),
                    Status::Gone => return Err(Stop::Gone),
                }
                if filtering {
                    s.outlet.release(true, |e| !spliced.remove(&e.message.id));
                    if spliced.is_empty() {
                        filtering = false;
                        s.outlet.release(false, |_| true);
                    }
                }
                s.flush().await?;
            }
            readable = s.outlet.stream.readable() => {
                readable.map_err(|_| Stop::Gone)?;
                s.read_incoming()?;
                if s.outlet.has_queued() {
                    s.flush().await?; // pongs
                }
            }
            _ = ping.tick() => {
                if s.last_heard.elapsed() > ping_every * 2 {
                    tracing::debug!(%room, "dropping a socket that stopped answering pings");
                    return Err(Stop::Gone);
                }
                // A ping for the peer's TCP stack, a heartbeat for the page.
                s.outlet.push([Frame::Bytes(wsframe::ping()), Frame::Bytes(wsframe::text(HEARTBEAT))]);
                s.flush().await?;
            }
        }
    }
}

fn tail(entries: &[Arc<Entry>], n: usize) -> &[Arc<Entry>] {
    &entries[entries.len().saturating_sub(n)..]
}
