//! Source of time abstraction.
//!
//! By default, `std::time::Instant::now()` is used. However, when the
//! `test-util` feature flag is enabled, the values returned for `now()` are
//! configurable.

use crate::time::Instant;

#[derive(Default, Debug, Clone)]
pub(crate) struct Clock {}

pub(crate) fn now() -> Instant {
    Instant::from_std(read())
}

// xpyd patch: the time driver's last clock reading on this thread, kept for `recent`. The
// driver reads the clock every time the event loop parks (to fire timers), and the runtime
// reads it when a loop turn ends without parking (`runtime.rs`).
std::thread_local! {
    static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Reads the clock and keeps the reading for `recent` (xpyd patch).
pub(crate) fn read() -> std::time::Instant {
    let now = std::time::Instant::now();
    LAST.with(|l| l.set(Some(now)));
    now
}

/// The clock as the runtime of this thread last read it — at the start of the current
/// event-loop turn — or a fresh reading on a thread without a timer-enabled runtime (xpyd
/// patch). For deadlines and ages that one loop turn does not matter to: a reading costs a
/// vDSO call, and a request needs several.
pub fn recent() -> std::time::Instant {
    LAST.with(|l| l.get()).unwrap_or_else(std::time::Instant::now)
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {}
    }

    pub(crate) fn now(&self) -> Instant {
        now()
    }
}
