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

/// Where batches go: Kinesis `PutRecords`, or a scripted fake in tests.
pub trait Sink: Send + Sync + 'static {
    /// The time limit of one call. An entry is only sent when a call
    /// started now would end before the entry's deadline.
    fn call_timeout(&self) -> Duration;
    /// One call with `(partition key, data)` records; one result per
    /// record, in order, or the whole call's failure.
    fn put(&self, records: Vec<(String, Vec<u8>)>) -> BoxFuture<Result<Vec<EntryResult>, CallError>>;
}

/// A boxed future, as [`Sink::put`] returns it.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The real sink: `PutRecords` on the data client.
pub struct KinesisSink(pub Arc<Clients>);

impl Sink for KinesisSink {
    fn call_timeout(&self) -> Duration {
        self.0.call_timeout
    }

    fn put(&self, records: Vec<(String, Vec<u8>)>) -> BoxFuture<Result<Vec<EntryResult>, CallError>> {
        let clients = self.0.clone();
        Box::pin(async move {
            let result = put_records(&clients, records).await;
            match &result {
                Ok(_) => clients.reach.answered(),
                Err(e) => clients.reach.failed(e),
            }
            result
        })
    }
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
        sink: Arc<dyn Sink>,
        metrics: Arc<Metrics>,
        settings: ProducerSettings,
        shutdown: CancellationToken,
    ) -> Producer {
        // The channel and the task's own queues each hold at most `queue`.
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let task = Task {
            sink,
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
#[derive(Debug)]
pub enum EntryResult {
    Ok { shard: String, seq: String },
    Failed {
        /// Trying again may work (throttling, internal failure, no answer).
        retryable: bool,
        throttled: bool,
        message: String,
    },
}

struct Task {
    sink: Arc<dyn Sink>,
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
        let call = self.sink.call_timeout();
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

        let call = self.sink.call_timeout();
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
            return next_retry.map_or(Batch::Nothing, Batch::WaitUntil);
        }
        Batch::Send(batch)
    }

    fn launch(&mut self, batch: Vec<Pending>) {
        let records = batch.iter().map(|p| (p.room.clone(), p.data.clone())).collect();
        let call = self.sink.put(records);
        self.in_flight.spawn(async move {
            let result = call.await;
            Sent { batch, result }
        });
    }

    /// Answers the waiters of a finished call and puts retryable entries
    /// back at the front of their rooms.
    fn settle(&mut self, sent: Sent, stopping: bool) {
        let Sent { batch, result } = sent;
        let now = Instant::now();
        let results: Vec<EntryResult> = match result {
            Ok(results) if results.len() == batch.len() => results,
            Ok(results) => {
                let e = CallError {
                    kind: Failure::Server,
                    code: None,
                    message: format!("PutRecords answered {} entries for {}", results.len(), batch.len()),
                };
                tracing::error!(error = %e, "PutRecords answer does not match the call; refusing its messages");
                batch.iter().map(|_| EntryResult::Failed { retryable: false, throttled: false, message: e.message.clone() }).collect()
            }
            Err(e) => {
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
                        } else if now + self.sink.call_timeout() > p.deadline {
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
async fn put_records(clients: &Clients, records: Vec<(String, Vec<u8>)>) -> Result<Vec<EntryResult>, CallError> {
    let count = records.len();
    let mut entries = Vec::with_capacity(count);
    for (key, data) in records {
        let entry = PutRecordsRequestEntry::builder()
            .data(Blob::new(data))
            .partition_key(key)
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
    if records.len() != count {
        return Err(CallError {
            kind: Failure::Server,
            code: None,
            message: format!("PutRecords answered {} entries for {count}", records.len()),
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
    use parking_lot::Mutex;
    use std::collections::HashSet;

    /// What the fake stream does with one call.
    type Script = Box<dyn FnOnce(&[(String, Vec<u8>)]) -> Result<Vec<EntryResult>, CallError> + Send>;

    /// A scripted stream: each call takes the next script (or accepts all
    /// when none is left), after `delay`; accepted records are "written".
    #[derive(Default)]
    struct Fake {
        scripts: Mutex<VecDeque<Script>>,
        written: Mutex<Vec<(String, String)>>,
        calls: Mutex<Vec<usize>>,
        delay: Duration,
    }

    impl Fake {
        fn new(delay: Duration) -> Arc<Fake> {
            Arc::new(Fake { delay, ..Fake::default() })
        }
        fn script(&self, f: impl FnOnce(&[(String, Vec<u8>)]) -> Result<Vec<EntryResult>, CallError> + Send + 'static) {
            self.scripts.lock().push_back(Box::new(f));
        }
        fn written(&self) -> Vec<String> {
            self.written.lock().iter().map(|(_, text)| text.clone()).collect()
        }
    }

    fn ok(i: usize) -> EntryResult {
        EntryResult::Ok { shard: "shardId-0".into(), seq: format!("{}", 1000 + i) }
    }

    fn throttled() -> EntryResult {
        EntryResult::Failed { retryable: true, throttled: true, message: "ProvisionedThroughputExceededException".into() }
    }

    struct Shared(Arc<Fake>);

    impl Sink for Shared {
        fn call_timeout(&self) -> Duration {
            Duration::from_millis(100)
        }
        fn put(&self, records: Vec<(String, Vec<u8>)>) -> BoxFuture<Result<Vec<EntryResult>, CallError>> {
            let fake = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(fake.delay).await;
                fake.calls.lock().push(records.len());
                let script = fake.scripts.lock().pop_front();
                let results = match script {
                    Some(f) => f(&records)?,
                    None => (0..records.len()).map(ok).collect(),
                };
                let mut written = fake.written.lock();
                for ((room, data), r) in records.iter().zip(&results) {
                    if matches!(r, EntryResult::Ok { .. }) {
                        written.push((room.clone(), String::from_utf8(data.clone()).unwrap()));
                    }
                }
                Ok(results)
            })
        }
    }

    fn producer(fake: &Arc<Fake>, budget_ms: u64, queue: usize) -> (Producer, Arc<Metrics>, CancellationToken) {
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let settings =
            ProducerSettings { budget: Duration::from_millis(budget_ms), linger: Duration::from_millis(5), queue };
        let p = Producer::start(Arc::new(Shared(fake.clone())), metrics.clone(), settings, stop.clone());
        (p, metrics, stop)
    }

    async fn send_all(p: &Producer, msgs: &[(&str, &str)]) -> Vec<Verdict> {
        futures_util::future::join_all(msgs.iter().map(|(room, text)| p.send(room, text.as_bytes().to_vec()))).await
    }

    #[tokio::test]
    async fn a_lone_message_goes_out_at_once_with_its_position() {
        let fake = Fake::new(Duration::ZERO);
        let (p, _, _stop) = producer(&fake, 1000, 100);
        let started = Instant::now();
        let pos = p.send("lobby", b"hello".to_vec()).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(50), "no linger when idle");
        assert_eq!(pos, Position::Kinesis { shard: "shardId-0".into(), seq: "1000".into(), sub: 0 });
        assert_eq!(fake.written(), ["hello"]);
    }

    #[tokio::test]
    async fn concurrent_messages_share_calls() {
        let fake = Fake::new(Duration::from_millis(30));
        let (p, _, _stop) = producer(&fake, 2000, 1000);
        let msgs: Vec<(String, String)> = (0..40).map(|i| (format!("r{}", i % 4), format!("m{i}"))).collect();
        let refs: Vec<(&str, &str)> = msgs.iter().map(|(r, t)| (r.as_str(), t.as_str())).collect();
        let verdicts = send_all(&p, &refs).await;
        assert!(verdicts.iter().all(Result::is_ok));
        let calls = fake.calls.lock().clone();
        assert!(calls.len() < 10, "40 messages in {} calls: {calls:?}", calls.len());
        // Each room's messages were written in the order they were sent.
        let written = fake.written.lock().clone();
        for room in ["r0", "r1", "r2", "r3"] {
            let texts: Vec<usize> =
                written.iter().filter(|(r, _)| r == room).map(|(_, t)| t[1..].parse().unwrap()).collect();
            assert!(texts.windows(2).all(|w| w[0] < w[1]), "{room}: {texts:?}");
        }
    }

    #[tokio::test]
    async fn failed_entries_are_retried_ahead_of_their_room() {
        let fake = Fake::new(Duration::from_millis(10));
        let (p, metrics, _stop) = producer(&fake, 2000, 100);
        // a0 holds room a in flight, so a1 and a2 queue up into one call,
        // where both fail once; b1 is not held up by a's trouble.
        fake.script(|r| Ok((0..r.len()).map(ok).collect()));
        let fail_once: Arc<Mutex<HashSet<&'static str>>> = Arc::new(Mutex::new(["a1", "a2"].into()));
        for _ in 0..5 {
            let fail_once = fail_once.clone();
            fake.script(move |r| {
                Ok(r.iter()
                    .enumerate()
                    .map(|(i, (_, d))| {
                        let text = std::str::from_utf8(d).unwrap();
                        if fail_once.lock().remove(text) {
                            throttled()
                        } else {
                            ok(i)
                        }
                    })
                    .collect())
            });
        }
        let first = p.send("a", b"a0".to_vec());
        let rest = async {
            tokio::time::sleep(Duration::from_millis(3)).await;
            send_all(&p, &[("a", "a1"), ("a", "a2"), ("b", "b1")]).await
        };
        let (first, rest) = tokio::join!(first, rest);
        assert!(first.is_ok());
        assert!(rest.iter().all(Result::is_ok), "{rest:?}");
        let written = fake.written.lock().clone();
        let room_a: Vec<&str> = written.iter().filter(|(r, _)| r == "a").map(|(_, t)| t.as_str()).collect();
        assert_eq!(room_a, ["a0", "a1", "a2"]);
        assert!(written.iter().any(|(_, t)| t == "b1"));
        assert_eq!(metrics.producer_retries.get(), 2);
    }

    #[tokio::test]
    async fn an_entry_overtaken_by_its_successor_is_refused_not_retried() {
        let fake = Fake::new(Duration::from_millis(10));
        let (p, _, _stop) = producer(&fake, 2000, 100);
        fake.script(|r| Ok((0..r.len()).map(ok).collect()));
        // [a1, a2]: a1 fails but a2 is written: a1 can no longer come first.
        fake.script(|_| Ok(vec![throttled(), ok(1)]));
        let first = p.send("a", b"a0".to_vec());
        let rest = async {
            tokio::time::sleep(Duration::from_millis(3)).await;
            send_all(&p, &[("a", "a1"), ("a", "a2")]).await
        };
        let (_, rest) = tokio::join!(first, rest);
        assert!(matches!(rest[0], Err(AppendError::Unavailable { .. })), "{:?}", rest[0]);
        assert!(rest[1].is_ok());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fake.written(), ["a0", "a2"], "a1 is never written behind the sender's back");
    }

    #[tokio::test]
    async fn a_spent_budget_is_a_503_and_the_message_never_appears() {
        let fake = Fake::new(Duration::from_millis(5));
        for _ in 0..100 {
            fake.script(|_| {
                Err(CallError { kind: Failure::Throttled, code: None, message: "Rate exceeded".into() })
            });
        }
        let (p, metrics, _stop) = producer(&fake, 400, 100);
        let started = Instant::now();
        let verdict = p.send("lobby", b"doomed".to_vec()).await;
        let took = started.elapsed();
        assert!(matches!(verdict, Err(AppendError::Unavailable { .. })));
        assert!(took <= Duration::from_millis(400), "answered within the budget: {took:?}");
        let calls = fake.calls.lock().len();
        assert!(calls >= 2, "retried: {calls} calls");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(fake.calls.lock().len(), calls, "no call after the 503");
        assert!(fake.written().is_empty());
        assert!(metrics.producer_retries.get() >= 1);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let fake = Fake::new(Duration::from_secs(3600));
        let (p, _, _stop) = producer(&fake, 60_000, 1);
        let p = Arc::new(p);
        // One in flight (hangs), one held behind it, one in the channel.
        let mut waiting = Vec::new();
        for i in 0..3 {
            let p = p.clone();
            waiting.push(tokio::spawn(async move { p.send("a", format!("m{i}").into_bytes()).await }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        let verdict = p.send("a", b"one too many".to_vec()).await;
        assert!(started.elapsed() < Duration::from_millis(50));
        match verdict {
            Err(AppendError::Unavailable { reason, .. }) => assert!(reason.contains("too many"), "{reason}"),
            other => panic!("{other:?}"),
        }
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test]
    async fn shutdown_refuses_what_was_not_sent() {
        let fake = Fake::new(Duration::from_millis(200));
        let (p, _, stop) = producer(&fake, 5000, 100);
        let p = Arc::new(p);
        let first = {
            let p = p.clone();
            tokio::spawn(async move { p.send("a", b"in flight".to_vec()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = {
            let p = p.clone();
            tokio::spawn(async move { p.send("a", b"queued".to_vec()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.cancel();
        assert!(first.await.unwrap().is_ok(), "the call in flight completes");
        assert!(second.await.unwrap().is_err(), "the queued one is refused");
        assert_eq!(fake.written(), ["in flight"]);
    }

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
