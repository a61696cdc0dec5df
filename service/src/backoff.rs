//! Bounded exponential backoff: the wait between two attempts of anything retried.

use std::time::Duration;

use rand::Rng;

/// Waits that double from `initial` up to `max`. With jitter, each wait is drawn from
/// [50 %, 100 %] of the nominal one, so that many clients do not retry in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Wait before the first retry.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
    /// Whether waits are randomised.
    pub jitter: bool,
}

impl Backoff {
    /// Backoff from `initial` to `max`, with jitter.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            jitter: true,
        }
    }

    /// The nominal wait before retry number `retry` (1-based): `initial · 2^(retry−1)`,
    /// capped at `max`.
    pub fn nominal(&self, retry: u32) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let nominal = self.nominal(retry);
        if self.jitter {
            nominal.mul_f64(rand::rng().random_range(0.5..=1.0))
        } else {
            nominal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap() {
        let b = Backoff {
            jitter: false,
            ..Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
        };
        let waits: Vec<u64> = (1..=6).map(|r| b.delay(r).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
        let jittered = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for r in 1..10 {
            let d = jittered.delay(r);
            assert!(
                d <= jittered.nominal(r) && d >= jittered.nominal(r) / 2,
                "{d:?}"
            );
        }
    }
}
