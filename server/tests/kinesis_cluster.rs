//! The Kinesis backend with several in-process instances on one emulator
//! stream: fan-out across instances, resharding, cursors across instances,
//! and records written by other producers.

mod support;

use app::ChatMessage;
use futures_util::future::join_all;
use server::backend::kinesis::kpl;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use support::emulator::{
    kinesis_config, metric, put_raw, rooms_on_two_shards, send_retrying, start_ready, update_shard_count, wait_active,
    Emulator,
};
use support::{TestServer, WsClient};

fn ids(msgs: &[(String, ChatMessage)]) -> Vec<String> {
    msgs.iter().map(|(_, m)| m.id.clone()).collect()
}

/// Reads exactly `n` messages, then makes sure nothing more (a duplicate)
/// follows.
async fn exactly(ws: &mut WsClient, n: usize) -> Vec<(String, ChatMessage)> {
    let got = ws.messages(n).await;
    ws.expect_silence(Duration::from_millis(700)).await;
    let unique: HashSet<&str> = got.iter().map(|(_, m)| m.id.as_str()).collect();
    assert_eq!(unique.len(), n, "duplicates on a socket");
    got
}

/// Checks that each poster's messages (texts "<poster>:<k>", sent one
/// after another) appear in the order they were sent.
fn assert_poster_order(msgs: &[(String, ChatMessage)]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    for (_, m) in msgs {
        let (poster, k) = m.text.rsplit_once(':').expect("poster:k");
        let k: i64 = k.parse().expect("k");
        let prev = last.insert(poster.to_owned(), k).unwrap_or(-1);
        assert!(k > prev, "{poster}: message {k} came after {prev}");
    }
}

/// Test 1: one instance: POST → WebSocket, history, `since`.
#[tokio::test]
async fn one_instance_post_socket_history_since() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("one", 1).await;
    let s = start_ready(kinesis_config(&emu.endpoint(), &stream)).await;
    let (mut w, b) = s.ws_ready("lobby").await;
    assert!(b.messages.is_empty());
    let mut sent = Vec::new();
    for i in 0..4 {
        sent.push(send_retrying(&s, "lobby", "ana", &format!("hello {i}")).await);
    }
    let got = exactly(&mut w, 4).await;
    for ((cursor, m), (sent_m, sent_cursor)) in got.iter().zip(&sent) {
        assert_eq!(m, sent_m);
        assert_eq!(cursor, sent_cursor, "the socket shows the POST's cursor");
    }
    let (status, page) = s.get_json("/api/messages?room=lobby").await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"].as_array().unwrap().len(), 4);
    let mut r = s.ws(&format!("room=lobby&since={}", sent[1].1)).await;
    let b = r.until_ready().await;
    assert!(!b.reset);
    assert_eq!(b.texts(), ["hello 2", "hello 3"]);
    let metrics = s.get_text("/metrics").await.1;
    assert!(metrics.contains("chat_shard_millis_behind_latest"), "per-shard lag exported");
    assert!(metrics.contains("chat_shard_seconds_since_read"), "per-shard read age exported");
}

/// Test 2: three instances on a 2-shard stream, two rooms, POSTs spread
/// over all three: every socket gets every message of its room exactly
/// once, in the same order on every instance.
#[tokio::test]
async fn three_instances_exactly_once_same_order() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("three", 2).await;
    let (room_a, room_b) = rooms_on_two_shards();
    let config = kinesis_config(&emu.endpoint(), &stream);
    let servers: Vec<TestServer> = join_all((0..3).map(|_| start_ready(config.clone()))).await;

    let mut sockets = Vec::new();
    for s in &servers {
        for room in [&room_a, &room_b] {
            sockets.push((room.clone(), s.ws_ready(room).await.0));
        }
    }
    let per_poster = 8;
    let posters = servers.iter().enumerate().flat_map(|(i, s)| {
        [&room_a, &room_b].into_iter().map(move |room| async move {
            let mut ids = Vec::new();
            for k in 0..per_poster {
                ids.push(send_retrying(s, room, &format!("i{i}"), &format!("i{i}-{room}:{k}")).await.0.id);
            }
            (room.clone(), ids)
        })
    });
    let sent: Vec<(String, Vec<String>)> = join_all(posters).await;
    let expected = |room: &str| -> HashSet<String> {
        sent.iter().filter(|(r, _)| r == room).flat_map(|(_, ids)| ids.clone()).collect()
    };

    let mut orders: HashMap<String, Vec<Vec<String>>> = HashMap::new();
    for (room, ws) in &mut sockets {
        let got = exactly(ws, 3 * per_poster).await;
        assert_eq!(ids(&got).into_iter().collect::<HashSet<_>>(), expected(room), "{room}: every message");
        assert_poster_order(&got);
        orders.entry(room.clone()).or_default().push(ids(&got));
    }
    for (room, seen) in orders {
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{room}: the same order on every instance");
    }
}

