//! The fan-out hub: per-room recent window, id deduplication and live
//! broadcast.
//!
//! Every backend feeds messages in stream order through [`Rooms::publish`].
//! There they are deduplicated by id (the stream is at-least-once),
//! encoded once into a WebSocket `message` frame, appended to the room's
//! bounded window and handed to the fan-out (`fanout.rs`). Subscribing
//! takes the backlog and joins the fan-out under the same lock as
//! publishing, so nothing falls between them or arrives twice.

use crate::cursor::Position;
use crate::fanout::{Fanout, Outlet};
use crate::metrics::Metrics;
use crate::wsframe;
use app::{ChatMessage, ServerFrame};
use bytes::Bytes;
use parking_lot::Mutex;
use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// One message as it sits in a room: where it is, what it is, and its
/// frame, encoded once for every socket.
#[derive(Debug)]
pub struct Entry {
    pub pos: Position,
    /// `pos` encoded for clients.
    pub cursor: String,
    pub message: ChatMessage,
    /// The whole WebSocket text frame of `{"type":"message",...}`, the same
    /// bytes for every socket.
    pub wire: Bytes,
    /// Where the JSON starts in `wire`.
    json_at: usize,
    /// Bytes this entry holds, roughly (for the hub's size bound).
    pub size: usize,
}

impl Entry {
    pub fn new(pos: Position, message: ChatMessage) -> Self {
        let cursor = pos.encode();
        let frame = ServerFrame::Message { cursor: cursor.clone(), message: message.clone() };
        // Serializing plain strings into JSON cannot fail.
        let json = serde_json::to_string(&frame).expect("serialize message frame");
        let wire = wsframe::text(&json);
        const OVERHEAD: usize = 256; // the structs, the Arc, map and queue slots
        let m = &message;
        let size = OVERHEAD + wire.len() + cursor.len() + m.id.len() * 3 + m.room.len() + m.author.len()
            + m.text.len() + m.sent_at.len();
        Entry { pos, cursor, message, json_at: wire.len() - json.len(), wire, size }
    }

    /// The frame's JSON text.
    pub fn json(&self) -> &str {
        // `wire` ends with the JSON written in `new`.
        std::str::from_utf8(&self.wire[self.json_at..]).expect("frame payload is the JSON")
    }
}

/// Sizes of the hub's bounded structures.
#[derive(Debug, Clone)]
pub struct RoomsConfig {
    /// Messages kept per room for history and `since` (the window).
    pub window: usize,
    /// Frames a socket may fall behind before it is closed with 4008.
    pub socket_queue: usize,
    /// Rooms kept at once; the least recently active room with no sockets
    /// is forgotten beyond this, so junk room names cannot exhaust memory.
    pub max_rooms: usize,
    /// Messages kept across all rooms; beyond it the oldest message of
    /// the whole hub is dropped from its room's window. With `max_rooms`
    /// this bounds memory whatever room names clients invent.
    pub max_messages: usize,
    /// Message ids remembered for deduplication and idempotent POSTs.
    pub dedup_ids: usize,
    /// Bytes of messages kept across all rooms (text, frame, ids): the same
    /// bound as `max_messages`, by size, so large messages cannot run the
    /// hub up to gigabytes before the count bound is reached.
    pub max_bytes: usize,
}

/// Default for [`RoomsConfig::max_bytes`].
pub const DEFAULT_MAX_BYTES: usize = 128 << 20;

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            window: 1000,
            socket_queue: 1024,
            max_rooms: 10_000,
            max_messages: 100_000,
            dedup_ids: 100_000,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// What `publish` did with a message.
#[derive(Debug)]
pub enum Published {
    /// First time this id was seen: it is in the window and on the air.
    New(Arc<Entry>),
    /// The id was already published; this is the earlier entry.
    Duplicate(Arc<Entry>),
}

