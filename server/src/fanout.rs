//! Fan-out: getting one published message onto every socket of its room.
//!
//! Each socket has an [`Outlet`]: its TCP stream and a queue of frames not
//! yet written. A fixed set of fan-out workers (one per runtime thread)
//! each owns a share of all sockets. [`Fanout::publish`] hands the entry
//! to every worker; a worker writes the pre-encoded frame straight into
//! each of its sockets with a non-blocking `send()` and moves on. Only a
//! socket whose kernel buffer is full gets frames queued and its session
//! task woken to finish the write when the socket drains, so in the common
//! case a message costs one system call per socket and no task wake-ups,
//! spread over every core. One worker per socket keeps each socket's
//! frames in publish order.
//!
//! A socket more than `limit` frames behind is marked slow and its session
//! closes it with 4008; a worker that itself falls more than `limit`
//! publishes behind (the machine is out of CPU) marks all of its sockets
//! slow the same way, so memory stays bounded and clients resume with
//! `since`.

use crate::metrics::Metrics;
use crate::rooms::Entry;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

/// Most frames handed to one `writev`.
const MAX_IOV: usize = 64;
/// Writes a worker makes before it yields its thread to other tasks.
const WRITES_PER_YIELD: usize = 512;
/// A pass over the sockets this long means the worker is under load.
const BUSY_PASS: std::time::Duration = std::time::Duration::from_micros(200);

/// One frame waiting in an outlet's queue.
#[derive(Clone)]
pub enum Frame {
    /// A chat message, encoded once for every socket.
    Entry(Arc<Entry>),
    /// A pong: at most one waits at a time (see [`Outlet::push_pong`]).
    Pong(Bytes),
    /// Anything else (ready, reset, ping, heartbeat, close).
    Bytes(Bytes),
}

impl Frame {
    fn wire(&self) -> &[u8] {
        match self {
            Frame::Entry(e) => &e.wire,
            Frame::Pong(b) | Frame::Bytes(b) => b,
        }
    }
}

/// How an outlet stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    /// Fell too far behind: close with 4008.
    Slow,
    /// A write failed: the peer is gone.
    Gone,
}

struct State {
    status: Status,
    /// `Some` while live messages must wait for the session (it is still
    /// sending the backlog, or filters live frames itself).
    held: Option<Vec<Arc<Entry>>>,
    /// Frames not yet (fully) written, in order.
    queue: VecDeque<Frame>,
    /// Bytes of `queue.front()` already written.
    offset: usize,
    /// A close frame is queued: nothing may follow it on the wire.
    closing: bool,
}

/// One socket's write side, shared by its session and a fan-out worker.
pub struct Outlet {
    pub id: u64,
    pub stream: TcpStream,
    limit: usize,
    state: Mutex<State>,
    /// Wakes the session: frames to flush, held entries, or a new status.
    pub wake: Notify,
}

