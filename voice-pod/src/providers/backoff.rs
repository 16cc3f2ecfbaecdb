//! Bounded, jittered exponential backoff for provider reconnects.
//!
//! Full jitter (a random delay between zero and the exponential cap) keeps many calls
//! on one pod from reconnecting in lockstep after a provider blip.

use std::time::Duration;

use rand::Rng;

/// Reconnect policy: `attempts` tries, delays growing from `initial` by `factor` up to `max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Delay cap of the first retry.
    pub initial: Duration,
    /// Largest delay cap.
    pub max: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// Attempts before giving up.
    pub attempts: u32,
}

impl Default for Backoff {
    /// A call cannot wait long: 5 attempts within about 3 s in the worst case.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(1000),
            factor: 2.0,
            attempts: 5,
        }
    }
}

impl Backoff {
    /// The delay cap before retry `attempt` (0-based), without jitter.
    pub fn cap(&self, attempt: u32) -> Duration {
        let exp = self.factor.max(1.0).powi(attempt.min(32) as i32);
        let secs = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The jittered delay before retry `attempt`: uniformly between half the cap and the
    /// cap, so the first retry is quick yet calls still spread out.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self.cap(attempt);
        let half = cap / 2;
        let span = cap.saturating_sub(half).as_micros() as u64;
        let jitter = if span == 0 {
            0
        } else {
            rand::rng().random_range(0..=span)
        };
        half + Duration::from_micros(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stay_within_jitter_bounds() {
        // Proves the delay grows exponentially, never exceeds `max`, and jitter stays in [cap/2, cap].
        let b = Backoff::default();
        assert_eq!(b.cap(0), Duration::from_millis(50));
        assert_eq!(b.cap(1), Duration::from_millis(100));
        assert_eq!(b.cap(10), Duration::from_millis(1000));
        for attempt in 0..8 {
            for _ in 0..100 {
                let d = b.delay(attempt);
                assert!(d <= b.cap(attempt) && d >= b.cap(attempt) / 2, "{d:?}");
            }
        }
    }
}
