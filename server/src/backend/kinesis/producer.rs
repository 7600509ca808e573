//! The producer: POSTs in, acknowledged `PutRecords` batches out.
//!
//! Every POST puts one [`Pending`] entry on a bounded queue and waits for
//! its own verdict. One task drains the queue into `PutRecords` calls (≤ 500
//! entries, ≤ 5 MiB) and answers each waiter with the record's position, or
//! with an error once the entry's budget is spent.
//!
//! Guarantees, and how they are kept:
//!
//! - **201 only after the stream accepted that entry**: a waiter gets `Ok`
//!   only from a `PutRecords` answer whose entry for it has a sequence number.
//! - **A room's order survives retries**: a room has at most one call in
//!   flight; failed entries go back to the *front* of their room's queue; and
//!   an entry that failed while a later entry of its room in the same call
//!   succeeded cannot be put back in order, so it is refused (503, and it was
//!   not written) instead of being retried behind its successor.
//! - **No 503-then-appears**: an entry is only sent when the call's time
//!   limit ends before the entry's deadline, so its fate is settled while its
//!   POST still waits. Once refused it is dropped, never retried later.
//!   (A call that times out has an unknown outcome; if it did land, the
//!   client's retry with the same `client_id` is deduplicated by id.)
//! - **Bounded**: the queue and the entries held here are capped; beyond
//!   that a POST is refused at once.
//!
//! Batching adapts to load: when no call is in flight an entry goes out at
//! once (no linger for a quiet chat); while calls are in flight, entries wait
//! up to `linger` to share the next call, and behind a busy room they simply
//! pile up into the next batch.

use super::client::{CallError, Clients, Failure};
use crate::backend::AppendError;
use crate::cursor::Position;
use crate::metrics::{Labels, Metrics};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// PutRecords accepts at most 500 entries per call.
const MAX_BATCH_ENTRIES: usize = 500;
/// ... and at most 5 MiB per call, partition keys included.
const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// Calls in flight at once (each holding different rooms): enough to keep
/// a busy producer's pipe full without hammering a struggling stream.
const MAX_IN_FLIGHT: usize = 4;
/// First retry delay of a failed entry; doubles per attempt.
const RETRY_BASE: Duration = Duration::from_millis(50);
/// Longest delay between two attempts of one entry.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How often queued entries are checked against their deadlines.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Extra time a POST waits beyond its budget for the producer's verdict
/// (the verdict always comes earlier; this only guards against a bug).
const WAITER_SLACK: Duration = Duration::from_secs(1);
/// Our own timer's margin over the SDK's call time limit.
const CALL_GUARD: Duration = Duration::from_millis(100);
/// Seconds a refused client is told to wait.
const RETRY_AFTER_SECS: u64 = 2;

/// The producer's knobs, from the config.
#[derive(Debug, Clone)]
pub struct ProducerSettings {
    /// How long a POST may wait in total before it is refused.
    pub budget: Duration,
    /// Longest wait for company in a batch while another call is in flight.
    pub linger: Duration,
    /// Entries queued or held at once.
    pub queue: usize,
}

/// The POST side's handle.
pub struct Producer {
    tx: mpsc::Sender<Pending>,
    settings: ProducerSettings,
}

/// A verdict for one POST.
type Verdict = Result<Position, AppendError>;

/// One message waiting for the stream.
struct Pending {
    room: String,
    /// The record: the ChatMessage as JSON.
    data: Vec<u8>,
    /// When the POST queued it (for the linger).
    queued_at: Instant,
    /// After this the POST is answered 503.
    deadline: Instant,
    /// Attempts made so far.
    attempts: u32,
    waiter: oneshot::Sender<Verdict>,
}

impl Pending {
    fn size(&self) -> usize {
        self.data.len() + self.room.len()
    }

    fn refuse(self, reason: &str) {
        // The POST may have gone away already; then nobody needs the answer.
        let _gone = self.waiter.send(Err(unavailable(reason)));
    }
}

fn unavailable(reason: &str) -> AppendError {
    AppendError::Unavailable { reason: reason.to_owned(), retry_after_secs: RETRY_AFTER_SECS }
}

impl Producer {
    /// Starts the producer task; it stops on `shutdown`.
    pub fn start(
        clients: Arc<Clients>,
        metrics: Arc<Metrics>,
        settings: ProducerSettings,
        shutdown: CancellationToken,
    ) -> Producer {
        // The channel and the task's own queues each hold at most `queue`.
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let task = Task {
            clients,
            metrics,
            settings: settings.clone(),
            rx,
            rooms: HashMap::new(),
            order: VecDeque::new(),
            held: 0,
            in_flight: JoinSet::new(),
        };
        tokio::spawn(task.run(shutdown));
        Producer { tx, settings }
    }

