//! WebSocket subscribers for both protocols, cheap enough to run thousands.
//!
//! A subscriber never parses a frame as JSON. It tells a chat message from
//! other frames by a prefix, counts it, and on every `sample_every`-th
//! message scans the frame for the send-time marker the poster put in the
//! text (see [`MARKER`]) to record one POST→receive latency. Nor does it
//! use a WebSocket library after connecting: frames are parsed in place in
//! one read buffer per socket (see `Conn`), so the receiving side costs a
//! `read()` and a few comparisons per batch of frames, not an allocation
//! and a UTF-8 check per frame.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

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
    fn path(&self) -> String {
        match self.proto {
            Proto::Kinesis => format!("/ws?room={}", self.room),
            Proto::Socketio => format!("/socket.io/?EIO=4&transport=websocket&room={}", self.room),
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
    let mut tcp = connect_tcp(source, target.server).await?;
    let mut conn = Conn::new(target.read_buffer);
    handshake(&mut tcp, target, &mut conn).await.context("WebSocket handshake")?;

    let mut count: u64 = 0;
    // A few samples kept per socket and merged in bulk: a histogram per
    // socket would be ~250 KiB each, and the shared one's lock would be hot.
    let mut local: Vec<u64> = Vec::new();
    let mut last_flush = Instant::now();
    let mut live = false;
    let mut replies: Vec<u8> = Vec::new();
    let end = 'session: loop {
        // Every whole frame in the buffer, then one more read.
        loop {
            let frame = match conn.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    flush_latency(shared, &mut local);
                    return Err(e);
                }
            };
            let bytes = match frame {
                WsFrame::Text(range) => &conn.buf[range],
                WsFrame::Assembled => &conn.message[..],
                WsFrame::Ping(range) => {
                    replies.extend_from_slice(&client_frame(OP_PONG, &conn.buf[range]));
                    continue;
                }
                WsFrame::Close(code) => break 'session End::Closed(code),
                WsFrame::Other => continue,
            };
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
                        replies.extend_from_slice(&client_frame(OP_TEXT, b"3"));
                        false
                    }
                    [b'0', b'{', ..] => {
                        replies.extend_from_slice(&client_frame(OP_TEXT, b"40"));
                        false
                    }
                    [b'4', b'0', ..] if !live => {
                        live = true;
                        go_live(shared, ready);
                        false
                    }
                    [b'4', b'1', ..] | [b'4', b'4', ..] => {
                        bail!("namespace refused: {}", String::from_utf8_lossy(bytes))
                    }
                    [b'1', ..] => break 'session End::Closed(None),
                    _ => false,
                },
            };
            if !is_message {
                continue;
            }
            shared.deliveries.fetch_add(1, Ordering::Relaxed);
            count += 1;
            if count.is_multiple_of(target.sample_every) && shared.recording.load(Ordering::Relaxed) {
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
        }
        if !replies.is_empty() {
            tcp.write_all(&replies).await?;
            replies.clear();
        }
        // A oneshot per socket: polling it costs no shared lock.
        let n = tokio::select! {
            biased;
            _ = &mut stop => break End::Stopped,
            n = conn.read_from(&mut tcp) => n,
        };
        match n {
            Ok(0) => break End::Closed(None),
            Ok(_) => {}
            Err(e) => {
                flush_latency(shared, &mut local);
                return Err(e.into());
            }
        }
    };
    flush_latency(shared, &mut local);
    Ok(end)
}

// ------------------------------------------------------------ WebSocket
// A minimal client side of RFC 6455, enough for a load generator: the
// servers' frames are parsed in place in one reusable buffer per socket (no
// allocation per frame, no UTF-8 check), pings are answered, and the few
// frames we send are masked as the RFC requires.

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// Largest frame or message accepted from a server.
const MAX_MESSAGE: usize = 1 << 20;