/// Where a subscription starts.
#[derive(Debug)]
pub enum Start {
    /// No `since`: `backlog` is the room's recent history.
    History,
    /// `since` was found in the window: `backlog` is exactly what follows it.
    After,
    /// `since` is not in the window (older, from another shard, or unknown).
    /// `backlog` is the whole window; the caller asks the backend for what
    /// lies between `since` and the window, or resets.
    OutOfWindow,
}

/// A socket's view of a room: what it missed. What comes next is held in
/// the socket's outlet until the session releases it.
pub struct Subscription {
    pub start: Start,
    pub backlog: Vec<Arc<Entry>>,
}

struct Room {
    window: VecDeque<Arc<Entry>>,
    /// Whether anything was ever dropped from the window's front.
    evicted: bool,
    /// Sockets subscribed now.
    sockets: usize,
    last_active: Instant,
}

/// Ids already published, oldest first, bounded.
#[derive(Default)]
struct Seen {
    by_id: HashMap<String, Arc<Entry>>,
    order: VecDeque<String>,
    /// Sum of [`Entry::size`] over `by_id`.
    bytes: usize,
}

/// The rooms, and every retained message in publish order (for the
/// global `max_messages` bound).
#[derive(Default)]
struct Hub {
    rooms: HashMap<String, Room>,
    order: VecDeque<Arc<Entry>>,
    /// Sum of [`Entry::size`] over `order`.
    bytes: usize,
}

pub struct Rooms {
    config: RoomsConfig,
    metrics: Arc<Metrics>,
    hub: Mutex<Hub>,
    seen: Mutex<Seen>,
    fanout: Fanout,
}

impl Rooms {
    pub fn new(config: RoomsConfig, metrics: Arc<Metrics>) -> Self {
        let fanout = Fanout::new(config.socket_queue, metrics.clone());
        Self { config, metrics, hub: Mutex::new(Hub::default()), seen: Mutex::new(Seen::default()), fanout }
    }

    pub fn config(&self) -> &RoomsConfig {
        &self.config
    }

    /// The entry already published under `id`, if it is still remembered.
    pub fn lookup_id(&self, id: &str) -> Option<Arc<Entry>> {
        self.seen.lock().by_id.get(id).cloned()
    }

    /// Publishes one message, in stream order. Callers that need one order
    /// across publishers (the memory backend) serialize their calls.
    pub fn publish(&self, pos: Position, message: ChatMessage) -> Published {
        let entry = {
            let mut seen = self.seen.lock();
            if let Some(existing) = seen.by_id.get(&message.id) {
                self.metrics.duplicates_dropped.inc();
                return Published::Duplicate(existing.clone());
            }
            let entry = Arc::new(Entry::new(pos, message));
            seen.bytes += entry.size;
            seen.by_id.insert(entry.message.id.clone(), entry.clone());
            seen.order.push_back(entry.message.id.clone());
            while seen.order.len() > self.config.dedup_ids || seen.bytes > self.config.max_bytes {
                let Some(old) = seen.order.pop_front() else { break };
                if let Some(e) = seen.by_id.remove(&old) {
                    seen.bytes -= e.size;
                }
            }
            entry
        };

        let mut hub = self.hub.lock();
        let room = self.room_mut(&mut hub.rooms, &entry.message.room);
        room.window.push_back(entry.clone());
        while room.window.len() > self.config.window {
            room.window.pop_front();
            room.evicted = true;
        }
        room.last_active = Instant::now();
        if room.sockets > 0 {
            self.fanout.publish(&entry);
        }
        hub.bytes += entry.size;
        hub.order.push_back(entry.clone());
        while hub.order.len() > self.config.max_messages || hub.bytes > self.config.max_bytes {
            let Some(oldest) = hub.order.pop_front() else { break };
            hub.bytes -= oldest.size;
            // Still at the front of its room unless the room's own bound
            // (or forgetting the room) dropped it already.
            if let Some(r) = hub.rooms.get_mut(&oldest.message.room) {
                if r.window.front().is_some_and(|f| Arc::ptr_eq(f, &oldest)) {
                    r.window.pop_front();
                    r.evicted = true;
                }
            }
        }
        Published::New(entry)
    }