    /// Writes one message; returns its position once the stream accepted it.
    pub async fn send(&self, room: &str, data: Vec<u8>) -> Verdict {
        let (waiter, verdict) = oneshot::channel();
        let queued_at = Instant::now();
        let deadline = queued_at + self.settings.budget;
        let pending = Pending { room: room.to_owned(), data, queued_at, deadline, attempts: 0, waiter };
        match self.tx.try_send(pending) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(unavailable("The server has too many messages waiting for the stream; try again shortly."))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(unavailable("The server is shutting down; try again on another instance."))
            }
        }
        match tokio::time::timeout_at(deadline + WAITER_SLACK, verdict).await {
            Ok(Ok(v)) => v,
            Ok(Err(_dropped)) => Err(unavailable("The server is shutting down; try again on another instance.")),
            Err(_elapsed) => Err(unavailable("The stream did not accept the message in time; try again.")),
        }
    }
}

/// One room's entries, oldest first.
struct RoomQueue {
    entries: VecDeque<Pending>,
    /// A call holding this room's entries is in flight.
    in_flight: bool,
    /// Retry backoff: nothing of this room is sent before this.
    not_before: Instant,
}

/// What a finished call hands back.
struct Sent {
    batch: Vec<Pending>,
    result: Result<Vec<EntryResult>, CallError>,
}

/// The answer for one entry of a call.
enum EntryResult {
    Ok { shard: String, seq: String },
    Failed {
        /// Trying again may work (throttling, internal failure, no answer).
        retryable: bool,
        throttled: bool,
        message: String,
    },
}

struct Task {
    clients: Arc<Clients>,
    metrics: Arc<Metrics>,
    settings: ProducerSettings,
    rx: mpsc::Receiver<Pending>,
    rooms: HashMap<String, RoomQueue>,
    /// Every room with queued entries, once, in turn order (fairness).
    order: VecDeque<String>,
    /// Entries held in `rooms` (not counting those in flight).
    held: usize,
    in_flight: JoinSet<Sent>,
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            let mut wake = now + SWEEP_EVERY;
            if self.in_flight.len() < MAX_IN_FLIGHT {
                match self.next_batch(now) {
                    Batch::Send(batch) => {
                        self.launch(batch);
                        continue;
                    }
                    Batch::WaitUntil(t) => wake = wake.min(t),
                    Batch::Nothing => {}
                }
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => match done {
                    Ok(sent) => self.settle(sent, false),
                    Err(e) => tracing::error!(error = %e, "a PutRecords task failed; its messages were refused"),
                },
                received = self.rx.recv(), if self.held < self.settings.queue => match received {
                    Some(p) => self.hold(p),
                    None => break,
                },
                _ = sweep.tick() => self.sweep(Instant::now()),
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        self.stop().await;
    }

    /// Refuses everything not yet sent, lets calls in flight finish (within
    /// their time limit) and answers their waiters without retrying.
    async fn stop(mut self) {
        const BYE: &str = "The server is shutting down; try again on another instance.";
        self.rx.close();
        while let Ok(p) = self.rx.try_recv() {
            p.refuse(BYE);
        }
        for (_, room) in self.rooms.drain() {
            for p in room.entries {
                p.refuse(BYE);
            }
        }
        self.order.clear();
        while let Some(done) = self.in_flight.join_next().await {
            if let Ok(sent) = done {
                self.settle(sent, true);
            }
        }
    }

    fn hold(&mut self, p: Pending) {
        let now = Instant::now();
        let room = self
            .rooms
            .entry(p.room.clone())
            .or_insert_with(|| RoomQueue { entries: VecDeque::new(), in_flight: false, not_before: now });
        if room.entries.is_empty() {
            self.order.push_back(p.room.clone());
        }
        room.entries.push_back(p);
        self.held += 1;
    }

    /// Refuses entries whose budget cannot fit one more call, and drops
    /// those whose POST went away (never sent, so never shown: the client
    /// saw no 201).
    fn sweep(&mut self, now: Instant) {
        let call = self.clients.call_timeout;
        let mut dropped = 0;
        for room in self.rooms.values_mut() {
            if room.entries.iter().all(|p| !p.waiter.is_closed() && now + call <= p.deadline) {
                continue;
            }
            let before = room.entries.len();
            let mut kept = VecDeque::with_capacity(before);
            for p in room.entries.drain(..) {
                if p.waiter.is_closed() {
                    continue;
                }
                if now + call > p.deadline {
                    p.refuse("The stream did not accept the message in time; try again.");
                    continue;
                }
                kept.push_back(p);
            }
            dropped += before - kept.len();
            room.entries = kept;
        }
        self.held -= dropped;
        self.rooms.retain(|_, r| !r.entries.is_empty() || r.in_flight);
        let rooms = &self.rooms;
        self.order.retain(|name| rooms.get(name).is_some_and(|r| !r.entries.is_empty()));
    }

