//! WebSocket behaviour that protects everyone else: slow consumers, dead
//! peers, shutdown, and clients that break the WebSocket protocol.

mod support;

use std::time::{Duration, Instant};
use support::{test_config, Ended, TestServer, WsClient, WAIT};
use tokio::net::TcpSocket;

/// A socket whose receive buffer is tiny, so it fills at once when the
/// test stops reading.
async fn tiny_buffer_socket(s: &TestServer, room: &str) -> WsClient {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(s.addr).await.unwrap();
    let url = format!("ws://{}/ws?room={room}", s.addr);
    let (stream, _) = tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
        .await
        .expect("handshake");
    WsClient { stream }
}

async fn metric(s: &TestServer, name: &str) -> f64 {
    let (_, text) = s.get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

async fn wait_for_metric(s: &TestServer, name: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    while metric(s, name).await != want {
        assert!(Instant::now() < deadline, "{name} never reached {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn slow_consumer_is_closed_with_4008_and_never_slows_the_others() {
    let mut config = test_config();
    config.ws_queue = 64;
    config.ws_write_timeout = Duration::from_millis(500);
    let s = TestServer::start(config).await;

    let mut slow = tiny_buffer_socket(&s, "busy").await;
    slow.until_ready().await;
    let (mut fast, _) = s.ws_ready("busy").await;

    // ~8 MB: more than the kernel buffers between the server and a socket
    // that stopped reading, so the slow one must block or lag.
    let n = 2000;
    let text = "x".repeat(3990);
    let reader = tokio::spawn(async move {
        let got = fast.messages(n).await;
        (got.len(), fast)
    });
    for i in 0..n {
        s.send("busy", "ana", &format!("{i} {text}")).await;
    }
    let (got, mut fast) = tokio::time::timeout(WAIT, reader).await.expect("fast socket keeps up").unwrap();
    assert_eq!(got, n, "the fast socket got every message");

    // The slow one was given up on, with 4008, while the fast one lives on.
    wait_for_metric(&s, "chat_slow_consumer_closes_total", 1.0).await;
    assert_eq!(slow.until_end().await, Ended::Closed(Some(4008)));
    let (m, _) = s.send("busy", "ana", "still here").await;
    assert_eq!(fast.messages(1).await[0].1, m);
    wait_for_metric(&s, "chat_sockets_open", 1.0).await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let mut config = test_config();
    config.ws_ping_interval = Duration::from_millis(200);
    let s = TestServer::start(config).await;
    let (mut alive, _) = s.ws_ready("pings").await;
    let (_silent, _) = s.ws_ready("pings").await; // never read again, so never pongs
    wait_for_metric(&s, "chat_sockets_open", 2.0).await;
    // The live one answers pings (tungstenite does while reading).
    let reader = tokio::spawn(async move {
        alive.expect_silence(Duration::from_millis(1500)).await;
        alive
    });
    wait_for_metric(&s, "chat_sockets_open", 1.0).await;
    let mut alive = reader.await.unwrap();
    let (m, _) = s.send("pings", "ana", "you are alive").await;
    assert_eq!(alive.messages(1).await[0].1, m);
}

#[tokio::test]
async fn heartbeats_arrive_every_ping_interval() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut config = test_config();
    config.ws_ping_interval = Duration::from_millis(200);
    let s = TestServer::start(config).await;
    let (mut c, _) = s.ws_ready("beats").await;
    let mut beats = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while beats < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.stream.next()).await.expect("three heartbeats within 2 s") {
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), r#"{"type":"heartbeat"}"#);
                beats += 1;
            }
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_and_finishes() {
    let s = TestServer::start(test_config()).await;
    let (mut a, _) = s.ws_ready("bye").await;
    let (mut b, _) = s.ws_ready("other").await;
    let stop = tokio::spawn(s.stop());
    assert_eq!(a.until_end().await, Ended::Closed(Some(1001)));
    assert_eq!(b.until_end().await, Ended::Closed(Some(1001)));
    stop.await.unwrap().expect("run returns Ok after a graceful shutdown");
}

/// A raw TCP connection that has done the WebSocket handshake for `room`,
/// for sending bytes no well-behaved client library would.
async fn raw_socket(s: &TestServer, room: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let request = format!(
        "GET /ws?room={room} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        s.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Read the 101 response head, byte by byte so no frame is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(tokio::time::timeout(WAIT, tcp.read(&mut b)).await.unwrap().unwrap(), 1);
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "RFC 6455 accept key: {head}");
    tcp
}

/// Reads server frames from a raw socket until a close frame; returns its
/// code and the text frames seen before it (backlog, ready, heartbeats).
async fn raw_until_close(tcp: &mut tokio::net::TcpStream) -> (u16, Vec<String>) {
    use tokio::io::AsyncReadExt;
    let mut texts = Vec::new();
    let mut buf = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        // Parse whole frames from `buf` (server frames are unmasked).
        while buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7F {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            assert_eq!(buf[1] & 0x80, 0, "server frames are unmasked");
            if buf.len() < at + len {
                break;
            }
            let payload = buf[at..at + len].to_vec();
            let opcode = buf[0] & 0x0F;
            buf.drain(..at + len);
            match opcode {
                0x1 => texts.push(String::from_utf8(payload).expect("text frames are UTF-8")),
                0x8 => return (u16::from_be_bytes([payload[0], payload[1]]), texts),
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut chunk)).await.expect("close frame in time").unwrap();
        assert!(n > 0, "connection ended without a close frame");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A masked client frame.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![first];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[tokio::test]
async fn client_pings_are_answered_and_a_client_close_is_echoed() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;
    let s = TestServer::start(test_config()).await;
    let (mut c, _) = s.ws_ready("manners").await;
    c.stream.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match c.stream.next().await {
                Some(Ok(Message::Pong(p))) => return p,
                Some(Ok(_)) => {}
                other => panic!("socket ended before the pong: {other:?}"),
            }
        }
    })
    .await
    .expect("pong in time");
    assert_eq!(&pong[..], b"are you there");
    // Still live after the ping.
    let (m, _) = s.send("manners", "ana", "after the ping").await;
    assert_eq!(c.messages(1).await[0].1, m);
    // A client close with 1000 is answered with 1000, then the socket goes.
    let close = CloseFrame { code: CloseCode::Normal, reason: "done".into() };
    c.stream.send(Message::Close(Some(close))).await.unwrap();
    assert_eq!(c.until_end().await, Ended::Closed(Some(1000)));
    wait_for_metric(&s, "chat_sockets_open", 0.0).await;
}

