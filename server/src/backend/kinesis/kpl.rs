//! De-aggregation of Kinesis Producer Library (KPL) records.
//!
//! The KPL packs many user records into one Kinesis record:
//!
//! ```text
//! F3 89 9A C2 | protobuf AggregatedRecord | MD5(protobuf), 16 bytes
//! ```
//!
//! Every inner record shares the outer record's sequence number and is
//! told apart by its index (the "sub-sequence number"). The protobuf schema
//! is the KPL's `messages.proto`, written here as `prost` derives so no
//! `protoc` is needed at build time.

use md5::{Digest, Md5};
use prost::Message;

/// The four bytes every KPL aggregate starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Length of the MD5 trailer.
const DIGEST_LEN: usize = 16;

/// `message AggregatedRecord` of the KPL's `messages.proto`.
#[derive(Clone, PartialEq, Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// `message Record`: one user record inside an aggregate.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    pub data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// `message Tag` (unused by readers, kept so the schema is complete).
#[derive(Clone, PartialEq, Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// Why an aggregate could not be opened (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KplError {
    /// The MD5 trailer does not match the protobuf.
    Checksum,
    /// The protobuf does not parse.
    Protobuf,
}

impl KplError {
    pub fn reason(self) -> &'static str {
        match self {
            KplError::Checksum => "kpl_checksum",
            KplError::Protobuf => "kpl_protobuf",
        }
    }
}

/// Whether `data` claims to be a KPL aggregate (magic bytes and room for
/// the trailer).
pub fn is_aggregate(data: &[u8]) -> bool {
    data.len() >= MAGIC.len() + DIGEST_LEN && data[..MAGIC.len()] == MAGIC
}

/// The inner records' data, in order (index = sub-sequence number).
/// Call only when [`is_aggregate`] holds.
pub fn deaggregate(data: &[u8]) -> Result<Vec<Vec<u8>>, KplError> {
    let body = &data[MAGIC.len()..data.len() - DIGEST_LEN];
    let digest = &data[data.len() - DIGEST_LEN..];
    if Md5::digest(body).as_slice() != digest {
        return Err(KplError::Checksum);
    }
    let aggregate = AggregatedRecord::decode(body).map_err(|_| KplError::Protobuf)?;
    Ok(aggregate.records.into_iter().map(|r| r.data).collect())
}

/// Builds an aggregate the way the KPL does (tests, and anyone who wants
/// to feed the stream like the Java producer).
pub fn aggregate<'a>(records: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut agg = AggregatedRecord::default();
    for (key, data) in records {
        let index = match agg.partition_key_table.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                agg.partition_key_table.push(key.to_owned());
                agg.partition_key_table.len() - 1
            }
        };
        agg.records.push(Record {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data: data.to_vec(),
            tags: Vec::new(),
        });
    }
    let body = agg.encode_to_vec();
    let mut out = Vec::with_capacity(MAGIC.len() + body.len() + DIGEST_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&body);
    out.extend_from_slice(&Md5::digest(&body));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_order() {
        let bytes = aggregate([("lobby", &b"one"[..]), ("other", &b"two"[..]), ("lobby", &b""[..])]);
        assert!(is_aggregate(&bytes));
        let inner = deaggregate(&bytes).unwrap();
        assert_eq!(inner, vec![b"one".to_vec(), b"two".to_vec(), Vec::new()]);
    }

    #[test]
    fn matches_the_kpl_wire_format() {
        // One record, key "a", data "hi": hand-assembled protobuf.
        // field 1 (string) "a"; field 3 (message) { field 1 varint 0; field 3 bytes "hi" }
        let body: &[u8] = &[0x0a, 0x01, b'a', 0x1a, 0x06, 0x08, 0x00, 0x1a, 0x02, b'h', b'i'];
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&Md5::digest(body));
        assert_eq!(aggregate([("a", &b"hi"[..])]), bytes);
        assert_eq!(deaggregate(&bytes).unwrap(), vec![b"hi".to_vec()]);
    }

    #[test]
    fn bad_checksum_and_bad_protobuf_are_refused() {
        let mut bytes = aggregate([("k", &b"data"[..])]);
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        assert_eq!(deaggregate(&bytes), Err(KplError::Checksum));

        let body: &[u8] = &[0x1a, 0x09, 0xff, 0xff];
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&Md5::digest(body));
        assert_eq!(deaggregate(&bytes), Err(KplError::Protobuf));
    }

    #[test]
    fn short_or_unmarked_data_is_not_an_aggregate() {
        assert!(!is_aggregate(b""));
        assert!(!is_aggregate(&MAGIC));
        assert!(!is_aggregate(b"{\"id\":\"x\"}"));
    }
}
