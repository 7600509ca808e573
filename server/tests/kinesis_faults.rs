//! The Kinesis backend under faults, injected by a proxy between the
//! server and the emulator (support/fault_proxy.rs), or by killing the
//! emulator itself.

mod support;

use app::ChatMessage;
use futures_util::future::join_all;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use support::emulator::{
    kinesis_config, metric, rooms_on_two_shards, send_retrying, start_ready, wait_readyz, Emulator,
};
use support::fault_proxy::{FaultPlan, FaultProxy};
use support::{TestServer, WsClient};

/// Settings that make faults show quickly.
fn fault_config(endpoint: &str, stream: &str) -> server::config::Config {
    let mut c = kinesis_config(endpoint, stream);
    c.kinesis_call_timeout = Duration::from_secs(2);
    c.kinesis_put_budget = Duration::from_secs(4);
    c.kinesis_stuck_after = Duration::from_secs(3);
    c
}

/// One POST's fate.
#[derive(Debug)]
struct Posted {
    id: String,
    room: String,
    status: u16,
    started: Instant,
    answered: Instant,
}

async fn post(s: &TestServer, room: &str, text: &str) -> Posted {
    let id = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let (status, body) = s.post(&json!({"room": room, "author": "t", "text": text, "client_id": id})).await;
    assert!(status == 201 || status == 503, "POST answered {status}: {body}");
    Posted { id, room: room.to_owned(), status, started, answered: Instant::now() }
}

/// Reads exactly `n` messages, then expects silence.
async fn exactly(ws: &mut WsClient, n: usize, quiet: Duration) -> Vec<ChatMessage> {
    let got: Vec<ChatMessage> = ws.messages(n).await.into_iter().map(|(_, m)| m).collect();
    ws.expect_silence(quiet).await;
    got
}

/// 6a. Partial PutRecords failures and whole-call throttling: every 201
/// message is delivered, in the order it was accepted; no refused one ever
/// appears.
#[tokio::test]
async fn put_failures_and_throttling_deliver_every_201_in_order() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("putfail", 2).await;
    let proxy = FaultProxy::start(&emu.endpoint()).await;
    let mut config = fault_config(&proxy.endpoint(), &stream);
    config.kinesis_put_budget = Duration::from_secs(6);
    let s = start_ready(config).await;
    // A witness reading straight from the emulator.
    let witness = start_ready(kinesis_config(&emu.endpoint(), &stream)).await;
    let (room_a, room_b) = rooms_on_two_shards();
    let (mut wa, _) = witness.ws_ready(&room_a).await;
    let (mut wb, _) = witness.ws_ready(&room_b).await;

    proxy.set(FaultPlan { put_entry_failure: 0.3, throttle_puts: 2, ..FaultPlan::default() });
    // Per room, four concurrent posters of six messages each: batches hold
    // several messages of one room, so partial failures hit the middle of
    // a room's run.
    let sref = &s;
    let mut posters = Vec::new();
    for room in [&room_a, &room_b] {
        for p in 0..4 {
            posters.push(async move {
                let mut out = Vec::new();
                for k in 0..6 {
                    out.push(post(sref, room, &format!("p{p}:{k}")).await);
                }
                out
            });
        }
    }
    let posted: Vec<Posted> = join_all(posters).await.into_iter().flatten().collect();
    proxy.clear();

    let stats = proxy.stats();
    assert!(stats.entries_refused > 0, "the proxy refused entries: {stats:?}");
    assert_eq!(stats.puts_throttled, 2);
    assert!(metric(&s, "chat_producer_retries_total", "").await > 0.0, "the producer retried");
    let accepted = posted.iter().filter(|p| p.status == 201).count();
    assert!(accepted >= posted.len() / 2, "most messages get through: {accepted}/{}", posted.len());

    for (room, ws) in [(&room_a, &mut wa), (&room_b, &mut wb)] {
        let ok: Vec<&Posted> = posted.iter().filter(|p| &p.room == room && p.status == 201).collect();
        let got = exactly(ws, ok.len(), Duration::from_secs(2)).await;
        let got_ids: Vec<&str> = got.iter().map(|m| m.id.as_str()).collect();
        let want: HashSet<&str> = ok.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(got_ids.iter().copied().collect::<HashSet<_>>(), want, "{room}: exactly the 201 messages");
        // Accepted order: a message answered 201 before another was even
        // posted must come first.
        let index: HashMap<&str, usize> = got_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        for x in &ok {
            for y in &ok {
                if x.answered < y.started {
                    assert!(index[x.id.as_str()] < index[y.id.as_str()], "{room}: {} overtook {}", y.id, x.id);
                }
            }
        }
    }
    // What was refused never shows up later.
    let (_, page_a) = witness.get_json(&format!("/api/messages?room={room_a}&limit=500")).await;
    let (_, page_b) = witness.get_json(&format!("/api/messages?room={room_b}&limit=500")).await;
    let shown: HashSet<String> = [page_a, page_b]
        .iter()
        .flat_map(|p| p["messages"].as_array().unwrap().clone())
        .map(|e| e["message"]["id"].as_str().unwrap().to_owned())
        .collect();
    for p in posted.iter().filter(|p| p.status == 503) {
        assert!(!shown.contains(&p.id), "a message answered 503 appeared: {}", p.id);
    }
}

