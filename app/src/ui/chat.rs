//! The chat page's state and the rules that change it.
//!
//! Everything the view shows is a signal here; what the view does not show
//! (the last cursor, the ids already on screen, the outbox) sits in one
//! `StoredValue`. The browser side (`net.rs`) calls [`Chat::on_frame`] for
//! every socket frame and [`Chat::settle`] when a POST ends; the view calls
//! [`Chat::submit`], [`Chat::retry`] and [`Chat::discard`].
//!
//! The rules (DESIGN.md, "Clients"):
//! - a message id is shown at most once, wherever it came from;
//! - the stream's messages go above our own unconfirmed ones, in stream order;
//! - our message shows at once, keeps its `client_id` for every retry, and
//!   becomes an ordinary message when its echo arrives (`id == client_id`);
//! - `reset` drops the list (but never our unsent messages) and the cursor.

use crate::protocol::{ChatMessage, HistoryEntry, PostMessage, ServerFrame, DEFAULT_ROOM};
use crate::validate::{validate_author, validate_room, validate_text};
use leptos::prelude::*;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// Messages kept on screen (not counting our unconfirmed ones): a long
/// session must not grow the DOM without bound.
pub const MAX_SHOWN: usize = 1000;
/// Ids remembered for de-duplication; more than fit on screen, so a replay
/// of something just scrolled out is still recognised.
pub const MAX_SEEN: usize = 5000;
/// The counter appears when this few characters are left.
pub const COUNTER_FROM: i64 = 500;

/// The connection, as the `status` hook's `data-state` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Connecting,
    Live,
    Reconnecting,
    Offline,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connecting => "connecting",
            Status::Live => "live",
            Status::Reconnecting => "reconnecting",
            Status::Offline => "offline",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Status::Connecting => "Connecting…",
            Status::Live => "Live",
            Status::Reconnecting => "Reconnecting…",
            Status::Offline => "Offline",
        }
    }
}

/// Where one of our own messages is on its way to the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// On the stream and shown in stream order (everyone's messages).
    Shown,
    /// A POST is in flight; `retrying` once the first attempt failed.
    Sending { retrying: bool },
    /// The server answered 201/200; waiting for the echo on the socket.
    Accepted,
    /// Given up for now; the person can retry or discard it.
    Failed { problem: String },
}

impl Delivery {
    pub fn is_pending(&self) -> bool {
        !matches!(self, Delivery::Shown)
    }
}

/// One row of the list. Cheap to clone; the parts that change are signals.
#[derive(Clone)]
pub struct Item {
    pub id: Arc<str>,
    pub author: Arc<str>,
    pub text: Arc<str>,
    /// Empty until the server has stamped it.
    pub sent_at: ArcRwSignal<String>,
    pub delivery: ArcRwSignal<Delivery>,
    /// Typed in this page (other messages by the same name are "mine" too,
    /// but that is decided in the view, once the name is known).
    pub sent_here: bool,
}

impl Item {
    fn from_message(m: &ChatMessage) -> Item {
        Item {
            id: m.id.as_str().into(),
            author: m.author.as_str().into(),
            text: m.text.as_str().into(),
            sent_at: ArcRwSignal::new(m.sent_at.clone()),
            delivery: ArcRwSignal::new(Delivery::Shown),
            sent_here: false,
        }
    }
}

/// One of our messages not yet seen on the stream.
pub struct Outgoing {
    /// Exactly what is POSTed, every time (same `client_id`).
    pub body: PostMessage,
    pub item: Item,
    /// A delivery loop is running for it.
    pub in_flight: bool,
}

/// What the view does not show.
#[derive(Default)]
pub struct Inner {
    /// The last cursor seen on the socket; a reconnect resumes after it.
    pub cursor: Option<String>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Our unconfirmed messages, all rooms, oldest first.
    pub outbox: Vec<Outgoing>,
}

