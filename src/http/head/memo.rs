//! Heads recognised by their bytes. An engine answers every request with a head of the same
//! bytes but for its `Content-Length` value (a stream's head, chunked, is the same bytes every
//! time; vLLM's `date` changes once a second), and a client on a kept-alive connection sends
//! the same request head each time but for the body's length and, from a client that names
//! its requests (`vllm bench serve`), the `X-Request-Id`. A head that matches one parsed
//! before byte for byte, those holes aside, gets that head's answer with the new length and
//! id: a few byte comparisons instead of a parse (docs/benchmarks.md, "Heads recognised by
//! their bytes").
//!
//! Exact, not a guess: the matched bytes are the ones that were parsed and checked, and the
//! digits and the id (printable ASCII only, nothing to trim) are read as the parser reads
//! them. Heads that a length does not frame the same way (a zero length, a status without a
//! body, several `Content-Length` lines) are not kept.

use super::fields::{short_decimal, MAX_UNCHECKED_DIGITS};
use super::{
    parse_request, parse_request_noting, parse_response, parse_response_noting, Framing, HeadError,
    RequestHead, ResponseHead, Shape,
};

/// Longer heads are parsed each time (an engine's is about 100 bytes, vLLM's 150, the OpenAI
/// SDK's requests 600).
const MAX_KEPT: usize = 1024;
/// After this many misses in a row (heads that differ each time other than in a hole: a
/// `traceparent` in every head), the memo rests for `REST` heads: a miss costs a comparison
/// and a copy.
const MISSES: u32 = 16;
const REST: u32 = 1024;

/// A head the memo can hand out again with another body length.
pub trait Head: Clone + Sized {
    /// The parse alone.
    fn parse(buf: &[u8]) -> Result<Self, HeadError>;
    /// The parse, and what of the head may be kept.
    fn parse_noting(buf: &[u8]) -> Result<(Self, Option<Shape>), HeadError>;
    /// Makes this the head recalled in another head's bytes: `len` bytes long, of a body of
    /// `length` bytes (not 0) when the length differs, with the request id `id` when that
    /// differs.
    fn recalled(&mut self, length: Option<u64>, id: Option<&str>, len: usize);
    fn len(&self) -> usize;
}

impl Head for ResponseHead {
    fn parse(buf: &[u8]) -> Result<Self, HeadError> {
        parse_response(buf, false)
    }

    fn parse_noting(buf: &[u8]) -> Result<(Self, Option<Shape>), HeadError> {
        parse_response_noting(buf)
    }

