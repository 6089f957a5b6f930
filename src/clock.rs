//! Clock readings on the request path. A reading costs a vDSO call (~25 ns here) and a
//! request took eleven (docs/benchmarks.md, "Clock readings per request"), so:
//! - what is reported — the request's timeline, its latency metrics — reads the clock
//!   (`Instant::now`);
//! - what only sets a deadline or an age of a second or more — the keep-alive and header
//!   timeouts, the disconnect watch's idle wait, a pooled connection's idle age, the circuit
//!   breaker's window — takes `recent`: the event loop's reading at the start of the current
//!   turn (nginx keeps its time the same way, per event-loop iteration).

use std::time::Instant;

/// On a worker: the event loop's last clock reading, at most one loop turn old (a deadline
/// taken from it falls due that much early). Elsewhere: a fresh reading.
pub fn recent() -> Instant {
    monoio::time::recent()
}