impl Inner {
    fn remember(&mut self, id: &str) {
        if self.seen.insert(id.to_owned()) {
            self.seen_order.push_back(id.to_owned());
            if self.seen_order.len() > MAX_SEEN {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    fn forget_all(&mut self) {
        self.seen.clear();
        self.seen_order.clear();
        self.cursor = None;
    }

    fn is_outgoing(&self, id: &str) -> bool {
        self.outbox.iter().any(|o| &*o.item.id == id)
    }
}

/// The page's state. `Copy`: every handler captures it by value.
#[derive(Clone, Copy)]
pub struct Chat {
    /// The room on screen (from the URL).
    pub room: RwSignal<String>,
    /// The list, in display order: the stream's messages, then ours.
    pub items: RwSignal<Vec<Item>>,
    pub status: RwSignal<Status>,
    /// The author name field.
    pub name: RwSignal<String>,
    /// The message field.
    pub draft: RwSignal<String>,
    /// A sentence about the last send attempt (validation or the server's).
    pub form_error: RwSignal<Option<String>>,
    /// A sentence about the page (e.g. an unusable room name in the URL).
    pub notice: RwSignal<Option<String>>,
    /// "New messages" arrived while the reader was scrolled up.
    pub unseen_below: RwSignal<bool>,
    /// The browser has taken over (false during SSR and hydration), so
    /// browser-only facts (local time, the stored name) may be shown.
    pub mounted: RwSignal<bool>,
    pub inner: StoredValue<Inner>,
}

/// Reads the `room` query parameter as the plain client does: trimmed,
/// lowercased, and `lobby` (with a sentence saying why) when unusable.
pub fn room_from_query(asked: Option<&str>) -> (String, Option<String>) {
    let Some(asked) = asked.map(str::trim).filter(|s| !s.is_empty()) else {
        return (DEFAULT_ROOM.to_owned(), None);
    };
    let candidate = asked.to_lowercase();
    match validate_room(&candidate) {
        Ok(()) => (candidate, None),
        Err(_) => (
            DEFAULT_ROOM.to_owned(),
            Some(format!(
                "“{asked}” is not a room name (use up to 64 lowercase letters, digits, “-” and “_”). You are in #{DEFAULT_ROOM}."
            )),
        ),
    }
}

impl Chat {
    /// A page for `room` that starts with `history` (the server-rendered
    /// backlog, oldest first); the socket resumes after its last cursor.
    pub fn new(room: String, notice: Option<String>, history: Vec<HistoryEntry>) -> Chat {
        let mut inner = Inner::default();
        let mut items = Vec::with_capacity(history.len());
        for entry in &history {
            if entry.message.room != room || inner.seen.contains(&entry.message.id) {
                continue;
            }
            inner.remember(&entry.message.id);
            items.push(Item::from_message(&entry.message));
        }
        inner.cursor = history.last().map(|e| e.cursor.clone()).filter(|c| !c.is_empty());
        Chat {
            room: RwSignal::new(room),
            items: RwSignal::new(items),
            status: RwSignal::new(Status::Connecting),
            name: RwSignal::new(String::new()),
            draft: RwSignal::new(String::new()),
            form_error: RwSignal::new(None),
            notice: RwSignal::new(notice),
            unseen_below: RwSignal::new(false),
            mounted: RwSignal::new(false),
            inner: StoredValue::new(inner),
        }
    }

    /// The cursor a (re)connect resumes after.
    pub fn cursor(&self) -> Option<String> {
        self.inner.with_value(|i| i.cursor.clone())
    }

    /// Handles one socket frame. Returns true when a message was added.
    pub fn on_frame(&self, frame: ServerFrame) -> FrameEffect {
        match frame {
            ServerFrame::Message { cursor, message } => {
                if !cursor.is_empty() {
                    self.inner.update_value(|i| i.cursor = Some(cursor));
                }
                self.receive(message)
            }
            ServerFrame::Ready { cursor } => {
                if !cursor.is_empty() {
                    self.inner.update_value(|i| i.cursor = Some(cursor));
                }
                self.status.set(Status::Live);
                FrameEffect::Ready
            }
            ServerFrame::Reset { .. } => {
                self.reset();
                FrameEffect::Nothing
            }
            // Liveness only; net.rs times the gaps between them.
            ServerFrame::Heartbeat => FrameEffect::Nothing,
        }
    }

    /// Puts a message from the stream on screen, once.
    fn receive(&self, m: ChatMessage) -> FrameEffect {
        if m.room != self.room.get_untracked() {
            return FrameEffect::Nothing;
        }
        let mut fresh = false;
        let mut ours = None;
        self.inner.update_value(|i| {
            if i.seen.contains(&m.id) {
                return;
            }
            i.remember(&m.id);
            fresh = true;
            if let Some(pos) = i.outbox.iter().position(|o| *o.item.id == *m.id) {
                ours = Some(i.outbox.remove(pos).item);
            }
        });
        if !fresh {
            return FrameEffect::Nothing;
        }
        let mine = ours.is_some();
        let item = match ours {
            Some(item) => {
                item.sent_at.set(m.sent_at.clone());
                item.delivery.set(Delivery::Shown);
                item
            }
            None => Item::from_message(&m),
        };
        let inner = self.inner;
        self.items.update(|items| {
            items.retain(|it| it.id != item.id);
            // Above our own unconfirmed messages: they have no place in the
            // stream yet, so they stay at the bottom.
            let at = inner
                .with_value(|i| items.iter().position(|it| i.is_outgoing(&it.id)))
                .unwrap_or(items.len());
            items.insert(at, item);
            let shown = items.len() - inner.with_value(|i| i.outbox.len()).min(items.len());
            if shown > MAX_SHOWN {
                let mut extra = shown - MAX_SHOWN;
                items.retain(|it| {
                    if extra > 0 && !it.delivery.get_untracked().is_pending() {
                        extra -= 1;
                        false
                    } else {
                        true
                    }
                });
            }
        });
        FrameEffect::Added { mine }
    }

    /// `reset`: the cursor was unknown; the history that follows replaces
    /// the list. Our unconfirmed messages stay (their echo may be in it).
    pub fn reset(&self) {
        self.inner.update_value(Inner::forget_all);
        let inner = self.inner;
        self.items.update(|items| items.retain(|it| inner.with_value(|i| i.is_outgoing(&it.id))));
    }

    /// Moves to another room: nothing of the old one stays on screen except
    /// our unconfirmed messages for the new one.
    pub fn enter_room(&self, room: String) {
        self.inner.update_value(Inner::forget_all);
        let ours: Vec<Item> =
            self.inner.with_value(|i| i.outbox.iter().filter(|o| o.body.room.as_deref() == Some(&room)).map(|o| o.item.clone()).collect());
        self.items.set(ours);
        self.unseen_below.set(false);
        self.status.set(Status::Connecting);
        self.room.set(room);
    }

    /// Checks the composer the way the server will, and queues the message.
    /// Returns its id, or `None` (with a sentence in `form_error`).
    pub fn submit(&self, client_id: String) -> Result<String, SubmitError> {
        self.form_error.set(None);
        let author = match validate_author(&self.name.get_untracked()) {
            Ok(a) => a,
            Err(e) => {
                self.form_error.set(Some(e.message));
                return Err(SubmitError::Name);
            }
        };
        let draft = self.draft.get_untracked();
        if draft.trim().is_empty() {
            return Err(SubmitError::Empty);
        }
        let text = match validate_text(&draft) {
            Ok(t) => t,
            Err(e) => {
                self.form_error.set(Some(e.message));
                return Err(SubmitError::Text);
            }
        };
        let room = self.room.get_untracked();
        let item = Item {
            id: client_id.as_str().into(),
            author: author.as_str().into(),
            text: text.as_str().into(),
            sent_at: ArcRwSignal::new(String::new()),
            delivery: ArcRwSignal::new(Delivery::Sending { retrying: false }),
            sent_here: true,
        };
        let body = PostMessage { room: Some(room), author, text, client_id: Some(client_id.clone()) };
        self.inner.update_value(|i| i.outbox.push(Outgoing { body, item: item.clone(), in_flight: false }));
        self.items.update(|items| items.push(item));
        self.draft.set(String::new());
        Ok(client_id)
    }

    /// Claims an outbox entry for one delivery loop: its body, or `None` if
    /// it is gone (confirmed, discarded) or already being delivered.
    pub fn start_delivery(&self, id: &str) -> Option<PostMessage> {
        let mut body = None;
        self.inner.update_value(|i| {
            if let Some(o) = i.outbox.iter_mut().find(|o| &*o.item.id == id) {
                if !o.in_flight {
                    o.in_flight = true;
                    o.item.delivery.set(Delivery::Sending { retrying: false });
                    body = Some(o.body.clone());
                }
            }
        });
        body
    }

    /// Whether `id` still waits for delivery (false once its echo arrived).
    pub fn is_outgoing(&self, id: &str) -> bool {
        self.inner.with_value(|i| i.is_outgoing(id))
    }

    /// Shows a delivery state on an outgoing message (if it is still ours).
    pub fn mark(&self, id: &str, delivery: Delivery) {
        self.inner.with_value(|i| {
            if let Some(o) = i.outbox.iter().find(|o| &*o.item.id == id) {
                o.item.delivery.set(delivery);
            }
        });
    }

    /// Ends a delivery loop: `Accepted` (with the server's message) or
    /// `Failed`. A refusal (4xx) also goes to the form's error line.
    pub fn settle(&self, id: &str, outcome: Result<Option<ChatMessage>, (String, bool)>) {
        self.inner.update_value(|i| {
            let Some(o) = i.outbox.iter_mut().find(|o| &*o.item.id == id) else { return };
            o.in_flight = false;
            match &outcome {
                Ok(message) => {
                    if let Some(m) = message {
                        o.item.sent_at.set(m.sent_at.clone());
                    }
                    o.item.delivery.set(Delivery::Accepted);
                }
                Err((problem, _)) => o.item.delivery.set(Delivery::Failed { problem: problem.clone() }),
            }
        });
        if let Err((problem, refused)) = outcome {
            if refused {
                self.form_error.set(Some(problem));
            }
        }
    }

    /// Drops a failed message the person no longer wants.
    pub fn discard(&self, id: &str) {
        self.inner.update_value(|i| i.outbox.retain(|o| &*o.item.id != id));
        self.items.update(|items| items.retain(|it| &*it.id != id));
    }
}

/// What a frame did, so the view can scroll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEffect {
    Nothing,
    Ready,
    Added { mine: bool },
}

/// Why the composer did not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The name is missing or invalid (focus the name field).
    Name,
    /// Nothing to send.
    Empty,
    /// The text breaks a rule.
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, room: &str, text: &str) -> ChatMessage {
        ChatMessage {
            id: id.into(),
            room: room.into(),
            author: "ana".into(),
            text: text.into(),
            sent_at: "2026-12-03T16:00:00.123Z".into(),
        }
    }

