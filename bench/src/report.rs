//! One run's results as JSON, merging the results of several load-generator
//! processes, and the side-by-side Markdown tables `bench/run` prints.

use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::subscriber::new_histogram;

/// What one load-generator process (or several, merged) measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub label: String,
    pub proto: String,
    /// Load-generator processes merged into this result.
    pub processes: u64,
    pub subs_requested: u64,
    pub subs_connected: u64,
    pub connect_failures: u64,
    /// Seconds from the first connect to the last `ready`.
    pub connect_s: f64,
    /// Length of the measured window (after warm-up), seconds.
    pub window_s: f64,
    pub posts_ok: u64,
    pub posts_failed: u64,
    pub posts_rate_limited: u64,
    /// Chat-message frames received inside the window.
    pub deliveries_in_window: u64,
    pub deliveries_per_s: f64,
    /// Every chat-message frame received, warm-up and drain included.
    pub deliveries_total: u64,
    /// Accepted posts × connected subscribers.
    pub deliveries_expected: u64,
    /// Expected minus received (a closed subscriber's share shows up here).
    pub deliveries_lost: u64,
    pub latency_samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub slow_consumer_closes: u64,
    pub other_closes: u64,
    /// Server CPU seconds (user + system) inside the window.
    pub server_cpu_s: f64,
    /// Server CPU cores busy on average inside the window.
    pub server_cores: f64,
    pub server_cpu_us_per_delivery: f64,
    /// Server resident memory before any subscriber connected.
    pub server_rss_start_kib: u64,
    /// ... after every subscriber connected and the settle time passed.
    pub server_rss_connected_kib: u64,
    /// ... at the end of the window.
    pub server_rss_end_kib: u64,
    /// (connected − start) / subscribers connected.
    pub rss_per_socket_kib: f64,
    /// The same per load-generator process (one per server process).
    pub rss_per_socket_kib_each: Vec<f64>,
    /// The load generator's own CPU seconds over the whole run.
    pub loadgen_cpu_s: f64,
    /// Latency histogram, µs: (value, count) pairs, for merging.
    pub latency_hist_us: Vec<(u64, u64)>,
}

impl RunResult {
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        let ms = |us: u64| us as f64 / 1000.0;
        self.latency_samples = h.len();
        if !h.is_empty() {
            self.p50_ms = ms(h.value_at_quantile(0.50));
            self.p99_ms = ms(h.value_at_quantile(0.99));
            self.p999_ms = ms(h.value_at_quantile(0.999));
            self.max_ms = ms(h.max());
        }
        self.latency_hist_us = h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect();
    }

    fn histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for &(value, count) in &self.latency_hist_us {
            let _ = h.record_n(value, count);
        }
        h
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?).with_context(|| format!("write {}", path.display()))
    }

    /// One line for a person watching the run.
    pub fn summary(&self) -> String {
        format!(
            "{} [{}]: subs {}/{} ({} failed), {:.0} deliveries/s, p50 {:.2} ms p99 {:.2} ms max {:.1} ms \
             ({} samples), posts ok {} failed {}, lost {}, closes 4008 {} other {}, server {:.2} cores \
             {:.2} µs/delivery, rss {} KiB → {} KiB ({:.2} KiB/socket), loadgen cpu {:.1} s",
            self.label,
            self.proto,
            self.subs_connected,
            self.subs_requested,
            self.connect_failures,
            self.deliveries_per_s,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.latency_samples,
            self.posts_ok,
            self.posts_failed,
            self.deliveries_lost,
            self.slow_consumer_closes,
            self.other_closes,
            self.server_cores,
            self.server_cpu_us_per_delivery,
            self.server_rss_start_kib,
            self.server_rss_connected_kib,
            self.rss_per_socket_kib,
            self.loadgen_cpu_s,
        )
    }
}

