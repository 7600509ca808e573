//! `loadgen`: kinesis-chat's load generator (driven by `bench/run`).
//!
//! `loadgen run` opens many WebSocket subscribers to one room of one server
//! (kinesis-chat or the Socket.IO peer), posts to that room at a fixed rate
//! or as fast as the subscribers take messages in, and writes what it
//! measured as JSON: deliveries/s, POST→receive latency (sampled), errors,
//! and the server process's CPU time and resident memory from `/proc`.
//! `loadgen merge` adds up the results of processes that ran side by side
//! (one per server process, each under the 20,000 open-files limit);
//! `loadgen table` prints the side-by-side Markdown table.
//!
//! Files: `subscriber.rs` (both WebSocket protocols), `poster.rs` (HTTP),
//! `proc_stat.rs` (`/proc`), `report.rs` (results, merge, tables).

mod poster;
mod proc_stat;
mod report;
mod subscriber;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use report::RunResult;
use subscriber::{Proto, Shared, Target};

/// Time allowed for the drain after posting stops: late deliveries still
/// count for latency and loss, but a run never hangs on a lost message.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "kinesis-chat's load generator (see bench/run)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect subscribers, post, measure; write the result as JSON.
    Run(RunArgs),
    /// Add up results of load generators that ran at the same time.
    Merge {
        /// Where to write the merged result.
        #[arg(long)]
        out: PathBuf,
        files: Vec<PathBuf>,
    },
    /// Exit 0 if a result held every socket, lost nothing and kept p99
    /// under the limit (the capacity workload's pass mark); say why not.
    Check {
        #[arg(long)]
        max_p99_ms: f64,
        file: PathBuf,
    },
    /// Print a Markdown table comparing systems, one column each.
    Table {
        #[arg(long)]
        title: String,
        /// Comma-separated result fields, one row each.
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
        /// `NAME=file1.json,file2.json` (one file per round); give two for a ratio column.
        #[arg(long = "system")]
        systems: Vec<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Which protocol the server speaks.
    #[arg(long, value_enum)]
    proto: Proto,
    /// The server's base URL, `http://127.0.0.1:PORT`.
    #[arg(long)]
    url: String,
    /// Room to join and post to (use a fresh one per run: no history).
    #[arg(long, default_value = "bench")]
    room: String,
    /// Subscribers to open.
    #[arg(long, default_value_t = 1000)]
    subs: u64,
    /// Comma-separated source addresses (127.0.0.x), used round-robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Subscribers connecting at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Give up waiting for subscribers to connect after this long.
    #[arg(long, default_value_t = 120.0)]
    connect_timeout_s: f64,
    /// Wait after connecting, before measuring memory and posting.
    #[arg(long, default_value_t = 1.0)]
    settle_s: f64,
    /// After posting stops, keep the subscribers at least this long (when
    /// other processes post to the same room, their last messages still
    /// count); the usual drain (up to 5 s, until this process's own posts
    /// have arrived everywhere) follows.
    #[arg(long, default_value_t = 0.0)]
    min_drain_s: f64,
    /// Messages per second, `max` (as fast as the window allows) or 0 (none).
    #[arg(long, default_value = "max")]
    rate: String,
    /// In `max` mode: most messages not yet delivered to every subscriber.
    #[arg(long, default_value_t = 32)]
    window: u64,
    /// In `max` mode: concurrent POST connections.
    #[arg(long, default_value_t = 4)]
    posters: usize,
    /// Filler characters in each message text.
    #[arg(long, default_value_t = 64)]
    pad: usize,
    /// Posting before the measured window starts.
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Length of the measured window.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Time every n-th message of each subscriber.
    #[arg(long, default_value_t = 8)]
    sample_every: u64,
    /// Server process(es) whose CPU time and memory to read from /proc.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// WebSocket read buffer per subscriber, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Name for the result (e.g. the system's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Write the result here as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => {
            // Every run ends: a watchdog outlives any phase by a margin.
            let limit = args.connect_timeout_s + args.settle_s + args.warmup_s + args.duration_s + args.min_drain_s + 60.0;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs_f64(limit));
                eprintln!("loadgen: still running after {limit:.0} s; giving up");
                std::process::exit(3);
            });
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads.max(1))
                .enable_all()
                .build()?;
            let result = rt.block_on(run(&args))?;
            eprintln!("loadgen: {}", result.summary());
            if let Some(out) = &args.out {
                result.save(out)?;
            }
            // Subscriber tasks may still be closing; do not wait for them.
            rt.shutdown_timeout(Duration::from_millis(500));
            Ok(())
        }
        Command::Merge { out, files } => {
            let parts = files.iter().map(|f| RunResult::load(f)).collect::<anyhow::Result<Vec<_>>>()?;
            let merged = report::merge(&parts);
            eprintln!("loadgen: merged {}", merged.summary());
            merged.save(&out)
        }
        Command::Check { max_p99_ms, file } => {
            let r = RunResult::load(&file)?;
            let mut why = Vec::new();
            if r.subs_connected < r.subs_requested {
                why.push(format!("{} of {} sockets connected", r.subs_connected, r.subs_requested));
            }
            if r.latency_samples == 0 {
                why.push("no latency samples".to_string());
            } else if r.p99_ms >= max_p99_ms {
                why.push(format!("p99 {:.0} ms", r.p99_ms));
            }
            if r.deliveries_lost > 0 {
                why.push(format!("{} deliveries lost", r.deliveries_lost));
            }
            if r.slow_consumer_closes + r.other_closes > 0 {
                why.push(format!("{} sockets closed", r.slow_consumer_closes + r.other_closes));
            }
            if r.posts_failed > 0 {
                why.push(format!("{} POSTs failed", r.posts_failed));
            }
            if why.is_empty() {
                println!("pass");
                Ok(())
            } else {
                println!("fail: {}", why.join(", "));
                std::process::exit(1);
            }
        }
        Command::Table { title, metrics, systems } => {
            let mut columns = Vec::new();
            for s in &systems {
                let (name, files) = s.split_once('=').context("--system wants NAME=file,file")?;
                let rounds = files
                    .split(',')
                    .filter(|f| !f.is_empty())
                    .map(|f| RunResult::load(f.as_ref()))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                columns.push((name.to_string(), rounds));
            }
            print!("{}", report::table(&title, &metrics, &columns));
            Ok(())
        }
    }
}

