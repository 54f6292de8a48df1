//! Retry timing: capped exponential backoff with full jitter.
//!
//! Our own ten lines rather than a crate: the `backoff` crate is unmaintained
//! (RUSTSEC-2025-0012), and per-attempt `Retry-After` plus "retry forever"
//! fit a plain loop better than a combinator. Invariant: a delay never
//! exceeds the cap, however many attempts came before.

use std::time::Duration;

/// Exponential backoff with full jitter: each delay is uniform in
/// `[0, min(max, initial * 2^attempt)]`, which spreads a fleet of agents
/// reconnecting after a shared outage instead of having them knock in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_stays_within_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..50 {
            let d = b.next_delay();
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(20))
                .min(Duration::from_secs(2));
            assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10, "delays are not spread: {delays:?}");
    }
}