/// Results of load generators that ran at the same time against the same
/// system (one per server process), added up.
pub fn merge(parts: &[RunResult]) -> RunResult {
    let mut out = RunResult::default();
    let mut hist = new_histogram();
    for p in parts {
        out.label = p.label.clone();
        out.proto = p.proto.clone();
        out.processes += p.processes.max(1);
        out.subs_requested += p.subs_requested;
        out.subs_connected += p.subs_connected;
        out.connect_failures += p.connect_failures;
        out.connect_s = out.connect_s.max(p.connect_s);
        out.window_s = out.window_s.max(p.window_s);
        out.posts_ok += p.posts_ok;
        out.posts_failed += p.posts_failed;
        out.posts_rate_limited += p.posts_rate_limited;
        out.deliveries_in_window += p.deliveries_in_window;
        out.deliveries_per_s += p.deliveries_per_s;
        out.deliveries_total += p.deliveries_total;
        out.deliveries_expected += p.deliveries_expected;
        out.deliveries_lost += p.deliveries_lost;
        out.slow_consumer_closes += p.slow_consumer_closes;
        out.other_closes += p.other_closes;
        out.server_cpu_s += p.server_cpu_s;
        out.server_cores += p.server_cores;
        out.server_rss_start_kib += p.server_rss_start_kib;
        out.server_rss_connected_kib += p.server_rss_connected_kib;
        out.server_rss_end_kib += p.server_rss_end_kib;
        out.rss_per_socket_kib_each.extend(if p.rss_per_socket_kib_each.is_empty() {
            vec![p.rss_per_socket_kib]
        } else {
            p.rss_per_socket_kib_each.clone()
        });
        out.loadgen_cpu_s += p.loadgen_cpu_s;
        let _ = hist.add(p.histogram());
    }
    if out.deliveries_in_window > 0 {
        out.server_cpu_us_per_delivery = out.server_cpu_s * 1e6 / out.deliveries_in_window as f64;
    }
    if out.subs_connected > 0 {
        out.rss_per_socket_kib = out.server_rss_connected_kib.saturating_sub(out.server_rss_start_kib) as f64
            / out.subs_connected as f64;
    }
    out.set_latency(&hist);
    out
}

/// A row of a table: the JSON field, how people call it, decimals.
const METRICS: &[(&str, &str, usize)] = &[
    ("subs_connected", "sockets connected", 0),
    ("connect_failures", "sockets that failed to connect", 0),
    ("deliveries_per_s", "deliveries/s", 0),
    ("p50_ms", "latency p50 (ms)", 2),
    ("p99_ms", "latency p99 (ms)", 2),
    ("p999_ms", "latency p99.9 (ms)", 2),
    ("max_ms", "latency max (ms)", 1),
    ("latency_samples", "latency samples", 0),
    ("posts_ok", "POSTs accepted", 0),
    ("posts_failed", "POSTs failed", 0),
    ("deliveries_lost", "deliveries lost", 0),
    ("slow_consumer_closes", "closed as slow (4008)", 0),
    ("other_closes", "other closes", 0),
    ("server_cores", "server CPU (cores busy)", 2),
    ("server_cpu_us_per_delivery", "server CPU µs/delivery", 2),
    ("server_rss_start_kib", "server RSS before (KiB)", 0),
    ("server_rss_connected_kib", "server RSS connected (KiB)", 0),
    ("rss_per_socket_kib", "server RSS per socket (KiB)", 2),
    ("rss_per_socket_kib_each", "… per process (KiB)", 2),
    ("processes", "server processes", 0),
    ("connect_s", "connect time (s)", 1),
    ("loadgen_cpu_s", "load generator CPU (s)", 1),
];

fn value(r: &RunResult, field: &str) -> Option<f64> {
    serde_json::to_value(r).ok()?.get(field)?.as_f64()
}

