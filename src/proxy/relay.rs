//! Relaying an upstream response to the client as it arrives: every upstream read becomes
//! one client write, at once — SSE events are never held back or coalesced.
//!
//! Upstream chunked bodies are forwarded byte for byte while a decoder tracks where they end
//! (so the upstream connection can be pooled); close-delimited bodies are re-framed as
//! chunked for HTTP/1.1 clients; HTTP/1.0 clients get the decoded body and a close.

use super::upstream::{BodyDecoder, UpstreamConn};
use super::Worker;
use crate::http::chunked::{encode_chunk, ChunkedDecoder, LAST_CHUNK};
use crate::http::head::{Framing, ResponseHead};
use crate::http::write::{response_head, BodyLen};
use crate::instance::Instance;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

/// How a request ended: the status the client got (499: the client left first) and
/// whether its connection can serve another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u16,
    pub keep_alive: bool,
}

impl Outcome {
    pub fn new(status: u16, keep_alive: bool) -> Self {
        Outcome { status, keep_alive }
    }
    pub fn close(status: u16) -> Self {
        Outcome {
            status,
            keep_alive: false,
        }
    }
}

/// When the parts of a request happened, for metrics and the request log line.
pub struct Timeline {
    pub start: Instant,
    pub prefill: Option<Arc<Instance>>,
    pub prefill_sent: Option<Instant>,
    pub prefill_done: Option<Instant>,
    pub decode: Option<Arc<Instance>>,
    pub decode_sent: Option<Instant>,
    pub decode_head: Option<Instant>,
    /// First body byte written to the client.
    pub first_byte: Option<Instant>,
    pub last_event: Option<Instant>,
    /// SSE events relayed.
    pub events: u64,
}

impl Timeline {
    pub fn new(start: Instant) -> Self {
        Timeline {
            start,
            prefill: None,
            prefill_sent: None,
            prefill_done: None,
            decode: None,
            decode_sent: None,
            decode_head: None,
            first_byte: None,
            last_event: None,
            events: 0,
        }
    }
}

/// SSE events that start in `bytes` (each begins with `data:` at a line start).
fn count_events(bytes: &[u8]) -> u64 {
    let mut n = 0;
    let mut at_line_start = true;
    for (i, &b) in bytes.iter().enumerate() {
        if at_line_start && b == b'd' && bytes[i..].starts_with(b"data:") {
            n += 1;
        }
        at_line_start = b == b'\n';
    }
    n
}

enum Mode {
    /// The client gets the decoded body: fixed length, or HTTP/1.0 (delimited by close).
    Decode(BodyDecoder),
    /// Upstream chunks forwarded byte for byte; the decoder only finds the end.
    ChunkedPass(ChunkedDecoder),
    /// Upstream delimits by close; the client gets chunks.
    WrapUntilClose,
}

/// Appends to `out` what the client must receive from the unconsumed upstream bytes.
/// Returns true once the upstream body is complete.
fn process(mode: &mut Mode, conn: &mut UpstreamConn, out: &mut Vec<u8>) -> Result<bool, ()> {
    match mode {
        Mode::Decode(dec) => dec.decode(&mut conn.buf, out).map_err(|_| ()),
        Mode::ChunkedPass(dec) => {
            let data = conn.buf.data();
            let used = dec.feed(data, |_| {}).map_err(|_| ())?;
            out.extend_from_slice(&data[..used]);
            conn.buf.consume(used);
            Ok(dec.is_done())
        }
        Mode::WrapUntilClose => {
            let data = conn.buf.data();
            if !data.is_empty() {
                encode_chunk(out, data);
                conn.buf.clear();
            }
            Ok(false)
        }
    }
}

pub struct RelayParams<'a> {
    pub request_id: &'a str,
    pub http10: bool,
    pub client_keep_alive: bool,
    pub timeline: &'a mut Timeline,
}

