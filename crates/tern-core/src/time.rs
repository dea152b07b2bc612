//! Clock and randomness interfaces. Decision-making code takes time and randomness only from these, so
//! the deterministic simulator can substitute virtual time and a seeded generator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    /// Wall-clock time in unix milliseconds; used to stamp TTL expiry. May jump.
    fn now_unix_ms(&self) -> u64;
    /// Monotonic time since an arbitrary origin; used for timeouts and leases.
    fn monotonic(&self) -> Duration;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock { origin: Instant::now() }
    }
}

/// This machine's wall clock in unix milliseconds (for code outside the decision-making paths,
/// which take a `Clock`).
pub fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        unix_now_ms()
    }
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to; for tests and the simulator.
#[derive(Debug, Default)]
pub struct ManualClock {
    unix_ms: AtomicU64,
    monotonic_ms: AtomicU64,
}

impl ManualClock {
    pub fn new(unix_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock { unix_ms: AtomicU64::new(unix_ms), monotonic_ms: AtomicU64::new(0) })
    }
    pub fn advance(&self, by: Duration) {
        self.unix_ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        self.monotonic_ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
    /// A wall-clock jump (monotonic time is unaffected).
    pub fn jump_wall(&self, to_unix_ms: u64) {
        self.unix_ms.store(to_unix_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> u64 {
        self.unix_ms.load(Ordering::SeqCst)
    }
    fn monotonic(&self) -> Duration {
        Duration::from_millis(self.monotonic_ms.load(Ordering::SeqCst))
    }
}

/// Source of randomness for decisions (election timeouts, retry jitter, ids).
pub trait RandomSource: Send {
    fn next_u64(&mut self) -> u64;
    /// Uniform in [low, high).
    fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low < high, "empty range {low}..{high}");
        low + self.next_u64() % (high - low)
    }
}

/// Seeded generator (splitmix64): same seed, same sequence, on every platform.
#[derive(Clone, Debug)]
pub struct SeededRandom {
    state: u64,
}

impl SeededRandom {
    pub fn new(seed: u64) -> SeededRandom {
        SeededRandom { state: seed }
    }
    /// Seeded from the operating system; for production use.
    pub fn from_entropy() -> SeededRandom {
        SeededRandom::new(rand::random())
    }
}

impl RandomSource for SeededRandom {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeded generator is reproducible and stays inside requested ranges.
    #[test]
    fn seeded_random_is_reproducible() {
        let mut a = SeededRandom::new(7);
        let mut b = SeededRandom::new(7);
        for _ in 0..100 {
            let x = a.range(10, 20);
            assert_eq!(x, b.range(10, 20));
            assert!((10..20).contains(&x));
        }
    }

    /// The manual clock moves only when advanced, and wall jumps leave monotonic time alone.
    #[test]
    fn manual_clock() {
        let c = ManualClock::new(1000);
        c.advance(Duration::from_millis(5));
        assert_eq!(c.now_unix_ms(), 1005);
        c.jump_wall(10);
        assert_eq!(c.now_unix_ms(), 10);
        assert_eq!(c.monotonic(), Duration::from_millis(5));
    }
}