    /// Picks the next batch: runs of entries of rooms that are neither in
    /// flight nor backing off, rooms in turn, up to the call's limits.
    fn next_batch(&mut self, now: Instant) -> Batch {
        let mut eligible = 0;
        let mut oldest: Option<Instant> = None;
        let mut next_retry: Option<Instant> = None;
        for name in &self.order {
            let Some(room) = self.rooms.get(name) else { continue };
            let Some(front) = room.entries.front() else { continue };
            if room.in_flight {
                continue;
            }
            if room.not_before > now {
                next_retry = Some(next_retry.map_or(room.not_before, |t: Instant| t.min(room.not_before)));
                continue;
            }
            eligible += room.entries.len();
            oldest = Some(oldest.map_or(front.queued_at, |t: Instant| t.min(front.queued_at)));
        }
        let Some(oldest) = oldest else {
            return next_retry.map_or(Batch::Nothing, Batch::WaitUntil);
        };
        // Linger only while another call is in flight: a quiet chat's
        // message goes out at once.
        let linger_until = oldest + self.settings.linger;
        if !self.in_flight.is_empty() && eligible < MAX_BATCH_ENTRIES && now < linger_until {
            return Batch::WaitUntil(next_retry.map_or(linger_until, |t| t.min(linger_until)));
        }

        let call = self.clients.call_timeout;
        let mut batch = Vec::new();
        let mut bytes = 0;
        for _ in 0..self.order.len() {
            if batch.len() >= MAX_BATCH_ENTRIES {
                break;
            }
            let Some(name) = self.order.pop_front() else { break };
            let Some(room) = self.rooms.get_mut(&name) else { continue };
            if !room.in_flight && room.not_before <= now {
                let mut took = false;
                while let Some(p) = room.entries.front() {
                    if batch.len() >= MAX_BATCH_ENTRIES || bytes + p.size() > MAX_BATCH_BYTES {
                        break;
                    }
                    let Some(p) = room.entries.pop_front() else { break };
                    self.held -= 1;
                    if p.waiter.is_closed() {
                        continue;
                    }
                    if now + call > p.deadline {
                        p.refuse("The stream did not accept the message in time; try again.");
                        continue;
                    }
                    bytes += p.size();
                    batch.push(p);
                    took = true;
                }
                room.in_flight = took;
            }
            if !room.entries.is_empty() {
                self.order.push_back(name);
            } else if !room.in_flight {
                self.rooms.remove(&name);
            }
        }
        if batch.is_empty() {
            return Batch::Nothing;
        }
        Batch::Send(batch)
    }

    fn launch(&mut self, batch: Vec<Pending>) {
        let clients = self.clients.clone();
        self.in_flight.spawn(async move {
            let result = put_records(&clients, &batch).await;
            Sent { batch, result }
        });
    }