/// A list-valued field (one value per process), as `a / b / c`.
fn list(r: &RunResult, field: &str) -> Option<String> {
    let v = serde_json::to_value(r).ok()?;
    let items = v.get(field)?.as_array()?;
    let shown: Vec<String> = items.iter().filter_map(|x| x.as_f64()).map(|x| format!("{x:.2}")).collect();
    Some(shown.join(" / "))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn fmt(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if decimals == 0 && v.abs() >= 1_000.0 {
        // Thousands separators: 123,456.
        let mut out = String::new();
        for (i, c) in s.chars().rev().enumerate() {
            if i > 0 && i % 3 == 0 && c != '-' {
                out.push(',');
            }
            out.push(c);
        }
        out.chars().rev().collect()
    } else {
        s
    }
}

/// A Markdown table: one row per metric, one column per system (the median
/// over its rounds, each round in parentheses when there are several), and
/// the ratio of the first system to the second.
pub fn table(title: &str, metrics: &[String], systems: &[(String, Vec<RunResult>)]) -> String {
    let mut out = format!("### {title}\n\n| metric |");
    for (name, _) in systems {
        out.push_str(&format!(" {name} |"));
    }
    let ratio = systems.len() == 2;
    if ratio {
        out.push_str(&format!(" {} / {} |", systems[0].0, systems[1].0));
    }
    out.push_str("\n| --- |");
    for _ in systems {
        out.push_str(" ---: |");
    }
    if ratio {
        out.push_str(" ---: |");
    }
    out.push('\n');
    for field in metrics {
        let (label, decimals) = METRICS
            .iter()
            .find(|(f, _, _)| f == field)
            .map(|&(_, l, d)| (l.to_string(), d))
            .unwrap_or_else(|| (field.clone(), 2));
        out.push_str(&format!("| {label} |"));
        let mut medians = Vec::new();
        for (_, rounds) in systems {
            if let Some(list) = rounds.first().and_then(|r| list(r, field)) {
                // A per-process list (one round): shown as is.
                medians.push(None);
                out.push_str(&format!(" {list} |"));
                continue;
            }
            let values: Vec<f64> = rounds.iter().filter_map(|r| value(r, field)).collect();
            let m = median(values.clone());
            medians.push(m);
            let cell = match m {
                None => "–".to_string(),
                Some(m) if values.len() > 1 => format!(
                    "{} ({})",
                    fmt(m, decimals),
                    values.iter().map(|v| fmt(*v, decimals)).collect::<Vec<_>>().join(" / ")
                ),
                Some(m) => fmt(m, decimals),
            };
            out.push_str(&format!(" {cell} |"));
        }
        if ratio {
            let cell = match (medians[0], medians[1]) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
                _ => "–".to_string(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_up_and_recomputes_percentiles() {
        let mut a = RunResult { subs_connected: 10, server_rss_start_kib: 100, server_rss_connected_kib: 200, ..Default::default() };
        let mut h = new_histogram();
        h.record_n(1000, 99).unwrap();
        a.set_latency(&h);
        let mut b = RunResult { subs_connected: 10, server_rss_start_kib: 100, server_rss_connected_kib: 300, ..Default::default() };
        let mut h = new_histogram();
        h.record_n(50_000, 1).unwrap();
        b.set_latency(&h);
        let m = merge(&[a, b]);
        assert_eq!(m.subs_connected, 20);
        assert_eq!(m.latency_samples, 100);
        assert!((m.rss_per_socket_kib - 15.0).abs() < 1e-9);
        assert!(m.max_ms >= 49.9);
        assert!(m.p50_ms < 1.1);
    }

    #[test]
    fn table_shows_medians_and_ratio() {
        let r = |d: f64| RunResult { deliveries_per_s: d, ..Default::default() };
        let t = table(
            "fan-out",
            &["deliveries_per_s".to_string()],
            &[("a".into(), vec![r(300.0), r(100.0), r(200.0)]), ("b".into(), vec![r(100.0)])],
        );
        assert!(t.contains("| deliveries/s | 200 (300 / 100 / 200) | 100 | 2.00× |"), "{t}");
    }
}
