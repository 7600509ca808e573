//! The stream backend seam.
//!
//! A backend does two things: it appends a message to the stream (answering
//! only once the stream has durably accepted it), and it feeds every message
//! it reads from the stream, in stream order, into the shared [`Rooms`] hub.
//! Sockets and history are served from the hub; the backend is asked
//! directly only for what lies before the hub's window.
//!
//! - [`memory`]: embedded, single instance, no cloud.
//! - `kinesis`: Amazon Kinesis Data Streams; every instance reads every shard.
//!
//! [`Rooms`]: crate::rooms::Rooms

pub mod kinesis;
pub mod memory;

use crate::cursor::Position;
use crate::rooms::Entry;
use app::ChatMessage;
use std::sync::Arc;

/// What became of an append.
#[derive(Debug)]
pub enum Appended {
    /// The stream accepted the message at this position.
    New(Position),
    /// A message with this id was already accepted; here it is.
    Existing(Arc<Entry>),
}

/// Why an append was not accepted. The message was **not** written and
/// will not appear later; the sender keeps it and retries.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The stream is unreachable, throttling past the retry budget, timed
    /// out, or the producer queue is full.
    #[error("{reason}")]
    Unavailable {
        /// A sentence for the sender.
        reason: String,
        /// Seconds the client should wait before retrying.
        retry_after_secs: u64,
    },
}

/// Result of reading the stream between a cursor and the hub's window.
#[derive(Debug)]
pub enum CatchUp {
    /// Every message of the room after `since` up to `stop_at` (exclusive)
    /// or the stream's tip, in stream order.
    Messages(Vec<(Position, ChatMessage)>),
    /// `since` is unknown here or no longer retained: the client resets.
    Gone,
}

#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and `/readyz` (`memory`, `kinesis`).
    fn name(&self) -> &'static str;

    /// Appends one message; returns only after the stream accepted it.
    async fn append(&self, message: ChatMessage) -> Result<Appended, AppendError>;

    /// Reads the room's messages after `since` that precede the hub's
    /// window (whose oldest entry is `stop_at`, if any).
    async fn catch_up(&self, room: &str, since: &Position, stop_at: Option<&Position>) -> CatchUp;

    /// `Ok` when the stream is reachable and the reader is running, else a
    /// sentence saying what is wrong (for `/readyz`).
    fn readiness(&self) -> Result<(), String>;
}