    fn recalled(&mut self, length: Option<u64>, _id: Option<&str>, len: usize) {
        // A response's shape has no request id.
        if let Some(n) = length {
            self.framing = Framing::Length(n);
        }
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

    fn recalled(&mut self, length: Option<u64>, id: Option<&str>, len: usize) {
        if let Some(n) = length {
            self.framing = Framing::Length(n);
        }
        if let Some(id) = id {
            // The kept id's buffer takes the new one: no allocation per request.
            let kept = self.request_id.get_or_insert_with(String::new);
            kept.clear();
            kept.push_str(id);
        }
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
            let Some(r) = k.recall(buf) else {
                continue;
            };
            k.head
                .recalled(r.length, r.id.map(|(s, e)| id_str(buf, s, e)), r.len);
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

/// How a kept head matches a new one: its length (the new head's), and what differs.
struct Recalled {
    /// The body's length, when its digits are a hole of the shape.
    length: Option<u64>,
    /// Where the new head's request id lies, when that is a hole of the shape.
    id: Option<(usize, usize)>,
    len: usize,
}

impl<H: Head> Kept<H> {
    /// How the head `buf` starts with matches this one: the same bytes but in the shape's
    /// holes, which hold other digits for the length, another request id.
    fn recall(&self, buf: &[u8]) -> Option<Recalled> {
        let kept = self.bytes.as_slice();
        match (self.shape.length, self.shape.id) {
            // The usual shapes first, each with no more work than it needs.
            (None, None) => (buf.get(..kept.len())? == kept).then_some(Recalled {
                length: None,
                id: None,
                len: kept.len(),
            }),
            (Some((start, end)), None) => {
                if buf.get(..start)? != &kept[..start] {
                    return None;
                }
                let (n, at) = length_at(buf, start)?;
                let rest = &kept[end..];
                (buf.get(at..at + rest.len())? == rest).then_some(Recalled {
                    length: Some(n),
                    id: None,
                    len: at + rest.len(),
                })
            }
            (length, Some(id)) => self.recall_with_id(buf, length, id),
        }
    }

    /// `recall` for a shape with a request id: the holes in the order they lie in.
    fn recall_with_id(
        &self,
        buf: &[u8],
        length: Option<(usize, usize)>,
        id: (usize, usize),
    ) -> Option<Recalled> {
        let mut holes = [Some((id, Hole::Id)), length.map(|l| (l, Hole::Length))];
        if length.is_some_and(|(start, _)| start < id.0) {
            holes.swap(0, 1);
        }
        let mut r = Recalled {
            length: None,
            id: None,
            len: 0,
        };
        // Where the kept bytes and the new ones are: equal before the first hole, shifted by
        // the holes' differences after it.
        let (mut kept_at, mut at) = (0, 0);
        for ((start, end), hole) in holes.into_iter().flatten() {
            let same = &self.bytes[kept_at..start];
            if buf.get(at..at + same.len())? != same {
                return None;
            }
            at += same.len();
            match hole {
                Hole::Length => {
                    let (n, next) = length_at(buf, at)?;
                    r.length = Some(n);
                    at = next;
                }
                Hole::Id => {
                    let n = id_len(&buf[at..])?;
                    r.id = Some((at, at + n));
                    at += n;
                }
            }
            kept_at = end;
        }
        let rest = &self.bytes[kept_at..];
        if buf.get(at..at + rest.len())? != rest {
            return None;
        }
        r.len = at + rest.len();
        Some(r)
    }
}

/// The `Content-Length` value whose digits start at `buf[at]`, read as the parser reads it,
/// and where the digits end. None for no digits, too many to read unchecked, or a zero (no
/// body: framed as `None`, which the parser decides). Inlined: called apart, it cost more
/// than the comparisons around it.
#[inline(always)]
fn length_at(buf: &[u8], at: usize) -> Option<(u64, usize)> {
    let digits = buf[at..]
        .iter()
        .take(MAX_UNCHECKED_DIGITS + 1)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || digits > MAX_UNCHECKED_DIGITS {
        return None;
    }
    let n = short_decimal(&buf[at..at + digits])?;
    (n != 0).then_some((n, at + digits))
}

#[derive(Clone, Copy)]
enum Hole {
    Length,
    Id,
}

/// The request id `recall` found at `buf[start..end]`: printable ASCII (`id_len`), so text.
fn id_str(buf: &[u8], start: usize, end: usize) -> &str {
    std::str::from_utf8(&buf[start..end]).unwrap_or_default()
}

/// The length of the request id `buf` starts with: printable ASCII without spaces, at least
/// one byte, at most `MAX_KEPT`: a value the parser reads as it is, with nothing to trim.
/// Where it ends is checked by the caller: the kept bytes after the hole (the line's end)
/// must follow it.
fn id_len(buf: &[u8]) -> Option<usize> {
    let n = buf
        .iter()
        .take(MAX_KEPT)
        .take_while(|b| b.is_ascii_graphic())
        .count();
    (n > 0).then_some(n)
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
        b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 77\r\nx-request-id: 0f9e\r\nContent-Type: application/json\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nX-Request-Id: a\r\nX-Request-Id: b\r\nContent-Length: 3\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nX-Request-Id:\r\nContent-Length: 3\r\n\r\n",
    ];

    /// Request ids to put in a head's `X-Request-Id` line: ones the memo reads, and ones it
    /// leaves to the parser (empty, spaced, non-ASCII, control bytes, a line cut short).
    const IDS: &[&[u8]] = &[
        b"r2",
        b"cmpl-5b3f0c1e-8a8d-4c5e-9d55-2f4b0f1c6a77",
        b"",
        b" r3",
        b"r4 ",
        b"a b",
        b"\xc3\xa9t\xc3\xa9",
        b"r\t5",
        b"r\x7f6",
        b"r7\r",
        b"r8\n",
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
                // Other request ids, alone and with another length.
                for id in IDS {
                    let Some(h) = with_value(head, b"request-id: ", |b| b != b'\r', id) else {
                        break;
                    };
                    check(&h);
                    check(&h[..h.len() - 1]);
                    if let Some(other) = with_value(&h, b"ength: ", is_digit, b"4096") {
                        check(&other);
                    }
                }
                for digits in lengths {
                    let Some(h) = with_value(head, b"ength: ", is_digit, digits) else {
                        break;
                    };
                    check(&h);
                    check(&h[..h.len() - 1]);
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
            format!("POST / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-{i:032x}-00f067aa0ba902b7-01\r\nContent-Length: 1\r\n\r\n")
        };
        for i in 0..MISSES {
            assert_eq!(memo.resting, 0);
            memo.parse(head(i).as_bytes()).unwrap();
        }
        assert_eq!(memo.resting, REST);
        let kept = memo.kept[0].bytes.clone();
        // Resting, it neither recalls the kept head nor keeps new ones; it reads them alike.
        let h = memo.parse(&kept).unwrap();
        assert!(String::from_utf8_lossy(&h.headers).contains(&format!("{:032x}", 15)));
        assert_eq!(memo.resting, REST - 1);
        memo.parse(head(99).as_bytes()).unwrap();
        assert_eq!(memo.kept[0].bytes, kept);
    }

    /// A client that names each request (`X-Request-Id`, as `vllm bench serve` does) sends
    /// heads that differ in the id and the length only: recalled, each with its own id,
    /// without a miss.
    #[test]
    fn a_new_request_id_is_recalled_not_parsed() {
        let mut memo = RequestMemo::default();
        for i in 0..3 * MISSES {
            let h = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: a\r\nX-Request-Id: bench-{i}\r\nContent-Length: {}\r\n\r\n",
                100 + i
            );
            let got = memo.parse_in_place(h.as_bytes()).unwrap();
            assert!(got.is_none(), "kept or recalled");
            let head = memo.last();
            assert_eq!(head.request_id, Some(format!("bench-{i}")));
            assert_eq!(head.framing, Framing::Length(100 + i as u64));
            assert_eq!(head.len, h.len());
            assert_eq!(memo.kept.len(), 1);
        }
        assert_eq!((memo.misses, memo.resting), (0, 0));
    }

    /// `head` with the value after `name` (the bytes `is_value` takes) replaced by `value`.
    fn with_value(
        head: &[u8],
        name: &[u8],
        is_value: impl Fn(u8) -> bool,
        value: &[u8],
    ) -> Option<Vec<u8>> {
        let start = find(head, name)? + name.len();
        let end = start + head[start..].iter().take_while(|&&b| is_value(b)).count();
        Some([&head[..start], value, &head[end..]].concat())
    }

    fn is_digit(b: u8) -> bool {
        b.is_ascii_digit()
    }

    fn find(h: &[u8], what: &[u8]) -> Option<usize> {
        h.windows(what.len())
            .position(|w| w.eq_ignore_ascii_case(what))
    }
}