    fn texts(chat: &Chat) -> Vec<String> {
        chat.items.with_untracked(|items| items.iter().map(|i| i.text.to_string()).collect())
    }

    fn frame(cursor: &str, m: ChatMessage) -> ServerFrame {
        ServerFrame::Message { cursor: cursor.into(), message: m }
    }

    #[test]
    fn room_query_is_normalised_or_falls_back_with_a_reason() {
        assert_eq!(room_from_query(None), ("lobby".into(), None));
        assert_eq!(room_from_query(Some("  ")), ("lobby".into(), None));
        assert_eq!(room_from_query(Some(" Dev-1 ")), ("dev-1".into(), None));
        let (room, why) = room_from_query(Some("no spaces"));
        assert_eq!(room, "lobby");
        assert!(why.unwrap().contains("not a room name"));
    }

    #[test]
    fn history_seeds_the_list_and_the_cursor() {
        let owner = Owner::new();
        owner.with(|| {
            let h = vec![
                HistoryEntry { cursor: "c1".into(), message: msg("a", "lobby", "one") },
                HistoryEntry { cursor: "c2".into(), message: msg("b", "lobby", "two") },
            ];
            let chat = Chat::new("lobby".into(), None, h);
            assert_eq!(texts(&chat), ["one", "two"]);
            assert_eq!(chat.cursor().as_deref(), Some("c2"));
            // the socket's replay of the same ids changes nothing
            assert_eq!(chat.on_frame(frame("c2", msg("b", "lobby", "two"))), FrameEffect::Nothing);
            assert_eq!(texts(&chat), ["one", "two"]);
        });
    }

