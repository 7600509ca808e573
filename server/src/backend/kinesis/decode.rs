//! From stream record to chat messages.
//!
//! A record is one ChatMessage as UTF-8 JSON, or a KPL aggregate of such
//! records. Anything else (another producer's data, garbage, a message that
//! breaks the protocol's rules) is skipped with a reason, never a crash.

use super::kpl;
use app::{validate, ChatMessage};

/// Longest message id accepted from the stream (ours are 36-char UUIDs;
/// other producers may use other ids, but not unbounded ones).
const MAX_ID_CHARS: usize = 128;

/// What one (inner) record turned out to be.
#[derive(Debug, PartialEq)]
pub enum Item {
    /// A valid chat message, normalised like a POST would be.
    Message(ChatMessage),
    /// Not a chat message; the reason is a metric label.
    Skip(&'static str),
}

/// Decodes one Kinesis record's data into items, in order; item `i` has
/// sub-sequence number `i` (always 0 for a plain record).
pub fn decode_record(data: &[u8]) -> Vec<Item> {
    if kpl::is_aggregate(data) {
        match kpl::deaggregate(data) {
            Ok(inner) => inner.iter().map(|d| decode_message(d)).collect(),
            Err(e) => vec![Item::Skip(e.reason())],
        }
    } else {
        vec![decode_message(data)]
    }
}

/// Decodes one ChatMessage from JSON and applies the protocol's rules.
pub fn decode_message(data: &[u8]) -> Item {
    if data.is_empty() {
        return Item::Skip("empty");
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return Item::Skip("not_utf8");
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return Item::Skip("not_json"),
    };
    let message: ChatMessage = match serde_json::from_value(value) {
        Ok(m) => m,
        Err(_) => return Item::Skip("not_chat_message"),
    };
    match normalise(message) {
        Some(m) => Item::Message(m),
        None => Item::Skip("invalid_message"),
    }
}

/// The POST rules (app::validate) applied to a message someone else wrote.
fn normalise(mut m: ChatMessage) -> Option<ChatMessage> {
    let id_ok = !m.id.is_empty()
        && m.id.chars().count() <= MAX_ID_CHARS
        && !m.id.chars().any(|c| c.is_control() || c.is_whitespace());
    if !id_ok {
        return None;
    }
    validate::validate_room(&m.room).ok()?;
    m.author = validate::validate_author(&m.author).ok()?;
    m.text = validate::validate_text(&m.text).ok()?;
    chrono::DateTime::parse_from_rfc3339(&m.sent_at).ok()?;
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(id: &str, room: &str) -> String {
        format!(r#"{{"id":"{id}","room":"{room}","author":"ana","text":"hi","sent_at":"2026-12-03T16:00:00.123Z"}}"#)
    }

    #[test]
    fn a_plain_chat_message_decodes() {
        let items = decode_record(json("a", "lobby").as_bytes());
        assert!(matches!(&items[..], [Item::Message(m)] if m.id == "a" && m.room == "lobby"));
    }

    #[test]
    fn extra_fields_such_as_a_version_are_fine() {
        let with_v = r#"{"v":1,"id":"a","room":"lobby","author":"  ana ","text":"hi\n","sent_at":"2026-12-03T16:00:00Z"}"#;
        match decode_message(with_v.as_bytes()) {
            Item::Message(m) => {
                assert_eq!(m.author, "ana");
                assert_eq!(m.text, "hi");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_skipped_with_a_reason() {
        assert_eq!(decode_message(b""), Item::Skip("empty"));
        assert_eq!(decode_message(&[0xff, 0xfe, 0x00]), Item::Skip("not_utf8"));
        assert_eq!(decode_message(b"hello"), Item::Skip("not_json"));
        assert_eq!(decode_message(br#"{"temperature": 21}"#), Item::Skip("not_chat_message"));
        assert_eq!(decode_message(b"[1,2]"), Item::Skip("not_chat_message"));
        assert_eq!(decode_message(json("a", "Bad Room").as_bytes()), Item::Skip("invalid_message"));
        assert_eq!(decode_message(json("", "lobby").as_bytes()), Item::Skip("invalid_message"));
        let bad_time = r#"{"id":"a","room":"lobby","author":"ana","text":"hi","sent_at":"yesterday"}"#;
        assert_eq!(decode_message(bad_time.as_bytes()), Item::Skip("invalid_message"));
        let control = r#"{"id":"a","room":"lobby","author":"ana","text":"a\u0007b","sent_at":"2026-12-03T16:00:00Z"}"#;
        assert_eq!(decode_message(control.as_bytes()), Item::Skip("invalid_message"));
    }

    #[test]
    fn aggregates_yield_each_inner_record_in_order() {
        let a = json("a", "lobby");
        let b = json("b", "other");
        let agg = kpl::aggregate([("lobby", a.as_bytes()), ("x", &b"junk"[..]), ("other", b.as_bytes())]);
        let items = decode_record(&agg);
        assert_eq!(items.len(), 3);
        assert!(matches!(&items[0], Item::Message(m) if m.id == "a"));
        assert_eq!(items[1], Item::Skip("not_json"));
        assert!(matches!(&items[2], Item::Message(m) if m.id == "b"));
    }

    #[test]
    fn a_broken_aggregate_is_one_skip() {
        let mut agg = kpl::aggregate([("lobby", json("a", "lobby").as_bytes())]);
        agg[6] ^= 1;
        assert_eq!(decode_record(&agg), vec![Item::Skip("kpl_checksum")]);
    }
}
