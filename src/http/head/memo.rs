//! Heads recognised by their bytes. An engine answers every request with a head of the same
//! bytes but for its `Content-Length` value (a stream's head, chunked, is the same bytes every
//! time; vLLM's `date` changes once a second), and a client on a kept-alive connection sends
//! the same request head each time but for the body's length. A head that matches one parsed
//! before byte for byte, the length's digits aside, gets that head's answer with the new
//! length: two byte comparisons instead of a parse (docs/benchmarks.md, "Heads recognised by
//! their bytes").
//!
//! Exact, not a guess: the matched bytes are the ones that were parsed and checked, and the
//! digits are read as the parser reads them. Heads that a length does not frame the same way
//! (a zero length, a status without a body, several `Content-Length` lines) are not kept.

use super::fields::{short_decimal, MAX_UNCHECKED_DIGITS};
use super::{
    parse_request, parse_request_noting, parse_response, parse_response_noting, Framing, HeadError,
    RequestHead, ResponseHead, Shape,
};

/// Longer heads are parsed each time (an engine's is about 100 bytes, vLLM's 150, the OpenAI
/// SDK's requests 600).
const MAX_KEPT: usize = 1024;
/// After this many misses in a row (heads that differ each time: a request id in every
/// head), the memo rests for `REST` heads: a miss costs a comparison and a copy.
const MISSES: u32 = 16;
const REST: u32 = 1024;

/// A head the memo can hand out again with another body length.
pub trait Head: Clone + Sized {
    /// The parse alone.
    fn parse(buf: &[u8]) -> Result<Self, HeadError>;
    /// The parse, and what of the head may be kept.
    fn parse_noting(buf: &[u8]) -> Result<(Self, Option<Shape>), HeadError>;
    /// Makes this the head of a body of `n` bytes (not 0), `len` bytes long itself.
    fn set_length(&mut self, n: u64, len: usize);
    fn len(&self) -> usize;
}

impl Head for ResponseHead {
    fn parse(buf: &[u8]) -> Result<Self, HeadError> {
        parse_response(buf, false)
    }

    fn parse_noting(buf: &[u8]) -> Result<(Self, Option<Shape>), HeadError> {
        parse_response_noting(buf)
    }

    fn set_length(&mut self, n: u64, len: usize) {
        self.framing = Framing::Length(n);
        self.len = len;
    }

    fn len(&self) -> usize {
        self.len
    }
}

impl Head for RequestHead {
    fn parse(buf: &[u8]) -> Result<Self, HeadError> {
        parse_request(buf)
    }

    fn parse_noting(buf: &[u8]) -> Result<(Self, Option<Shape>), HeadError> {
        parse_request_noting(buf)
    }

