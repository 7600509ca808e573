//! WebSocket behaviour that protects everyone else: slow consumers, dead
//! peers, shutdown.

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
