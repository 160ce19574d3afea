//! Rate limiters. [`TokenBucket`] is owned by one connection (client events per socket), so it
//! needs no lock.

use std::time::Instant;

/// A token bucket refilled continuously at `rate` tokens per second, holding at most `rate`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn per_second(rate: u32) -> Self {
        Self { rate: f64::from(rate), tokens: f64::from(rate), last: Instant::now() }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
}
