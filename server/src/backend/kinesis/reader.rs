//! The reader: every instance reads every shard (no leases, no DynamoDB).
//!
//! A coordinator task knows the stream's shards and their lineage. It starts
//! one task per shard whose parents are drained (so a room's messages come
//! out in order across splits and merges), learns of children from the
//! `ChildShards` of a drained shard and from a periodic `ListShards` (others
//! may reshard), and keeps the per-shard lag gauges fresh.
//!
//! A shard task polls `GetRecords` at an adaptive interval: the base
//! interval (≥ 200 ms, so ≤ 5 calls/s per shard from this instance), grown 1.5×
//! on throttling up to a ceiling and shrunk slowly while calls succeed. It
//! decodes each record (JSON or KPL aggregate) and publishes the messages, in
//! shard order, into the hub. It remembers the last sequence number it read:
//! an expired iterator, or any error that may have spoiled the iterator,
//! resumes `AFTER_SEQUENCE_NUMBER` of it, so nothing is skipped. A shard's
//! trouble only delays that shard.
//!
//! At start-up every shard is read from `AT_TIMESTAMP` (now − backfill), so
//! a fresh instance has recent history and can place cursors; the hub's
//! per-room window caps what is kept. Shards found later are read from
//! `TRIM_HORIZON`: they were created after this instance started.

