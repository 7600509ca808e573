//! Prometheus metrics, served as text at `GET /metrics`.
//!
//! One `Metrics` value is shared by every part of the server; each part
//! updates its own counters. Label sets are small and fixed (reasons,
//! routes, shard ids), never user input, so series cannot explode.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// One label set: `[(name, value), ...]`.
pub type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s in 16 doubling buckets.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Messages a backend accepted (POST answered 201).
    pub messages_accepted: Counter,
    /// POSTs refused, by reason (invalid, too_large, unsupported_type,
    /// rate_limited, unavailable, bad_json).
    pub messages_rejected: Family<Labels, Counter>,
    /// WebSockets currently open.
    pub sockets_open: Gauge,
    /// Message frames handed to sockets.
    pub deliveries: Counter,
    /// Sockets closed with 4008 because they could not keep up.
    pub slow_consumer_closes: Counter,
    /// Messages dropped before fan-out because their id was already seen.
    pub duplicates_dropped: Counter,
    /// Stream records skipped by the reader, by reason.
    pub records_skipped: Family<Labels, Counter>,
    /// HTTP request latency by route and status class.
    pub http_latency: Family<Labels, Histogram, fn() -> Histogram>,
    /// Per-shard reader lag in milliseconds (`MillisBehindLatest`).
    pub shard_millis_behind: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Per-shard seconds since the last successful `GetRecords`.
    pub shard_seconds_since_read: Family<Labels, Gauge<f64, AtomicU64>>,
    /// Stream calls throttled, by operation.
    pub throttled: Family<Labels, Counter>,
    /// Producer retries of individual entries.
    pub producer_retries: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let messages_accepted = Counter::default();
        let messages_rejected = Family::<Labels, Counter>::default();
        let sockets_open = Gauge::default();
        let deliveries = Counter::default();
        let slow_consumer_closes = Counter::default();
        let duplicates_dropped = Counter::default();
        let records_skipped = Family::<Labels, Counter>::default();
        let http_latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        let shard_millis_behind = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let shard_seconds_since_read = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let throttled = Family::<Labels, Counter>::default();
        let producer_retries = Counter::default();

        registry.register("chat_messages_accepted", "Messages accepted by the stream backend", messages_accepted.clone());
        registry.register("chat_messages_rejected", "POSTs refused, by reason", messages_rejected.clone());
        registry.register("chat_sockets_open", "WebSockets currently open", sockets_open.clone());
        registry.register("chat_deliveries", "Message frames handed to sockets", deliveries.clone());
        registry.register(
            "chat_slow_consumer_closes",
            "Sockets closed with 4008 because they could not keep up",
            slow_consumer_closes.clone(),
        );
        registry.register(
            "chat_duplicates_dropped",
            "Messages dropped before fan-out because their id was already seen",
            duplicates_dropped.clone(),
        );
        registry.register("chat_records_skipped", "Stream records skipped by the reader, by reason", records_skipped.clone());
        registry.register("chat_http_request_duration_seconds", "HTTP request latency", http_latency.clone());
        registry.register("chat_shard_millis_behind_latest", "Reader lag per shard (MillisBehindLatest)", shard_millis_behind.clone());
        registry.register(
            "chat_shard_seconds_since_read",
            "Seconds since the last successful GetRecords per shard",
            shard_seconds_since_read.clone(),
        );
        registry.register("chat_stream_throttled", "Stream calls throttled, by operation", throttled.clone());
        registry.register("chat_producer_retries", "Producer retries of individual entries", producer_retries.clone());

        Self {
            registry,
            messages_accepted,
            messages_rejected,
            sockets_open,
            deliveries,
            slow_consumer_closes,
            duplicates_dropped,
            records_skipped,
            http_latency,
            shard_millis_behind,
            shard_seconds_since_read,
            throttled,
            producer_retries,
        }
    }

    /// Counts a refused POST.
    pub fn reject(&self, reason: &str) {
        self.messages_rejected.get_or_create(&vec![("reason".into(), reason.into())]).inc();
    }

    /// Counts a skipped stream record.
    pub fn skip_record(&self, reason: &str) {
        self.records_skipped.get_or_create(&vec![("reason".into(), reason.into())]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        encode(&mut out, &self.registry).expect("encoding metrics into a String");
        out
    }
}
