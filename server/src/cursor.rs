//! Cursors: opaque strings naming a position in the stream.
//!
//! Clients only store a cursor and hand it back, so its encoding is ours to
//! choose; it must survive a trip to any other instance of the deployment.
//! A position is encoded as a short text (`m.<epoch>.<seq>` or
//! `k.<shard>.<sequence number>.<sub-sequence>`) wrapped in base64url so
//! nobody is tempted to parse it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::cmp::Ordering;

/// Longest cursor string accepted from a client; real ones are < 120 bytes.
const MAX_CURSOR_LEN: usize = 256;

/// A position in the stream: where one message sits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Position {
    /// The embedded backend: a global sequence within one process run.
    /// `epoch` changes on every start, so a cursor from an earlier run is
    /// recognised as unknown rather than misread.
    Memory { epoch: u64, seq: u64 },
    /// A Kinesis record: shard id, sequence number (a decimal string of up
    /// to 128 bits, only comparable within a shard) and, for a record that
    /// came out of a KPL aggregate, its index inside it (0 otherwise).
    Kinesis { shard: String, seq: String, sub: u32 },
}

impl Position {
    /// Encodes the position as the opaque cursor clients see.
    pub fn encode(&self) -> String {
        let plain = match self {
            Position::Memory { epoch, seq } => format!("m.{epoch}.{seq}"),
            Position::Kinesis { shard, seq, sub } => format!("k.{shard}.{seq}.{sub}"),
        };
        URL_SAFE_NO_PAD.encode(plain)
    }

    /// Parses a client-supplied cursor; `None` for anything malformed.
    pub fn decode(cursor: &str) -> Option<Position> {
        if cursor.is_empty() || cursor.len() > MAX_CURSOR_LEN {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.split('.');
        let pos = match parts.next()? {
            "m" => Position::Memory {
                epoch: parts.next()?.parse().ok()?,
                seq: parts.next()?.parse().ok()?,
            },
            "k" => {
                let shard = parts.next()?;
                let seq = parts.next()?;
                let sub = parts.next()?.parse().ok()?;
                let shard_ok = !shard.is_empty()
                    && shard.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                let seq_ok = !seq.is_empty() && seq.len() <= 128 && seq.bytes().all(|b| b.is_ascii_digit());
                if !shard_ok || !seq_ok {
                    return None;
                }
                Position::Kinesis { shard: shard.to_owned(), seq: seq.to_owned(), sub }
            }
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(pos)
    }

    /// Orders two positions where the stream defines an order: within one
    /// memory epoch, or within one Kinesis shard. `None` otherwise (across
    /// shards the order is the lineage's, which only the reader knows).
    pub fn stream_cmp(&self, other: &Position) -> Option<Ordering> {
        match (self, other) {
            (Position::Memory { epoch: a, seq: x }, Position::Memory { epoch: b, seq: y }) if a == b => {
                Some(x.cmp(y))
            }
            (
                Position::Kinesis { shard: a, seq: x, sub: i },
                Position::Kinesis { shard: b, seq: y, sub: j },
            ) if a == b => Some(cmp_decimal(x, y).then(i.cmp(j))),
            _ => None,
        }
    }
}

/// Compares two decimal strings without leading zeros as numbers.
pub fn cmp_decimal(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let positions = [
            Position::Memory { epoch: 17, seq: 0 },
            Position::Memory { epoch: u64::MAX, seq: u64::MAX },
            Position::Kinesis {
                shard: "shardId-000000000001".into(),
                seq: "49590338271490256608559692538361571095921575989136588898".into(),
                sub: 3,
            },
        ];
        for p in positions {
            let c = p.encode();
            assert!(c.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{c}");
            assert_eq!(Position::decode(&c), Some(p));
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "!!!", "bS4x", "x", &"A".repeat(300)] {
            assert_eq!(Position::decode(bad), None, "{bad:?}");
        }
        let enc = |s: &str| URL_SAFE_NO_PAD.encode(s);
        for bad in ["m.1", "m.1.2.3", "m.a.b", "k.shard.12", "k.sh/ard.12.0", "k.s.12x.0", "q.1.2"] {
            assert_eq!(Position::decode(&enc(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn orders_within_a_shard_only() {
        let k = |shard: &str, seq: &str, sub| Position::Kinesis { shard: shard.into(), seq: seq.into(), sub };
        assert_eq!(k("a", "99", 0).stream_cmp(&k("a", "100", 0)), Some(Ordering::Less));
        assert_eq!(k("a", "100", 1).stream_cmp(&k("a", "100", 0)), Some(Ordering::Greater));
        assert_eq!(k("a", "1", 0).stream_cmp(&k("b", "2", 0)), None);
        let m = |epoch, seq| Position::Memory { epoch, seq };
        assert_eq!(m(1, 5).stream_cmp(&m(1, 7)), Some(Ordering::Less));
        assert_eq!(m(1, 5).stream_cmp(&m(2, 7)), None);
        assert_eq!(m(1, 5).stream_cmp(&k("a", "1", 0)), None);
    }
}
