//! The usual shape of a head, read without httparse: `CRLF` line ends, an uppercase method,
//! an ASCII target, `HTTP/1.0` or `HTTP/1.1`, a status reason of visible ASCII, `Name:`
//! lines whose values hold no control byte but HTAB, at most `USUAL_FIELDS` of them.
//! Every head of that shape is one httparse accepts, and it is read into the same method,
//! target, version, status and header lines (values without the blanks around them);
//! anything else — incomplete heads included — goes to httparse, which says what it is.
//! An engine's answer and a client's request have that shape: httparse's general parse
//! cost about twice as much.

use super::fields::Field;
use super::StatusLine;

/// Header lines the usual shape holds; a head with more goes to httparse.
const USUAL_FIELDS: usize = 32;

/// Byte classes of the usual shape.
const TOKEN: u8 = 1;
const VALUE: u8 = 2;
const TARGET: u8 = 4;
const REASON: u8 = 8;
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        let token = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        let visible = c >= 0x21 && c <= 0x7e;
        let mut class = 0;
        if token {
            class |= TOKEN;
        }
        if visible || c == b' ' || c == b'\t' || c >= 0x80 {
            class |= VALUE;
        }
        if visible {
            class |= TARGET;
        }
        if visible || c == b' ' || c == b'\t' {
            class |= REASON;
        }
        t[b] = class;
        b += 1;
    }
    t
};

/// The end of the run of `class` bytes from `i`.
#[inline]
fn run(buf: &[u8], mut i: usize, class: u8) -> usize {
    // Four bytes per test while all four are in the class: one branch instead of four.
    while let Some(&[a, b, c, d]) = buf.get(i..i + 4) {
        let all = CLASS[a as usize] & CLASS[b as usize] & CLASS[c as usize] & CLASS[d as usize];
        if all & class == 0 {
            break;
        }
        i += 4;
    }
    while i < buf.len() && CLASS[buf[i] as usize] & class != 0 {
        i += 1;
    }
    i
}

/// `HTTP/1.0` or `HTTP/1.1` at `i`: the minor version.
#[inline]
fn usual_version(buf: &[u8], i: usize) -> Option<u8> {
    match buf.get(i..i + 8)? {
        b"HTTP/1.1" => Some(1),
        b"HTTP/1.0" => Some(0),
        _ => None,
    }
}

/// Header lines as offsets into the head (name start and end, value start and end): small,
/// so that making one costs little.
pub(super) struct Fields {
    at: [[u16; 4]; USUAL_FIELDS],
    n: usize,
}

impl Fields {
    pub(super) fn new() -> Self {
        Fields {
            at: [[0; 4]; USUAL_FIELDS],
            n: 0,
        }
    }

    /// Each line's name start and end, value start and end.
    pub(super) fn spans(&self) -> &[[u16; 4]] {
        &self.at[..self.n]
    }

    pub(super) fn iter<'b>(&self, buf: &'b [u8]) -> impl Iterator<Item = Field<'b>> + use<'_, 'b> {
        self.at[..self.n]
            .iter()
            .map(move |&[ns, ne, vs, ve]| Field {
                name: &buf[ns as usize..ne as usize],
                value: &buf[vs as usize..ve as usize],
            })
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Where the header value starting at `i` ends: the first byte that may not be in a value
/// (a control byte but HTAB, or DEL), found eight bytes at a time.
#[inline]
fn value_end(buf: &[u8], mut i: usize) -> usize {
    while let Some(word) = buf.get(i..i + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(word) else {
            break;
        };
        let x = u64::from_le_bytes(bytes);
        // Bytes below 0x20 and bytes equal to 0x7f; the lowest flagged one is exact.
        let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let del = x ^ (ONES * 0x7f);
        let del = del.wrapping_sub(ONES) & !del & HIGH;
        let flagged = below | del;
        if flagged == 0 {
            i += 8;
            continue;
        }
        let at = i + (flagged.trailing_zeros() / 8) as usize;
        if buf[at] != b'\t' {
            return at;
        }
        i = at + 1;
    }
    run(buf, i, VALUE)
}

/// The header lines from `at` through the blank line that ends them, into `f`; the head's
/// length, when they have the usual shape (and the head is under 64 KiB).
fn usual_fields(buf: &[u8], mut at: usize, f: &mut Fields) -> Option<usize> {
    loop {
        if buf.get(at) == Some(&b'\r') {
            return (buf.get(at + 1) == Some(&b'\n')).then_some(at + 2);
        }
        let name_end = run(buf, at, TOKEN);
        if name_end == at || buf.get(name_end) != Some(&b':') {
            return None;
        }
        let mut value_start = name_end + 1;
        while matches!(buf.get(value_start), Some(b' ' | b'\t')) {
            value_start += 1;
        }
        let line_end = value_end(buf, value_start);
        if buf.get(line_end..line_end + 2) != Some(b"\r\n") {
            return None;
        }
        let mut end = line_end;
        while end > value_start && matches!(buf[end - 1], b' ' | b'\t') {
            end -= 1;
        }
        let slot = f.at.get_mut(f.n)?;
        let off = |x: usize| u16::try_from(x).ok();
        *slot = [off(at)?, off(name_end)?, off(value_start)?, off(end)?];
        f.n += 1;
        at = line_end + 2;
    }
}

