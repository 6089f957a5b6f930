//! Response heads recognised by their bytes. An engine answers every request with a head of
//! the same bytes but for its `Content-Length` value (a stream's head, chunked, is the same
//! bytes every time; vLLM's `date` changes once a second). A worker keeps the last few heads
//! it parsed in full; a head that matches one of them byte for byte, the length's digits
//! aside, gets that head's answer with the new length, for two byte comparisons instead of a
//! parse (docs/benchmarks.md, "Response heads recognised").
//!
//! Exact, not a guess: the matched bytes are the ones that were parsed and checked, and the
//! digits are read as the parser reads them. Heads that a length does not frame the same way
//! (a zero length, a status without a body, several `Content-Length` lines) are not kept.

use super::{parse_response_noting, Framing, HeadError, ResponseHead, Shape};

/// Heads kept: a 1P+1D stream alternates a prefill node's JSON head with the decode node's
/// event-stream head, and a fleet may run more than one server build.
const SLOTS: usize = 4;
/// Longer heads are parsed each time (an engine's is about 100 bytes; vLLM's 150).
const MAX_KEPT: usize = 1024;
/// `Content-Length` digits read without an overflow check (`fields::content_length`).
const MAX_DIGITS: usize = 19;

struct Kept {
    bytes: Vec<u8>,
    shape: Shape,
    head: ResponseHead,
}

/// A worker's recent response heads (`parse`).
#[derive(Default)]
pub struct ResponseMemo {
    kept: Vec<Kept>,
    /// The slot the next new head replaces, round robin.
    next: usize,
}

impl ResponseMemo {
    /// `parse_response(buf, false)`: from a kept head when `buf` starts with one of the same
    /// bytes, else parsed (and kept, when its shape allows).
    pub fn parse(&mut self, buf: &[u8]) -> Result<ResponseHead, HeadError> {
        if let Some(h) = self.kept.iter().find_map(|k| k.recall(buf)) {
            return Ok(h);
        }
        let (head, shape) = parse_response_noting(buf)?;
        if let Some(shape) = shape.filter(|_| head.len <= MAX_KEPT) {
            self.keep(&buf[..head.len], shape, &head);
        }
        Ok(head)
    }

    fn keep(&mut self, bytes: &[u8], shape: Shape, head: &ResponseHead) {
        if self.kept.len() < SLOTS {
            self.kept.push(Kept {
                bytes: bytes.to_vec(),
                shape,
                head: head.clone(),
            });
            return;
        }
        let k = &mut self.kept[self.next];
        k.bytes.clear();
        k.bytes.extend_from_slice(bytes);
        k.shape = shape;
        k.head = head.clone();
        self.next = (self.next + 1) % SLOTS;
    }
}

impl Kept {
    /// The head `buf` starts with, when it is this one's bytes with (for `LengthAt`) other
    /// digits for the length.
    fn recall(&self, buf: &[u8]) -> Option<ResponseHead> {
        let (start, end) = match self.shape {
            Shape::Fixed => {
                return (buf.get(..self.bytes.len())? == self.bytes.as_slice())
                    .then(|| self.head.clone());
            }
            Shape::LengthAt(start, end) => (start, end),
        };
        if buf.get(..start)? != &self.bytes[..start] {
            return None;
        }
        let digits = buf[start..]
            .iter()
            .take(MAX_DIGITS + 1)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || digits > MAX_DIGITS {
            return None;
        }
        let rest = &self.bytes[end..];
        let at = start + digits;
        if buf.get(at..at + rest.len())? != rest {
            return None;
        }
        let n = buf[start..at]
            .iter()
            .fold(0u64, |n, &b| n * 10 + u64::from(b - b'0'));
        if n == 0 {
            // No body: framed as `None`, which the parser decides.
            return None;
        }
        let mut head = self.head.clone();
        head.framing = Framing::Length(n);
        head.len = at + rest.len();
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::parse_response;

    fn same(memo: &mut ResponseMemo, buf: &[u8]) {
        assert_eq!(
            format!("{:?}", memo.parse(buf)),
            format!("{:?}", parse_response(buf, false)),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }

    /// Through the memo, every head reads as the parser reads it: heads that differ from a
    /// kept one in the length's digits, in a byte anywhere, cut short, or with a body after.
    #[test]
    fn a_kept_head_answers_as_the_parser_does() {
        let heads: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 385\r\nConnection: keep-alive\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ndate: Sat, 28 Nov 2026 02:45:25 GMT\r\nserver: uvicorn\r\ncontent-length: 7 \r\ncontent-type: application/json\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 12\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 40\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 40\r\n\r\n",
        ];
        let lengths: &[&[u8]] = &[
            b"1",
            b"0",
            b"00",
            b"42",
            b"385",
            b"9999999999999999999",
            b"18446744073709551615",
            b"18446744073709551616",
            b"12a",
            b"",
            b" 9",
        ];
        let interesting = b"\r\n \t:0159aZ-\x00\x7f";
        let mut next = crate::test_rng(0x9e37_79b9_7f4a_7c15);
        let mut memo = ResponseMemo::default();
        for round in 0..4 {
            for head in heads {
                same(&mut memo, head);
                // The same bytes with a body behind them, and another length.
                let mut with_body = head.to_vec();
                with_body.extend_from_slice(b"{\"x\":1}");
                same(&mut memo, &with_body);
                if let Some(at) = find(head, b"ength: ") {
                    let start = at + 7;
                    let end = start
                        + head[start..]
                            .iter()
                            .take_while(|b| b.is_ascii_digit())
                            .count();
                    for digits in lengths {
                        let mut h = head[..start].to_vec();
                        h.extend_from_slice(digits);
                        h.extend_from_slice(&head[end..]);
                        same(&mut memo, &h);
                        same(&mut memo, &h[..h.len() - 1]);
                    }
                }
                for cut in 0..head.len() {
                    same(&mut memo, &head[..cut]);
                }
                for _ in 0..200 + round * 100 {
                    let mut m = head.to_vec();
                    let at = next(m.len());
                    let b = interesting[next(interesting.len())];
                    match next(3) {
                        0 => m[at] = b,
                        1 => m.insert(at, b),
                        _ => {
                            m.remove(at);
                        }
                    }
                    same(&mut memo, &m);
                }
            }
        }
    }

    #[test]
    fn only_heads_a_length_frames_alike_are_kept() {
        let mut memo = ResponseMemo::default();
        for h in [
            &b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            memo.parse(h).unwrap();
        }
        assert!(memo.kept.is_empty());
        let json = b"HTTP/1.1 200 OK\r\nContent-Length: 385\r\n\r\n";
        memo.parse(json).unwrap();
        assert_eq!(memo.kept.len(), 1);
        // Another length: recalled, not kept again.
        let h = memo
            .parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\nbody")
            .unwrap();
        assert_eq!((h.framing, h.len), (Framing::Length(1024), 41));
        assert_eq!(memo.kept.len(), 1);
        // More shapes than slots: the oldest goes, round robin.
        for i in 0..SLOTS {
            memo.parse(
                format!("HTTP/1.1 200 OK\r\nX-{i}: v\r\nContent-Length: 1\r\n\r\n").as_bytes(),
            )
            .unwrap();
        }
        assert_eq!(memo.kept.len(), SLOTS);
        assert!(memo.kept.iter().all(|k| k.bytes.as_slice() != json));
    }

    fn find(h: &[u8], what: &[u8]) -> Option<usize> {
        h.windows(what.len())
            .position(|w| w.eq_ignore_ascii_case(what))
    }
}
