//! Catch-up: a one-off read of the stream after a cursor older than the
//! hub's window.
//!
//! A cursor names (shard, sequence number, sub-sequence). The read starts
//! `AT_SEQUENCE_NUMBER` of it, which also proves the position is still
//! retained (the first record must be the cursor's own), and walks forward:
//! to the end of the shard, then into the child that holds the room's hash
//! key (splits and merges keep a partition key on one path), and so on until
//! it meets the window's oldest entry (`stop_at`) or the stream's tip. Only
//! the room's messages are kept. A position that is gone, unknown, or too
//! far back to read within the limits gives `Gone`, and the client resets.

use super::client::{hash_key, CallError, Failure};
use super::decode::{decode_record, Item};
use super::reader::{error_backoff, shard_iterator, ReaderState, Start};
use super::Clients;
use crate::backend::CatchUp;
use crate::cursor::Position;
use app::ChatMessage;
use std::cmp::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Longest a catch-up may take before the client is told to reset.
const TIME_LIMIT: Duration = Duration::from_secs(10);
/// Most records a catch-up reads (all rooms) before giving up.
const MAX_RECORDS: usize = 200_000;
/// Most messages of the room it returns: more than any window holds.
const MAX_MESSAGES: usize = 100_000;
/// Records per GetRecords call.
const RECORDS_PER_CALL: i32 = 10_000;
/// Spacing of this read's calls on one shard: its share of the 5 calls/s.
const CALL_SPACING: Duration = Duration::from_millis(200);

/// Reads `room`'s messages after `since` up to `stop_at` (exclusive) or the tip.
pub async fn catch_up(
    clients: &Clients,
    state: &ReaderState,
    room: &str,
    since: &Position,
    stop_at: Option<&Position>,
) -> CatchUp {
    let Position::Kinesis { shard, seq, sub } = since else {
        return CatchUp::Gone;
    };
    let deadline = Instant::now() + TIME_LIMIT;
    match tokio::time::timeout_at(deadline, walk(clients, state, room, shard, seq, *sub, stop_at)).await {
        Ok(Ok(messages)) => CatchUp::Messages(messages),
        Ok(Err(why)) => {
            tracing::info!(%room, cursor_shard = %shard, %why, "cannot resume a cursor; the client resets");
            CatchUp::Gone
        }
        Err(_) => {
            tracing::info!(%room, cursor_shard = %shard, "catch-up took too long; the client resets");
            CatchUp::Gone
        }
    }
}

async fn walk(
    clients: &Clients,
    state: &ReaderState,
    room: &str,
    first_shard: &str,
    since_seq: &str,
    since_sub: u32,
    stop_at: Option<&Position>,
) -> Result<Vec<(Position, ChatMessage)>, String> {
    let room_hash = hash_key(room);
    let mut out = Vec::new();
    let mut records_read = 0usize;
    let mut shard = first_shard.to_owned();
    let mut start = Start::AtSequence(since_seq.to_owned());
    let mut verify_first = true;

    loop {
        let mut iterator = match with_retries(|| shard_iterator(clients, &shard, &start)).await {
            Ok(Some(it)) => Some(it),
            Ok(None) => None,
            Err(e) if verify_first && matches!(e.kind, Failure::NotFound | Failure::InvalidArgument) => {
                return Err(format!("position not retained or unknown ({e})"));
            }
            Err(e) => return Err(format!("GetShardIterator failed: {e}")),
        };
        let mut children = Vec::new();
        let mut last_call: Option<Instant> = None;
        while let Some(it) = iterator.take() {
            if let Some(t) = last_call {
                tokio::time::sleep_until(t + CALL_SPACING).await;
            }
            last_call = Some(Instant::now());
            let out_page = with_retries(|| async {
                clients
                    .data
                    .get_records()
                    .shard_iterator(&it)
                    .limit(RECORDS_PER_CALL)
                    .send()
                    .await
                    .map_err(CallError::from_sdk)
            })
            .await
            .map_err(|e| format!("GetRecords failed: {e}"))?;

            let records = out_page.records();
            records_read += records.len();
            if records_read > MAX_RECORDS {
                return Err(format!("more than {MAX_RECORDS} records to read"));
            }
            for record in records {
                let seq = record.sequence_number();
                if verify_first {
                    if seq != since_seq {
                        return Err("position not retained".into());
                    }
                    verify_first = false;
                }
                for (i, item) in decode_record(record.data().as_ref()).into_iter().enumerate() {
                    let pos = Position::Kinesis { shard: shard.clone(), seq: seq.to_owned(), sub: i as u32 };
                    if shard == first_shard
                        && crate::cursor::cmp_decimal(seq, since_seq).then((i as u32).cmp(&since_sub)) != Ordering::Greater
                    {
                        continue;
                    }
                    if let Some(stop) = stop_at {
                        if matches!(pos.stream_cmp(stop), Some(Ordering::Equal | Ordering::Greater)) {
                            return Ok(out);
                        }
                    }
                    if let Item::Message(m) = item {
                        if m.room == room {
                            out.push((pos, m));
                            if out.len() > MAX_MESSAGES {
                                return Err(format!("more than {MAX_MESSAGES} messages to send"));
                            }
                        }
                    }
                }
            }
            match out_page.next_shard_iterator() {
                Some(next) => {
                    let at_tip = records.is_empty() && out_page.millis_behind_latest().unwrap_or(0) == 0;
                    if at_tip && !verify_first {
                        return Ok(out);
                    }
                    if at_tip && verify_first {
                        // The cursor's own record never showed up.
                        return Err("position not found".into());
                    }
                    iterator = Some(next.to_owned());
                }
                None => {
                    children = out_page.child_shards().iter().map(|c| c.shard_id().to_owned()).collect();
                }
            }
        }
        if verify_first {
            return Err("position not found".into());
        }
        // The shard ended: go on into the child that holds this room.
        let next = next_shard(clients, state, &shard, &children, room_hash).await;
        match next {
            Some(child) => {
                shard = child;
                start = Start::TrimHorizon;
            }
            None => return Ok(out),
        }
    }
}

/// The child of `shard` whose hash range holds `room_hash`.
async fn next_shard(
    clients: &Clients,
    state: &ReaderState,
    shard: &str,
    announced: &[String],
    room_hash: u128,
) -> Option<String> {
    let mut children = state.children(shard);
    if children.is_empty() || announced.iter().any(|a| !children.iter().any(|c| &c.id == a)) {
        // The reader has not seen this reshard yet: ask.
        if let Ok(listed) = clients.list_shards().await {
            state.learn(&listed);
            children = state.children(shard);
        }
    }
    children.into_iter().find(|c| c.holds(room_hash)).map(|c| c.id)
}

/// A call retried on throttling and transient errors, with backoff; the
/// caller's time limit bounds it.
async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CallError>>,
{
    let mut failures = 0;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.kind.is_transient() && failures < 8 => {
                failures += 1;
                tokio::time::sleep(error_backoff(failures)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