#[tokio::test]
async fn protocol_violations_close_that_socket_only() {
    use tokio::io::AsyncWriteExt;
    let s = TestServer::start(test_config()).await;
    let (mut bystander, _) = s.ws_ready("rude").await;

    // An unmasked client frame: 1002.
    let mut unmasked = raw_socket(&s, "rude").await;
    unmasked.write_all(b"\x81\x02hi").await.unwrap();
    assert_eq!(raw_until_close(&mut unmasked).await.0, 1002);

    // A text frame over the 4 KiB a client may send: 1009.
    let mut big = raw_socket(&s, "rude").await;
    big.write_all(&client_frame(0x81, &[b'a'; 5000])).await.unwrap();
    assert_eq!(raw_until_close(&mut big).await.0, 1009);

    // Garbage that is not WebSocket at all (reserved bits, unknown opcode): 1002.
    let mut junk = raw_socket(&s, "rude").await;
    junk.write_all(&[0xFF; 16]).await.unwrap();
    assert_eq!(raw_until_close(&mut junk).await.0, 1002);

    // A 64-bit length with its top bit set: 1002 (RFC 6455 §5.2).
    let mut huge = raw_socket(&s, "rude").await;
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 63).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    huge.write_all(&frame).await.unwrap();
    assert_eq!(raw_until_close(&mut huge).await.0, 1002);

    // A close code no peer may send (1005, 999, 5000): 1002.
    for code in [1005u16, 999, 5000] {
        let mut bad_code = raw_socket(&s, "rude").await;
        bad_code.write_all(&client_frame(0x88, &code.to_be_bytes())).await.unwrap();
        assert_eq!(raw_until_close(&mut bad_code).await.0, 1002, "close code {code}");
    }

    // Bytes after a valid close are ignored: the close is echoed.
    let mut trailing = raw_socket(&s, "rude").await;
    let mut bytes = client_frame(0x88, &1000u16.to_be_bytes());
    bytes.extend_from_slice(&[0xFF; 8]);
    trailing.write_all(&bytes).await.unwrap();
    assert_eq!(raw_until_close(&mut trailing).await.0, 1000);

    // The well-behaved socket in the same room never noticed.
    let (m, _) = s.send("rude", "ana", "still fine").await;
    assert_eq!(bystander.messages(1).await[0].1, m);
    wait_for_metric(&s, "chat_sockets_open", 1.0).await;
}

