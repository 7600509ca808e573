//! Per-client-address token buckets for `POST /api/messages` (429).
//!
//! Bounded: beyond `MAX_TRACKED` addresses, buckets that have refilled
//! completely (clients that went quiet) are dropped.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Addresses tracked before idle buckets are pruned.
const MAX_TRACKED: usize = 10_000;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    /// Tokens per second; 0 disables the limiter.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self { rate, burst: f64::from(burst.max(1)), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `ip`; on refusal, the seconds until one is available.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        self.check_at(ip, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(ip).or_insert(Bucket { tokens: self.burst, updated: now });
        let refill = now.duration_since(b.updated).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let l = RateLimiter::new(2.0, 3);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at(ip, t0).is_ok());
        }
        assert_eq!(l.check_at(ip, t0), Err(1));
        // Another client is not affected.
        assert!(l.check_at("127.0.0.2".parse().unwrap(), t0).is_ok());
        assert!(l.check_at(ip, t0 + Duration::from_millis(600)).is_ok());
        assert!(l.check_at(ip, t0 + Duration::from_millis(600)).is_err());
    }

    #[test]
    fn zero_rate_is_off() {
        let l = RateLimiter::new(0.0, 1);
        let ip: IpAddr = "::1".parse().unwrap();
        for _ in 0..1000 {
            assert!(l.check(ip).is_ok());
        }
    }
}
