//! Clock readings on the request path. A reading costs a vDSO call (~25 ns here) and a
//! request took eleven (docs/benchmarks.md, "Clock readings per request"), so:
//! - what is reported — the request's timeline, its latency metrics — reads the clock
//!   (`Instant::now`);
//! - what only sets a deadline or an age of a second or more — the keep-alive and header
//!   timeouts, the disconnect watch's idle wait, a relay's idle timeout between body reads,
//!   a pooled connection's idle age — takes `recent`: the event loop's reading at the start
//!   of the current turn (nginx keeps its time the same way, per event-loop iteration);
//! - `resilience::now_ms` stays a fresh reading: workers compare it with stamps other threads
//!   wrote (the prefix index's pending entries), which a reading one turn old could predate.

use std::time::{Duration, Instant};

/// On a worker: the event loop's last clock reading, at most one loop turn old (a deadline
/// taken from it falls due that much early). Elsewhere: a fresh reading.
pub fn recent() -> Instant {
    monoio::time::recent()
}

/// `d` after `from`: a deadline. A timeout too large to add (the config takes any positive
/// number of seconds) gives a deadline a year off instead of a worker's panic.
pub fn after(from: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365);
    from.checked_add(d).unwrap_or(from + FAR)
}

#[cfg(test)]
mod tests {
    use super::{after, recent};
    use std::time::{Duration, Instant};

    fn spin_past(t: Instant) {
        while Instant::now() < t {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_timeout_too_large_to_add_is_a_far_deadline() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400));
    }

    #[test]
    fn off_a_runtime_every_reading_is_fresh() {
        let a = recent();
        spin_past(a + Duration::from_millis(2));
        assert!(
            recent() >= a + Duration::from_millis(2),
            "a kept reading off the runtime"
        );
    }

    #[test]
    fn on_a_runtime_the_reading_moves_with_the_event_loop() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let before = Instant::now();
            monoio::time::sleep(Duration::from_millis(3)).await;
            // The loop parked for the timer and read the clock when it woke.
            let after_park = recent();
            assert!(after_park >= before + Duration::from_millis(3));
            // Within the turn the reading stands still: it is the turn's.
            spin_past(Instant::now() + Duration::from_millis(1));
            assert_eq!(recent(), after_park);
        });
    }
}
