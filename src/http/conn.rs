//! A connection split into its read and write halves (one socket, no `dup`), so that a read
//! can be in flight while the connection is written: on a client connection that read is
//! the disconnect watch and the wait for the next request at once (`watch::NextRead`); on an
//! upstream one the response's first read is submitted together with the request's write.

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};

/// Where a response to the client is written.
pub type ClientWriter = OwnedWriteHalf<TcpStream>;

pub struct SplitStream {
    pub rd: OwnedReadHalf<TcpStream>,
    pub wr: OwnedWriteHalf<TcpStream>,
    /// The socket's descriptor, open as long as the halves are.
    fd: RawFd,
}

impl SplitStream {
    pub fn new(stream: TcpStream) -> Self {
        let fd = stream.as_raw_fd();
        let (rd, wr) = stream.into_split();
        SplitStream { rd, wr, fd }
    }

    /// The halves and the descriptor, to be put together again by `from_parts` (a pooled
    /// upstream connection's read half waits in its own future while it is idle).
    pub fn into_parts(self) -> (OwnedReadHalf<TcpStream>, OwnedWriteHalf<TcpStream>, RawFd) {
        (self.rd, self.wr, self.fd)
    }

    /// The inverse of `into_parts`: the three must come from one `into_parts`.
    pub fn from_parts(
        rd: OwnedReadHalf<TcpStream>,
        wr: OwnedWriteHalf<TcpStream>,
        fd: RawFd,
    ) -> Self {
        SplitStream { rd, wr, fd }
    }
}

impl AsRawFd for SplitStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
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