/// 6b. GetRecords throttling: three instances share a budget of 5 reads/s
/// per shard (Kinesis's limit); readers slow down, nothing is lost, and
/// they recover when the throttling stops.
#[tokio::test]
async fn get_records_throttling_slows_readers_without_loss() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("getthrottle", 2).await;
    let proxy = FaultProxy::start(&emu.endpoint()).await;
    let config = fault_config(&proxy.endpoint(), &stream);

    // One idle instance alone: never more than 5 GetRecords/s per shard.
    let first = start_ready(config.clone()).await;
    let before = proxy.stats().calls("GetRecords");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rate = (proxy.stats().calls("GetRecords") - before) as f64 / 3.0 / 2.0;
    assert!(rate <= 5.5, "{rate} GetRecords/s per shard from one instance");

    proxy.set(FaultPlan { get_records_per_shard_per_sec: Some(5), ..FaultPlan::default() });
    let mut servers = vec![first];
    servers.extend(join_all((0..2).map(|_| TestServer::start(config.clone()))).await);
    for s in &servers[1..] {
        wait_readyz(s, 200).await;
    }
    let mut sockets = Vec::new();
    for s in &servers {
        sockets.push(s.ws_ready("lobby").await.0);
    }
    let mut sent = Vec::new();
    for k in 0..20 {
        sent.push(servers[k % 3].send("lobby", "t", &format!("t:{k}")).await.0.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for ws in &mut sockets {
        let got: Vec<String> = exactly(ws, sent.len(), Duration::from_millis(500)).await.into_iter().map(|m| m.id).collect();
        assert_eq!(got, sent, "every message, in order, once");
    }
    assert!(proxy.stats().get_records_throttled > 0, "the budget throttled someone");
    let mut throttled = 0.0;
    for s in &servers {
        throttled += metric(s, "chat_stream_throttled_total", "GetRecords").await;
    }
    assert!(throttled > 0.0, "throttling is counted in /metrics");

    // Recovery: without throttling, a message arrives promptly everywhere.
    proxy.clear();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let (m, _) = servers[0].send("lobby", "t", "after").await;
    for ws in &mut sockets {
        assert_eq!(ws.messages(1).await[0].1, m);
    }
    assert!(started.elapsed() < Duration::from_secs(10), "recovered: {:?}", started.elapsed());
}

/// One shard's trouble never stops the others: its room waits (and
/// /readyz says which shard is stuck) while the other room flows; then it
/// catches up without loss.
#[tokio::test]
async fn a_broken_shard_does_not_stop_the_others() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("oneshard", 2).await;
    let proxy = FaultProxy::start(&emu.endpoint()).await;
    let s = start_ready(fault_config(&proxy.endpoint(), &stream)).await;
    let (low, high) = rooms_on_two_shards();
    let (mut wl, _) = s.ws_ready(&low).await;
    let (mut wh, _) = s.ws_ready(&high).await;

    proxy.update(|p| p.broken_shard = Some("shardId-000000000000".into()));
    let (stuck, _) = send_retrying(&s, &low, "t", "on the broken shard").await;
    let (flowing, _) = send_retrying(&s, &high, "t", "on the healthy shard").await;
    assert_eq!(wh.messages(1).await[0].1, flowing, "the healthy shard keeps flowing");
    let why = wait_readyz(&s, 503).await;
    assert!(why["error"].as_str().unwrap_or("").contains("shardId-000000000000"), "{why}");
    wl.expect_silence(Duration::from_millis(300)).await;

    proxy.clear();
    assert_eq!(wl.messages(1).await[0].1, stuck, "the broken shard catches up");
    wait_readyz(&s, 200).await;
    wl.expect_silence(Duration::from_millis(500)).await;
    wh.expect_silence(Duration::from_millis(100)).await;
}