/// Streams `head` and the rest of `conn`'s response to the client. A read that waits longer
/// than `timeouts.idle` ends the response: with an SSE error event when the body is a
/// stream the client can parse, then a close.
pub async fn relay(
    w: &Worker,
    inst: &Instance,
    mut conn: UpstreamConn,
    head: ResponseHead,
    client: &mut TcpStream,
    p: RelayParams<'_>,
) -> Outcome {
    let status = head.status.as_u16();
    let idle = w.policy().timeouts.idle;
    let sse = head
        .content_type
        .as_deref()
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let (client_len, mut mode) = match (head.framing, p.http10) {
        (Framing::None, _) => (
            BodyLen::Length(0),
            Mode::Decode(BodyDecoder::new(Framing::None)),
        ),
        (Framing::Length(n), _) => (
            BodyLen::Length(n as usize),
            Mode::Decode(BodyDecoder::new(head.framing)),
        ),
        (Framing::Chunked, false) => (BodyLen::Chunked, Mode::ChunkedPass(ChunkedDecoder::new())),
        (Framing::Chunked, true) | (Framing::UntilClose, true) => {
            (BodyLen::Close, Mode::Decode(BodyDecoder::new(head.framing)))
        }
        (Framing::UntilClose, false) => (BodyLen::Chunked, Mode::WrapUntilClose),
    };
    let keep_alive = p.client_keep_alive && client_len != BodyLen::Close;
    let mut out = w.scratch.take();
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(2);
    if let Some(ct) = head.content_type.as_deref() {
        headers.push(("Content-Type", ct));
    }
    headers.push(("X-Request-Id", p.request_id));
    response_head(&mut out, head.status, &headers, client_len, keep_alive);
    let mut head_len = out.len();

    loop {
        let done = match process(&mut mode, &mut conn, &mut out) {
            Ok(d) => d,
            Err(()) => {
                crate::warn!(
                    "request {}: upstream {} sent invalid chunked encoding; closing",
                    p.request_id,
                    conn.addr
                );
                return Outcome::close(status);
            }
        };
        if !out.is_empty() {
            let body_bytes = out.len() > head_len;
            let events = if sse {
                count_events(&out[head_len..])
            } else {
                0
            };
            let (res, buf) = client.write_all(out).await;
            out = buf;
            out.clear();
            head_len = 0;
            if res.is_err() {
                return Outcome::close(499);
            }
            let tl = &mut *p.timeline;
            if body_bytes {
                let now = Instant::now();
                tl.first_byte.get_or_insert(now);
                if events > 0 {
                    tl.events += events;
                    tl.last_event = Some(now);
                }
            }
        }
        if done {
            break;
        }
        let read = match monoio::time::timeout(idle, conn.buf.fill(&mut conn.stream)).await {
            Ok(r) => r,
            Err(_) => {
                inst.record_failure(&w.policy().circuit);
                crate::warn!(
                    "request {}: upstream {} sent nothing for {:?} mid-response; ending it",
                    p.request_id,
                    conn.addr,
                    idle
                );
                if sse && client_len == BodyLen::Chunked {
                    let mut out = Vec::new();
                    let msg = format!("upstream {} stalled mid-stream", inst.address);
                    sse_error_chunk(&mut out, &msg, "timeout_error", 504);
                    let _ = client.write_all(out).await;
                }
                return Outcome::close(status);
            }
        };
        match read {
            Ok(0) => match mode {
                Mode::WrapUntilClose => {
                    let _ = client.write_all(LAST_CHUNK).await;
                    return Outcome::new(status, keep_alive);
                }
                Mode::Decode(ref dec) if dec.ends_at_eof() => return Outcome::close(status),
                _ => {
                    inst.record_failure(&w.policy().circuit);
                    crate::warn!(
                        "request {}: upstream {} closed mid-response; closing the client connection",
                        p.request_id,
                        conn.addr
                    );
                    return Outcome::close(status);
                }
            },
            Ok(_) => {}
            Err(e) => {
                inst.record_failure(&w.policy().circuit);
                crate::warn!(
                    "request {}: reading from upstream {} failed mid-response: {e}",
                    p.request_id,
                    conn.addr
                );
                return Outcome::close(status);
            }
        }
    }
    w.scratch.give(out);
    if head.keep_alive {
        w.pool.put_back(conn, inst);
    }
    Outcome::new(status, keep_alive)
}

/// Appends one chunk holding an SSE `error` event in OpenAI shape: how a stream that already
/// started tells the client why it ends early.
pub fn sse_error_chunk(out: &mut Vec<u8>, message: &str, kind: &str, code: u16) {
    let err = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    encode_chunk(out, format!("data: {err}\n\n").as_bytes());
}

/// Per-worker free list of output buffers, so relaying allocates nothing in steady state.
#[derive(Default)]
pub struct Scratch(std::cell::RefCell<Vec<Vec<u8>>>);

impl Scratch {
    const KEEP: usize = 256;
    const MAX_CAPACITY: usize = 64 * 1024;

    pub fn take(&self) -> Vec<u8> {
        self.0
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(4096))
    }

    pub fn give(&self, mut buf: Vec<u8>) {
        let mut list = self.0.borrow_mut();
        if buf.capacity() <= Self::MAX_CAPACITY && list.len() < Self::KEEP {
            buf.clear();
            list.push(buf);
        }
    }
}
