//! Server-sent events as the proxy writes and reads them: one event per chunk, the error
//! event that ends a failed stream, counting events, splitting a body into events.

use crate::http::chunked::encode_chunk_of;
use crate::http::ApiError;
use std::borrow::Cow;

/// Appends one `data:` event holding `payload` as one chunk of a chunked body.
pub fn chunk(out: &mut Vec<u8>, payload: &[u8]) {
    encode_chunk_of(out, &[b"data: ", payload, b"\n\n"]);
}

/// Appends the event that ends a stream which failed after it started: the OpenAI-shaped
/// error (the JSON an error response carries, `code` and `param` kept) and no `[DONE]`, so
/// the client can tell it from a finished answer. `chunked`: as a chunk of a chunked body,
/// else raw (a close-delimited body).
pub fn error_event(out: &mut Vec<u8>, err: &ApiError, chunked: bool) {
    let body = err.body();
    if chunked {
        chunk(out, &body);
    } else {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\n\n");
    }
}

/// SSE events that start in `bytes` (each begins with `data:` at a line start). A relay
/// writes whole upstream reads, so an event's `data:` is counted once.
pub fn count_events(bytes: &[u8]) -> u64 {
    // Line starts found with a SIMD newline search: a byte-by-byte loop cost ~7
    // instructions per relayed byte, a third of a streamed request's user-space work.
    let starts = std::iter::once(0).chain(memchr::memchr_iter(b'\n', bytes).map(|i| i + 1));
    starts.filter(|&i| bytes[i..].starts_with(b"data:")).count() as u64
}

/// Cuts a decoded event-stream body into whole events (each ended by a blank line) as its
/// bytes arrive in arbitrary pieces.
#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of an event.
    scanned: usize,
}

impl Splitter {
    /// Where to append the next decoded body bytes.
    pub fn input(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Hands `f` each whole event the buffer now holds, its blank line included, and drops
    /// them from the buffer.
    pub fn each_event(&mut self, mut f: impl FnMut(&[u8])) {
        // A blank line may straddle what was searched and what came since.
        let mut from = self.scanned.saturating_sub(1);
        let mut start = 0;
        while let Some(at) = memchr::memmem::find(&self.buf[from..], b"\n\n") {
            let end = from + at + 2;
            f(&self.buf[start..end]);
            (start, from) = (end, end);
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
    }
}

/// The `data:` values of one event, leading blanks trimmed.
pub fn data_values(event: &[u8]) -> impl Iterator<Item = Cow<'_, str>> + '_ {
    let mut rest = event;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        // An engine's events are UTF-8: checked at the speed of `from_utf8`, not of the
        // lossy walk that only a bad byte needs.
        return Some(match std::str::from_utf8(value) {
            Ok(v) => Cow::Borrowed(v.trim_start()),
            Err(_) => Cow::Owned(String::from_utf8_lossy(value).trim_start().to_owned()),
        });
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn events_of(s: &mut Splitter) -> Vec<Vec<u8>> {
        let mut events = Vec::new();
        s.each_event(|e| events.push(e.to_vec()));
        events
    }

    #[test]
    fn splits_events_across_arbitrary_pieces() {
        let body = b"data: {\"a\":1}\n\ndata: [DONE]\n\n";
        for cut in 0..body.len() {
            let mut s = Splitter::default();
            let mut events = Vec::new();
            for piece in [&body[..cut], &body[cut..]] {
                s.input().extend_from_slice(piece);
                events.extend(events_of(&mut s));
            }
            assert_eq!(
                events,
                vec![
                    b"data: {\"a\":1}\n\n".to_vec(),
                    b"data: [DONE]\n\n".to_vec()
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_blank_line_split_between_two_pieces_ends_the_event() {
        let mut s = Splitter::default();
        s.input().extend_from_slice(b"data: x\n");
        assert!(events_of(&mut s).is_empty());
        s.input().extend_from_slice(b"\ndata: y");
        assert_eq!(events_of(&mut s), [b"data: x\n\n".to_vec()]);
        assert!(events_of(&mut s).is_empty());
        s.input().extend_from_slice(b"\n\ndata: z\n\n");
        assert_eq!(
            events_of(&mut s),
            [b"data: y\n\n".to_vec(), b"data: z\n\n".to_vec()]
        );
    }

    #[test]
    fn an_event_is_one_chunk() {
        let mut out = Vec::new();
        chunk(&mut out, b"{}");
        assert_eq!(out, b"a\r\ndata: {}\n\n\r\n");
    }

    #[test]
    fn data_values_of_an_event() {
        let v: Vec<Cow<str>> = data_values(b"event: x\ndata:  a\r\ndata:b\n\n").collect();
        assert_eq!(v, ["a", "b"]);
        let v: Vec<Cow<str>> = data_values(b"data: \xffx\ndata:last").collect();
        assert_eq!(v, ["\u{fffd}x", "last"]);
    }

    #[test]
    fn counts_events_at_line_starts_only() {
        assert_eq!(count_events(b"data: 1\n\ndata: 2\n\n"), 2);
        assert_eq!(count_events(b"data: has data: inside\n\n"), 1);
        assert_eq!(count_events(b""), 0);
        // As relayed from a chunked upstream: chunk-size lines between the events.
        assert_eq!(
            count_events(b"e\r\ndata: 1\n\ndata: 2\n\n\r\n7\r\ndata: 3\r\n"),
            3
        );
        assert_eq!(count_events(b": comment\nevent: x\ndata"), 0);
        assert_eq!(count_events(b"\n\ndata:"), 1);
    }

    #[test]
    fn error_event_keeps_code_and_param_and_has_no_done() {
        let err = ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", "stalled")
            .with_code("upstream_stalled")
            .with_param("x");
        let mut raw = Vec::new();
        error_event(&mut raw, &err, false);
        let text = String::from_utf8(raw).unwrap();
        let json = text
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["error"]["code"], "upstream_stalled");
        assert_eq!(v["error"]["param"], "x");
        assert_eq!(v["error"]["type"], "timeout_error");
        assert!(!text.contains("[DONE]"));
        let mut chunked = Vec::new();
        error_event(&mut chunked, &err, true);
        assert!(chunked.starts_with(format!("{:x}\r\n", text.len()).as_bytes()));
        assert!(
            chunked.ends_with(b"\n\n\r\n"),
            "one chunk, and not the last chunk"
        );
    }
}
