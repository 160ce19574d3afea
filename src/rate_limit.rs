//! Rate limiters. [`TokenBucket`] is owned by one connection (client events per socket), so it
//! needs no lock. [`RateLimiter`] counts requests per key in one-second windows, in memory
//! (this node) or in Redis (shared by every node of a cluster).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A token bucket refilled continuously at `rate` tokens per second, holding at most its burst
/// (`rate` unless set).
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    cap: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn per_second(rate: u32) -> Self {
        Self::with_burst(rate, rate)
    }

    /// Refilled at `rate` per second, holding at most `burst` (full at first).
    pub fn with_burst(rate: u32, burst: u32) -> Self {
        Self { rate: f64::from(rate), tokens: f64::from(burst), cap: f64::from(burst.max(1)), last: Instant::now() }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The outcome of one check, with what the `X-RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window resets.
    pub reset_after: u64,
}

/// Keys kept in memory at most; past it, windows that ended are dropped.
const MAX_KEYS: usize = 100_000;

enum Backend {
    Memory(Mutex<HashMap<String, (u64, u32)>>),
    Redis { conn: std::sync::Arc<crate::redis_client::Commands>, prefix: String, failures: AtomicU64 },
}

/// Fixed one-second windows per key.
pub struct RateLimiter {
    backend: Backend,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl RateLimiter {
    pub fn memory() -> Self {
        Self { backend: Backend::Memory(Mutex::default()) }
    }

    /// A limiter shared through Redis (any mode of `adapter.redis`; fails naming the key, with
    /// passwords masked, when Redis is unreachable).
    pub async fn redis(config: &crate::config::RedisConfig) -> Result<Self, crate::redis_client::SetupError> {
        let target = crate::redis_client::Redis::from_config(config)?;
        let conn = std::sync::Arc::new(crate::redis_client::Commands::connect(target).await?);
        // With Sentinel, counting moves to a new master as soon as the sentinels name it.
        let _ = crate::redis_client::follow_master(&conn);
        Ok(Self { backend: Backend::Redis { conn, prefix: config.prefix.clone(), failures: AtomicU64::new(0) } })
    }

    /// Counts `cost` against `key`'s window of `limit` per second.
    pub async fn check(&self, key: &str, limit: u32, cost: u32) -> Decision {
        let now = now_secs();
        let used = match &self.backend {
            Backend::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
                if map.len() >= MAX_KEYS && !map.contains_key(key) {
                    map.retain(|_, (window, _)| *window == now);
                }
                let slot = map.entry(key.to_owned()).or_insert((now, 0));
                if slot.0 != now {
                    *slot = (now, 0);
                }
                // Refused requests do not consume the window.
                if slot.1.saturating_add(cost) <= limit {
                    slot.1 += cost;
                    slot.1
                } else {
                    slot.1.saturating_add(cost)
                }
            }
            Backend::Redis { conn, prefix, failures } => {
                // One key per pipeline, so on a Redis Cluster it goes to one slot's master.
                let redis_key = format!("{prefix}:ratelimit:{key}:{now}");
                let mut incr = redis::pipe();
                incr.cmd("INCRBY").arg(&redis_key).arg(cost).cmd("EXPIRE").arg(&redis_key).arg(2).ignore();
                let result: redis::RedisResult<(u32,)> = conn.query(&incr).await;
                match result {
                    Ok((n,)) if n > limit => {
                        // Refused requests give their cost back, as in memory.
                        let mut decr = redis::pipe();
                        decr.cmd("DECRBY").arg(&redis_key).arg(cost).ignore();
                        let _: redis::RedisResult<()> = conn.query(&decr).await;
                        n
                    }
                    Ok((n,)) => n,
                    Err(err) => {
                        // Fail open: a limiter outage must not take the API down with it.
                        let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            tracing::warn!(error = %err, failures = n, "rate limiter unavailable; allowing requests");
                        }
                        0
                    }
                }
            }
        };
        Decision { allowed: used <= limit, limit, remaining: limit.saturating_sub(used), reset_after: 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_rate() {
        let mut b = TokenBucket::per_second(3);
        assert!(b.try_take() && b.try_take() && b.try_take());
        assert!(!b.try_take());
    }

    #[tokio::test]
    async fn windows_count_cost() {
        let l = RateLimiter::memory();
        assert!(l.check("k", 3, 2).await.allowed);
        let d = l.check("k", 3, 2).await;
        assert!(!d.allowed);
        assert!(l.check("k", 3, 1).await.allowed, "a refused request consumed nothing");
        assert!(l.check("other", 3, 3).await.allowed);
    }
}