impl Outlet {
    /// A new outlet that holds live messages until [`Outlet::release`].
    pub fn new(stream: TcpStream, limit: usize) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Arc::new(Outlet {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            limit: limit.max(1),
            state: Mutex::new(State { status: Status::Open, held: Some(Vec::new()), queue: VecDeque::new(), offset: 0, closing: false }),
            wake: Notify::new(),
        })
    }

    pub fn status(&self) -> Status {
        self.state.lock().status
    }

    /// Marks the outlet slow (or gone) and wakes its session.
    pub fn fail(&self, status: Status) {
        let mut st = self.state.lock();
        if st.status == Status::Open {
            st.status = status;
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Offers live entries from a fan-out worker: written at once when
    /// nothing is queued, else queued for the session. Returns how many
    /// were taken (written or queued).
    fn offer(&self, entries: &[Arc<Entry>]) -> usize {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.status != Status::Open || st.closing {
            return 0;
        }
        let wake = if let Some(held) = &mut st.held {
            held.extend(entries.iter().cloned());
            if held.len() > self.limit {
                st.status = Status::Slow;
            }
            true
        } else if st.queue.is_empty() {
            match self.write_direct(entries) {
                Ok(written) if written.0 == entries.len() => false,
                Ok((whole, offset)) => {
                    st.queue.extend(entries[whole..].iter().cloned().map(Frame::Entry));
                    st.offset = offset;
                    true
                }
                Err(_) => {
                    st.status = Status::Gone;
                    true
                }
            }
        } else {
            st.queue.extend(entries.iter().cloned().map(Frame::Entry));
            if st.queue.len() > self.limit {
                st.status = Status::Slow;
            }
            true
        };
        drop(guard);
        if wake {
            self.wake.notify_one();
        }
        entries.len()
    }

    /// Writes entries with one system call: (entries fully written, bytes
    /// of the next one written).
    fn write_direct(&self, entries: &[Arc<Entry>]) -> io::Result<(usize, usize)> {
        let n = match entries {
            [one] => self.stream.try_write(&one.wire),
            many => {
                let slices: Vec<IoSlice<'_>> = many.iter().take(MAX_IOV).map(|e| IoSlice::new(&e.wire)).collect();
                self.stream.try_write_vectored(&slices)
            }
        };
        let mut n = match n {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let mut whole = 0;
        for e in entries {
            if n < e.wire.len() {
                break;
            }
            n -= e.wire.len();
            whole += 1;
        }
        Ok((whole, n))
    }

    /// Queues frames from the session itself (backlog, ready, pings).
    /// Call [`Outlet::flush`] afterwards.
    pub fn push(&self, frames: impl IntoIterator<Item = Frame>) {
        self.state.lock().queue.extend(frames);
    }

    /// Drops every queued frame not yet begun (a partly written frame
    /// stays, so the stream remains well-formed), then queues `last`, the
    /// close frame: from then on the fan-out offers this outlet nothing.
    pub fn replace_queue(&self, last: Bytes) {
        let mut st = self.state.lock();
        let keep = usize::from(st.offset > 0);
        st.queue.truncate(keep);
        st.queue.push_back(Frame::Bytes(last));
        st.held = None;
        st.closing = true;
    }

    /// Moves the live entries held so far into the queue, minus those
    /// `keep` rejects, in one step so no later entry can overtake them.
    /// With `keep_holding` the outlet goes on holding (the session filters
    /// live entries itself); without, later entries go straight to the
    /// socket. Call [`Outlet::flush`] after.
    pub fn release(&self, keep_holding: bool, mut keep: impl FnMut(&Entry) -> bool) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let held = if keep_holding { st.held.as_mut().map(std::mem::take) } else { st.held.take() };
        st.queue.extend(held.into_iter().flatten().filter(|e| keep(e)).map(Frame::Entry));
    }

    /// Writes what the queue holds as far as the socket takes it now.
    /// `Ok(true)`: all written; `Ok(false)`: the socket is full.
    fn try_flush(&self) -> io::Result<bool> {
        let mut st = self.state.lock();
        loop {
            if st.queue.is_empty() {
                return Ok(true);
            }
            let offset = st.offset;
            let slices: Vec<IoSlice<'_>> = st
                .queue
                .iter()
                .take(MAX_IOV)
                .enumerate()
                .map(|(i, f)| IoSlice::new(if i == 0 { &f.wire()[offset..] } else { f.wire() }))
                .collect();
            let mut n = match self.stream.try_write_vectored(&slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    st.status = Status::Gone;
                    return Err(e);
                }
            };
            drop(slices);
            while n > 0 {
                let left = st.queue.front().map_or(0, |f| f.wire().len()) - st.offset;
                if n >= left {
                    n -= left;
                    st.queue.pop_front();
                    st.offset = 0;
                } else {
                    st.offset += n;
                    n = 0;
                }
            }
        }
    }

    /// Writes the whole queue, waiting for the socket to drain as needed.
    pub async fn flush(&self) -> io::Result<()> {
        while !self.try_flush()? {
            self.stream.writable().await?;
        }
        Ok(())
    }

    /// Gives back the queue's memory once it is empty (after the backlog:
    /// an idle socket should not keep room for a hundred frames).
    pub fn shrink(&self) {
        let mut st = self.state.lock();
        if st.queue.is_empty() {
            st.queue = VecDeque::new();
        }
        if let Some(held) = &mut st.held {
            held.shrink_to_fit();
        }
    }

    /// Queues a pong, replacing one still waiting unbegun: only the newest
    /// ping needs an answer, so pongs never pile up. Call
    /// [`Outlet::flush`] afterwards.
    pub fn push_pong(&self, pong: Bytes) {
        let mut st = self.state.lock();
        let begun = usize::from(st.offset > 0);
        let waiting = st.queue.iter().skip(begun).position(|f| matches!(f, Frame::Pong(_)));
        match waiting {
            Some(i) => st.queue[begun + i] = Frame::Pong(pong),
            None => st.queue.push_back(Frame::Pong(pong)),
        }
    }

    /// Whether frames are waiting to be written.
    pub fn has_queued(&self) -> bool {
        !self.state.lock().queue.is_empty()
    }
}

enum Command {
    Join { room: Arc<str>, outlet: Arc<Outlet> },
    Leave { room: Arc<str>, id: u64 },
    Publish(Arc<Entry>),
}

struct Worker {
    tx: mpsc::UnboundedSender<Command>,
    /// Commands sent but not yet taken by the worker.
    depth: Arc<AtomicUsize>,
}

/// The fan-out workers, started on first use (they need a runtime).
pub struct Fanout {
    limit: usize,
    metrics: Arc<Metrics>,
    workers: OnceLock<Vec<Worker>>,
}

impl Fanout {
    /// `limit`: frames a socket (or a worker) may fall behind.
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Self {
        Self { limit: limit.max(1), metrics, workers: OnceLock::new() }
    }

