//! Circuit breaking and retry backoff (SPEC 5). Breaker state lives in atomics on each
//! instance so that workers record outcomes and the scheduler reads availability without a
//! lock; transitions are compare-and-swap so that concurrent reports agree on one winner.

use crate::config::{CircuitConfig, RetryConfig};
use crate::topology::{Instance, CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds on a process-wide monotonic clock (never 0).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The counters behind an instance's circuit state.
#[derive(Default)]
pub struct Breaker {
    window_start_ms: AtomicU64,
    failures: AtomicU32,
    successes: AtomicU32,
    open_until_ms: AtomicU64,
    /// Times the circuit opened (for status and metrics).
    pub opened_total: AtomicU64,
}

impl Breaker {
    /// Whether the circuit lets a request through now; an open circuit whose timeout passed
    /// turns half-open here, letting trial traffic (and probes) through.
    #[inline]
    pub fn allows(&self, state: &std::sync::atomic::AtomicU8) -> bool {
        match state.load(Ordering::Relaxed) {
            CIRCUIT_OPEN => {
                if now_ms() >= self.open_until_ms.load(Ordering::Relaxed) {
                    if state
                        .compare_exchange(
                            CIRCUIT_OPEN,
                            CIRCUIT_HALF_OPEN,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                    {
                        self.successes.store(0, Ordering::Relaxed);
                    }
                    true
                } else {
                    false
                }
            }
            _ => true,
        }
    }
}

fn open(inst: &Instance, cfg: &CircuitConfig, from: u8) {
    let b = &inst.breaker;
    b.open_until_ms
        .store(now_ms() + cfg.timeout.as_millis() as u64, Ordering::Relaxed);
    if inst
        .circuit
        .compare_exchange(from, CIRCUIT_OPEN, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
    {
        b.opened_total.fetch_add(1, Ordering::Relaxed);
        crate::warn!(
            "circuit of {} ({}) opened for {:?}",
            inst.address,
            inst.role.as_str(),
            cfg.timeout
        );
    }
}

/// Records a failed request or probe (connect error, timeout, 5xx).
pub fn record_failure(inst: &Instance, cfg: &CircuitConfig) {
    if !cfg.enabled {
        return;
    }
    let b = &inst.breaker;
    match inst.circuit.load(Ordering::Relaxed) {
        CIRCUIT_HALF_OPEN => open(inst, cfg, CIRCUIT_HALF_OPEN),
        CIRCUIT_OPEN => {}
        _ => {
            let now = now_ms();
            let start = b.window_start_ms.load(Ordering::Relaxed);
            let failures = if now.saturating_sub(start) > cfg.window.as_millis() as u64 {
                b.window_start_ms.store(now, Ordering::Relaxed);
                b.failures.store(1, Ordering::Relaxed);
                1
            } else {
                b.failures.fetch_add(1, Ordering::Relaxed) + 1
            };
            if failures >= cfg.failure_threshold {
                open(inst, cfg, CIRCUIT_CLOSED);
            }
        }
    }
}

/// Records a successful request or probe.
pub fn record_success(inst: &Instance, cfg: &CircuitConfig) {
    if !cfg.enabled {
        return;
    }
    if inst.circuit.load(Ordering::Relaxed) == CIRCUIT_HALF_OPEN {
        let b = &inst.breaker;
        if b.successes.fetch_add(1, Ordering::Relaxed) + 1 >= cfg.success_threshold
            && inst
                .circuit
                .compare_exchange(
                    CIRCUIT_HALF_OPEN,
                    CIRCUIT_CLOSED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            b.failures.store(0, Ordering::Relaxed);
            b.window_start_ms.store(now_ms(), Ordering::Relaxed);
            crate::warn!(
                "circuit of {} ({}) closed again",
                inst.address,
                inst.role.as_str()
            );
        }
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
    use crate::config::Role;
    use crate::topology::Health;
    use std::sync::Arc;

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
        let i = Arc::new(Instance::new(
            "a:1".into(),
            "127.0.0.1:1".parse().unwrap(),
            Role::Decode,
            Arc::from("m"),
        ));
        i.set_health(Health::Healthy);
        let c = cfg();
        record_failure(&i, &c);
        record_failure(&i, &c);
        assert!(i.is_available());
        record_failure(&i, &c);
        assert_eq!(i.circuit_str(), "open");
        assert!(!i.is_available());
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.is_available(), "half-open lets trial traffic through");
        assert_eq!(i.circuit_str(), "half_open");
        record_failure(&i, &c);
        assert_eq!(i.circuit_str(), "open", "a failure while half-open reopens");
        std::thread::sleep(Duration::from_millis(60));
        assert!(i.is_available());
        record_success(&i, &c);
        assert_eq!(i.circuit_str(), "half_open");
        record_success(&i, &c);
        assert_eq!(i.circuit_str(), "closed");
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