    /// Answers the waiters of a finished call and puts retryable entries
    /// back at the front of their rooms.
    fn settle(&mut self, sent: Sent, stopping: bool) {
        let Sent { batch, result } = sent;
        let now = Instant::now();
        let results: Vec<EntryResult> = match result {
            Ok(results) => {
                self.clients.reach.answered();
                results
            }
            Err(e) => {
                self.clients.reach.failed(&e);
                let retryable = e.kind.is_transient();
                if retryable {
                    tracing::warn!(error = %e, entries = batch.len(), "PutRecords failed; retrying within the budget");
                } else {
                    tracing::error!(error = %e, entries = batch.len(), "PutRecords refused; the messages were not written");
                }
                let throttled = e.kind == Failure::Throttled;
                batch
                    .iter()
                    .map(|_| EntryResult::Failed { retryable, throttled, message: e.message.clone() })
                    .collect()
            }
        };

        // Group by room, keeping each room's order.
        let mut by_room: Vec<(String, Vec<(Pending, EntryResult)>)> = Vec::new();
        for (p, r) in batch.into_iter().zip(results) {
            match by_room.iter_mut().find(|(room, _)| *room == p.room) {
                Some((_, v)) => v.push((p, r)),
                None => by_room.push((p.room.clone(), vec![(p, r)])),
            }
        }
        let mut throttled_entries = 0;
        for (room_name, entries) in by_room {
            let last_ok = entries.iter().rposition(|(_, r)| matches!(r, EntryResult::Ok { .. }));
            let mut retry = Vec::new();
            let mut attempts = 0;
            for (i, (p, r)) in entries.into_iter().enumerate() {
                match r {
                    EntryResult::Ok { shard, seq } => {
                        // The POST may be gone; the message stands anyway.
                        let _gone = p.waiter.send(Ok(Position::Kinesis { shard, seq, sub: 0 }));
                    }
                    EntryResult::Failed { retryable, throttled, message } => {
                        throttled_entries += u64::from(throttled);
                        if last_ok.is_some_and(|ok| i < ok) {
                            // A later message of this room is already on the
                            // stream: retried, this one would come after it.
                            tracing::info!(room = %room_name, error = %message, "refusing a failed entry that a later one overtook");
                            p.refuse("The stream did not accept the message; try again.");
                        } else if stopping || !retryable {
                            p.refuse(&format!("The stream did not accept the message ({message}); try again."));
                        } else if p.waiter.is_closed() {
                            // The POST went away: it saw no 201, so drop it.
                        } else if now + self.clients.call_timeout > p.deadline {
                            p.refuse("The stream did not accept the message in time; try again.");
                        } else {
                            let mut p = p;
                            p.attempts += 1;
                            attempts = attempts.max(p.attempts);
                            self.metrics.producer_retries.inc();
                            retry.push(p);
                        }
                    }
                }
            }
            if stopping {
                continue;
            }
            let Some(room) = self.rooms.get_mut(&room_name) else { continue };
            room.in_flight = false;
            if !retry.is_empty() {
                room.not_before = now + backoff(attempts);
                if room.entries.is_empty() {
                    self.order.push_back(room_name.clone());
                }
                self.held += retry.len();
                for p in retry.into_iter().rev() {
                    room.entries.push_front(p);
                }
            }
            if room.entries.is_empty() {
                self.rooms.remove(&room_name);
            }
        }
        if throttled_entries > 0 {
            let labels: Labels = vec![("op".into(), "PutRecords".into())];
            self.metrics.throttled.get_or_create(&labels).inc_by(throttled_entries);
        }
    }
}

enum Batch {
    Send(Vec<Pending>),
    /// Something becomes sendable at this time (linger or backoff ends).
    WaitUntil(Instant),
    Nothing,
}

/// Exponential backoff with full jitter.
fn backoff(attempts: u32) -> Duration {
    let exp = RETRY_BASE.saturating_mul(1 << attempts.min(10).saturating_sub(1));
    let cap = exp.min(RETRY_MAX);
    let ms = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(ms)
}

/// One `PutRecords` call; one result per entry, in order.
async fn put_records(clients: &Clients, batch: &[Pending]) -> Result<Vec<EntryResult>, CallError> {
    let mut entries = Vec::with_capacity(batch.len());
    for p in batch {
        let entry = PutRecordsRequestEntry::builder()
            .data(Blob::new(p.data.clone()))
            .partition_key(&p.room)
            .build()
            .map_err(|e| CallError { kind: Failure::Other, code: None, message: e.to_string() })?;
        entries.push(entry);
    }
    let call = clients.data.put_records().stream_name(&clients.stream).set_records(Some(entries)).send();
    // The SDK enforces the same limit; this guards the guarantee that a
    // call's outcome is settled before its entries' deadlines.
    let out = match tokio::time::timeout(clients.call_timeout + CALL_GUARD, call).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(CallError::from_sdk(e)),
        Err(_) => return Err(CallError::timed_out()),
    };
    let records = out.records();
    if records.len() != batch.len() {
        return Err(CallError {
            kind: Failure::Server,
            code: None,
            message: format!("PutRecords answered {} entries for {}", records.len(), batch.len()),
        });
    }
    Ok(records
        .iter()
        .map(|r| match (r.error_code(), r.shard_id(), r.sequence_number()) {
            (None, Some(shard), Some(seq)) => EntryResult::Ok { shard: shard.to_owned(), seq: seq.to_owned() },
            (code, _, _) => {
                let code = code.unwrap_or("NoSequenceNumber");
                let throttled = matches!(code, "ProvisionedThroughputExceededException" | "KMSThrottlingException");
                EntryResult::Failed {
                    retryable: throttled || code == "InternalFailure",
                    throttled,
                    message: format!("{code}: {}", r.error_message().unwrap_or("entry not written")),
                }
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempts in 1..20 {
            let d = backoff(attempts);
            assert!(d <= RETRY_MAX, "{attempts}: {d:?}");
            assert!(d >= RETRY_BASE / 2, "{attempts}: {d:?}");
        }
        assert!(backoff(1) <= RETRY_BASE);
    }
}