    fn workers(&self) -> &[Worker] {
        self.workers.get_or_init(|| {
            let n = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 16);
            (0..n)
                .map(|_| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let depth = Arc::new(AtomicUsize::new(0));
                    tokio::spawn(run_worker(rx, depth.clone(), self.limit, self.metrics.clone()));
                    Worker { tx, depth }
                })
                .collect()
        })
    }

    fn send(&self, worker: &Worker, command: Command) {
        worker.depth.fetch_add(1, Ordering::Relaxed);
        // The workers live as long as the runtime; after it, nothing listens.
        let _ = worker.tx.send(command);
    }

    /// Adds a socket to a room. Callers order this against `publish` (the
    /// hub calls both under its lock).
    pub fn join(&self, room: &str, outlet: Arc<Outlet>) {
        let workers = self.workers();
        let w = &workers[outlet.id as usize % workers.len()];
        self.send(w, Command::Join { room: room.into(), outlet });
    }

    /// Removes a socket from a room.
    pub fn leave(&self, room: &str, outlet: &Outlet) {
        let Some(workers) = self.workers.get() else { return };
        let w = &workers[outlet.id as usize % workers.len()];
        self.send(w, Command::Leave { room: room.into(), id: outlet.id });
    }

    /// Sends an entry to every socket of its room.
    pub fn publish(&self, entry: &Arc<Entry>) {
        // No worker yet means no socket has ever joined.
        let Some(workers) = self.workers.get() else { return };
        for w in workers {
            self.send(w, Command::Publish(entry.clone()));
        }
    }
}

/// One room's sockets on one worker: a dense list plus positions by id.
#[derive(Default)]
struct Members {
    outlets: Vec<Arc<Outlet>>,
    index: HashMap<u64, usize>,
}

impl Members {
    fn insert(&mut self, outlet: Arc<Outlet>) {
        self.index.insert(outlet.id, self.outlets.len());
        self.outlets.push(outlet);
    }

    fn remove(&mut self, id: u64) {
        let Some(i) = self.index.remove(&id) else { return };
        self.outlets.swap_remove(i);
        if let Some(moved) = self.outlets.get(i) {
            self.index.insert(moved.id, i);
        }
    }
}

async fn run_worker(
    mut rx: mpsc::UnboundedReceiver<Command>,
    depth: Arc<AtomicUsize>,
    limit: usize,
    metrics: Arc<Metrics>,
) {
    let mut rooms: HashMap<Arc<str>, Members> = HashMap::new();
    let mut commands: Vec<Command> = Vec::with_capacity(MAX_IOV);
    let mut batch: Vec<Arc<Entry>> = Vec::with_capacity(MAX_IOV);
    // Whether the last pass was long (many sockets or many frames): then
    // more messages are probably on their way.
    let mut busy = false;
    loop {
        commands.clear();
        if rx.recv_many(&mut commands, MAX_IOV).await == 0 {
            return;
        }
        if busy {
            // Let the tasks that bring the next messages (POSTs, the
            // backend) run first, so what they publish joins this pass:
            // under load each socket then gets fewer, larger writes.
            tokio::task::yield_now().await;
            while commands.len() < MAX_IOV {
                match rx.try_recv() {
                    Ok(c) => commands.push(c),
                    Err(_) => break,
                }
            }
        }
        let pass = std::time::Instant::now();
        let behind = depth.fetch_sub(commands.len(), Ordering::Relaxed) - commands.len();
        if behind > limit {
            // Out of CPU: every socket here is more than `limit` behind.
            tracing::warn!(behind, "fan-out worker overrun; closing its sockets as slow consumers");
            for members in rooms.values() {
                for o in &members.outlets {
                    o.fail(Status::Slow);
                }
            }
        }
        let mut writes = 0;
        let mut i = 0;
        while i < commands.len() {
            match &commands[i] {
                Command::Join { room, outlet } => rooms.entry(room.clone()).or_default().insert(outlet.clone()),
                Command::Leave { room, id } => {
                    if let Some(m) = rooms.get_mut(room) {
                        m.remove(*id);
                        if m.outlets.is_empty() {
                            rooms.remove(room);
                        }
                    }
                }
                Command::Publish(first) => {
                    // Consecutive messages for one room go out together.
                    batch.clear();
                    batch.push(first.clone());
                    while let Some(Command::Publish(next)) = commands.get(i + 1) {
                        if next.message.room != first.message.room {
                            break;
                        }
                        batch.push(next.clone());
                        i += 1;
                    }
                    if let Some(members) = rooms.get(first.message.room.as_str()) {
                        let mut delivered = 0;
                        for o in &members.outlets {
                            delivered += o.offer(&batch);
                            writes += 1;
                            if writes % WRITES_PER_YIELD == 0 {
                                tokio::task::yield_now().await;
                            }
                        }
                        metrics.deliveries.inc_by(delivered as u64);
                    }
                }
            }
            i += 1;
        }
        busy = pass.elapsed() >= BUSY_PASS;
    }
}