use super::client::{CallError, Clients, Failure, ShardMeta};
use super::decode::{decode_record, Item};
use crate::cursor::Position;
use crate::metrics::{Labels, Metrics};
use crate::rooms::Rooms;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;
use parking_lot::Mutex;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Records asked for per `GetRecords` (the API's maximum): a backlog is
/// read in as few of the 5 calls/s as possible.
pub const RECORDS_PER_CALL: i32 = 10_000;
/// Shard events waiting for the coordinator.
const EVENT_QUEUE: usize = 256;
/// First delay after a failed call; doubles per failure in a row.
const ERROR_BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest delay between two tries after failures.
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the lag gauges are refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(1);

/// The reader's knobs, from the config.
#[derive(Debug, Clone)]
pub struct ReaderSettings {
    /// Base (and shortest) interval between GetRecords calls per shard.
    pub poll: Duration,
    /// Longest the interval grows to while throttled.
    pub max_poll: Duration,
    /// How far back start-up reads.
    pub backfill: Duration,
    /// How often the shard list is refreshed.
    pub list_every: Duration,
    /// A shard without a successful read for this long is "stuck".
    pub stuck_after: Duration,
}

/// Where a shard task starts reading.
#[derive(Debug, Clone)]
pub enum Start {
    AtTimestamp(SystemTime),
    TrimHorizon,
    AfterSequence(String),
    AtSequence(String),
}

/// What the readers share with `/readyz`, the lag gauges and catch-up.
pub struct ReaderState {
    settings: ReaderSettings,
    inner: Mutex<StateInner>,
}

#[derive(Default)]
struct StateInner {
    /// The first ListShards succeeded.
    listed: bool,
    /// Why the last ListShards failed, while it keeps failing.
    list_error: Option<String>,
    /// Every shard known, for catch-up's walk through the lineage.
    shards: HashMap<String, ShardMeta>,
    /// Shards being read now.
    running: HashMap<String, ShardStatus>,
    /// Shards of the start-up list not yet read up to the tip (or drained).
    catching_up: HashSet<String>,
}

struct ShardStatus {
    /// The last successful GetRecords (or the task's start).
    last_ok: Instant,
    /// Why the last call failed, if it did.
    last_error: Option<String>,
}

impl ReaderState {
    pub fn new(settings: ReaderSettings) -> Self {
        Self { settings, inner: Mutex::new(StateInner::default()) }
    }

    /// `Ok` once the shards are listed, the start-up backlog is read, and
    /// no shard went without a successful read for `stuck_after`.
    pub fn readiness(&self) -> Result<(), String> {
        let s = self.inner.lock();
        if !s.listed {
            return Err(match &s.list_error {
                Some(e) => format!("cannot list the stream's shards: {e}"),
                None => "listing the stream's shards".into(),
            });
        }
        let mut stuck: Vec<(&String, &ShardStatus)> =
            s.running.iter().filter(|(_, st)| st.last_ok.elapsed() > self.settings.stuck_after).collect();
        stuck.sort_by_key(|(id, _)| id.as_str());
        if let Some((id, st)) = stuck.first() {
            return Err(format!(
                "no successful read from {id} for {}s{}",
                st.last_ok.elapsed().as_secs(),
                st.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            ));
        }
        if let Some(id) = s.catching_up.iter().min() {
            return Err(format!("reading the recent history of {id}"));
        }
        Ok(())
    }

    /// The shard and what is known about it (for catch-up).
    pub fn shard(&self, id: &str) -> Option<ShardMeta> {
        self.inner.lock().shards.get(id).cloned()
    }

    /// Known children of a shard.
    pub fn children(&self, id: &str) -> Vec<ShardMeta> {
        let s = self.inner.lock();
        let mut c: Vec<ShardMeta> = s.shards.values().filter(|m| m.parents.iter().any(|p| p == id)).cloned().collect();
        c.sort_by(|a, b| a.id.cmp(&b.id));
        c
    }

    /// Records shards learnt from a listing or a `ChildShards` answer.
    pub fn learn(&self, shards: &[ShardMeta]) {
        let mut s = self.inner.lock();
        for m in shards {
            s.shards.entry(m.id.clone()).or_insert_with(|| m.clone());
        }
    }

    fn read_ok(&self, shard: &str, at_tip: bool) {
        let mut s = self.inner.lock();
        if let Some(st) = s.running.get_mut(shard) {
            st.last_ok = Instant::now();
            st.last_error = None;
        }
        if at_tip {
            s.catching_up.remove(shard);
        }
    }

    fn read_failed(&self, shard: &str, error: &str) {
        if let Some(st) = self.inner.lock().running.get_mut(shard) {
            st.last_error = Some(error.to_owned());
        }
    }
}

/// Everything a shard task needs.
struct Ctx {
    clients: Arc<Clients>,
    rooms: Arc<Rooms>,
    metrics: Arc<Metrics>,
    state: Arc<ReaderState>,
    settings: ReaderSettings,
}

/// What shard tasks tell the coordinator.
enum Event {
    /// The shard is closed and fully read; these are its children.
    Drained { shard: String, children: Vec<ShardMeta> },
    /// The shard cannot be found (expired, or the stream was deleted).
    Missing { shard: String },
}

/// A shard as the coordinator tracks it.
struct Node {
    meta: ShardMeta,
    stage: Stage,
    /// Where its task starts.
    start: Start,
}

enum Stage {
    /// Waiting for its parents to drain.
    Waiting,
    /// Its task runs; cancelling the token stops it.
    Running(CancellationToken),
    Drained,
}

/// Starts the coordinator (which starts the shard tasks); everything stops
/// on `shutdown`.
pub fn start(
    clients: Arc<Clients>,
    rooms: Arc<Rooms>,
    metrics: Arc<Metrics>,
    state: Arc<ReaderState>,
    shutdown: CancellationToken,
) {
    let settings = state.settings.clone();
    let ctx = Arc::new(Ctx { clients, rooms, metrics, state, settings });
    tokio::spawn(coordinate(ctx, shutdown));
}

async fn coordinate(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let from = SystemTime::now() - ctx.settings.backfill;
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut task_shards: HashMap<tokio::task::Id, String> = HashMap::new();

    // The first listing: retry until it works (readiness says why not).
    let mut failures = 0;
    let listed = loop {
        match ctx.clients.list_shards().await {
            Ok(shards) => break shards,
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot list the stream's shards; retrying");
                }
                ctx.state.inner.lock().list_error = Some(e.message.clone());
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(error_backoff(failures)) => {}
                }
            }
        }
    };
    let mut nodes: HashMap<String, Node> = HashMap::new();
    {
        let mut s = ctx.state.inner.lock();
        s.listed = true;
        s.list_error = None;
        for m in &listed {
            s.shards.insert(m.id.clone(), m.clone());
            s.catching_up.insert(m.id.clone());
        }
    }
    for m in listed {
        let start = Start::AtTimestamp(from);
        nodes.insert(m.id.clone(), Node { meta: m, stage: Stage::Waiting, start });
    }
    tracing::info!(shards = nodes.len(), backfill = ?ctx.settings.backfill, "reading every shard of the stream");
    let spawn = |nodes: &mut HashMap<String, Node>, tasks: &mut JoinSet<()>, ids: &mut HashMap<_, _>| {
        spawn_ready(&ctx, nodes, tasks, ids, &events_tx, &shutdown)
    };
    spawn(&mut nodes, &mut tasks, &mut task_shards);

    let mut list_tick = tokio::time::interval_at(Instant::now() + ctx.settings.list_every, ctx.settings.list_every);
    list_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gauge_tick = tokio::time::interval(GAUGE_EVERY);
    gauge_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(event) = events.recv() => match event {
                Event::Drained { shard, children } => {
                    tracing::info!(%shard, children = ?children.iter().map(|c| &c.id).collect::<Vec<_>>(), "shard drained");
                    drained(&ctx, &mut nodes, &shard);
                    let mut unknown_parent = false;
                    for c in children {
                        unknown_parent |= c.parents.iter().any(|p| !nodes.contains_key(p));
                        ctx.state.learn(std::slice::from_ref(&c));
                        nodes.entry(c.id.clone()).or_insert(Node { meta: c, stage: Stage::Waiting, start: Start::TrimHorizon });
                    }
                    if unknown_parent {
                        // A merge's other parent we have not seen yet: learn it
                        // before the child may start.
                        relist(&ctx, &mut nodes).await;
                    }
                    spawn(&mut nodes, &mut tasks, &mut task_shards);
                }
                Event::Missing { shard } => {
                    if let Some(listed) = relist(&ctx, &mut nodes).await {
                        if !listed.contains(&shard) {
                            tracing::warn!(%shard, "shard no longer exists (past retention?); moving on to its children");
                            drained(&ctx, &mut nodes, &shard);
                            spawn(&mut nodes, &mut tasks, &mut task_shards);
                        }
                    }
                }
            },
            Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => match joined {
                Ok((id, ())) => { task_shards.remove(&id); }
                Err(e) => {
                    // Never expected: a bug. The shard's stale read time makes
                    // /readyz say so.
                    let shard = task_shards.remove(&e.id()).unwrap_or_default();
                    if e.is_panic() {
                        tracing::error!(%shard, error = %e, "a shard reader task panicked");
                        ctx.state.read_failed(&shard, "the reader task failed");
                    }
                }
            },
            _ = list_tick.tick() => {
                if relist(&ctx, &mut nodes).await.is_some() {
                    spawn(&mut nodes, &mut tasks, &mut task_shards);
                }
            }
            _ = gauge_tick.tick() => refresh_gauges(&ctx),
        }
    }
    tasks.shutdown().await;
}

