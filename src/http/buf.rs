//! A growable read buffer with a consumed-prefix cursor, filled by owned-buffer reads
//! (monoio's io_uring API takes the buffer by value for the duration of the read).

use monoio::buf::{IoBufMut, SliceMut};
use monoio::io::AsyncReadRent;
use monoio::BufResult;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

const MIN_SPARE: usize = 8 * 1024;

#[derive(Default)]
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
}

impl ReadBuf {
    pub fn with_capacity(cap: usize) -> Self {
        ReadBuf {
            buf: Vec::with_capacity(cap),
            start: 0,
        }
    }

    /// Unconsumed bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads once more from `r`, appending. Returns the number of bytes read (0 = EOF).
    ///
    /// If the future is dropped mid-read the buffer is lost; callers only drop reads on
    /// connections they are about to close.
    pub async fn fill<R: AsyncReadRent>(&mut self, r: &mut R) -> io::Result<usize> {
        self.fill_at_least(r, MIN_SPARE).await
    }

    /// Like `fill`, making room for at least `want` bytes in a single read.
    pub async fn fill_at_least<R: AsyncReadRent>(
        &mut self,
        r: &mut R,
        want: usize,
    ) -> io::Result<usize> {
        self.make_room(want);
        let vec = std::mem::take(&mut self.buf);
        let len = vec.len();
        let (res, slice) = r.read(vec.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        res
    }

    fn make_room(&mut self, want: usize) {
        if self.start > 0 && (self.start >= self.buf.capacity() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let spare = self.buf.capacity() - self.buf.len();
        if spare < want.max(MIN_SPARE / 2) {
            self.buf.reserve(want.max(MIN_SPARE));
        }
    }

    /// `fill` as a future that owns the buffer and does not borrow the reader: `read` starts
    /// a read of the buffer's spare room that owns it (`TcpStream::read_owned`), and the
    /// buffer comes back with the result. A pooled upstream connection's read is one, kept
    /// in flight while the connection is idle (`proxy::upstream`), without a box.
    pub fn fill_owned<F>(mut self, read: impl FnOnce(SliceMut<Vec<u8>>) -> F) -> OwnedFill<F> {
        self.make_room(MIN_SPARE);
        let len = self.buf.len();
        OwnedFill {
            read: read(self.buf.slice_mut(len..)),
            start: self.start,
        }
    }

    /// Drops everything (used when a connection is discarded).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
}

/// `ReadBuf::fill_owned`'s future: the read's result and the buffer, filled.
pub struct OwnedFill<F> {
    read: F,
    start: usize,
}

impl<F> Future for OwnedFill<F>
where
    F: Future<Output = BufResult<usize, SliceMut<Vec<u8>>>> + Unpin,
{
    type Output = (io::Result<usize>, ReadBuf);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (res, slice) = std::task::ready!(Pin::new(&mut self.read).poll(cx));
        let buf = ReadBuf {
            buf: slice.into_inner(),
            start: self.start,
        };
        Poll::Ready((res, buf))
    }
}
