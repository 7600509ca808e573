//! A process's CPU time and resident memory, read from `/proc/<pid>`.

use std::fs;

/// CPU seconds (user + system, all threads) and resident KiB of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` if the process
/// is gone or the files do not parse.
pub fn sample(pid: u32) -> Option<Sample> {
    Some(Sample { cpu_s: cpu_seconds(&format!("/proc/{pid}/stat"))?, rss_kib: rss_kib(pid)? })
}

/// This process's own CPU seconds, to show what the load generator costs.
pub fn self_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat").unwrap_or(0.0)
}

/// Sums the samples of several processes (a server run as several instances).
pub fn sample_all(pids: &[u32]) -> Option<Sample> {
    let mut total = Sample::default();
    for &pid in pids {
        let s = sample(pid)?;
        total.cpu_s += s.cpu_s;
        total.rss_kib += s.rss_kib;
    }
    Some(total)
}

fn cpu_seconds(path: &str) -> Option<f64> {
    let stat = fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces and parentheses; every field
    // after the last ')' is a plain number. utime and stime are fields 14 and
    // 15 of the line, so 12th and 13th after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks_per_second())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}