/// Marks a shard drained and forgets its status and gauges.
fn drained(ctx: &Ctx, nodes: &mut HashMap<String, Node>, shard: &str) {
    if let Some(node) = nodes.get_mut(shard) {
        if let Stage::Running(stop) = &node.stage {
            stop.cancel();
        }
        node.stage = Stage::Drained;
    }
    let mut s = ctx.state.inner.lock();
    s.running.remove(shard);
    s.catching_up.remove(shard);
    drop(s);
    let labels: Labels = vec![("shard".into(), shard.to_owned())];
    ctx.metrics.shard_millis_behind.remove(&labels);
    ctx.metrics.shard_seconds_since_read.remove(&labels);
}

/// Refreshes the shard list; new shards are read from their start. Returns
/// the listed ids, or `None` when the listing failed.
async fn relist(ctx: &Ctx, nodes: &mut HashMap<String, Node>) -> Option<HashSet<String>> {
    match ctx.clients.list_shards().await {
        Ok(shards) => {
            ctx.state.inner.lock().list_error = None;
            ctx.state.learn(&shards);
            let ids = shards.iter().map(|m| m.id.clone()).collect();
            for m in shards {
                if !nodes.contains_key(&m.id) {
                    tracing::info!(shard = %m.id, parents = ?m.parents, "new shard");
                    nodes.insert(m.id.clone(), Node { meta: m, stage: Stage::Waiting, start: Start::TrimHorizon });
                }
            }
            Some(ids)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot refresh the shard list");
            ctx.state.inner.lock().list_error = Some(e.message);
            None
        }
    }
}