/// 6c. ExpiredIteratorException: the reader resumes after the last record
/// it read, without a gap or a duplicate.
#[tokio::test]
async fn expired_iterators_resume_without_gap() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("expired", 1).await;
    let proxy = FaultProxy::start(&emu.endpoint()).await;
    let s = start_ready(fault_config(&proxy.endpoint(), &stream)).await;
    let (mut w, _) = s.ws_ready("lobby").await;
    let mut sent = Vec::new();
    for k in 0..4 {
        sent.push(s.send("lobby", "t", &format!("e:{k}")).await.0.id);
    }
    assert_eq!(w.messages(4).await.len(), 4);
    proxy.update(|p| p.expire_iterators = 3);
    for k in 4..10 {
        sent.push(s.send("lobby", "t", &format!("e:{k}")).await.0.id);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let got: Vec<String> = exactly(&mut w, 6, Duration::from_secs(1)).await.into_iter().map(|m| m.id).collect();
    assert_eq!(got, sent[4..].to_vec());
    assert_eq!(proxy.stats().iterators_expired, 3);
    let (status, _) = s.get_json("/readyz").await;
    assert_eq!(status, 200);
}

/// 6d. An endpoint that accepts connections and never answers: the POST
/// gets 503 with Retry-After within the configured budget, /readyz turns
/// 503, and everything recovers when the endpoint answers again.
#[tokio::test]
async fn hung_endpoint_gives_503_within_the_budget() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("hang", 1).await;
    let proxy = FaultProxy::start(&emu.endpoint()).await;
    let config = fault_config(&proxy.endpoint(), &stream);
    let budget = config.kinesis_put_budget;
    let s = start_ready(config).await;
    let (mut w, _) = s.ws_ready("lobby").await;

    proxy.update(|p| p.hang = true);
    let http = reqwest::Client::new();
    let started = Instant::now();
    let resp = http
        .post(s.url("/api/messages"))
        .json(&json!({"room": "lobby", "author": "t", "text": "into the void"}))
        .send()
        .await
        .expect("POST");
    let took = started.elapsed();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"), "503 carries Retry-After");
    assert!(took <= budget + Duration::from_millis(1500), "503 after {took:?}, budget {budget:?}");
    let body: serde_json::Value = resp.json().await.expect("JSON error");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    let why = wait_readyz(&s, 503).await;
    assert!(why["error"].as_str().is_some(), "{why}");

    proxy.update(|p| p.hang = false);
    wait_readyz(&s, 200).await;
    let (m, _) = s.send("lobby", "t", "back").await;
    let got = exactly(&mut w, 1, Duration::from_secs(1)).await;
    assert_eq!(got, [m], "only the accepted message appears");
}

/// 6e. The emulator is killed: POSTs get 503 and /readyz 503. It restarts
/// with its persisted data: the same instances recover without a restart,
/// and no 201 message is lost (nor any 503 one shown).
#[tokio::test]
async fn emulator_killed_and_restarted_recovers_without_loss() {
    let mut emu = Emulator::start_persistent().await;
    let stream = emu.create_stream("restart", 2).await;
    let config = fault_config(&emu.endpoint(), &stream);
    let servers: Vec<TestServer> = join_all((0..2).map(|_| start_ready(config.clone()))).await;
    let mut sockets = Vec::new();
    for s in &servers {
        sockets.push(s.ws_ready("lobby").await.0);
    }
    let mut accepted = Vec::new();
    for k in 0..5 {
        accepted.push(send_retrying(&servers[k % 2], "lobby", "t", &format!("before:{k}")).await.0);
    }
    for ws in &mut sockets {
        assert_eq!(ws.messages(5).await.into_iter().map(|(_, m)| m).collect::<Vec<_>>(), accepted);
    }
    // Let the emulator persist what it acknowledged.
    tokio::time::sleep(Duration::from_secs(1)).await;

    emu.kill();
    let mut refused = Vec::new();
    for s in &servers {
        let p = post(s, "lobby", "during the outage").await;
        assert_eq!(p.status, 503, "POST while the stream is down");
        refused.push(p.id);
    }
    for s in &servers {
        let why = wait_readyz(s, 503).await;
        assert!(why["error"].as_str().is_some(), "{why}");
    }

    emu.restart().await;
    for s in &servers {
        wait_readyz(s, 200).await;
    }
    for k in 0..4 {
        accepted.push(send_retrying(&servers[k % 2], "lobby", "t", &format!("after:{k}")).await.0);
    }
    for ws in &mut sockets {
        let got = exactly(ws, 4, Duration::from_secs(1)).await;
        assert_eq!(got, accepted[5..].to_vec(), "the new messages, once each");
    }
    // A new instance reads everything back from the restarted emulator.
    let late = start_ready(config.clone()).await;
    let (_, backlog) = late.ws_ready("lobby").await;
    let shown: Vec<ChatMessage> = backlog.messages.into_iter().map(|(_, m)| m).collect();
    assert_eq!(shown, accepted, "every 201 message survived, and nothing else");
    assert!(refused.iter().all(|id| shown.iter().all(|m| &m.id != id)));
}
