//! A token bucket in one atomic: GCRA (the generic cell rate algorithm). The state is the
//! "theoretical arrival time" — when the bucket would be full again; taking `cost` tokens
//! pushes it `cost / rate` seconds further, and a take is refused when that would put it
//! more than one full bucket (`burst / rate`) ahead of now. One compare-and-swap per take,
//! no refill thread, no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct Bucket {
    /// Nanoseconds on the caller's clock; 0: full.
    tat: AtomicU64,
}

/// The time `tokens` take to refill at `rate` per second, in ns.
fn ns(tokens: u64, rate: u64) -> u64 {
    (tokens as u128 * 1_000_000_000 / rate as u128) as u64
}

impl Bucket {
    /// Takes `cost` tokens at `now` (ns) from a bucket of `burst` tokens refilled at `rate`
    /// tokens per second. A cost above `burst` takes a whole bucket (it could never fit
    /// otherwise). Refused: how long until it would fit.
    pub fn take(&self, now: u64, cost: u64, rate: u64, burst: u64) -> Result<(), Duration> {
        if rate == 0 {
            return Ok(());
        }
        let burst = burst.max(1);
        let (inc, tau) = (ns(cost.clamp(1, burst), rate), ns(burst, rate));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + inc;
            let ahead = next - now;
            if ahead > tau {
                return Err(Duration::from_nanos(ahead - tau));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(t) => tat = t,
            }
        }
    }

    /// Undoes a `take` of the same `cost`, `rate` and `burst` that succeeded (the request
    /// was refused by another limit after it). Takes made since only pushed the state
    /// further, so at once it is exact; later (after a queue wait) it may credit up to
    /// `cost` more than a replay without that take would — never past a full bucket, which
    /// any state before now means.
    pub fn give_back(&self, cost: u64, rate: u64, burst: u64) {
        if rate == 0 {
            return;
        }
        let inc = ns(cost.clamp(1, burst.max(1)), rate);
        let _ = self
            .tat
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(inc))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn starts_full_then_refills_at_the_rate() {
        let b = Bucket::default();
        let t0 = 10 * S;
        // 100 tokens/s, burst 200: two 100-token requests pass at once, the third waits 1 s.
        assert!(b.take(t0, 100, 100, 200).is_ok());
        assert!(b.take(t0, 100, 100, 200).is_ok());
        let wait = b.take(t0, 100, 100, 200).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // Half a second later, 50 tokens have come back.
        assert!(b.take(t0 + S / 2, 60, 100, 200).is_err());
        assert!(b.take(t0 + S / 2, 50, 100, 200).is_ok());
    }

    #[test]
    fn a_refused_take_costs_nothing_and_a_huge_one_takes_a_full_bucket() {
        let b = Bucket::default();
        assert!(b.take(S, 10_000, 100, 100).is_ok());
        assert!(b.take(S, 1, 100, 100).is_err());
        assert!(b.take(S, 1, 100, 100).is_err());
        assert!(b.take(2 * S, 100, 100, 100).is_ok());
    }

    #[test]
    fn a_take_given_back_leaves_the_bucket_as_it_was() {
        let b = Bucket::default();
        assert!(b.take(S, 150, 100, 200).is_ok());
        assert!(b.take(S, 100, 100, 200).is_err());
        // A second request took 50, then was refused elsewhere: its 50 come back.
        assert!(b.take(S, 50, 100, 200).is_ok());
        b.give_back(50, 100, 200);
        assert!(b.take(S, 50, 100, 200).is_ok());
        assert!(b.take(S, 1, 100, 200).is_err());
    }

    #[test]
    fn zero_rate_is_no_limit() {
        let b = Bucket::default();
        for _ in 0..1000 {
            assert!(b.take(0, u64::MAX, 0, 0).is_ok());
        }
    }
}
