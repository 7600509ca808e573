//! The wire protocol (docs/PROTOCOL.md, v1) as Rust types.
//!
//! The server, the Leptos client and every test use these types; the plain
//! JavaScript client speaks the same JSON. Nothing here depends on the
//! server or the browser.

use serde::{Deserialize, Serialize};

/// The room a client lands in when it names none.
pub const DEFAULT_ROOM: &str = "lobby";
/// Longest room name, in characters (all ASCII).
pub const MAX_ROOM_CHARS: usize = 64;
/// Longest author name, in Unicode scalar values, after trimming.
pub const MAX_AUTHOR_CHARS: usize = 40;
/// Longest message text, in Unicode scalar values, after trimming.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Largest `POST /api/messages` body the server reads; larger is a 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Messages sent on connect (and by `GET /api/messages`) when no limit is given.
pub const DEFAULT_HISTORY: usize = 50;
/// Largest `limit` for `GET /api/messages`.
pub const MAX_HISTORY_LIMIT: usize = 500;
/// WebSocket close code for a client that cannot keep up.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// WebSocket close code sent when the server shuts down ("going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// One chat message, as stored on the stream and sent to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Unique id (a UUID); delivery is idempotent on it.
    pub id: String,
    /// The room, also the Kinesis partition key.
    pub room: String,
    /// Who wrote it (validated, trimmed).
    pub author: String,
    /// What they wrote (validated, trimmed).
    pub text: String,
    /// The receiving server's clock, RFC 3339, UTC, milliseconds.
    pub sent_at: String,
}

/// Body of `POST /api/messages`.
///
/// The server does not deserialize straight into this type: it parses the
/// JSON object field by field so it can name the offending field in a 400.
/// Clients serialize it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostMessage {
    /// Room name; `lobby` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub author: String,
    pub text: String,
    /// A client-chosen UUID that makes retries idempotent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// Answer to an accepted `POST /api/messages` (201, or 200 for a repeat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostResponse {
    pub message: ChatMessage,
    pub cursor: String,
}

/// One entry of a history page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub cursor: String,
    pub message: ChatMessage,
}

/// Answer to `GET /api/messages`: oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryResponse {
    pub messages: Vec<HistoryEntry>,
}

/// Every error answer's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A sentence a person can act on.
    pub error: String,
    /// The request field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A server → client WebSocket text frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    /// One chat message and the cursor just after it.
    Message { cursor: String, message: ChatMessage },
    /// The backlog has been sent; what follows is live. `cursor` is the
    /// last position sent (empty when the room has no messages yet).
    Ready { cursor: String },
    /// `since` was too old or unknown: drop the list and take the history
    /// that follows.
    Reset { reason: String },
    /// Sent every ping interval (an extension of protocol v1), so a
    /// browser, which cannot see WebSocket pings, can tell a dead socket
    /// from a quiet room. Clients ignore frame types they do not know.
    Heartbeat,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> ChatMessage {
        ChatMessage {
            id: "0193a6f2-7c41-7d3e-9a51-3b0f5c2d9e10".into(),
            room: "lobby".into(),
            author: "ana".into(),
            text: "hello, world".into(),
            sent_at: "2026-12-03T16:00:00.123Z".into(),
        }
    }

    #[test]
    fn frames_use_the_documented_shape() {
        let f = ServerFrame::Message { cursor: "c1".into(), message: msg() };
        let v: serde_json::Value = serde_json::to_value(&f).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["cursor"], "c1");
        assert_eq!(v["message"]["author"], "ana");

        let v = serde_json::to_value(ServerFrame::Ready { cursor: "c2".into() }).unwrap();
        assert_eq!(v, serde_json::json!({"type": "ready", "cursor": "c2"}));

        let v = serde_json::to_value(ServerFrame::Reset { reason: "too old".into() }).unwrap();
        assert_eq!(v, serde_json::json!({"type": "reset", "reason": "too old"}));

        let v = serde_json::to_value(ServerFrame::Heartbeat).unwrap();
        assert_eq!(v, serde_json::json!({"type": "heartbeat"}));
    }

    #[test]
    fn chat_message_round_trips_and_tolerates_extra_fields() {
        let json = r#"{"v":1,"id":"0193a6f2-7c41-7d3e-9a51-3b0f5c2d9e10","room":"lobby",
            "author":"ana","text":"hello, world","sent_at":"2026-12-03T16:00:00.123Z"}"#;
        let m: ChatMessage = serde_json::from_str(json).unwrap();
        assert_eq!(m, msg());
        let back: ChatMessage = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn error_body_omits_absent_field() {
        let e = ErrorBody { error: "x".into(), field: None };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"error":"x"}"#);
    }
}
