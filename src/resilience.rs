//! Circuit breaking and retry backoff (docs/resilience.md). The breaker's state lives in
//! atomics on each instance so that workers record outcomes and the scheduler reads
//! availability without a lock; transitions are compare-and-swap so that concurrent reports
//! agree on one winner. The state is time-driven: an open circuit past its open time is
//! half-open for whoever looks (a pick, a probe, a status page, a scrape).

use crate::config::{CircuitConfig, RetryConfig};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds on a process-wide monotonic clock (never 0).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A circuit's state; only `Open` blocks picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Circuit {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl Circuit {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Circuit::Open,
            2 => Circuit::HalfOpen,
            _ => Circuit::Closed,
        }
    }

    /// As `/status/instances` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }

    /// The value of the `proxy_circuit_state` gauge.
    pub fn gauge(self) -> u8 {
        self as u8
    }
}

/// A state change a report caused, for the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

/// One instance's circuit: its state and the counters behind it.
#[derive(Default)]
pub struct Breaker {
    state: AtomicU8,
    window_start_ms: AtomicU64,
    failures: AtomicU32,
    successes: AtomicU32,
    open_until_ms: AtomicU64,
    /// Times the circuit opened (`proxy_circuit_opened_total`).
    opened_total: AtomicU64,
}

impl Breaker {
    /// The state now; an open circuit whose open time has passed turns half-open here,
    /// letting trial traffic and probes through.
    #[inline]
    pub fn state(&self) -> Circuit {
        // Only an open circuit depends on the time: the clock is read for it alone, not on
        // every eligibility check of every pick.
        match Circuit::from_u8(self.state.load(Ordering::Relaxed)) {
            Circuit::Open => self.state_at(now_ms()),
            s => s,
        }
    }

    /// Whether the circuit lets a request through now.
    #[inline]
    pub fn allows(&self) -> bool {
        self.state() != Circuit::Open
    }

    pub fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }

    /// Records a failed request or probe (connect error, timeout, 5xx).
    pub fn record_failure(&self, cfg: &CircuitConfig) -> Option<Transition> {
        self.failure_at(cfg, now_ms())
    }

    /// Records a successful request or probe. A closed circuit, every request's usual case,
    /// has nothing to record and reads no clock.
    pub fn record_success(&self, cfg: &CircuitConfig) -> Option<Transition> {
        if Circuit::from_u8(self.state.load(Ordering::Relaxed)) == Circuit::Closed {
            return None;
        }
        self.success_at(cfg, now_ms())
    }

    #[inline]
    fn state_at(&self, now: u64) -> Circuit {
        match Circuit::from_u8(self.state.load(Ordering::Relaxed)) {
            Circuit::Open if now >= self.open_until_ms.load(Ordering::Relaxed) => {
                if self.swap(Circuit::Open, Circuit::HalfOpen) {
                    self.successes.store(0, Ordering::Relaxed);
                }
                Circuit::HalfOpen
            }
            s => s,
        }
    }

    /// Compare-and-swap of the state: true for the one caller that made the move.
    fn swap(&self, from: Circuit, to: Circuit) -> bool {
        self.state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    fn open(&self, cfg: &CircuitConfig, from: Circuit, now: u64) -> Option<Transition> {
        self.open_until_ms
            .store(now + cfg.timeout.as_millis() as u64, Ordering::Relaxed);
        self.swap(from, Circuit::Open).then(|| {
            self.opened_total.fetch_add(1, Ordering::Relaxed);
            Transition::Opened
        })
    }

    fn failure_at(&self, cfg: &CircuitConfig, now: u64) -> Option<Transition> {
        if !cfg.enabled {
            return None;
        }
        match self.state_at(now) {
            Circuit::HalfOpen => self.open(cfg, Circuit::HalfOpen, now),
            Circuit::Open => None,
            Circuit::Closed => {
                let start = self.window_start_ms.load(Ordering::Relaxed);
                let failures = if now.saturating_sub(start) > cfg.window.as_millis() as u64 {
                    self.window_start_ms.store(now, Ordering::Relaxed);
                    self.failures.store(1, Ordering::Relaxed);
                    1
                } else {
                    self.failures.fetch_add(1, Ordering::Relaxed) + 1
                };
                if failures >= cfg.failure_threshold {
                    self.open(cfg, Circuit::Closed, now)
                } else {
                    None
                }
            }
        }
    }

    fn success_at(&self, cfg: &CircuitConfig, now: u64) -> Option<Transition> {
        if !cfg.enabled || self.state_at(now) != Circuit::HalfOpen {
            return None;
        }
        let enough = self.successes.fetch_add(1, Ordering::Relaxed) + 1 >= cfg.success_threshold;
        if enough && self.swap(Circuit::HalfOpen, Circuit::Closed) {
            self.failures.store(0, Ordering::Relaxed);
            self.window_start_ms.store(now, Ordering::Relaxed);
            return Some(Transition::Closed);
        }
        None
    }
}

