//! The retry policy: exponential backoff with jitter, bounded by a deadline. Pure: randomness is passed
//! in, so it is deterministic under the simulator.

use std::time::Duration;
use tern_core::time::RandomSource;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    /// The longest pause while a partition's leader is being replaced (NotLeader, a server that
    /// cannot be reached): a new leader is elected within an election timeout, and a client
    /// asleep in a long backoff would add up to `max` to every write stalled by a failover.
    pub leader_wait_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { base: Duration::from_millis(20), max: Duration::from_secs(1), leader_wait_max: Duration::from_millis(100) }
    }
}

impl RetryPolicy {
    /// The pause before retry number `attempt` (0-based): base * 2^attempt capped at max, then a
    /// uniformly random value in [half, full] of that ("equal jitter").
    pub fn delay(&self, attempt: u32, rng: &mut dyn RandomSource) -> Duration {
        self.delay_up_to(attempt, self.max, rng)
    }

    /// `delay` with a lower cap (still jittered within [half, full] of it, so retries that hit
    /// the cap do not all come back at the same moment).
    pub fn delay_up_to(&self, attempt: u32, cap: Duration, rng: &mut dyn RandomSource) -> Duration {
        let exp = self.base.saturating_mul(1u32 << attempt.min(16)).min(self.max).min(cap);
        let ms = exp.as_millis().max(2) as u64;
        Duration::from_millis(rng.range(ms / 2, ms + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::time::SeededRandom;

    /// Delays grow exponentially, stay within [half, full] of the cap, and never exceed max.
    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy::default();
        let mut rng = SeededRandom::new(1);
        for attempt in 0..30 {
            let d = p.delay(attempt, &mut rng);
            let cap = p.base.saturating_mul(1 << attempt.min(16)).min(p.max);
            assert!(d <= cap && d >= cap / 2 - Duration::from_millis(1), "attempt {attempt}: {d:?} vs {cap:?}");
        }
        assert!(p.delay(30, &mut rng) <= Duration::from_secs(1));
    }
}
