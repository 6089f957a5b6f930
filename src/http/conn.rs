//! A connection split into its read and write halves (one socket, no `dup`), so that a read
//! can be in flight while the connection is written: on a client connection that read is
//! the disconnect watch and the wait for the next request at once (`watch::NextRead`); on an
//! upstream one the response's first read is submitted together with the request's write.
//!
//! The halves are ours, not monoio's `into_split`: monoio's write half shuts the socket down
//! (`shutdown(SHUT_WR)`, a synchronous syscall even on io_uring) when it is dropped, and every
//! connection ends by being dropped. Closing the descriptor sends the same FIN, so a closing
//! connection costs the close alone (on io_uring a queued operation, not a syscall of its
//! own). An explicit `shutdown` (lingering close) still shuts down.

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;
use std::cell::UnsafeCell;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

/// Where a response to the client is written.
pub type ClientWriter = WriteHalf;

/// The socket both halves use. monoio's `TcpStream` methods take `&mut self` but only use the
/// descriptor (every operation owns its buffer), so a read and a write may be in flight at
/// once — what monoio's own split relies on too.
type Shared = Rc<UnsafeCell<TcpStream>>;

/// Reads from the connection.
pub struct ReadHalf(Shared);

impl ReadHalf {
    /// A read whose future owns its buffer and does not borrow this half (monoio's
    /// `TcpStream::read_owned`, vendored): it can wait in a struct. The caller starts no other
    /// read on this half until it completes, or the two would race for the bytes.
    pub fn read_owned<T: IoBufMut>(&mut self, buf: T) -> monoio::net::tcp::ReadOwned<T> {
        // SAFETY: as in `read`.
        let stream = unsafe { &*self.0.get() };
        stream.read_owned(buf)
    }
}

/// Writes to the connection. Dropping it does not shut the socket down.
pub struct WriteHalf(Shared);

impl WriteHalf {
    /// A second handle on the socket, for a task that writes the rest of an answer while the
    /// request waits for it (`proxy::relay_task`). The caller keeps to one writer at a time:
    /// the two handles never have writes in flight together.
    pub fn share(&self) -> WriteHalf {
        WriteHalf(self.0.clone())
    }
}

impl AsRawFd for WriteHalf {
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: a shared read of the stream's descriptor number, which nothing changes while
        // the stream lives (operations in flight hold their own handle on the descriptor).
        unsafe { &*self.0.get() }.as_raw_fd()
    }
}

pub struct SplitStream {
    pub rd: ReadHalf,
    pub wr: WriteHalf,
    /// The socket's descriptor, open as long as the halves are.
    fd: RawFd,
}

impl SplitStream {
    pub fn new(stream: TcpStream) -> Self {
        let fd = stream.as_raw_fd();
        let shared = Rc::new(UnsafeCell::new(stream));
        SplitStream {
            rd: ReadHalf(shared.clone()),
            wr: WriteHalf(shared),
            fd,
        }
    }

    /// The halves and the descriptor, to be put together again by `from_parts` (a pooled
    /// upstream connection's read half waits in its own future while it is idle).
    pub fn into_parts(self) -> (ReadHalf, WriteHalf, RawFd) {
        (self.rd, self.wr, self.fd)
    }

    /// The inverse of `into_parts`: the three must come from one `into_parts`.
    pub fn from_parts(rd: ReadHalf, wr: WriteHalf, fd: RawFd) -> Self {
        SplitStream { rd, wr, fd }
    }
}

impl AsRawFd for SplitStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl AsyncReadRent for ReadHalf {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        // SAFETY: the stream lives as long as either half; the only other reference is the
        // write half's, and a read and a write on one socket may be in flight together (see
        // `Shared`). This half never hands out a second read at once (`&mut self`).
        let stream = unsafe { &mut *self.0.get() };
        stream.read(buf)
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        // SAFETY: as in `read`.
        let stream = unsafe { &mut *self.0.get() };
        stream.readv(buf)
    }
}

impl AsyncWriteRent for WriteHalf {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        // SAFETY: as in `ReadHalf::read`, for the write side.
        let stream = unsafe { &mut *self.0.get() };
        stream.write(buf)
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        // SAFETY: as in `ReadHalf::read`, for the write side.
        let stream = unsafe { &mut *self.0.get() };
        stream.writev(buf)
    }

    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> {
        // SAFETY: as in `ReadHalf::read`, for the write side.
        let stream = unsafe { &mut *self.0.get() };
        stream.flush()
    }

    fn shutdown(&mut self) -> impl Future<Output = std::io::Result<()>> {
        // SAFETY: as in `ReadHalf::read`, for the write side.
        let stream = unsafe { &mut *self.0.get() };
        stream.shutdown()
    }
}

impl AsyncReadRent for SplitStream {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.rd.read(buf)
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.rd.readv(buf)
    }
}

impl AsyncWriteRent for SplitStream {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.wr.write(buf)
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.wr.writev(buf)
    }

    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> {
        self.wr.flush()
    }

    fn shutdown(&mut self) -> impl Future<Output = std::io::Result<()>> {
        self.wr.shutdown()
    }
}
