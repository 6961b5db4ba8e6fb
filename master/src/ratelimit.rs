//! Token buckets that keep a flood of webhook or control requests from starving the master:
//! one bucket per key (a forge and client address, or a caller), refilled continuously. It
//! only counts; the HTTP layer decides which requests pass through which limiter and answers
//! 429 with `Retry-After`.

use rbb_schema::config::BucketConfig;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default for webhooks: per forge and client address.
pub const WEBHOOKS: BucketConfig = BucketConfig { per_second: 20.0, burst: 100 };
/// Default for control and admin actions: per caller.
pub const CONTROL: BucketConfig = BucketConfig { per_second: 10.0, burst: 50 };

/// Buckets kept before full ones are forgotten (a full bucket is the same as no bucket).
const PRUNE_AT: usize = 4096;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key.
pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    /// A limiter; a rate or burst that is not positive is an error naming it.
    pub fn new(cfg: BucketConfig, what: &str) -> Result<Limiter, String> {
        if !(cfg.per_second.is_finite() && cfg.per_second > 0.0) {
            return Err(format!("rate_limits.{what}.per_second: must be a positive number, not {}", cfg.per_second));
        }
        if cfg.burst == 0 {
            return Err(format!("rate_limits.{what}.burst: must be at least 1"));
        }
        Ok(Limiter { rate: cfg.per_second, burst: f64::from(cfg.burst), buckets: Mutex::default() })
    }

    /// Takes one token from `key`'s bucket, or says how long until one is there.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        self.take_at(key, Instant::now())
    }

    fn take_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= PRUNE_AT {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket { tokens: self.burst, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let l = Limiter::new(BucketConfig { per_second: 2.0, burst: 3 }, "control").expect("valid");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take_at("a", t0).is_ok());
        }
        let wait = l.take_at("a", t0).expect_err("empty");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(l.take_at("b", t0).is_ok(), "buckets are per key");
        assert!(l.take_at("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(l.take_at("a", t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn many_keys_do_not_grow_without_bound() {
        let l = Limiter::new(BucketConfig { per_second: 1000.0, burst: 1 }, "webhooks").expect("valid");
        let t0 = Instant::now();
        for i in 0..20_000 {
            let _ = l.take_at(&i.to_string(), t0 + Duration::from_millis(i));
        }
        assert!(l.buckets.lock().expect("lock").len() <= PRUNE_AT);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Limiter::new(BucketConfig { per_second: 0.0, burst: 1 }, "webhooks").err().expect("bad");
        assert!(e.contains("rate_limits.webhooks.per_second"), "{e}");
        let e = Limiter::new(BucketConfig { per_second: 1.0, burst: 0 }, "control").err().expect("bad");
        assert!(e.contains("rate_limits.control.burst"), "{e}");
    }
}
