//! The Kinesis backend: the stream is the only shared state.
//!
//! - `client.rs`: the SDK clients (timeouts, no hidden retries on the hot
//!   path), error classification, stream check/creation, `ListShards`.
//! - `producer.rs`: POSTs → acknowledged, order-keeping `PutRecords` batches.
//! - `reader.rs`: every shard, lineage-aware, adaptive polling → the hub.
//! - `decode.rs` and `kpl.rs`: record → ChatMessages (JSON, KPL aggregates).
//! - `catchup.rs`: reading after a cursor older than the hub's window.
//!
//! Every instance reads every shard and feeds the same hub as the memory
//! backend ([`Rooms`]); a POST's 201 carries the record's own position, so a
//! cursor from any instance resumes on any other.

pub mod catchup;
pub mod client;
pub mod decode;
pub mod kpl;
pub mod producer;
pub mod reader;

pub use client::Clients;

use super::{Appended, AppendError, Backend, CatchUp};
use crate::config::Config;
use crate::cursor::Position;
use crate::metrics::Metrics;
use crate::rooms::{Entry, Rooms};
use app::ChatMessage;
use parking_lot::Mutex;
use producer::{Producer, ProducerSettings};
use reader::{ReaderSettings, ReaderState};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Messages this instance wrote recently, by id, so a repeated `client_id`
/// is answered 200 even before the reader has brought the record back.
const RECENT_APPENDS: usize = 10_000;

pub struct KinesisBackend {
    clients: Arc<Clients>,
    rooms: Arc<Rooms>,
    producer: Producer,
    reader: Arc<ReaderState>,
    recent: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    by_id: HashMap<String, Arc<Entry>>,
    order: VecDeque<String>,
}

impl KinesisBackend {
    /// Connects, checks (or creates) the stream, and starts the producer
    /// and the reader. A missing stream or an unreachable endpoint stops
    /// start-up with one line.
    pub async fn start(
        config: &Config,
        rooms: Arc<Rooms>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<KinesisBackend> {
        let clients = Arc::new(Clients::from_config(config).await?);
        clients.ensure_stream(config.create_stream, config.kinesis_shards).await?;
        tracing::info!(stream = %clients.stream, place = %clients.place, "Kinesis stream ready");

        let producer = Producer::start(
            Arc::new(producer::KinesisSink(clients.clone())),
            metrics.clone(),
            ProducerSettings {
                budget: config.kinesis_put_budget,
                linger: config.kinesis_linger,
                queue: config.kinesis_producer_queue as usize,
            },
            shutdown.clone(),
        );
        let reader = Arc::new(ReaderState::new(ReaderSettings {
            poll: config.kinesis_poll_interval,
            max_poll: config.kinesis_max_poll_interval,
            backfill: config.kinesis_backfill,
            list_every: config.kinesis_list_shards_interval,
            stuck_after: config.kinesis_stuck_after,
        }));
        reader::start(clients.clone(), rooms.clone(), metrics, reader.clone(), shutdown);
        Ok(KinesisBackend { clients, rooms, producer, reader, recent: Mutex::new(Recent::default()) })
    }

    fn remember(&self, entry: Arc<Entry>) {
        let mut recent = self.recent.lock();
        recent.order.push_back(entry.message.id.clone());
        recent.by_id.insert(entry.message.id.clone(), entry);
        while recent.order.len() > RECENT_APPENDS {
            if let Some(old) = recent.order.pop_front() {
                recent.by_id.remove(&old);
            }
        }
    }
}

#[async_trait::async_trait]
impl Backend for KinesisBackend {
    fn name(&self) -> &'static str {
        "kinesis"
    }

    async fn append(&self, message: ChatMessage) -> Result<Appended, AppendError> {
        let known = self.rooms.lookup_id(&message.id).or_else(|| self.recent.lock().by_id.get(&message.id).cloned());
        if let Some(existing) = known {
            return Ok(Appended::Existing(existing));
        }
        // Serializing plain strings cannot fail.
        let data = serde_json::to_vec(&message).expect("serialize a ChatMessage");
        let pos = self.producer.send(&message.room, data).await?;
        self.remember(Arc::new(Entry::new(pos.clone(), message)));
        Ok(Appended::New(pos))
    }

    async fn catch_up(&self, room: &str, since: &Position, stop_at: Option<&Position>) -> CatchUp {
        catchup::catch_up(&self.clients, &self.reader, room, since, stop_at).await
    }

    fn readiness(&self) -> Result<(), String> {
        self.clients.reach.readiness()?;
        self.reader.readiness()
    }
}