#[tokio::test]
async fn frames_sent_with_the_handshake_are_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A client that sends its close frame in the same packet as the
    // handshake: those bytes reach the session, which answers the close.
    let s = TestServer::start(test_config()).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut request = format!(
        "GET /ws?room=eager HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        s.addr
    )
    .into_bytes();
    request.extend(client_frame(0x88, &[0x0B, 0xB8])); // close 3000
    tcp.write_all(&request).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut all)).await.expect("server closes").unwrap();
    let at = all.windows(4).position(|w| w == b"\r\n\r\n").expect("response head") + 4;
    let mut rest = tokio_test_stream(all[at..].to_vec());
    assert_eq!(raw_until_close(&mut rest).await.0, 3000);
}

/// A loopback stream that yields `bytes` and then ends.
fn tokio_test_stream(bytes: Vec<u8>) -> tokio::net::TcpStream {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::net::TcpStream::connect(addr).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    std::io::Write::write_all(&mut server, &bytes).unwrap();
    drop(server);
    client.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(client).unwrap()
}

/// A client flooding pings without reading the pongs gets TCP backpressure
/// and one pong per batch read, not one per ping: the server's memory and
/// the other sockets are not its to take.
#[tokio::test]
async fn a_ping_flood_is_answered_sparingly_and_disturbs_no_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start(test_config()).await;
    let (mut victim, _) = s.ws_ready("calm").await;
    let mut flood = raw_socket(&s, "flood").await;
    let pings = 20_000;
    let ping = client_frame(0x89, &[7u8; 125]);
    let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * pings).collect();
    let (mut rd, mut wr) = flood.split();
    // Write the whole flood without reading a byte, while the room next
    // door gets a message.
    let writer = async { wr.write_all(&burst).await.unwrap() };
    let other = async {
        let (sent, _) = s.send("calm", "v", "still here").await;
        let got = victim.messages(1).await;
        assert_eq!(got[0].1, sent);
    };
    tokio::time::timeout(WAIT, async { tokio::join!(writer, other) }).await.expect("flood written, victim served");
    // Now read what came back: pongs (and the backlog/ready texts).
    let mut pongs = 0;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(800), rd.read(&mut chunk)).await {
        assert!(n > 0, "the flooding socket stays open");
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut at = 0;
    while at + 2 <= buf.len() {
        let (len, head) = match buf[at + 1] & 0x7F {
            126 => (usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]])), 4),
            n => (usize::from(n), 2),
        };
        if buf[at] == 0x8A {
            assert_eq!(&buf[at + head..at + head + len], &[7u8; 125][..], "a pong echoes the ping's payload");
            pongs += 1;
        }
        at += head + len;
    }
    assert!(pongs >= 1, "the newest ping is answered");
    assert!(pongs < pings / 10, "{pongs} pongs for {pings} pings");
}

/// An upgrade whose Sec-WebSocket-Key is not 16 bytes of base64 is a 400.
#[tokio::test]
async fn a_malformed_websocket_key_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start(test_config()).await;
    for key in ["", "abc", "not base64 at all!!!!!==", "dGhlIHNhbXBsZSBub25jZQ"] {
        let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let request = format!(
            "GET /ws?room=k HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
            s.addr
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 12];
        tokio::time::timeout(WAIT, tcp.read_exact(&mut head)).await.unwrap().unwrap();
        assert_eq!(&head, b"HTTP/1.1 400", "key {key:?}");
    }
}
