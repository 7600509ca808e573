//! The embedded backend: one process, no cloud.
//!
//! "The stream" is the hub itself: an append assigns the next sequence
//! number and publishes straight into [`Rooms`], whose bounded per-room
//! window is the whole retained history. Positions carry a random epoch per
//! process run so cursors from an earlier run are recognised as unknown.

use super::{Appended, AppendError, Backend, CatchUp};
use crate::cursor::Position;
use crate::rooms::{Published, Rooms};
use app::ChatMessage;
use parking_lot::Mutex;
use std::sync::Arc;

pub struct MemoryBackend {
    rooms: Arc<Rooms>,
    epoch: u64,
    /// The last sequence number given out. Held while publishing, so the
    /// hub receives messages in sequence order.
    seq: Mutex<u64>,
}

impl MemoryBackend {
    pub fn new(rooms: Arc<Rooms>) -> Self {
        Self { rooms, epoch: rand::random::<u64>() >> 12, seq: Mutex::new(0) }
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn append(&self, message: ChatMessage) -> Result<Appended, AppendError> {
        let mut seq = self.seq.lock();
        let pos = Position::Memory { epoch: self.epoch, seq: *seq + 1 };
        match self.rooms.publish(pos.clone(), message) {
            Published::New(_) => {
                *seq += 1;
                Ok(Appended::New(pos))
            }
            Published::Duplicate(existing) => Ok(Appended::Existing(existing)),
        }
    }

    async fn catch_up(&self, room: &str, since: &Position, _stop_at: Option<&Position>) -> CatchUp {
        // The window is all this backend retains. A position of this run
        // that precedes the window loses nothing as long as the room never
        // dropped a message; anything else is gone.
        match since {
            Position::Memory { epoch, seq } if *epoch == self.epoch && *seq <= *self.seq.lock() => {
                if self.rooms.evicted(room) {
                    CatchUp::Gone
                } else {
                    CatchUp::Messages(Vec::new())
                }
            }
            _ => CatchUp::Gone,
        }
    }

    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}