/// Starts every waiting shard whose parents are all drained (or gone).
fn spawn_ready(
    ctx: &Arc<Ctx>,
    nodes: &mut HashMap<String, Node>,
    tasks: &mut JoinSet<()>,
    task_shards: &mut HashMap<tokio::task::Id, String>,
    events: &mpsc::Sender<Event>,
    shutdown: &CancellationToken,
) {
    let ready: Vec<String> = nodes
        .values()
        .filter(|n| matches!(n.stage, Stage::Waiting))
        .filter(|n| {
            n.meta.parents.iter().all(|p| match nodes.get(p) {
                Some(parent) => matches!(parent.stage, Stage::Drained),
                // Not in the listing: past retention, nothing left to read.
                None => true,
            })
        })
        .map(|n| n.meta.id.clone())
        .collect();
    for id in ready {
        let Some(node) = nodes.get_mut(&id) else { continue };
        let stop = shutdown.child_token();
        node.stage = Stage::Running(stop.clone());
        ctx.state
            .inner
            .lock()
            .running
            .insert(id.clone(), ShardStatus { last_ok: Instant::now(), last_error: None });
        let handle = tasks.spawn(read_shard(ctx.clone(), id.clone(), node.start.clone(), events.clone(), stop));
        task_shards.insert(handle.id(), id);
    }
}

fn refresh_gauges(ctx: &Ctx) {
    let s = ctx.state.inner.lock();
    for (id, st) in &s.running {
        let labels: Labels = vec![("shard".into(), id.clone())];
        ctx.metrics.shard_seconds_since_read.get_or_create(&labels).set(st.last_ok.elapsed().as_secs_f64());
    }
}

/// Reads one shard until it is drained or `stop` is cancelled.
async fn read_shard(ctx: Arc<Ctx>, shard: String, start: Start, events: mpsc::Sender<Event>, stop: CancellationToken) {
    let labels: Labels = vec![("shard".into(), shard.clone())];
    let throttle_labels: Labels = vec![("op".into(), "GetRecords".into())];
    let mut last_seq: Option<String> = None;
    let mut iterator: Option<String> = None;
    let mut interval = ctx.settings.poll;
    let mut failures: u32 = 0;
    let mut next_call = Instant::now();
    tracing::debug!(%shard, ?start, "reading shard");

    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next_call) => {}
        }
        let it = match iterator.take() {
            Some(it) => it,
            None => {
                let from = match &last_seq {
                    Some(seq) => Start::AfterSequence(seq.clone()),
                    None => start.clone(),
                };
                let got = shard_iterator(&ctx.clients, &shard, &from).await;
                match &got {
                    Ok(_) => ctx.clients.reach.answered(),
                    Err(e) => ctx.clients.reach.failed(e),
                }
                match got {
                    Ok(Some(it)) => it,
                    Ok(None) => {
                        // No iterator: the shard is closed and read to its end.
                        let children = ctx.state.children(&shard);
                        let _closing = events.send(Event::Drained { shard, children }).await;
                        return;
                    }
                    Err(e) => {
                        failures += 1;
                        if e.kind == Failure::Throttled {
                            ctx.metrics.throttled.get_or_create(&vec![("op".into(), "GetShardIterator".into())]).inc();
                        }
                        if e.kind == Failure::NotFound && failures >= 2 {
                            let _closing = events.send(Event::Missing { shard: shard.clone() }).await;
                        }
                        note_failure(&ctx, &shard, &e, failures, "GetShardIterator");
                        next_call = Instant::now() + error_backoff(failures).max(interval);
                        continue;
                    }
                }
            }
        };

        let called_at = Instant::now();
        let result = ctx.clients.data.get_records().shard_iterator(&it).limit(RECORDS_PER_CALL).send().await;
        match result {
            Ok(out) => {
                ctx.clients.reach.answered();
                if failures > 0 {
                    tracing::info!(%shard, "shard reads again");
                }
                failures = 0;
                for record in out.records() {
                    let seq = record.sequence_number();
                    publish(&ctx, &shard, seq, record.data().as_ref());
                    last_seq = Some(seq.to_owned());
                }
                let behind = out.millis_behind_latest().unwrap_or(0);
                ctx.metrics.shard_millis_behind.get_or_create(&labels).set(behind as f64);
                ctx.metrics.shard_seconds_since_read.get_or_create(&labels).set(0.0);
                ctx.state.read_ok(&shard, behind == 0 && out.records().len() < RECORDS_PER_CALL as usize);
                // Shrink slowly back towards the base rate.
                interval = (interval.mul_f64(0.95)).max(ctx.settings.poll);
                match out.next_shard_iterator() {
                    Some(next) => iterator = Some(next.to_owned()),
                    None => {
                        let mut children: Vec<ShardMeta> = out
                            .child_shards()
                            .iter()
                            .map(|c| {
                                let r = c.hash_key_range();
                                ShardMeta {
                                    id: c.shard_id().to_owned(),
                                    parents: c.parent_shards().to_vec(),
                                    hash_start: r.map(|r| r.starting_hash_key().parse().unwrap_or(0)).unwrap_or(0),
                                    hash_end: r
                                        .map(|r| r.ending_hash_key().parse().unwrap_or(u128::MAX))
                                        .unwrap_or(u128::MAX),
                                }
                            })
                            .collect();
                        if children.is_empty() {
                            children = ctx.state.children(&shard);
                        }
                        let _closing = events.send(Event::Drained { shard, children }).await;
                        return;
                    }
                }
                next_call = called_at + interval;
            }
            Err(e) => {
                let e = CallError::from_sdk(e);
                ctx.clients.reach.failed(&e);
                match e.kind {
                    Failure::Throttled => {
                        ctx.metrics.throttled.get_or_create(&throttle_labels).inc();
                        ctx.state.read_failed(&shard, &e.message);
                        interval = (interval.mul_f64(1.5)).min(ctx.settings.max_poll);
                        tracing::debug!(%shard, ?interval, "GetRecords throttled; slowing down");
                        iterator = Some(it);
                        next_call = Instant::now() + interval;
                    }
                    Failure::ExpiredIterator => {
                        // A fresh iterator right after the last record read.
                        tracing::info!(%shard, "shard iterator expired; resuming after the last record read");
                        next_call = called_at + interval;
                    }
                    Failure::Timeout | Failure::Unreachable => {
                        failures += 1;
                        note_failure(&ctx, &shard, &e, failures, "GetRecords");
                        iterator = Some(it);
                        next_call = Instant::now() + error_backoff(failures).max(interval);
                    }
                    _ => {
                        // The iterator may be what is wrong (the emulator
                        // answers a bad one with a bare 500): get a new one.
                        failures += 1;
                        note_failure(&ctx, &shard, &e, failures, "GetRecords");
                        next_call = Instant::now() + error_backoff(failures).max(interval);
                    }
                }
            }
        }
    }
}

