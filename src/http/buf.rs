//! A growable read buffer with a consumed-prefix cursor, filled by owned-buffer reads
//! (monoio's io_uring API takes the buffer by value for the duration of the read).

use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;
use std::io;

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
        if self.start > 0 && (self.start >= self.buf.capacity() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let spare = self.buf.capacity() - self.buf.len();
        if spare < want.max(MIN_SPARE / 2) {
            self.buf.reserve(want.max(MIN_SPARE));
        }
        let vec = std::mem::take(&mut self.buf);
        let len = vec.len();
        let (res, slice) = r.read(vec.slice_mut(len..)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Drops everything (used when a connection is discarded).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
}