/// What a request line says.
pub(super) struct RequestLine<'b> {
    pub(super) method: &'b [u8],
    pub(super) target: &'b str,
    pub(super) minor: u8,
}

/// `METHOD target HTTP/1.x` and the header lines, in the usual shape.
pub(super) fn usual_request<'b>(
    buf: &'b [u8],
    fields: &mut Fields,
) -> Option<(RequestLine<'b>, usize)> {
    let method_end = buf.iter().position(|b| !b.is_ascii_uppercase())?;
    if method_end == 0 || buf[method_end] != b' ' {
        return None;
    }
    let target_end = run(buf, method_end + 1, TARGET);
    if target_end == method_end + 1 || buf.get(target_end) != Some(&b' ') {
        return None;
    }
    let minor = usual_version(buf, target_end + 1)?;
    if buf.get(target_end + 9..target_end + 11) != Some(b"\r\n") {
        return None;
    }
    let target = &buf[method_end + 1..target_end];
    // SAFETY: every byte of the target is visible ASCII (`TARGET`), so it is UTF-8.
    let target = unsafe { std::str::from_utf8_unchecked(target) };
    let len = usual_fields(buf, target_end + 11, fields)?;
    let line = RequestLine {
        method: &buf[..method_end],
        target,
        minor,
    };
    Some((line, len))
}

/// `HTTP/1.x NNN reason` and the header lines, in the usual shape.
pub(super) fn usual_status(buf: &[u8], fields: &mut Fields) -> Option<(StatusLine, usize)> {
    let minor = usual_version(buf, 0)?;
    let (&[b' ', a, b, c], rest) = buf.get(8..)?.split_first_chunk::<4>()? else {
        return None;
    };
    if !(a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit()) {
        return None;
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    let at = match rest {
        [b'\r', b'\n', ..] => 12,
        [b' ', ..] => run(buf, 13, REASON),
        _ => return None,
    };
    if buf.get(at..at + 2) != Some(b"\r\n") {
        return None;
    }
    let len = usual_fields(buf, at + 2, fields)?;
    Some((StatusLine { code, minor }, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{
        parse_request, parse_request_general, parse_response, parse_response_general, Framing,
    };

    #[test]
    fn header_values_end_where_httparse_ends_them() {
        for b in 0u8..=255 {
            let ok = b == b'\t' || (b >= 0x20 && b != 0x7f);
            for len in [1, 7, 8, 9, 16, 17] {
                for at in [0, len / 2, len - 1] {
                    let mut v = vec![b'a'; len];
                    v[at] = b;
                    let want = if ok { len } else { at };
                    assert_eq!(value_end(&v, 0), want, "{b} at {at} of {len}");
                }
            }
        }
    }

    /// The usual-shape path reads every head it takes as httparse does: the same result,
    /// over sample heads cut and mutated at random positions with the bytes that matter.
    #[test]
    fn the_usual_shape_path_reads_heads_as_httparse_does() {
        let requests: &[&[u8]] = &[
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: identity\r\nContent-Length: 95\r\nContent-Type: application/json\r\n\r\n{}",
            b"GET /health?x=1 HTTP/1.0\r\nConnection: Keep-Alive\r\nX-Request-Id:  abc \t\r\nX-Empty:\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer k\r\nX-Session-ID: s\r\nExpect: 100-continue\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n",
        ];
        let responses: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 385\r\nConnection: keep-alive\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.0 503\r\nContent-Encoding: gzip\r\nX-A:\t v \r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ];
        let interesting = b"\r\n \t:\x00\x7f\x80\xff/aZ09-_\"(),;\x01\x0bHTTP/1.2";
        let mut next = crate::test_rng(0x2545_f491_4f6c_dd1d);
        let mut variants = |base: &[u8]| {
            let mut v = vec![base.to_vec()];
            for cut in 0..base.len() {
                v.push(base[..cut].to_vec());
            }
            for _ in 0..3000 {
                let mut m = base.to_vec();
                for _ in 0..1 + next(3) {
                    crate::test_mutate(&mut m, interesting, &mut next);
                }
                v.push(m);
            }
            v
        };
        let mut fast = 0;
        for base in requests {
            for m in variants(base) {
                let general = format!("{:?}", parse_request_general(&m));
                if usual_request(&m, &mut Fields::new()).is_some() {
                    fast += 1;
                }
                assert_eq!(format!("{:?}", parse_request(&m)), general, "{m:?}");
            }
        }
        for base in responses {
            for m in variants(base) {
                for head in [false, true] {
                    let general = format!("{:?}", parse_response_general(&m, head));
                    if usual_status(&m, &mut Fields::new()).is_some() {
                        fast += 1;
                    }
                    assert_eq!(format!("{:?}", parse_response(&m, head)), general, "{m:?}");
                }
            }
        }
        // The usual shape is what most of them still have.
        assert!(fast > 5000, "{fast}");
        // More header lines than the usual shape holds: httparse's answer.
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..USUAL_FIELDS + 1 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        assert!(usual_status(&many, &mut Fields::new()).is_none());
        assert_eq!(parse_response(&many, false).unwrap().framing, Framing::None);
    }
}
