//! The backend test suite: the same behaviour, checked against every
//! backend. A `Deployment` starts server instances that share one stream;
//! each backend's test file runs every function here against its own.

use super::TestServer;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

/// Starts instances of one deployment (sharing one stream).
pub trait Deployment {
    /// A new server instance on this deployment's stream.
    fn instance(&self) -> impl std::future::Future<Output = TestServer>;
}

/// Texts that must survive the round trip byte for byte.
pub fn odd_texts() -> Vec<String> {
    vec![
        "<script>window.__pwned = 1</script>".into(),
        r#"<img src=x onerror="window.__pwned=1">"#.into(),
        "[click](javascript:alert(1)) <a href=\"javascript:alert(1)\">x</a>".into(),
        "line one\nline two\n\tindented".into(),
        "e\u{301} a\u{308} combining, Z\u{335}\u{30d}a\u{31b}l\u{358}g\u{315}o".into(),
        "\u{202e}reversed\u{202c} and \u{200f}שלום עולם\u{200e} mixed".into(),
        "👩\u{200d}💻 🏳️\u{200d}🌈 family: 👨\u{200d}👩\u{200d}👧".into(),
        "quotes \" ' \\ and json {\"a\":1} and &amp; &lt;".into(),
        "😀".repeat(4000),
    ]
}

/// A POST reaches every socket of its room, and no socket of another room.
pub async fn post_reaches_its_room_only(d: &impl Deployment) {
    let s = d.instance().await;
    let (mut a, _) = s.ws_ready("alpha").await;
    let (mut b, _) = s.ws_ready("alpha").await;
    let (mut other, _) = s.ws_ready("beta").await;
    let (sent, cursor) = s.send("alpha", "ana", "hello alpha").await;
    for c in [&mut a, &mut b] {
        let got = c.messages(1).await;
        assert_eq!(got[0].1, sent);
        assert_eq!(got[0].0, cursor, "the socket's cursor is the POST's cursor");
    }
    let (beta, _) = s.send("beta", "bo", "hello beta").await;
    assert_eq!(other.messages(1).await[0].1, beta, "beta sees only beta's message");
    a.expect_silence(Duration::from_millis(300)).await;
}

/// A socket gets the room's history, then `ready`, then live messages.
pub async fn history_then_ready_then_live(d: &impl Deployment) {
    let s = d.instance().await;
    let (mut w, _) = s.ws_ready("hist").await;
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(s.send("hist", "ana", &format!("m{i}")).await.0);
    }
    assert_eq!(w.messages(5).await.into_iter().map(|(_, m)| m).collect::<Vec<_>>(), sent);

    let (mut late, backlog) = s.ws_ready("hist").await;
    assert!(!backlog.reset);
    assert_eq!(backlog.messages.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(), sent);
    assert_eq!(backlog.ready_cursor, backlog.messages.last().unwrap().0);

    let (live, _) = s.send("hist", "bo", "live one").await;
    assert_eq!(late.messages(1).await[0].1, live);

    let (status, page) = s.get_json("/api/messages?room=hist&limit=3").await;
    assert_eq!(status, 200);
    let texts: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|e| e["message"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["m3", "m4", "live one"]);
    let before = page["messages"][0]["cursor"].as_str().unwrap();
    let (_, older) = s.get_json(&format!("/api/messages?room=hist&limit=2&before={before}")).await;
    let texts: Vec<&str> = older["messages"].as_array().unwrap().iter().map(|e| e["message"]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["m1", "m2"]);
}

/// `since` gives exactly the messages after the cursor, then `ready`.
pub async fn since_gives_exactly_the_rest(d: &impl Deployment) {
    let s = d.instance().await;
    let (mut w, _) = s.ws_ready("since").await;
    let mut cursors = Vec::new();
    for i in 0..6 {
        cursors.push(s.send("since", "ana", &format!("s{i}")).await.1);
    }
    w.messages(6).await;
    let mut r = s.ws(&format!("room=since&since={}", cursors[2])).await;
    let b = r.until_ready().await;
    assert!(!b.reset);
    assert_eq!(b.texts(), ["s3", "s4", "s5"]);
    // From the newest cursor: nothing, and ready carries that cursor.
    let mut r = s.ws(&format!("room=since&since={}", cursors[5])).await;
    let b = r.until_ready().await;
    assert!(b.messages.is_empty() && !b.reset);
    assert_eq!(b.ready_cursor, cursors[5]);
    let (m, _) = s.send("since", "ana", "after").await;
    assert_eq!(r.messages(1).await[0].1, m);
}

/// An unknown `since` gets `reset`, then the history.
pub async fn unknown_since_resets(d: &impl Deployment) {
    let s = d.instance().await;
    let (mut w, _) = s.ws_ready("reset").await;
    let (kept, _) = s.send("reset", "ana", "kept").await;
    // Wait for the stream round trip, so "kept" is history everywhere.
    assert_eq!(w.messages(1).await[0].1, kept);
    for since in ["garbage", "bS4xLjI", "bS4xLjI.extra"] {
        let mut r = s.ws(&format!("room=reset&since={since}")).await;
        let b = r.until_ready().await;
        assert!(b.reset, "since={since} should reset");
        assert_eq!(b.texts(), ["kept"]);
    }
}

/// A repeated `client_id` is accepted once and shown once.
pub async fn client_id_is_idempotent(d: &impl Deployment) {
    let s = d.instance().await;
    let (mut w, _) = s.ws_ready("idem").await;
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({"room": "idem", "author": "ana", "text": "once", "client_id": id});
    let (first, a) = s.post(&body).await;
    assert_eq!(first, 201, "{a}");
    assert_eq!(a["message"]["id"], id.as_str());
    let (again, b) = s.post(&body).await;
    assert_eq!(again, 200, "repeat of an accepted client_id: {b}");
    assert_eq!(a, b, "the repeat answers the same message and cursor");
    let got = w.messages(1).await;
    assert_eq!(got[0].1.id, id);
    // After it has come back from the stream, a repeat is still 200.
    let (third, c) = s.post(&body).await;
    assert_eq!(third, 200);
    assert_eq!(c["message"], a["message"]);
    w.expect_silence(Duration::from_millis(500)).await;
    let (_, page) = s.get_json("/api/messages?room=idem").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
}

/// Hostile and odd text round-trips exactly, through POST, socket and history.
pub async fn odd_text_round_trips(d: &impl Deployment) {
    let s = d.instance().await;
    let (mut w, _) = s.ws_ready("odd").await;
    let texts = odd_texts();
    for t in &texts {
        let (m, _) = s.send("odd", "<b>mallory</b>", t).await;
        assert_eq!(&m.text, t);
    }
    let got: Vec<String> = w.messages(texts.len()).await.into_iter().map(|(_, m)| m.text).collect();
    assert_eq!(got, texts);
    let (_, page) = s.get_json("/api/messages?room=odd").await;
    let hist: Vec<String> =
        page["messages"].as_array().unwrap().iter().map(|e| e["message"]["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(hist, texts);
    assert_eq!(page["messages"][0]["message"]["author"], "<b>mallory</b>");
}

/// One room's messages arrive in the order they were accepted, each once.
pub async fn order_is_kept(d: &impl Deployment) {
    let s = d.instance().await;
    let (mut w, _) = s.ws_ready("order").await;
    let n = 30;
    let mut sent = Vec::new();
    for i in 0..n {
        sent.push(s.send("order", "ana", &format!("#{i}")).await.0.id);
    }
    let got: Vec<String> = w.messages(n).await.into_iter().map(|(_, m)| m.id).collect();
    assert_eq!(got, sent);
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), n);
}