/// Test 3: reshard during a steady flow (2 → 4 shards, then a merge):
/// nothing lost, nothing duplicated, each room's order kept, everywhere;
/// and a cursor from before the reshard resumes through the lineage.
#[tokio::test]
async fn reshard_during_steady_flow() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("reshard", 2).await;
    let (room_a, room_b) = rooms_on_two_shards();
    let config = kinesis_config(&emu.endpoint(), &stream);
    let servers: Vec<TestServer> = join_all((0..3).map(|_| start_ready(config.clone()))).await;
    let mut sockets = Vec::new();
    for s in &servers {
        for room in [&room_a, &room_b] {
            sockets.push((room.clone(), s.ws_ready(room).await.0));
        }
    }

    // Two posters per room (on different instances), each steady.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut posters = Vec::new();
    for (p, (i, room)) in [(0, &room_a), (1, &room_a), (1, &room_b), (2, &room_b)].into_iter().enumerate() {
        let s = &servers[i];
        let stop = stop.clone();
        posters.push(async move {
            let mut sent = Vec::new();
            let mut k = 0;
            while !stop.is_cancelled() {
                let (m, cursor) = send_retrying(s, room, "poster", &format!("p{p}:{k}")).await;
                sent.push((m, cursor, std::time::Instant::now()));
                k += 1;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            sent
        });
    }
    let driver = async {
        let c = emu.client().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let split = std::time::Instant::now();
        update_shard_count(&c, &stream, 4).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Merge two adjacent open shards.
        let shards = c.list_shards().stream_name(&stream).send().await.expect("ListShards");
        let mut open: Vec<_> = shards
            .shards()
            .iter()
            .filter(|s| s.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_none())
            .map(|s| {
                let r = s.hash_key_range().expect("range");
                (r.starting_hash_key().parse::<u128>().unwrap(), r.ending_hash_key().parse::<u128>().unwrap(), s.shard_id().to_owned())
            })
            .collect();
        open.sort();
        assert_eq!(open.len(), 4, "four open shards after the split");
        let pair = open.windows(2).find(|w| w[0].1 + 1 == w[1].0).expect("adjacent shards");
        let merge = std::time::Instant::now();
        c.merge_shards()
            .stream_name(&stream)
            .shard_to_merge(&pair[0].2)
            .adjacent_shard_to_merge(&pair[1].2)
            .send()
            .await
            .expect("MergeShards");
        wait_active(&c, &stream).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.cancel();
        (split, merge)
    };
    let (sent, (split, merge)) = tokio::join!(join_all(posters), driver);
    // The flow was steady: every room got messages before the split,
    // between split and merge, and after the merge.
    for room in [&room_a, &room_b] {
        let at: Vec<std::time::Instant> =
            sent.iter().flatten().filter(|(m, ..)| &m.room == room).map(|(.., t)| *t).collect();
        assert!(at.iter().any(|t| *t < split), "{room}: messages before the split");
        assert!(at.iter().any(|t| *t > split && *t < merge), "{room}: messages between split and merge");
        assert!(at.iter().any(|t| *t > merge), "{room}: messages after the merge");
    }
    let all: Vec<(ChatMessage, String)> = sent.iter().flatten().map(|(m, c, _)| (m.clone(), c.clone())).collect();
    let count = |room: &str| all.iter().filter(|(m, _)| m.room == room).count();

    let mut orders: HashMap<String, Vec<Vec<String>>> = HashMap::new();
    for (room, ws) in &mut sockets {
        let got = exactly(ws, count(room)).await;
        let want: HashSet<String> = all.iter().filter(|(m, _)| &m.room == room).map(|(m, _)| m.id.clone()).collect();
        assert_eq!(ids(&got).into_iter().collect::<HashSet<_>>(), want, "{room}: nothing lost");
        assert_poster_order(&got);
        orders.entry(room.clone()).or_default().push(ids(&got));
    }
    for (room, seen) in &orders {
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{room}: the same order on every instance");
    }

    // A cursor from before the split, on an instance whose window is too
    // small to hold it: the catch-up read follows parent → children.
    let mut small = config.clone();
    small.history_per_room = 3;
    let late = start_ready(small).await;
    let order_a = &orders[&room_a][0];
    let first_a = all.iter().find(|(m, _)| m.id == order_a[0]).expect("first message");
    let mut r = late.ws(&format!("room={room_a}&since={}", first_a.1)).await;
    let b = r.until_ready().await;
    assert!(!b.reset, "an old cursor is still retained");
    assert_eq!(ids(&b.messages), order_a[1..].to_vec(), "catch-up across the reshard: no gap, no duplicate");
}