    /// Subscribes a socket to a room: returns the backlog that precedes
    /// the live feed, which goes to `outlet` (held until released).
    pub fn subscribe(&self, room: &str, since: Option<&Position>, history: usize, outlet: Arc<Outlet>) -> Subscription {
        let mut hub = self.hub.lock();
        let r = self.room_mut(&mut hub.rooms, room);
        r.sockets += 1;
        self.fanout.join(room, outlet);
        let (start, backlog) = match since {
            None => (Start::History, tail(&r.window, history)),
            Some(pos) => match index_after(&r.window, pos) {
                Some(i) => (Start::After, r.window.iter().skip(i).cloned().collect()),
                None => (Start::OutOfWindow, r.window.iter().cloned().collect()),
            },
        };
        Subscription { start, backlog }
    }

    /// Takes a socket out of its room.
    pub fn unsubscribe(&self, room: &str, outlet: &Outlet) {
        let mut hub = self.hub.lock();
        if let Some(r) = hub.rooms.get_mut(room) {
            r.sockets = r.sockets.saturating_sub(1);
        }
        self.fanout.leave(room, outlet);
    }

    /// Up to `limit` messages strictly before `before` (or the newest),
    /// oldest first. A `before` that cannot be placed gives an empty page.
    pub fn history(&self, room: &str, before: Option<&Position>, limit: usize) -> Vec<Arc<Entry>> {
        let hub = self.hub.lock();
        let Some(r) = hub.rooms.get(room) else { return Vec::new() };
        let end = match before {
            None => r.window.len(),
            Some(pos) => match index_after(&r.window, pos) {
                // index_after gives the first entry after `pos`; an exact
                // match sits just before it and is excluded too.
                Some(i) if i > 0 && r.window[i - 1].pos == *pos => i - 1,
                Some(i) => i,
                None => return Vec::new(),
            },
        };
        let start = end.saturating_sub(limit);
        r.window.range(start..end).cloned().collect()
    }

    /// Whether the room's window has ever dropped messages (memory
    /// backend: whether `since` older than the window is still complete).
    pub fn evicted(&self, room: &str) -> bool {
        self.hub.lock().rooms.get(room).is_some_and(|r| r.evicted)
    }

    fn room_mut<'a>(&self, rooms: &'a mut HashMap<String, Room>, name: &str) -> &'a mut Room {
        if !rooms.contains_key(name) {
            if rooms.len() >= self.config.max_rooms {
                evict_idle_room(rooms);
            }
            rooms.insert(
                name.to_owned(),
                Room { window: VecDeque::new(), evicted: false, sockets: 0, last_active: Instant::now() },
            );
        }
        // Inserted just above when missing.
        rooms.get_mut(name).expect("room present")
    }
}

/// Drops the least recently active room that has no sockets.
fn evict_idle_room(rooms: &mut HashMap<String, Room>) {
    let victim = rooms
        .iter()
        .filter(|(_, r)| r.sockets == 0)
        .min_by_key(|(_, r)| r.last_active)
        .map(|(name, _)| name.clone());
    if let Some(name) = victim {
        tracing::debug!(room = %name, "forgetting idle room to stay within max_rooms");
        rooms.remove(&name);
    }
}

fn tail(window: &VecDeque<Arc<Entry>>, n: usize) -> Vec<Arc<Entry>> {
    window.iter().skip(window.len().saturating_sub(n)).cloned().collect()
}

