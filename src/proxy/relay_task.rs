//! A streamed answer relayed by a task of its own on the worker, while the request waits for
//! it. Why: each relayed token wakes the task that reads it, and a token read by the request's
//! own task is polled down through the connection's whole future — the connection, the flow,
//! the race with the client leaving, the leg, the relay — whose state, on a line of its own at
//! each level, has left the cache in the 10 ms since the stream's last token. A task of its
//! own touches its small state only (docs/benchmarks.md, "A stream's relay as a task of its
//! own").
//!
//! The request keeps what it must: the race with the client leaving. When the request is
//! dropped before the task ends (the client left, or the connection is torn down), dropping
//! the handle shuts the task's sockets down — the upstream one, so that the engine stops
//! decoding at once, and the client's — and the task, woken by that, ends at its next step.
//!
//! `apart` is how a relay runs here: it hands the task what it owns (`Apart`) and takes back
//! the upstream connection and what the task recorded.

use super::contain::{Contained, Panic};
use super::context::RequestCtx;
use super::timeline::Timeline;
use super::upstream::UpstreamConn;
use crate::http::conn::ClientWriter;
use crate::instance::{DecodeLeft, InFlight};
use std::cell::Cell;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// What a relay task owns while it runs: a handle on the client's write half, the upstream
/// connection, a timeline of its own (merged into the request's at the end), and the
/// request's decode tokens still counted on the instance.
pub struct Apart {
    pub client: ClientWriter,
    pub conn: UpstreamConn,
    pub tl: Timeline,
    pub decode: DecodeLeft,
    /// Something reached the client: a failure from then on cannot be answered as an error.
    pub started: bool,
}

/// Runs `work` on what the relay owns (`Apart`) in a task of its own while the request waits
/// for it; returns the work's result, the upstream connection (to pool it) and whether
/// anything reached the client. `work` gives `Apart` back with its result.
pub async fn apart<R, F, Fut>(
    ctx: &mut RequestCtx<'_>,
    guard: &InFlight<'_>,
    conn: UpstreamConn,
    started: bool,
    work: F,
) -> (R, UpstreamConn, bool)
where
    F: FnOnce(Apart) -> Fut,
    Fut: Future<Output = (R, Apart)> + 'static,
    R: 'static,
{
    let client = ctx.client.share();
    let fds = [conn.stream.as_raw_fd(), client.as_raw_fd()];
    let parts = Apart {
        client,
        conn,
        tl: Timeline::new(ctx.tl.start),
        decode: guard.hand_over_decode(),
        started,
    };
    let (result, parts) = spawn(work(parts), fds).await;
    ctx.tl.relayed(&parts.tl);
    (result, parts.conn, parts.started)
}

/// A running relay task. Awaiting it gives the task's output; dropping it before that ends
/// the task.
pub struct Detached<T> {
    join: monoio::task::JoinHandle<Result<T, Panic>>,
    /// Set as the task's work ends or is dropped: from then on its sockets may be closed and
    /// their numbers reused, so the drop must not touch them.
    done: Rc<Cell<bool>>,
    /// The sockets the task holds open until it ends.
    fds: [RawFd; 2],
}

/// Runs `work` as a task of this worker. `work` must hold the sockets `fds` open until it
/// ends (it closes none of them before it returns): dropping the handle early shuts them
/// down, and that must reach the task's sockets, not others that took their numbers.
pub fn spawn<F>(work: F, fds: [RawFd; 2]) -> Detached<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let done = Rc::new(Cell::new(false));
    let ended = Ended(done.clone());
    let join = monoio::spawn(async move {
        // Dropped as the work ends, or with it if the task is dropped unfinished (a runtime
        // torn down): either way before the handle can look.
        let _ended = ended;
        // A panic is resumed in the request that awaits the task, whose connection's task
        // contains it (`contain`); uncaught here it would end the worker.
        Contained(std::pin::pin!(work)).await
    });
    Detached { join, done, fds }
}

/// Marks the task ended when dropped.
struct Ended(Rc<Cell<bool>>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

impl<T> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match std::task::ready!(Pin::new(&mut self.join).poll(cx)) {
            Ok(out) => Poll::Ready(out),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl<T> Drop for Detached<T> {
    fn drop(&mut self) {
        if self.done.get() {
            return;
        }
        for fd in self.fds {
            // SAFETY: not a memory operation; `fd` is open (the task holds it until it ends,
            // and it has not). A shutdown wakes the task's pending read or write, which then
            // fails or reads the end, and the task ends.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}