/// Test 4: a cursor taken on instance A resumes on instance B with no gap
/// (from B's window, and by reading the stream when B's window is too
/// small); an instance started after the messages shows them as history.
#[tokio::test]
async fn cursor_moves_between_instances_and_late_instance_has_history() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("cursor", 2).await;
    let config = kinesis_config(&emu.endpoint(), &stream);
    let a = start_ready(config.clone()).await;
    let mut small = config.clone();
    small.history_per_room = 2;
    let b = start_ready(small).await;

    let (mut wa, _) = a.ws_ready("resume").await;
    let (mut wb, _) = b.ws_ready("resume").await;
    for i in 0..6 {
        send_retrying(&a, "resume", "ana", &format!("m{i}")).await;
    }
    let on_a = exactly(&mut wa, 6).await;
    exactly(&mut wb, 6).await;
    // The client saw m0..m1 on A, then lost its connection.
    let cursor = on_a[1].0.clone();
    for i in 6..8 {
        send_retrying(&b, "resume", "bo", &format!("m{i}")).await;
    }
    exactly(&mut wa, 2).await;
    exactly(&mut wb, 2).await;
    // B's window holds only m6, m7: m2..m5 come from the stream.
    let mut r = b.ws(&format!("room=resume&since={cursor}")).await;
    let got = r.until_ready().await;
    assert!(!got.reset);
    assert_eq!(got.texts(), ["m2", "m3", "m4", "m5", "m6", "m7"]);
    // The same on a third instance with a normal window.
    let c = start_ready(config.clone()).await;
    let mut r = c.ws(&format!("room=resume&since={cursor}")).await;
    let got = r.until_ready().await;
    assert!(!got.reset);
    assert_eq!(got.texts(), ["m2", "m3", "m4", "m5", "m6", "m7"]);
    // ... whose history (from its start-up backfill) has everything.
    let (_, late) = c.ws_ready("resume").await;
    assert_eq!(late.texts(), (0..8).map(|i| format!("m{i}")).collect::<Vec<_>>());
    let (_, page) = c.get_json("/api/messages?room=resume&limit=3").await;
    let texts: Vec<&str> =
        page["messages"].as_array().unwrap().iter().map(|e| e["message"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["m5", "m6", "m7"]);
    // Cursors of positions the stream does not hold: reset, then history.
    let bogus = [
        server::cursor::Position::Kinesis { shard: "shardId-000000000009".into(), seq: "123".into(), sub: 0 },
        server::cursor::Position::Kinesis { shard: "shardId-000000000000".into(), seq: "100".into(), sub: 0 },
    ];
    for pos in bogus {
        let mut g = b.ws(&format!("room=resume&since={}", pos.encode())).await;
        let got = g.until_ready().await;
        assert!(got.reset, "{pos:?} resets");
        assert_eq!(got.texts(), ["m6", "m7"], "then B's history");
    }
    // Live after resuming.
    let (m, _) = send_retrying(&a, "resume", "ana", "live").await;
    assert_eq!(r.messages(1).await[0].1, m);
}