fn server_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.strip_prefix("http://").context("--url must start with http://")?;
    let host_port = rest.split('/').next().unwrap_or(rest);
    host_port.parse().with_context(|| format!("--url needs an IP:PORT, got {host_port}"))
}

async fn run(args: &RunArgs) -> anyhow::Result<RunResult> {
    let server = server_addr(&args.url)?;
    if args.sources.is_empty() {
        bail!("--sources is empty");
    }
    let rate = match args.rate.as_str() {
        "max" => Some(None),
        r => {
            let r: f64 = r.parse().context("--rate must be a number, `max` or 0")?;
            (r > 0.0).then_some(Some(r))
        }
    };
    let cpu_self_0 = proc_stat::self_cpu_seconds();
    let sample = || proc_stat::sample_all(&args.server_pids).unwrap_or_default();
    let start = sample();

    let target = Arc::new(Target {
        proto: args.proto,
        server,
        room: args.room.clone(),
        sample_every: args.sample_every.max(1),
        read_buffer: args.read_buffer,
    });
    let shared = Arc::new(Shared::new());
    // Each subscriber's stop signal and task, to end them at the end.
    type Stops = Vec<(tokio::sync::oneshot::Sender<()>, tokio::task::AbortHandle)>;
    let tasks: Arc<std::sync::Mutex<Stops>> = Arc::default();

    // Connect phase: at most `connect_concurrency` handshakes in flight.
    let connect_started = Instant::now();
    let connect_limit = Duration::from_secs_f64(args.connect_timeout_s);
    let spawner = {
        let (target, shared, sources) = (target.clone(), shared.clone(), args.sources.clone());
        let (n, concurrency) = (args.subs, args.connect_concurrency.max(1));
        let tasks = tasks.clone();
        tokio::spawn(async move {
            let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
            for i in 0..n {
                if connect_started.elapsed() > connect_limit {
                    break;
                }
                let Ok(permit) = gate.clone().acquire_owned().await else { break };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let source = sources[(i as usize) % sources.len()];
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(subscriber::run(target.clone(), source, shared.clone(), tx, stop_rx));
                if let Ok(mut t) = tasks.lock() {
                    t.push((stop_tx, task.abort_handle()));
                }
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
                    drop(permit);
                });
            }
        })
    };
    let connected = loop {
        let live = shared.live.load(Ordering::Relaxed);
        let failed = shared.connect_failures.load(Ordering::Relaxed);
        if live + failed >= args.subs || connect_started.elapsed() >= connect_limit {
            break live;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    spawner.abort();
    let connect_s = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {connected}/{} subscribers live after {connect_s:.1} s ({} failed)",
        args.subs,
        shared.connect_failures.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs_f64(args.settle_s)).await;
    let connected_sample = sample();

    // Posting, warm-up, measured window, drain.
    let stats = Arc::new(poster::Stats::default());
    let (stop_post, stop_post_rx) = tokio::sync::watch::channel(false);
    let poster = rate.filter(|_| connected > 0).map(|rate| {
        let cfg = poster::Config {
            url: format!("{}/api/messages", args.url.trim_end_matches('/')),
            room: args.room.clone(),
            rate,
            window: args.window,
            concurrency: args.posters,
            pad: args.pad,
        };
        tokio::spawn(poster::run(cfg, shared.clone(), stats.clone(), stop_post_rx))
    });
    if poster.is_some() {
        tokio::time::sleep(Duration::from_secs_f64(args.warmup_s)).await;
    }
    shared.record_since_us.store(subscriber::now_us(), Ordering::Relaxed);
    shared.recording.store(true, Ordering::Relaxed);
    let d0 = shared.deliveries.load(Ordering::Relaxed);
    let c0 = sample();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration_s)).await;
    let d1 = shared.deliveries.load(Ordering::Relaxed);
    let c1 = sample();
    let window_s = t0.elapsed().as_secs_f64();
    let _ = stop_post.send(true);
    if let Some(p) = poster {
        let _ = tokio::time::timeout(Duration::from_secs(15), p).await;
        tokio::time::sleep(Duration::from_secs_f64(args.min_drain_s)).await;
        let drain_until = Instant::now() + DRAIN;
        while Instant::now() < drain_until {
            let expected = stats.ok.load(Ordering::Relaxed) * shared.live.load(Ordering::Relaxed);
            if shared.deliveries.load(Ordering::Relaxed) >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let end = sample();
    // Stop the subscribers (each merges its last samples), then abort
    // whatever has not ended.
    let stops = tasks.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
    let mut aborts = Vec::with_capacity(stops.len());
    for (stop, task) in stops {
        let _ = stop.send(()); // an ended subscriber has dropped its receiver
        aborts.push(task);
    }
    let wind_down = Instant::now() + Duration::from_secs(2);
    while Instant::now() < wind_down && aborts.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    aborts.iter().for_each(|t| t.abort());
    shared.recording.store(false, Ordering::Relaxed);

    let posts_ok = stats.ok.load(Ordering::Relaxed);
    let deliveries_total = shared.deliveries.load(Ordering::Relaxed);
    let in_window = d1 - d0;
    let cpu = c1.cpu_s - c0.cpu_s;
    let mut r = RunResult {
        label: args.label.clone(),
        proto: format!("{:?}", args.proto).to_lowercase(),
        processes: 1,
        subs_requested: args.subs,
        subs_connected: connected,
        connect_failures: shared.connect_failures.load(Ordering::Relaxed),
        connect_s,
        window_s,
        posts_ok,
        posts_failed: stats.failed.load(Ordering::Relaxed),
        posts_rate_limited: stats.rate_limited.load(Ordering::Relaxed),
        deliveries_in_window: in_window,
        deliveries_per_s: in_window as f64 / window_s,
        deliveries_total,
        deliveries_expected: posts_ok * connected,
        deliveries_lost: (posts_ok * connected).saturating_sub(deliveries_total),
        slow_consumer_closes: shared.slow_consumer_closes.load(Ordering::Relaxed),
        other_closes: shared.other_closes.load(Ordering::Relaxed),
        server_cpu_s: cpu,
        server_cores: cpu / window_s,
        server_cpu_us_per_delivery: if in_window > 0 { cpu * 1e6 / in_window as f64 } else { 0.0 },
        server_rss_start_kib: start.rss_kib,
        server_rss_connected_kib: connected_sample.rss_kib,
        server_rss_end_kib: end.rss_kib,
        rss_per_socket_kib: if connected > 0 {
            connected_sample.rss_kib.saturating_sub(start.rss_kib) as f64 / connected as f64
        } else {
            0.0
        },
        loadgen_cpu_s: proc_stat::self_cpu_seconds() - cpu_self_0,
        ..Default::default()
    };
    r.rss_per_socket_kib_each = vec![r.rss_per_socket_kib];
    if let Ok(h) = shared.latency.lock() {
        r.set_latency(&h);
    }
    Ok(r)
}
