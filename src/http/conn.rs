//! A client connection split into its read and write halves (one socket, no `dup`), so that
//! the connection's own next read can be in flight while a response is written: that read
//! is the disconnect watch and the wait for the next request at once (`watch::NextRead`).

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;
use std::future::Future;

/// Where a response to the client is written.
pub type ClientWriter = OwnedWriteHalf<TcpStream>;

pub struct ClientConn {
    pub rd: OwnedReadHalf<TcpStream>,
    pub wr: ClientWriter,
}

impl ClientConn {
    pub fn new(stream: TcpStream) -> Self {
        let (rd, wr) = stream.into_split();
        ClientConn { rd, wr }
    }
}

impl AsyncReadRent for ClientConn {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.rd.read(buf)
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        self.rd.readv(buf)
    }
}

impl AsyncWriteRent for ClientConn {
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