    #[test]
    fn echo_of_our_message_replaces_it_and_stream_goes_above_pending() {
        let owner = Owner::new();
        owner.with(|| {
            let chat = Chat::new("lobby".into(), None, vec![]);
            chat.name.set("me".into());
            chat.draft.set("  mine  ".into());
            let id = chat.submit("0193a6f2-7c41-7d3e-9a51-3b0f5c2d9e10".into()).unwrap();
            assert_eq!(chat.draft.get_untracked(), "");
            assert!(chat.start_delivery(&id).is_some());
            assert!(chat.start_delivery(&id).is_none(), "one delivery loop at a time");
            chat.on_frame(frame("c1", msg("x", "lobby", "theirs")));
            assert_eq!(texts(&chat), ["theirs", "mine"]);
            let effect = chat.on_frame(frame("c2", msg(&id, "lobby", "mine")));
            assert_eq!(effect, FrameEffect::Added { mine: true });
            assert_eq!(texts(&chat), ["theirs", "mine"]);
            assert!(!chat.is_outgoing(&id));
            let state = chat.items.with_untracked(|i| i[1].delivery.get_untracked());
            assert_eq!(state, Delivery::Shown);
            // a late 201 for it changes nothing
            chat.settle(&id, Ok(None));
            assert_eq!(chat.items.with_untracked(|i| i[1].delivery.get_untracked()), Delivery::Shown);
        });
    }