/// Index of the first window entry that comes after `pos`, when the window
/// can tell: `pos` is one of its entries, or sits between two comparable
/// ones. `None` when `pos` is older than the window or incomparable.
fn index_after(window: &VecDeque<Arc<Entry>>, pos: &Position) -> Option<usize> {
    for (i, e) in window.iter().enumerate().rev() {
        if e.pos == *pos {
            return Some(i + 1);
        }
        if e.pos.stream_cmp(pos) == Some(Ordering::Less) {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, room: &str) -> ChatMessage {
        ChatMessage {
            id: id.into(),
            room: room.into(),
            author: "a".into(),
            text: format!("text {id}"),
            sent_at: "2026-12-03T16:00:00.000Z".into(),
        }
    }

    fn pos(seq: u64) -> Position {
        Position::Memory { epoch: 1, seq }
    }

    #[test]
    fn large_messages_are_bounded_by_bytes_not_only_by_count() {
        let config = RoomsConfig { max_bytes: 256 << 10, ..RoomsConfig::default() };
        let r = Rooms::new(config, Arc::new(Metrics::new()));
        let big = "x".repeat(16 << 10);
        for i in 0..200u64 {
            let mut m = msg(&format!("m{i}"), "lobby");
            m.text.clone_from(&big);
            assert!(matches!(r.publish(pos(i), m), Published::New(_)));
        }
        // Each entry holds its text twice (message and frame): ~32 KiB.
        let kept = r.history("lobby", None, 1000);
        assert!(kept.len() >= 4 && kept.len() <= 8, "{} kept", kept.len());
        assert_eq!(kept.last().unwrap().message.id, "m199", "the newest stay");
        assert!(r.evicted("lobby"));
        assert!(r.hub.lock().bytes <= 256 << 10);
        assert!(r.seen.lock().bytes <= 256 << 10);
        assert!(r.lookup_id("m0").is_none(), "the oldest are forgotten entirely");
        assert!(r.lookup_id("m199").is_some());
    }

    fn rooms(window: usize) -> Rooms {
        Rooms::new(
            RoomsConfig { window, socket_queue: 8, max_rooms: 3, max_messages: 12, dedup_ids: 100, max_bytes: DEFAULT_MAX_BYTES },
            Arc::new(Metrics::new()),
        )
    }

    /// An outlet on a real loopback socket, and the client's end.
    async fn outlet() -> (Arc<Outlet>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Outlet::new(server, 8), client)
    }

    fn ids(entries: &[Arc<Entry>]) -> Vec<&str> {
        entries.iter().map(|e| e.message.id.as_str()).collect()
    }

    #[test]
    fn frame_is_the_protocol_message_frame() {
        let e = Entry::new(pos(1), msg("x", "lobby"));
        let v: serde_json::Value = serde_json::from_str(e.json()).unwrap();
        assert_eq!(e.wire[0], 0x81, "an unmasked, final text frame");
        assert!(e.wire.ends_with(e.json().as_bytes()));
        assert_eq!(v["type"], "message");
        assert_eq!(v["cursor"], e.cursor.as_str());
        assert_eq!(v["message"]["id"], "x");
    }

    #[test]
    fn duplicates_are_dropped_and_reported() {
        let r = rooms(10);
        assert!(matches!(r.publish(pos(1), msg("a", "lobby")), Published::New(_)));
        match r.publish(pos(2), msg("a", "lobby")) {
            Published::Duplicate(e) => assert_eq!(e.pos, pos(1)),
            Published::New(_) => panic!("duplicate published"),
        }
        assert_eq!(ids(&r.history("lobby", None, 10)), ["a"]);
    }

    #[tokio::test]
    async fn since_inside_window_gives_exactly_the_rest() {
        let r = rooms(10);
        for i in 1..=5 {
            r.publish(pos(i * 2), msg(&format!("m{i}"), "lobby"));
            r.publish(pos(i * 2 + 1), msg(&format!("o{i}"), "other"));
        }
        let s = r.subscribe("lobby", Some(&pos(6)), 50, outlet().await.0);
        assert!(matches!(s.start, Start::After));
        assert_eq!(ids(&s.backlog), ["m4", "m5"]);
        // A position from another room between two of ours works too.
        let s = r.subscribe("lobby", Some(&pos(7)), 50, outlet().await.0);
        assert_eq!(ids(&s.backlog), ["m4", "m5"]);
        // The newest position: nothing missed.
        let s = r.subscribe("lobby", Some(&pos(11)), 50, outlet().await.0);
        assert!(matches!(s.start, Start::After));
        assert!(s.backlog.is_empty());
    }

    #[tokio::test]
    async fn since_outside_window_is_reported() {
        let r = rooms(3);
        for i in 1..=5 {
            r.publish(pos(i), msg(&format!("m{i}"), "lobby"));
        }
        assert!(r.evicted("lobby"));
        let s = r.subscribe("lobby", Some(&pos(1)), 50, outlet().await.0);
        assert!(matches!(s.start, Start::OutOfWindow));
        assert_eq!(ids(&s.backlog), ["m3", "m4", "m5"]);
        let s = r.subscribe("lobby", Some(&Position::Memory { epoch: 2, seq: 4 }), 50, outlet().await.0);
        assert!(matches!(s.start, Start::OutOfWindow));
    }

    #[test]
    fn history_pages_backwards() {
        let r = rooms(100);
        for i in 1..=10 {
            r.publish(pos(i), msg(&format!("m{i}"), "lobby"));
        }
        assert_eq!(ids(&r.history("lobby", None, 3)), ["m8", "m9", "m10"]);
        assert_eq!(ids(&r.history("lobby", Some(&pos(8)), 3)), ["m5", "m6", "m7"]);
        assert_eq!(ids(&r.history("lobby", Some(&pos(2)), 3)), ["m1"]);
        assert!(r.history("nowhere", None, 3).is_empty());
    }

    #[tokio::test]
    async fn live_follows_backlog_without_gap() {
        let r = rooms(10);
        r.publish(pos(1), msg("a", "lobby"));
        let (o, mut client) = outlet().await;
        let s = r.subscribe("lobby", None, 50, o.clone());
        r.publish(pos(2), msg("b", "lobby"));
        assert_eq!(ids(&s.backlog), ["a"]);
        // Held until the session releases it, then written in order.
        o.wake.notified().await;
        o.release(false, |_| true);
        o.flush().await.unwrap();
        r.publish(pos(3), msg("c", "lobby"));
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("text c") {
            let mut buf = [0u8; 1024];
            let n = tokio::io::AsyncReadExt::read(&mut client, &mut buf).await.unwrap();
            assert!(n > 0, "socket closed early");
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        let (b, c) = (text.find("text b").unwrap(), text.find("text c").unwrap());
        assert!(b < c, "{text}");
        r.unsubscribe("lobby", &o);
    }

    #[test]
    fn the_hub_keeps_at_most_max_messages_dropping_the_oldest() {
        let r = rooms(10);
        for i in 0..8 {
            r.publish(pos(i), msg(&format!("a{i}"), "a"));
        }
        for i in 8..16 {
            r.publish(pos(i), msg(&format!("b{i}"), "b"));
        }
        // 16 published, 12 kept: the 4 oldest (all of room a) went.
        assert_eq!(ids(&r.history("a", None, 50)), ["a4", "a5", "a6", "a7"]);
        assert_eq!(r.history("b", None, 50).len(), 8);
        assert!(r.evicted("a"));
        assert!(!r.evicted("b"));
    }

    #[tokio::test]
    async fn idle_rooms_are_forgotten_beyond_the_limit() {
        let r = rooms(10);
        let _keep = r.subscribe("busy", None, 50, outlet().await.0);
        for (i, name) in ["busy", "a", "b", "c", "d"].iter().enumerate() {
            r.publish(pos(i as u64), msg(&format!("{name}{i}"), name));
        }
        let kept = r.hub.lock().rooms.len();
        assert!(kept <= 3, "{kept} rooms kept");
        assert_eq!(ids(&r.history("busy", None, 10)), ["busy0"]);
    }
}