    fn set_length(&mut self, n: u64, len: usize) {
        self.framing = Framing::Length(n);
        self.len = len;
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// A worker's recent response heads: a 1P+1D stream alternates a prefill node's JSON head
/// with the decode node's event-stream head, and a fleet may run more than one server build.
pub type ResponseMemo = Memo<ResponseHead, 4>;
/// A client connection's last request head.
pub type RequestMemo = Memo<RequestHead, 1>;

struct Kept<H> {
    bytes: Vec<u8>,
    shape: Shape,
    head: H,
}

/// The last `SLOTS` heads parsed in full (`parse`).
pub struct Memo<H, const SLOTS: usize> {
    kept: Vec<Kept<H>>,
    /// The slot the next new head replaces, round robin.
    next: usize,
    misses: u32,
    /// Heads left to parse without looking (after `MISSES` misses in a row).
    resting: u32,
    /// The slot `parse_in_place` recalled or kept the last head in.
    last: usize,
}

impl<H, const SLOTS: usize> Default for Memo<H, SLOTS> {
    fn default() -> Self {
        Memo {
            kept: Vec::new(),
            next: 0,
            misses: 0,
            resting: 0,
            last: 0,
        }
    }
}

impl<H: Head, const SLOTS: usize> Memo<H, SLOTS> {
    /// The head `buf` starts with, as `parse_response(buf, false)` or `parse_request(buf)`
    /// reads it: from a kept head when `buf` starts with one of the same bytes, else parsed
    /// (and kept, when its shape allows).
    pub fn parse(&mut self, buf: &[u8]) -> Result<H, HeadError> {
        match self.parse_in_place(buf)? {
            Some(head) => Ok(head),
            None => Ok(self.last().clone()),
        }
    }

    /// `parse` without a copy of a kept head: `None` when the head is `last()` (recalled,
    /// or parsed and kept), else the head. For a memo whose owner reads the head before
    /// its next parse: a client connection's (a clone of the head cost a hundred
    /// instructions and, for a client with headers of its own, an allocation).
    pub fn parse_in_place(&mut self, buf: &[u8]) -> Result<Option<H>, HeadError> {
        if self.resting > 0 {
            self.resting -= 1;
            return H::parse(buf).map(Some);
        }
        for (i, k) in self.kept.iter_mut().enumerate() {
            match k.recall(buf) {
                Some(Recalled::Same) => {}
                Some(Recalled::Length(n, len)) => k.head.set_length(n, len),
                None => continue,
            }
            self.misses = 0;
            self.last = i;
            return Ok(None);
        }
        let (head, shape) = H::parse_noting(buf)?;
        let Some(shape) = shape.filter(|_| head.len() <= MAX_KEPT) else {
            return Ok(Some(head));
        };
        self.misses += 1;
        if self.misses >= MISSES {
            self.misses = 0;
            self.resting = REST;
        }
        self.keep(&buf[..head.len()], shape, head);
        Ok(None)
    }

    /// The head the last `parse_in_place` that answered `None` recalled or kept.
    pub fn last(&self) -> &H {
        &self.kept[self.last].head
    }

    fn keep(&mut self, bytes: &[u8], shape: Shape, head: H) {
        if self.kept.len() < SLOTS {
            self.last = self.kept.len();
            self.kept.push(Kept {
                bytes: bytes.to_vec(),
                shape,
                head,
            });
            return;
        }
        let k = &mut self.kept[self.next];
        k.bytes.clear();
        k.bytes.extend_from_slice(bytes);
        k.shape = shape;
        k.head = head;
        self.last = self.next;
        self.next = (self.next + 1) % SLOTS;
    }
}

/// How a kept head matches a new one.
enum Recalled {
    /// The same bytes.
    Same,
    /// The same bytes but for the length: the body's, and the head's own.
    Length(u64, usize),
}

impl<H: Head> Kept<H> {
    /// The head `buf` starts with, when it is this one's bytes with (for `LengthAt`) other
    /// digits for the length.
    fn recall(&self, buf: &[u8]) -> Option<Recalled> {
        let (start, end) = match self.shape {
            Shape::Fixed => {
                return (buf.get(..self.bytes.len())? == self.bytes.as_slice())
                    .then_some(Recalled::Same);
            }
            Shape::LengthAt(start, end) => (start, end),
        };
        if buf.get(..start)? != &self.bytes[..start] {
            return None;
        }
        let digits = buf[start..]
            .iter()
            .take(MAX_UNCHECKED_DIGITS + 1)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || digits > MAX_UNCHECKED_DIGITS {
            return None;
        }
        let rest = &self.bytes[end..];
        let at = start + digits;
        if buf.get(at..at + rest.len())? != rest {
            return None;
        }
        let n = short_decimal(&buf[start..at])?;
        if n == 0 {
            // No body: framed as `None`, which the parser decides.
            return None;
        }
        Some(Recalled::Length(n, at + rest.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_response(memo: &mut ResponseMemo, buf: &[u8]) {
        // Always looking: the random heads below would otherwise put it to rest.
        memo.resting = 0;
        assert_eq!(
            format!("{:?}", memo.parse(buf)),
            format!("{:?}", parse_response(buf, false)),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }

    fn same_request(memo: &mut RequestMemo, buf: &[u8]) {
        memo.resting = 0;
        assert_eq!(
            format!("{:?}", memo.parse(buf)),
            format!("{:?}", parse_request(buf)),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }

    /// Through the memo, every head reads as the parser reads it: heads that differ from a
    /// kept one in the length's digits, in a byte anywhere, cut short, or with a body after.
    #[test]
    fn a_kept_response_head_answers_as_the_parser_does() {
        let mut memo = ResponseMemo::default();
        variants(RESPONSES, 0x9e37_79b9_7f4a_7c15, |h| {
            same_response(&mut memo, h)
        });
    }

    #[test]
    fn a_kept_request_head_answers_as_the_parser_does() {
        let mut memo = RequestMemo::default();
        variants(REQUESTS, 0x2545_f491_4f6c_dd1d, |h| {
            same_request(&mut memo, h)
        });
    }

    const REQUESTS: &[&[u8]] = &[
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\nContent-Length: 93\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nUser-Agent: OpenAI/Python 1.0\r\nAuthorization: Bearer k\r\nX-Request-Id: r1\r\ncontent-length: 12 \r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.0\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    ];

    const RESPONSES: &[&[u8]] = &[
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

    /// Each head, then the same with a body behind it, with other length digits, cut short,
    /// and mutated at random, in rounds (so that kept heads are met again).
    fn variants(heads: &[&[u8]], seed: u64, mut check: impl FnMut(&[u8])) {
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
        let mut next = crate::test_rng(seed);
        for round in 0..4 {
            for head in heads {
                check(head);
                // The same bytes with a body behind them, and another length.
                let mut with_body = head.to_vec();
                with_body.extend_from_slice(b"{\"x\":1}");
                check(&with_body);
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
                        check(&h);
                        check(&h[..h.len() - 1]);
                    }
                }
                for cut in 0..head.len() {
                    check(&head[..cut]);
                }
                for _ in 0..200 + round * 100 {
                    let mut m = head.to_vec();
                    crate::test_mutate(&mut m, interesting, &mut next);
                    check(&m);
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
        for i in 0..4 {
            memo.parse(
                format!("HTTP/1.1 200 OK\r\nX-{i}: v\r\nContent-Length: 1\r\n\r\n").as_bytes(),
            )
            .unwrap();
        }
        assert_eq!(memo.kept.len(), 4);
        assert!(memo.kept.iter().all(|k| k.bytes.as_slice() != json));
    }

    /// Heads that differ every time put the memo to rest: no comparison, no copy.
    #[test]
    fn heads_that_differ_each_time_rest_the_memo() {
        let mut memo = RequestMemo::default();
        let head = |i: u32| {
            format!("POST / HTTP/1.1\r\nHost: a\r\nX-Request-Id: {i}\r\nContent-Length: 1\r\n\r\n")
        };
        for i in 0..MISSES {
            assert_eq!(memo.resting, 0);
            memo.parse(head(i).as_bytes()).unwrap();
        }
        assert_eq!(memo.resting, REST);
        let kept = memo.kept[0].bytes.clone();
        // Resting, it neither recalls the kept head nor keeps new ones; it reads them alike.
        let h = memo.parse(&kept).unwrap();
        assert_eq!(h.request_id.as_deref(), Some("15"));
        assert_eq!(memo.resting, REST - 1);
        memo.parse(head(99).as_bytes()).unwrap();
        assert_eq!(memo.kept[0].bytes, kept);
    }

    fn find(h: &[u8], what: &[u8]) -> Option<usize> {
        h.windows(what.len())
            .position(|w| w.eq_ignore_ascii_case(what))
    }
}
