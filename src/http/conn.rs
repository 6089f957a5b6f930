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
use monoio::net::tcp::Descriptor;
use monoio::net::TcpStream;
use monoio::BufResult;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};

/// Where a response to the client is written.
pub type ClientWriter = WriteHalf;

// Each half holds a handle on the socket's descriptor (vendored monoio's `Descriptor`: the
// descriptor shared, not duplicated), not a stream shared behind an `Rc`: an operation then
// reaches the descriptor with one load less, a load that misses the cache when a stream's
// next token comes 10 ms after the last (docs/benchmarks.md, "A stream's relay as a task of
// its own"). Every operation owns its buffer, so a read and a write may be in flight at once.

/// Reads from the connection.
pub struct ReadHalf(Descriptor);

impl ReadHalf {
    /// A read whose future owns its buffer and does not borrow this half (vendored monoio's
    /// `read_owned`): it can wait in a struct. The caller starts no other read on this half
    /// until it completes, or the two would race for the bytes.
    pub fn read_owned<T: IoBufMut>(&mut self, buf: T) -> monoio::net::tcp::ReadOwned<T> {
        self.0.read_owned(buf)
    }
}

/// Writes to the connection. Dropping it does not shut the socket down.
pub struct WriteHalf(Descriptor);

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
        self.0.as_raw_fd()
    }
}

pub struct SplitStream {
    pub rd: ReadHalf,
    pub wr: WriteHalf,
    /// The socket's descriptor, open as long as the halves are.
    fd: RawFd,
}

impl SplitStream {
    /// The stream itself is dropped here; its socket stays open while either half lives.
    pub fn new(stream: TcpStream) -> Self {
        SplitStream {
            rd: ReadHalf(stream.descriptor()),
            wr: WriteHalf(stream.descriptor()),
            fd: stream.as_raw_fd(),
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
        self.0.read(buf)
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.0.readv(buf)
    }
}

impl AsyncWriteRent for WriteHalf {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.0.write(buf)
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.0.writev(buf)
    }

    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> {
        std::future::ready(Ok(())) // a TCP stream has nothing to flush
    }

    fn shutdown(&mut self) -> impl Future<Output = std::io::Result<()>> {
        std::future::ready(self.0.shutdown_write())
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
