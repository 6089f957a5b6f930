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

impl Bucket {
    /// Takes `cost` tokens at `now` (ns) from a bucket of `burst` tokens refilled at `rate`
    /// tokens per second. A cost above `burst` takes a whole bucket (it could never fit
    /// otherwise). Refused: how long until it would fit.
    pub fn take(&self, now: u64, cost: u64, rate: u64, burst: u64) -> Result<(), Duration> {
        if rate == 0 {
            return Ok(());
        }
        let burst = burst.max(1);
        let ns = |tokens: u64| (tokens as u128 * 1_000_000_000 / rate as u128) as u64;
        let (inc, tau) = (ns(cost.clamp(1, burst)), ns(burst));
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
    fn zero_rate_is_no_limit() {
        let b = Bucket::default();
        for _ in 0..1000 {
            assert!(b.take(0, u64::MAX, 0, 0).is_ok());
        }
    }
}