/// Delay before retry number `attempt` (1-based): exponential, capped, with ± jitter.
pub fn backoff(cfg: &RetryConfig, attempt: u32) -> Duration {
    let base =
        cfg.initial_backoff.as_secs_f64() * cfg.multiplier.powi(attempt.saturating_sub(1) as i32);
    let base = base.min(cfg.max_backoff.as_secs_f64());
    let unit = (crate::ids::next_u64() >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    let jittered = base * (1.0 + cfg.jitter * (2.0 * unit - 1.0));
    Duration::from_secs_f64(jittered.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CircuitConfig {
        CircuitConfig {
            enabled: true,
            failure_threshold: 3,
            success_threshold: 2,
            timeout: Duration::from_millis(50),
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn closed_open_half_open_closed() {
        let b = Breaker::default();
        let c = cfg();
        let t = 1_000;
        assert_eq!(b.failure_at(&c, t), None);
        assert_eq!(b.failure_at(&c, t), None);
        assert_eq!(b.state_at(t), Circuit::Closed);
        assert_eq!(b.failure_at(&c, t), Some(Transition::Opened));
        assert_eq!(b.state_at(t + 49), Circuit::Open);
        assert_eq!(
            b.success_at(&c, t + 49),
            None,
            "successes do not count while open"
        );
        assert_eq!(
            b.state_at(t + 50),
            Circuit::HalfOpen,
            "the open time passed"
        );
        assert_eq!(b.failure_at(&c, t + 50), Some(Transition::Opened));
        assert_eq!(
            b.state_at(t + 60),
            Circuit::Open,
            "a failure while half-open reopens"
        );
        assert_eq!(b.success_at(&c, t + 100), None);
        assert_eq!(b.state_at(t + 100), Circuit::HalfOpen);
        assert_eq!(b.success_at(&c, t + 101), Some(Transition::Closed));
        assert_eq!(b.state_at(t + 101), Circuit::Closed);
        assert_eq!(b.opened_total(), 2);
    }

    #[test]
    fn an_expired_open_circuit_closes_on_successes_alone() {
        // No pick ever looks at the state: the successes (passing probes) themselves move
        // the circuit on once its open time is over.
        let b = Breaker::default();
        let c = cfg();
        for _ in 0..3 {
            b.failure_at(&c, 10);
        }
        assert_eq!(b.success_at(&c, 70), None);
        assert_eq!(b.success_at(&c, 80), Some(Transition::Closed));
        assert_eq!(b.state_at(80), Circuit::Closed);
    }

    #[test]
    fn failures_outside_the_window_start_over() {
        let b = Breaker::default();
        let c = cfg();
        b.failure_at(&c, 10);
        b.failure_at(&c, 20);
        // 60 s later the window restarted: two more failures do not open it.
        b.failure_at(&c, 60_100);
        assert_eq!(b.failure_at(&c, 60_200), None);
        assert_eq!(b.state_at(60_200), Circuit::Closed);
        assert_eq!(b.failure_at(&c, 60_300), Some(Transition::Opened));
    }

    #[test]
    fn disabled_never_opens() {
        let b = Breaker::default();
        let c = CircuitConfig {
            enabled: false,
            ..cfg()
        };
        for t in 0..10 {
            assert_eq!(b.failure_at(&c, t), None);
        }
        assert!(b.allows());
    }

    #[test]
    fn gauge_and_names() {
        assert_eq!(Circuit::Closed.gauge(), 0);
        assert_eq!(Circuit::Open.gauge(), 1);
        assert_eq!(Circuit::HalfOpen.gauge(), 2);
        assert_eq!(Circuit::HalfOpen.as_str(), "half_open");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let r = RetryConfig {
            enabled: true,
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            multiplier: 2.0,
            jitter: 0.1,
            retryable_status: vec![],
        };
        let b1 = backoff(&r, 1).as_millis();
        let b2 = backoff(&r, 2).as_millis();
        let b5 = backoff(&r, 5).as_millis();
        assert!((90..=110).contains(&b1), "{b1}");
        assert!((180..=220).contains(&b2), "{b2}");
        assert!((270..=330).contains(&b5), "{b5}");
    }
}