/// Test 5: records written by others: a ChatMessage from another Kinesis
/// client is shown; garbage is skipped (and counted); KPL aggregates built
/// here are shown once each; the readers keep going.
#[tokio::test]
async fn foreign_records_garbage_and_kpl_aggregates() {
    let emu = Emulator::start().await;
    let stream = emu.create_stream("foreign", 2).await;
    let s = start_ready(kinesis_config(&emu.endpoint(), &stream)).await;
    let (mut w, _) = s.ws_ready("lobby").await;
    let c = emu.client().await;

    let foreign = |id: &str, text: &str| {
        format!(r#"{{"v":1,"id":"{id}","room":"lobby","author":"java","text":"{text}","sent_at":"2026-12-03T16:00:00.000Z"}}"#)
    };
    put_raw(&c, &stream, "lobby", foreign("f-1", "from another producer").into_bytes()).await;
    // Garbage: not JSON, JSON of another shape, invalid message, invalid UTF-8.
    put_raw(&c, &stream, "lobby", b"not json at all".to_vec()).await;
    put_raw(&c, &stream, "lobby", br#"{"temperature":21.5}"#.to_vec()).await;
    put_raw(&c, &stream, "lobby", br#"{"id":"x","room":"NO SUCH ROOM","author":"a","text":"t","sent_at":"2026-12-03T16:00:00Z"}"#.to_vec()).await;
    put_raw(&c, &stream, "lobby", vec![0xff, 0xfe, 0xfd, 0x00]).await;
    // An empty record, if the emulator takes one.
    let empty = c
        .put_record()
        .stream_name(&stream)
        .partition_key("lobby")
        .data(aws_sdk_kinesis::primitives::Blob::new(Vec::new()))
        .send()
        .await
        .is_ok();
    // A KPL aggregate of three messages and one bad inner record, twice
    // (at-least-once producers do that): each message shown once.
    let inner: Vec<String> = (1..=3).map(|i| foreign(&format!("k-{i}"), &format!("aggregated {i}"))).collect();
    let agg = kpl::aggregate([
        ("lobby", inner[0].as_bytes()),
        ("lobby", &b"junk inside"[..]),
        ("lobby", inner[1].as_bytes()),
        ("other", inner[2].as_bytes()),
    ]);
    put_raw(&c, &stream, "lobby", agg.clone()).await;
    put_raw(&c, &stream, "lobby", agg).await;
    // A broken aggregate (checksum), then our own message: still read.
    let mut broken = kpl::aggregate([("lobby", inner[0].as_bytes())]);
    let n = broken.len();
    broken[n - 1] ^= 0x55;
    put_raw(&c, &stream, "lobby", broken).await;
    let (own, _) = send_retrying(&s, "lobby", "ana", "after the garbage").await;

    let got = exactly(&mut w, 5).await;
    let texts: Vec<&str> = got.iter().map(|(_, m)| m.text.as_str()).collect();
    assert_eq!(texts, ["from another producer", "aggregated 1", "aggregated 2", "aggregated 3", "after the garbage"]);
    assert_eq!(got[4].1, own);
    let cursors: HashSet<&str> = got.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(cursors.len(), 5, "inner records have their own cursors (sub-sequence)");

    // A cursor pointing inside an aggregate resumes right after it.
    let mut r = s.ws(&format!("room=lobby&since={}", got[2].0)).await;
    let b = r.until_ready().await;
    assert_eq!(b.texts(), ["aggregated 3", "after the garbage"]);

    let skipped = metric(&s, "chat_records_skipped_total", "").await;
    let expected = 4 + 2 + 1 + usize::from(empty);
    assert_eq!(skipped as usize, expected, "garbage counted: 4 records, 2 bad inner records, 1 bad aggregate, maybe 1 empty");
    assert!(metric(&s, "chat_records_skipped_total", "kpl_checksum").await >= 1.0);
    let (status, _) = s.get_json("/readyz").await;
    assert_eq!(status, 200, "the reader keeps going");
}