/// A parsed server frame; ranges index [`Conn::buf`].
enum WsFrame {
    Text(std::ops::Range<usize>),
    /// A fragmented text message, now whole in [`Conn::message`].
    Assembled,
    Ping(std::ops::Range<usize>),
    Close(Option<u16>),
    /// Pongs, binary frames, fragments of a message not yet whole.
    Other,
}

/// One socket's read buffer: bytes `start..end` are read but not parsed.
struct Conn {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Fragments of a text message so far (rare: neither server fragments).
    message: Vec<u8>,
    fragmented: bool,
}

impl Conn {
    fn new(capacity: usize) -> Self {
        Conn { buf: vec![0; capacity.max(256)], start: 0, end: 0, message: Vec::new(), fragmented: false }
    }

    /// Reads once into the free end of the buffer (compacting or growing
    /// it first when a partial frame fills it).
    async fn read_from(&mut self, tcp: &mut tokio::net::TcpStream) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        self.make_room()?;
        let n = tcp.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Makes the free end of the buffer non-empty: resets it when all is
    /// parsed, moves a partial frame to the front when little room is
    /// left, grows it when one frame fills it.
    fn make_room(&mut self) -> std::io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 4 {
            // Little room left behind a partial frame: move it to the front.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // One frame fills the buffer: make room for the rest of it.
            let grown = (self.buf.len() * 2).min(MAX_MESSAGE + 16);
            if grown == self.buf.len() {
                return Err(std::io::Error::other("a frame larger than the read buffer"));
            }
            self.buf.resize(grown, 0);
        }
        Ok(())
    }

    /// The next whole frame in the buffer, if any.
    fn next_frame(&mut self) -> anyhow::Result<Option<WsFrame>> {
        let data = &self.buf[self.start..self.end];
        if data.len() < 2 {
            return Ok(None);
        }
        let fin = data[0] & 0x80 != 0;
        let opcode = data[0] & 0x0f;
        if data[1] & 0x80 != 0 {
            bail!("the server sent a masked frame");
        }
        let (len, header) = match data[1] & 0x7f {
            126 if data.len() >= 4 => (usize::from(u16::from_be_bytes([data[2], data[3]])), 4),
            127 if data.len() >= 10 => {
                let len = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                (usize::try_from(len).unwrap_or(usize::MAX), 10)
            }
            126 | 127 => return Ok(None),
            n => (usize::from(n), 2),
        };
        if len > MAX_MESSAGE {
            bail!("a {len}-byte frame from the server");
        }
        if data.len() < header + len {
            return Ok(None);
        }
        let payload = self.start + header..self.start + header + len;
        self.start += header + len;
        Ok(Some(match opcode {
            OP_TEXT if fin => WsFrame::Text(payload),
            OP_TEXT => {
                self.message.clear();
                self.message.extend_from_slice(&self.buf[payload]);
                self.fragmented = true;
                WsFrame::Other
            }
            OP_CONT if self.fragmented => {
                self.message.extend_from_slice(&self.buf[payload]);
                if self.message.len() > MAX_MESSAGE {
                    bail!("a message over {MAX_MESSAGE} bytes from the server");
                }
                if fin {
                    self.fragmented = false;
                    WsFrame::Assembled
                } else {
                    WsFrame::Other
                }
            }
            OP_PING => WsFrame::Ping(payload),
            OP_CLOSE => {
                let p = &self.buf[payload];
                WsFrame::Close((p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))
            }
            _ => WsFrame::Other,
        }))
    }
}

/// A client frame: FIN, masked (the key needs no randomness here: it only
/// keeps proxies from reading the payload as HTTP, and there are none).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(0x80 | opcode);
    // Pings and our replies are short: control payloads are at most 125.
    out.push(0x80 | payload.len().min(125) as u8);
    out.extend_from_slice(&KEY);
    out.extend(payload.iter().take(125).enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    out
}