fn note_failure(ctx: &Ctx, shard: &str, e: &CallError, failures: u32, op: &str) {
    ctx.state.read_failed(shard, &e.message);
    // One line when trouble starts, then one every 20 failures.
    if failures == 1 || failures.is_multiple_of(20) {
        tracing::warn!(%shard, error = %e, failures, "{op} failed; retrying with backoff");
    }
}

/// Decodes one record and publishes its messages, in order, into the hub.
fn publish(ctx: &Ctx, shard: &str, seq: &str, data: &[u8]) {
    for (sub, item) in decode_record(data).into_iter().enumerate() {
        match item {
            Item::Message(message) => {
                let pos = Position::Kinesis { shard: shard.to_owned(), seq: seq.to_owned(), sub: sub as u32 };
                ctx.rooms.publish(pos, message);
            }
            Item::Skip(reason) => {
                tracing::warn!(%shard, %seq, sub, reason, "skipping a stream record that is not a chat message");
                ctx.metrics.skip_record(reason);
            }
        }
    }
}

/// A shard iterator for `start`; `None` when the shard has nothing more.
pub async fn shard_iterator(clients: &Clients, shard: &str, start: &Start) -> Result<Option<String>, CallError> {
    let request = clients.data.get_shard_iterator().stream_name(&clients.stream).shard_id(shard);
    let request = match start {
        Start::AtTimestamp(t) => {
            request.shard_iterator_type(ShardIteratorType::AtTimestamp).timestamp(DateTime::from(*t))
        }
        Start::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        Start::AfterSequence(seq) => request
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq),
        Start::AtSequence(seq) => {
            request.shard_iterator_type(ShardIteratorType::AtSequenceNumber).starting_sequence_number(seq)
        }
    };
    let out = request.send().await.map_err(CallError::from_sdk)?;
    Ok(out.shard_iterator().map(str::to_owned))
}

/// Delay after `failures` failed calls in a row: exponential, jittered.
pub fn error_backoff(failures: u32) -> Duration {
    let exp = ERROR_BACKOFF_BASE.saturating_mul(1 << failures.min(10).saturating_sub(1));
    let cap = exp.min(ERROR_BACKOFF_MAX).as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
}
