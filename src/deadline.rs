//! A deadline kept in one timer that is not moved when the deadline moves later.
//!
//! Registering a timer in the worker's timer wheel and removing it costs a few hundred
//! instructions. The proxy's deadlines mostly move later: a kept-alive client connection's wait
//! for its next request; on a pooled upstream connection, each leg's first-byte timeout and its
//! body's idle timeout from one read to the next. So the timer is made once per connection and
//! left where it is while the deadline moves later; when it comes due it checks the deadline in
//! force and, if that is still ahead, waits on until it. Only a deadline earlier than the timer
//! (a request's header timeout after a longer keep-alive wait; a first-byte timeout configured
//! shorter than the idle timeout) moves it. docs/benchmarks.md, "Per relayed token", "One timer
//! per connection" and "One timer per upstream connection", has the counts.

use crate::clock::recent;
use monoio::time::Sleep;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// Small (24 bytes): it lives inside an upstream connection, moved from the pool to a leg and
/// back, and a connection over 128 bytes was copied with a `memcpy` call at every move
/// (docs/benchmarks.md, "One timer per upstream connection"; `proxy/upstream.rs` checks the
/// size). Where the timer is set is the `Sleep`'s own deadline, not a copy here.
pub struct Deadline {
    /// Made at the first wait that is not over at once, then kept. Boxed (128 bytes with
    /// vendor/monoio's unpadded timers): the connection moves, the registered timer must not.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline in force.
    due: Instant,
}

impl Default for Deadline {
    fn default() -> Self {
        Self::new()
    }
}

impl Deadline {
    pub fn new() -> Self {
        Deadline {
            sleep: None,
            due: recent(),
        }
    }

    /// The deadline in force from now on. Setting it costs no timer work.
    pub fn set(&mut self, due: Instant) {
        self.due = due;
    }

    /// Runs `fut` to its end (`Some`), or until the deadline in force passes (`None`). `fut`
    /// is `Unpin` — most callers pin it where they made it (`pin!`) — so that the race needs
    /// no state machine of its own (`Bounded`).
    pub fn bound<F: Future + Unpin>(&mut self, fut: F) -> Bounded<'_, F> {
        Bounded {
            deadline: self,
            fut,
        }
    }

    /// Ready once the deadline in force has passed. For a caller's own `poll_fn` beside the
    /// work it bounds (a relay's read of every token: a future around the read would cost a
    /// token ~100 instructions more).
    pub fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let due = self.due;
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                let due = monoio::time::Instant::from_std(due);
                if due < sleep.deadline() {
                    sleep.as_mut().reset(due);
                }
                sleep
            }
            slot @ None => slot.insert(Box::pin(monoio::time::sleep_until(
                monoio::time::Instant::from_std(due),
            ))),
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Due at an earlier deadline: wait on until this one. (The wheel fires a timer only
        // once the loop's reading has passed its deadline, so a timer set to a deadline
        // already past is ready at once: this runs at most once a poll.)
        if recent() < due {
            sleep.as_mut().reset(monoio::time::Instant::from_std(due));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    }
}

/// `Deadline::bound`'s race: a future of its own rather than an async fn, so that each
/// wake-up of the task polls the bounded work directly (a leg's write and response head, a
/// connection's wait for its next request).
pub struct Bounded<'d, F> {
    deadline: &'d mut Deadline,
    fut: F,
}

impl<F: Future + Unpin> Future for Bounded<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(out) = Pin::new(&mut this.fut).poll(cx) {
            return Poll::Ready(Some(out));
        }
        this.deadline.poll_passed(cx).map(|()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::Deadline;
    use crate::clock::{after, recent};
    use std::pin::pin;
    use std::time::Duration;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    #[test]
    fn a_deadline_moved_later_is_kept_and_an_earlier_one_is_met() {
        run(async {
            let mut d = Deadline::new();
            // A wait over at once arms no timer; the next, pending once, arms the kept one.
            d.set(after(recent(), Duration::from_millis(80)));
            assert_eq!(d.bound(pin!(async { 0 })).await, Some(0));
            let brief = monoio::time::sleep(Duration::from_millis(1));
            assert_eq!(
                d.bound(pin!(async {
                    brief.await;
                    1
                }))
                .await,
                Some(1)
            );
            // Moved later: the timer still points at the first deadline, and a wait past that
            // first deadline (but inside the new one) is not cut.
            d.set(after(recent(), Duration::from_secs(5)));
            let slow = monoio::time::sleep(Duration::from_millis(200));
            assert_eq!(
                d.bound(pin!(async {
                    slow.await;
                    2
                }))
                .await,
                Some(2)
            );
            // Moved earlier than the timer: the earlier deadline ends the wait.
            let t0 = std::time::Instant::now();
            d.set(after(recent(), Duration::from_millis(50)));
            assert_eq!(d.bound(std::future::pending::<()>()).await, None);
            // (Left at the later deadline, the wait would take ~4.8 s.)
            let took = t0.elapsed();
            assert!(
                took < Duration::from_secs(2),
                "an earlier deadline was not met: {took:?}"
            );
            // A deadline already past ends a wait at once.
            assert_eq!(d.bound(std::future::pending::<()>()).await, None);
        });
    }

    #[test]
    fn a_timer_kept_across_tasks_wakes_the_task_waiting_now() {
        // A pooled upstream connection carries its `Deadline` from one request's task to the
        // next: its timer must wake the task that waits on it now.
        run(async {
            let mut d = Deadline::new();
            d.set(after(recent(), Duration::from_millis(60)));
            // Task one: a wait over at once, then one that arms the kept timer, which it
            // leaves set 60 ms out, registered with this task's waker.
            let mut d = monoio::spawn(async move {
                d.bound(pin!(async {})).await;
                let brief = monoio::time::sleep(Duration::from_millis(1));
                d.bound(pin!(brief)).await;
                d
            })
            .await;
            // Task two: the same timer, a later deadline.
            d.set(after(recent(), Duration::from_millis(100)));
            let two = monoio::spawn(async move { d.bound(std::future::pending::<()>()).await });
            monoio::select! {
                out = two => assert_eq!(out, None),
                _ = monoio::time::sleep(Duration::from_secs(2)) => {
                    panic!("the timer woke the task that polled it first, not the one waiting")
                }
            }
        });
    }
}
