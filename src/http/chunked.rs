//! Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! It is fed arbitrary slices as they arrive and reports data ranges through a callback, so
//! the same state machine serves both decoding a request body and finding where a relayed
//! upstream body ends while its raw bytes are forwarded untouched.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    BadSize,
    SizeTooLarge,
    BadLineEnd,
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkError::BadSize => "invalid chunk size line",
            ChunkError::SizeTooLarge => "chunk size too large",
            ChunkError::BadLineEnd => "missing CRLF in chunked encoding",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits; `any` tells whether at least one was seen.
    Size {
        any: bool,
    },
    /// After the size: chunk extensions up to CR.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// Upper bound of a single chunk; far above anything legitimate, well below overflow.
const MAX_CHUNK: u64 = 1 << 40;

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    remaining: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size { any: false },
            size: 0,
            remaining: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Payload bytes announced by the current chunk's size line and not yet seen, so that
    /// a body limit can be enforced before the bytes arrive.
    #[inline]
    pub fn announced(&self) -> u64 {
        match self.state {
            State::Data => self.remaining,
            State::SizeLf => self.size,
            _ => 0,
        }
    }

    /// Consumes bytes from `input`, calling `on_data` for every piece of chunk payload.
    /// Returns how many bytes were consumed; stops right after the terminating CRLF, so any
    /// bytes after it (a pipelined message) are left alone.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            // The usual lines whole in this read, without a state change per byte: a size
            // line without extension, and the CRLF after a chunk's data.
            match self.state {
                State::Size { any: false } => {
                    if let Some((size, used)) = whole_size_line(&input[i..]) {
                        i += used;
                        if size == 0 {
                            self.state = State::TrailerStart;
                        } else {
                            self.remaining = size;
                            self.state = State::Data;
                        }
                        continue;
                    }
                }
                State::DataCr if input[i..].starts_with(b"\r\n") => {
                    i += 2;
                    self.state = State::Size { any: false };
                    continue;
                }
                _ => {}
            }
            let b = input[i];
            match self.state {
                State::Size { any } => match hex_val(b) {
                    Some(v) => {
                        self.size = self.size * 16 + v as u64;
                        if self.size > MAX_CHUNK {
                            return Err(ChunkError::SizeTooLarge);
                        }
                        self.state = State::Size { any: true };
                    }
                    None if !any => return Err(ChunkError::BadSize),
                    None => match b {
                        b'\r' => self.state = State::SizeLf,
                        b';' | b' ' | b'\t' => self.state = State::Ext,
                        _ => return Err(ChunkError::BadSize),
                    },
                },
                State::Ext => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.remaining = self.size;
                        self.state = State::Data;
                    }
                    self.size = 0;
                }
                State::Data => {
                    let avail = (input.len() - i) as u64;
                    let take = avail.min(self.remaining) as usize;
                    on_data(&input[i..i + take]);
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::Size { any: false };
                }
                State::TrailerStart => {
                    self.state = if b == b'\r' {
                        State::FinalLf
                    } else {
                        State::TrailerLine
                    };
                }
                State::TrailerLine => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::TrailerStart;
                }
                State::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnd);
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

/// A size line with no extension at the start of `input`, whole: `(size, bytes)`. None for
/// anything else (the state machine then takes it byte by byte, errors included).
#[inline]
fn whole_size_line(input: &[u8]) -> Option<(u64, usize)> {
    let mut size = 0u64;
    let mut n = 0;
    while let Some(v) = input.get(n).and_then(|&b| hex_val(b)) {
        size = size * 16 + v as u64;
        if size > MAX_CHUNK {
            return None;
        }
        n += 1;
    }
    (n > 0 && input[n..].starts_with(b"\r\n")).then_some((size, n + 2))
}

#[inline]
fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends one chunk (size line, payload, CRLF) to `out`.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    encode_chunk_of(out, &[data]);
}

/// Appends one chunk whose payload is `parts` one after another, without joining them first.
pub fn encode_chunk_of(out: &mut Vec<u8>, parts: &[&[u8]]) {
    push_chunk_size(out, parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

/// A chunk's size line: `n` in hex, then CRLF.
fn push_chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(HEX[(n >> (4 * i)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() && !d.is_done() {
            let end = (pos + step).min(input.len());
            pos += d.feed(&input[pos..end], |s| out.extend_from_slice(s))?;
        }
        assert!(d.is_done(), "decoder not done");
        Ok((out, pos))
    }

    #[test]
    fn decodes_in_any_split() {
        let msg = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..msg.len() {
            let (out, used) = decode_all(msg, step).unwrap();
            assert_eq!(out, b"hello, world");
            assert_eq!(&msg[used..], b"NEXT");
        }
    }

    #[test]
    fn rejects_garbage() {
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"zz\r\n", |_| {}), Err(ChunkError::BadSize));
        let mut d = ChunkedDecoder::new();
        assert_eq!(d.feed(b"3\r\nabcX", |_| {}), Err(ChunkError::BadLineEnd));
        let mut d = ChunkedDecoder::new();
        assert_eq!(
            d.feed(b"fffffffffffffffff\r\n", |_| {}),
            Err(ChunkError::SizeTooLarge)
        );
    }

    #[test]
    fn encode_roundtrip() {
        let mut out = Vec::new();
        encode_chunk(&mut out, b"data: x\n\n");
        out.extend_from_slice(LAST_CHUNK);
        let (dec, used) = decode_all(&out, 3).unwrap();
        assert_eq!(dec, b"data: x\n\n");
        assert_eq!(used, out.len());
    }

    #[test]
    fn chunk_size_lines_in_hex() {
        for n in [
            0usize,
            1,
            9,
            10,
            15,
            16,
            255,
            256,
            4096,
            0xabcdef,
            usize::MAX,
        ] {
            let mut out = Vec::new();
            push_chunk_size(&mut out, n);
            assert_eq!(out, format!("{n:x}\r\n").as_bytes(), "{n}");
        }
    }
}
