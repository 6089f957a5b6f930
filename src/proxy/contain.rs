//! A bug that panics while serving one connection ends that connection, not its worker.
//! monoio runs a task's poll under `catch_unwind` only to drop the task and resume the panic
//! out of the event loop, which would end the worker thread and every connection on it (and
//! its listener). Each connection's task and each relay task is polled through `Contained`
//! instead, as a tokio task contains a panic to itself. The panic's message is printed by the
//! panic hook as it happens; the caller closes what it held.
//!
//! The threads beside the workers run their steps through `step` for the same reason: the
//! control thread's probe rounds and commands, the KV-event thread's messages, the scraper's
//! engines, the prefix-sync sender's batches, the DNS resolver's lookups, the span exporter's
//! batches. A thread that died would stop that work for good, silently.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A panic's payload.
pub type Panic = Box<dyn Any + Send>;

/// `F` polled under `catch_unwind`: `Err` with the payload if a poll panicked. Unwind safety:
/// the future is dropped after a panic, and what it shared with the worker is released by
/// its guards' drops (counters, pooled buffers) as for a dropped request.
pub struct Contained<F>(pub F);

impl<F: Future + Unpin> Future for Contained<F> {
    type Output = Result<F::Output, Panic>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut self.0).poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Runs one step of a loop on a thread beside the workers. A bug's panic in it is logged
/// (`{what} panicked (…); going on`) and the loop goes on with its next step; what the step
/// changed may be half made.
pub fn step(what: impl std::fmt::Display, f: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
        crate::error!("{what} panicked ({}); going on", message(&panic));
    }
}

/// The panic's message, when it has one.
pub fn message(panic: &Panic) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn a_panicking_step_is_logged_and_the_loop_goes_on() {
        let mut ran = Vec::new();
        for i in 0..3 {
            step("a test step", || {
                assert_ne!(i, 1, "a bug in step {i}");
                ran.push(i);
            });
        }
        assert_eq!(ran, [0, 2]);
    }

    /// On a real event loop: a task that panics inside `Contained` ends alone; the loop and
    /// the other tasks on it go on.
    #[test]
    fn a_panicking_task_ends_alone() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let done = rt.block_on(async {
            let other = Rc::new(Cell::new(false));
            let o = other.clone();
            let bystander = monoio::spawn(async move {
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                o.set(true);
            });
            let failing = monoio::spawn(async {
                let work = std::pin::pin!(async {
                    monoio::time::sleep(std::time::Duration::from_millis(5)).await;
                    let v: Vec<u8> = Vec::new();
                    v[3] // a bug
                });
                Contained(work).await
            });
            let failed = failing.await;
            let msg = message(failed.as_ref().unwrap_err()).to_string();
            bystander.await;
            (msg, other.get())
        });
        assert!(done.0.contains("index out of bounds"), "{}", done.0);
        assert!(done.1, "the other task ran to its end");
    }
}