/// Sends the upgrade request and reads the `101` answer; bytes after it
/// stay in `conn` as the first frames.
async fn handshake(tcp: &mut tokio::net::TcpStream, target: &Target, conn: &mut Conn) -> anyhow::Result<()> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path(),
        target.server
    );
    tcp.write_all(request.as_bytes()).await?;
    loop {
        if conn.read_from(tcp).await? == 0 {
            bail!("the server closed the connection during the handshake");
        }
        let head = &conn.buf[..conn.end];
        if let Some(at) = memchr::memmem::find(head, b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 101") {
                let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                bail!("upgrade refused: {}", String::from_utf8_lossy(line));
            }
            // RFC 6455's own example key, so the answer is known.
            if memchr::memmem::find(&head[..at], b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=").is_none() {
                bail!("the upgrade answer has a wrong Sec-WebSocket-Accept");
            }
            conn.start = at + 4;
            return Ok(());
        }
        if conn.end >= 16 * 1024 {
            bail!("an upgrade answer over 16 KiB");
        }
    }
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

    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=65535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `wire` into a connection `chunk` bytes at a time (as reads
    /// would) and collects what the parser makes of it.
    fn parse(wire: &[u8], chunk: usize) -> anyhow::Result<Vec<String>> {
        let mut conn = Conn::new(256);
        let mut out = Vec::new();
        let mut rest = wire;
        while !rest.is_empty() {
            // What read_from does, with `rest` as the socket.
            conn.make_room()?;
            let n = chunk.min(rest.len()).min(conn.buf.len() - conn.end);
            conn.buf[conn.end..conn.end + n].copy_from_slice(&rest[..n]);
            conn.end += n;
            rest = &rest[n..];
            while let Some(f) = conn.next_frame()? {
                out.push(match f {
                    WsFrame::Text(r) => format!("text {}", String::from_utf8_lossy(&conn.buf[r])),
                    WsFrame::Assembled => format!("text {}", String::from_utf8_lossy(&conn.message)),
                    WsFrame::Ping(r) => format!("ping {}", String::from_utf8_lossy(&conn.buf[r])),
                    WsFrame::Close(code) => format!("close {code:?}"),
                    WsFrame::Other => "other".into(),
                });
            }
        }
        Ok(out)
    }

    #[test]
    fn parses_frames_whole_or_split_across_reads() {
        let long = "x".repeat(300);
        let huge = "y".repeat(70_000);
        let mut wire = server_frame(0x81, b"hello");
        wire.extend(server_frame(0x81, long.as_bytes()));
        wire.extend(server_frame(0x89, b"p"));
        wire.extend(server_frame(0x01, b"frag")); // text, not FIN
        wire.extend(server_frame(0x80, b"ment")); // continuation, FIN
        wire.extend(server_frame(0x81, huge.as_bytes()));
        wire.extend(server_frame(0x88, &4008u16.to_be_bytes()));
        let want = vec![
            "text hello".to_string(),
            format!("text {long}"),
            "ping p".into(),
            "other".into(),
            "text fragment".into(),
            format!("text {huge}"),
            "close Some(4008)".into(),
        ];
        for chunk in [1, 3, 7, 64, 4096, wire.len()] {
            assert_eq!(parse(&wire, chunk).unwrap(), want, "read size {chunk}");
        }
    }

    #[test]
    fn rejects_masked_and_oversized_server_frames() {
        assert!(parse(&[0x81, 0x85, 1, 2, 3, 4, 0, 0, 0, 0, 0], 64).is_err());
        let mut too_big = vec![0x81, 127];
        too_big.extend_from_slice(&((MAX_MESSAGE as u64) + 1).to_be_bytes());
        assert!(parse(&too_big, 64).is_err());
    }

    #[test]
    fn client_frames_are_masked() {
        let f = client_frame(OP_PONG, b"abc");
        assert_eq!(f[0], 0x8A);
        assert_eq!(f[1], 0x83);
        let key = &f[2..6];
        let unmasked: Vec<u8> = f[6..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
        assert_eq!(unmasked, b"abc");
    }
}
