//! Noticing that the peer of a connection went away while we are busy elsewhere (waiting on
//! an upstream, sleeping between tokens).
//!
//! The proxy uses `NextRead`: the connection's own next read, which also waits for the next
//! request — one read per request, nothing beside it. `DisconnectWatch` (the simulated node's)
//! waits for readability on a `dup` of the socket and peeks, consuming nothing: it costs a
//! readiness poll per request (on io_uring a PollAdd and, when dropped, its cancellation).

use crate::deadline::Deadline;
use monoio::net::TcpStream;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The client connection's next read (`ReadBuf::fill` on its read half), started when first
/// awaited: by the flow's race against the client leaving, else after the answer. While a
/// request is served, EOF or an error on it means the client left; bytes it brings (a
/// pipelined request) land in the connection's `ReadBuf`. After the answer the same read is
/// the wait for the next request, so it is never cancelled on a kept-alive connection and no
/// byte is lost; it is dropped only with a connection that closes.
///
/// When the next request is already buffered (pipelined behind this one) the read is never
/// started — the answer must not wait for bytes the client will not send — so a pipelining
/// client that leaves is noticed by the next write to it, not at once.
pub struct NextRead<'a> {
    read: Pin<&'a mut (dyn Future<Output = io::Result<usize>> + 'a)>,
    got: Option<io::Result<usize>>,
    buffered: bool,
}

impl<'a> NextRead<'a> {
    /// `buffered`: the connection's buffer already holds bytes of the next request.
    pub fn new(
        read: Pin<&'a mut (dyn Future<Output = io::Result<usize>> + 'a)>,
        buffered: bool,
    ) -> Self {
        NextRead {
            read,
            got: None,
            buffered,
        }
    }

    /// Ready when the client closed or reset the connection. If it sent bytes instead (a
    /// pipelined request), they stay buffered and this stays pending, as it does while the
    /// next request is already buffered (the read is then never started).
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.buffered {
            return Poll::Pending;
        }
        if self.got.is_none() {
            match self.read.as_mut().poll(cx) {
                Poll::Ready(r) => self.got = Some(r),
                Poll::Pending => return Poll::Pending,
            }
        }
        if matches!(self.got, Some(Ok(n)) if n > 0) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Runs `work` to its end unless the client closes or resets the connection first
    /// (`None`; the caller then drops the work). At every wake-up the work is polled first,
    /// so an answer that completes as the client's next bytes arrive leaves them to the next
    /// request's read. A streamed answer's tokens do not wake this task: its relay runs in a
    /// task of its own (`proxy::relay_task`), so the work here wakes a few times per request
    /// (a long plain body once per upstream read, which costs far more than this poll).
    /// Dropping the race leaves the read in flight.
    pub fn unless_closed<'n, 'w, F: Future>(
        &'n mut self,
        work: Pin<&'w mut F>,
    ) -> UnlessClosed<'n, 'a, 'w, F> {
        UnlessClosed { next: self, work }
    }

    /// After the answer: whether the client sent more within `idle` (its bytes are then in
    /// the connection's buffer). False for a close, an error or the idle timeout. `deadline`:
    /// the connection's timer, kept from one request to the next. A future of its own
    /// (`Arrived`), as `unless_closed`'s race is.
    pub fn arrived<'d>(self, idle: Duration, deadline: &'d mut Deadline) -> Arrived<'a, 'd> {
        Arrived {
            next: self,
            idle: Some(idle),
            deadline,
        }
    }
}

/// `NextRead::unless_closed`'s race: a future of its own rather than an async fn, so that
/// each of the request's wake-ups polls the work directly, not through two more state
/// machines (an async fn's and the read's `closed` one).
pub struct UnlessClosed<'n, 'a, 'w, F> {
    next: &'n mut NextRead<'a>,
    work: Pin<&'w mut F>,
}

impl<F: Future> Future for UnlessClosed<'_, '_, '_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(out) = this.work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        this.next.poll_closed(cx).map(|()| None)
    }
}

/// `NextRead::arrived`'s wait for the next request.
pub struct Arrived<'a, 'd> {
    next: NextRead<'a>,
    /// The keep-alive wait, until its deadline is set at the first poll.
    idle: Option<Duration>,
    deadline: &'d mut Deadline,
}

impl Future for Arrived<'_, '_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.get_mut();
        let next = &mut this.next;
        if next.buffered {
            return Poll::Ready(true); // the read was never started: dropping it loses nothing
        }
        let got = match next.got.take() {
            Some(r) => r,
            None => {
                if let Some(idle) = this.idle.take() {
                    this.deadline
                        .set(crate::clock::after(crate::clock::recent(), idle));
                }
                match next.read.as_mut().poll(cx) {
                    Poll::Ready(r) => r,
                    Poll::Pending => return this.deadline.poll_passed(cx).map(|()| false),
                }
            }
        };
        Poll::Ready(matches!(got, Ok(n) if n > 0))
    }
}

pub struct DisconnectWatch {
    dup: TcpStream,
}

impl DisconnectWatch {
    pub fn new(stream: &TcpStream) -> io::Result<Self> {
        // SAFETY: `stream` is borrowed for this whole call, so its descriptor stays open
        // while it is borrowed here.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        // A new descriptor we own, close-on-exec (F_DUPFD_CLOEXEC).
        let dup = std::net::TcpStream::from(fd.try_clone_to_owned()?);
        Ok(DisconnectWatch {
            dup: TcpStream::from_std(dup)?,
        })
    }

    /// Resolves when the peer closed or reset the connection. If the peer sends more data
    /// instead (a pipelined request), it stops watching and stays pending: those bytes
    /// belong to the connection's next read.
    pub async fn closed(&self) {
        loop {
            if self.dup.readable(false).await.is_err() {
                return;
            }
            let mut byte = 0u8;
            // SAFETY: the buffer is one writable byte on the stack; the descriptor is our own
            // dup, open as long as `self`.
            let n = unsafe {
                libc::recv(
                    self.dup.as_raw_fd(),
                    (&mut byte as *mut u8).cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return,
                n if n > 0 => std::future::pending::<()>().await,
                _ => {
                    let err = io::Error::last_os_error();
                    match err.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                        _ => return,
                    }
                }
            }
        }
    }
}