    #[test]
    fn reset_keeps_only_unconfirmed_messages_and_forgets_the_cursor() {
        let owner = Owner::new();
        owner.with(|| {
            let chat = Chat::new("lobby".into(), None, vec![]);
            chat.on_frame(frame("c1", msg("a", "lobby", "one")));
            chat.name.set("me".into());
            chat.draft.set("pending".into());
            chat.submit("0193a6f2-7c41-7d3e-9a51-3b0f5c2d9e11".into()).unwrap();
            chat.on_frame(ServerFrame::Reset { reason: "old".into() });
            assert_eq!(texts(&chat), ["pending"]);
            assert_eq!(chat.cursor(), None);
            chat.on_frame(frame("c9", msg("a", "lobby", "one")));
            assert_eq!(texts(&chat), ["one", "pending"]);
            assert_eq!(chat.cursor().as_deref(), Some("c9"));
        });
    }

    #[test]
    fn other_rooms_messages_are_ignored_and_validation_uses_the_shared_rules() {
        let owner = Owner::new();
        owner.with(|| {
            let chat = Chat::new("a".into(), None, vec![]);
            chat.on_frame(frame("c1", msg("x", "b", "elsewhere")));
            assert!(texts(&chat).is_empty());
            chat.draft.set("hi".into());
            assert_eq!(chat.submit("0193a6f2-7c41-7d3e-9a51-3b0f5c2d9e12".into()), Err(SubmitError::Name));
            assert_eq!(chat.form_error.get_untracked().as_deref(), Some("Please enter your name."));
            chat.name.set("me".into());
            chat.draft.set("x".repeat(4001));
            assert_eq!(chat.submit("0193a6f2-7c41-7d3e-9a51-3b0f5c2d9e13".into()), Err(SubmitError::Text));
            assert!(chat.form_error.get_untracked().unwrap().contains("4001"));
        });
    }
}
