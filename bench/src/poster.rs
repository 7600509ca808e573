//! Posters: `POST /api/messages` over keep-alive HTTP, at a fixed rate or
//! as fast as the subscribers take the messages in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::subscriber::{now_us, Shared, MARKER};

/// Most POSTs in flight at a fixed rate; past it the rate falls behind
/// rather than the load generator piling up requests.
const MAX_IN_FLIGHT: usize = 256;
/// A POST that takes longer is an error, not a hang.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Config {
    /// `http://127.0.0.1:PORT/api/messages`
    pub url: String,
    pub room: String,
    /// Messages per second; `None` posts as fast as the window allows.
    pub rate: Option<f64>,
    /// In "max" mode: most messages posted but not yet delivered to every
    /// live subscriber of this process. Keeps the server saturated without
    /// letting its queues grow until it drops slow consumers.
    pub window: u64,
    /// In "max" mode: concurrent posting connections.
    pub concurrency: usize,
    /// Filler characters after the marker, so frames have a realistic size.
    pub pad: usize,
}

#[derive(Default)]
pub struct Stats {
    /// POSTs started (the window counts these).
    pub started: AtomicU64,
    /// 200/201 answers.
    pub ok: AtomicU64,
    /// Other answers and transport errors.
    pub failed: AtomicU64,
    /// 429 answers (also counted in `failed`): the server's rate limit.
    pub rate_limited: AtomicU64,
}

pub async fn run(cfg: Config, subs: Arc<Shared>, stats: Arc<Stats>, mut stop: watch::Receiver<bool>) {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(POST_TIMEOUT)
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()
        .expect("a plain-HTTP reqwest client always builds");
    let pad = "x".repeat(cfg.pad);
    let poster = Arc::new(Poster { client, url: cfg.url, room: cfg.room, pad, stats });
    match cfg.rate {
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tick.tick() => {}
                }
                let Ok(permit) = limit.clone().acquire_owned().await else { break };
                let poster = poster.clone();
                tokio::spawn(async move {
                    poster.post_one().await;
                    drop(permit);
                });
            }
            // Let the POSTs in flight finish, so the caller's count of
            // accepted messages is final (each has its own timeout).
            let _ = tokio::time::timeout(POST_TIMEOUT, limit.acquire_many(MAX_IN_FLIGHT as u32)).await;
        }
        None => {
            let mut workers = Vec::new();
            for _ in 0..cfg.concurrency.max(1) {
                let poster = poster.clone();
                let subs = subs.clone();
                let mut stop = stop.clone();
                let window = cfg.window.max(1);
                workers.push(tokio::spawn(async move {
                    while !*stop.borrow() {
                        // Wait until the subscribers have caught up enough.
                        let live = subs.live.load(Ordering::Relaxed);
                        if live == 0 {
                            break;
                        }
                        let delivered = subs.deliveries.load(Ordering::Relaxed) / live;
                        let started = poster.stats.started.load(Ordering::Relaxed);
                        if started.saturating_sub(delivered) >= window {
                            tokio::select! {
                                _ = stop.changed() => break,
                                _ = tokio::time::sleep(Duration::from_millis(1)) => continue,
                            }
                        }
                        poster.post_one().await;
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
        }
    }
}

struct Poster {
    client: reqwest::Client,
    url: String,
    room: String,
    pad: String,
    stats: Arc<Stats>,
}

impl Poster {
    async fn post_one(&self) {
        let seq = self.stats.started.fetch_add(1, Ordering::Relaxed);
        let marker = std::str::from_utf8(MARKER).unwrap_or_default();
        // The send time goes in last, just before the request leaves.
        let body = format!(
            r#"{{"room":"{}","author":"bench","text":"{}{}:{} {}"}}"#,
            self.room,
            marker,
            now_us(),
            seq,
            self.pad
        );
        let answer = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match answer {
            Ok(resp) if resp.status().is_success() => {
                // Read the body so the connection goes back to the pool.
                let _ = resp.bytes().await;
                self.stats.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(resp) => {
                if resp.status().as_u16() == 429 {
                    self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                }
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                if self.stats.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("loadgen: POST answered {status}: {}", text.chars().take(200).collect::<String>());
                }
            }
            Err(e) => {
                if self.stats.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    // reqwest's message names only the URL; the cause is below.
                    let mut why = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        why.push_str(&format!(": {s}"));
                        source = s.source();
                    }
                    eprintln!("loadgen: POST failed: {why}");
                }
            }
        }
    }
}
