//! WebSocket subscribers for both protocols, cheap enough to run thousands.
//!
//! A subscriber never parses a frame as JSON. It tells a chat message from
//! other frames by a prefix, counts it, and on every `sample_every`-th
//! message scans the frame for the send-time marker the poster put in the
//! text (see [`MARKER`]) to record one POST→receive latency.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Put by the poster in front of the send time (µs since the Unix epoch).
pub const MARKER: &[u8] = b"kcb1:";
/// Latency samples a subscriber keeps before merging them into the shared
/// histogram: few enough to keep 100,000 sockets small, many enough that
/// the lock is taken rarely.
const LOCAL_SAMPLES: usize = 32;
/// ... and at least this often, so a slow trickle of samples is not lost.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Which server protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// kinesis-chat: `GET /ws?room=`, JSON frames per PROTOCOL.md.
    Kinesis,
    /// Socket.IO 4 over its WebSocket transport (Engine.IO v4 framing).
    Socketio,
}

/// Counters shared by every subscriber of one load-generator process.
pub struct Shared {
    /// Subscribers that got `ready` (kinesis-chat) or the namespace connect
    /// (Socket.IO) and are still open.
    pub live: AtomicU64,
    /// Subscribers that failed to connect or to reach `ready`.
    pub connect_failures: AtomicU64,
    /// Chat-message frames received after `ready`, by all subscribers.
    pub deliveries: AtomicU64,
    /// Subscribers closed by the server with 4008 (slow consumer).
    pub slow_consumer_closes: AtomicU64,
    /// Other closes and read errors after `ready`.
    pub other_closes: AtomicU64,
    /// Latencies are recorded only while this is set (not during warm-up).
    pub recording: AtomicBool,
    /// Only messages sent at or after this time (µs since epoch) are timed.
    pub record_since_us: AtomicU64,
    /// POST→receive latency in µs, merged from each subscriber's samples.
    pub latency: Mutex<Histogram<u64>>,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            live: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            other_closes: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            record_since_us: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits; values above are clamped.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// How a subscriber connects.
#[derive(Clone)]
pub struct Target {
    pub proto: Proto,
    /// `127.0.0.1:PORT` of the server.
    pub server: SocketAddr,
    pub room: String,
    /// Scan every n-th message of each subscriber for its send time.
    pub sample_every: u64,
    pub read_buffer: usize,
}

impl Target {
    fn url(&self) -> String {
        match self.proto {
            Proto::Kinesis => format!("ws://{}/ws?room={}", self.server, self.room),
            Proto::Socketio => {
                format!("ws://{}/socket.io/?EIO=4&transport=websocket&room={}", self.server, self.room)
            }
        }
    }
}

/// Opens a TCP connection from `source` (any port) to the server.
///
/// `IP_BIND_ADDRESS_NO_PORT` lets the kernel pick the source port at
/// connect time, so one source address serves a full port range per
/// destination. `SO_LINGER 0` makes our close an RST, so finished runs leave
/// no `TIME_WAIT` ports behind for the next one.
async fn connect_tcp(source: IpAddr, server: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    set_int_opt(socket.as_raw_fd(), libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
    socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("bind {source}"))?;
    let stream = socket.connect(server).await.with_context(|| format!("connect from {source}"))?;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    set_opt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    Ok(stream)
}

fn set_int_opt(fd: i32, level: i32, name: i32, value: libc::c_int) -> std::io::Result<()> {
    set_opt(fd, level, name, &value)
}

fn set_opt<T>(fd: i32, level: i32, name: i32, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` points at a live T of the size passed; fd is open.
    let rc = unsafe {
        libc::setsockopt(fd, level, name, (value as *const T).cast(), std::mem::size_of::<T>() as u32)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connects one subscriber, signals `ready` once it is live, then counts
/// messages until the server closes it or `stop` is set.
pub async fn run(
    target: Arc<Target>,
    source: IpAddr,
    shared: Arc<Shared>,
    ready: tokio::sync::oneshot::Sender<bool>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut ready = Some(ready);
    let result = session(&target, source, &shared, &mut ready, stop).await;
    let was_live = ready.is_none();
    if let Some(tx) = ready.take() {
        shared.connect_failures.fetch_add(1, Ordering::Relaxed);
        let _ = tx.send(false); // the connect phase may have timed out already
    }
    if was_live {
        shared.live.fetch_sub(1, Ordering::Relaxed);
    }
    match result {
        Ok(End::Stopped) => {}
        Ok(End::Closed(Some(4008))) => {
            shared.slow_consumer_closes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(End::Closed(_)) | Err(_) if was_live => {
            shared.other_closes.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    if let Err(e) = result {
        if !was_live {
            eprintln!("loadgen: subscriber failed: {e:#}");
        }
    }
}

/// How a session ended. The load generator ends its own by dropping the
/// socket, which resets it (SO_LINGER 0): a close handshake with 10,000
/// sockets would only measure the close path.
enum End {
    Stopped,
    Closed(Option<u16>),
}

async fn session(
    target: &Target,
    source: IpAddr,
    shared: &Shared,
    ready: &mut Option<tokio::sync::oneshot::Sender<bool>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<End> {
    let tcp = connect_tcp(source, target.server).await?;
    let config = WebSocketConfig::default()
        .read_buffer_size(target.read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(target.url(), tcp, Some(config))
        .await
        .context("WebSocket handshake")?;

    let mut count: u64 = 0;
    // A few samples kept per socket and merged in bulk: a histogram per
    // socket would be ~250 KiB each, and the shared one's lock would be hot.
    let mut local: Vec<u64> = Vec::new();
    let mut last_flush = Instant::now();
    let mut live = false;
    let end = loop {
        // A oneshot per socket: polling it costs no shared lock.
        let msg = tokio::select! {
            biased;
            _ = &mut stop => break End::Stopped,
            msg = ws.next() => msg,
        };
        let msg = match msg {
            None => break End::Closed(None),
            Some(Err(e)) => {
                flush_latency(shared, &mut local);
                return Err(e.into());
            }
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(frame) => break End::Closed(frame.map(|f| u16::from(f.code))),
            _ => continue, // pings are answered by tungstenite itself
        };
        let bytes = text.as_bytes();
        let is_message = match target.proto {
            Proto::Kinesis => {
                let head = &bytes[..bytes.len().min(40)];
                if memchr::memmem::find(head, b"\"type\":\"message\"").is_some() {
                    live // history before `ready` is not a delivery
                } else {
                    if !live && memchr::memmem::find(head, b"\"type\":\"ready\"").is_some() {
                        live = true;
                        go_live(shared, ready);
                    }
                    false
                }
            }
            Proto::Socketio => match bytes {
                [b'4', b'2', ..] => live && bytes.starts_with(b"42[\"message\""),
                [b'2'] => {
                    ws.send(Message::text("3")).await?;
                    false
                }
                [b'0', b'{', ..] => {
                    ws.send(Message::text("40")).await?;
                    false
                }
                [b'4', b'0', ..] if !live => {
                    live = true;
                    go_live(shared, ready);
                    false
                }
                [b'4', b'1', ..] | [b'4', b'4', ..] => bail!("namespace refused: {}", text.as_str()),
                [b'1', ..] => break End::Closed(None),
                _ => false,
            },
        };
        if !is_message {
            continue;
        }
        shared.deliveries.fetch_add(1, Ordering::Relaxed);
        count += 1;
        if count % target.sample_every == 0 && shared.recording.load(Ordering::Relaxed) {
            if let Some(sent) = sent_at_us(bytes) {
                if sent >= shared.record_since_us.load(Ordering::Relaxed) {
                    local.push(now_us().saturating_sub(sent).max(1));
                }
            }
            // Merge now and then so the shared lock stays cold, and at
            // least every second: tasks are aborted at the end, not joined.
            if local.len() >= LOCAL_SAMPLES || last_flush.elapsed() >= FLUSH_EVERY {
                last_flush = Instant::now();
                flush_latency(shared, &mut local);
            }
        }
    };
    flush_latency(shared, &mut local);
    Ok(end)
}

fn go_live(shared: &Shared, ready: &mut Option<tokio::sync::oneshot::Sender<bool>>) {
    shared.live.fetch_add(1, Ordering::Relaxed);
    if let Some(tx) = ready.take() {
        let _ = tx.send(true); // the connect phase may have timed out already
    }
}

fn flush_latency(shared: &Shared, local: &mut Vec<u64>) {
    if local.is_empty() {
        return;
    }
    if let Ok(mut h) = shared.latency.lock() {
        for &v in local.iter() {
            h.saturating_record(v);
        }
    }
    local.clear();
}

/// The send time after [`MARKER`] in a frame, if any.
fn sent_at_us(frame: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(frame, MARKER)? + MARKER.len();
    let digits = frame[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut value: u64 = 0;
    let mut n = 0;
    for d in digits {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        n += 1;
    }
    (n > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_send_time_in_either_protocol() {
        let kc = br#"{"type":"message","cursor":"c","message":{"id":"x","room":"r","author":"b","text":"kcb1:1733241600123456:7 pad","sent_at":"..."}}"#;
        assert_eq!(sent_at_us(kc), Some(1_733_241_600_123_456));
        let sio = br#"42["message",{"id":"x","text":"kcb1:42:1"}]"#;
        assert_eq!(sent_at_us(sio), Some(42));
        assert_eq!(sent_at_us(b"no marker"), None);
        assert_eq!(sent_at_us(b"kcb1:"), None);
    }
}
