//! Relaying an upstream response to the client as it arrives: every upstream read that
//! brings body bytes becomes one client write, at once — SSE events are never held back or
//! coalesced. The response head leaves with the first of them.
//!
//! Upstream chunked bodies are forwarded byte for byte while a decoder tracks where they end
//! (so the upstream connection can be pooled); close-delimited bodies are re-framed as
//! chunked for HTTP/1.1 clients; HTTP/1.0 clients get the decoded body and a close.
//!
//! A response failing after its head arrived never looks finished: before anything reached
//! the client it is answered 502/504 instead; after, an event stream ends with an SSE error
//! event and no `[DONE]`, a chunked body without its last chunk, and the connection closes.

use super::context::{write_client, RequestCtx};
use super::failure::{self, BodyFailure, RelayError};
use super::outcome::Outcome;
use super::relay_task;
use super::sse;
use super::timeline::Timeline;
use super::upstream::{BodyDecoder, UpstreamConn};
use crate::admission::usage;
use crate::http::chunked::{encode_chunk, ChunkedDecoder, LAST_CHUNK};
use crate::http::conn::ClientWriter;
use crate::http::head::{Framing, ResponseHead};
use crate::http::write::{response_head, BodyLen};
use crate::instance::{InFlight, Instance};
use std::time::Duration;

/// What is done with the upstream body bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The client gets the decoded body: fixed length, or HTTP/1.0 (delimited by close).
    Decode,
    /// Upstream chunks forwarded byte for byte; a decoder only finds the end.
    Chunks,
    /// Upstream delimits by close; the client gets chunks.
    WrapUntilClose,
}

/// The client's framing and the pass for an upstream framing.
fn plan(upstream: Framing, http10: bool) -> (BodyLen, Pass) {
    match (upstream, http10) {
        (Framing::None, _) => (BodyLen::Length(0), Pass::Decode),
        (Framing::Length(n), _) => (BodyLen::Length(n as usize), Pass::Decode),
        (Framing::Chunked, false) => (BodyLen::Chunked, Pass::Chunks),
        (Framing::Chunked, true) | (Framing::UntilClose, true) => (BodyLen::Close, Pass::Decode),
        (Framing::UntilClose, false) => (BodyLen::Chunked, Pass::WrapUntilClose),
    }
}

/// How a response that failed is ended for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Nothing was sent yet: an error response.
    Answer,
    /// An SSE error event (a chunk, or raw in a close-delimited body), then close.
    ErrorEvent { chunked: bool },
    /// Close: a chunked body lacks its last chunk, a fixed-length one its last bytes.
    Close,
}

fn ending(started: bool, sse: bool, client: BodyLen) -> Ending {
    match (started, sse, client) {
        (false, _, _) => Ending::Answer,
        (true, true, BodyLen::Chunked) => Ending::ErrorEvent { chunked: true },
        (true, true, BodyLen::Close) => Ending::ErrorEvent { chunked: false },
        (true, _, _) => Ending::Close,
    }
}

enum Mode {
    Decode(BodyDecoder),
    Chunks(ChunkedDecoder),
    WrapUntilClose,
}

impl Mode {
    fn new(pass: Pass, upstream: Framing) -> Self {
        match pass {
            Pass::Decode => Mode::Decode(BodyDecoder::new(upstream)),
            Pass::Chunks => Mode::Chunks(ChunkedDecoder::new()),
            Pass::WrapUntilClose => Mode::WrapUntilClose,
        }
    }

    /// Appends to `out` what the client must receive from the unconsumed upstream bytes,
    /// and shows `usage` the body's decoded bytes. Returns true once the upstream body is
    /// complete.
    fn process(
        &mut self,
        conn: &mut UpstreamConn,
        out: &mut Vec<u8>,
        usage: &mut usage::Scanner,
    ) -> Result<bool, BodyFailure> {
        match self {
            Mode::Decode(dec) => {
                let from = out.len();
                let done = dec
                    .decode(&mut conn.buf, out)
                    .map_err(|_| BodyFailure::Framing)?;
                if done {
                    usage.feed_last(&out[from..]);
                } else {
                    usage.feed(&out[from..]);
                }
                Ok(done)
            }
            Mode::Chunks(dec) => {
                let data = conn.buf.data();
                let used = dec
                    .feed(data, |payload| usage.feed(payload))
                    .map_err(|_| BodyFailure::Framing)?;
                out.extend_from_slice(&data[..used]);
                conn.buf.consume(used);
                Ok(dec.is_done())
            }
            Mode::WrapUntilClose => {
                let data = conn.buf.data();
                if !data.is_empty() {
                    usage.feed(data);
                    encode_chunk(out, data);
                    conn.buf.clear();
                }
                Ok(false)
            }
        }
    }

    /// What the upstream closing means: the body's end (`Some`, with what to send to end it
    /// for the client) or a failure (`None`).
    fn at_eof(&self) -> Option<&'static [u8]> {
        match self {
            Mode::WrapUntilClose => Some(LAST_CHUNK),
            Mode::Decode(dec) if dec.ends_at_eof() => Some(b""),
            _ => None,
        }
    }
}

/// How the body ended well.
enum Finished {
    /// At its framing's end: the upstream connection may be pooled.
    AtEnd,
    /// By the upstream closing.
    AtClose,
}

/// What a relay reports as it goes: to the request's timeline (`wrote_body`, `usage`), to
/// `decoded` (the SSE events relayed) and in `started` (something reached the client: a
/// failure from then on cannot be answered as an error).
struct Seen<'t, D> {
    tl: &'t mut Timeline,
    started: bool,
    decoded: D,
}

/// Streams `head` and the rest of `conn`'s response to the client. An event stream is relayed
/// by a task of its own while this request waits for it (`relay_task`): its tokens then wake
/// that task's small state, not the request's.
pub async fn relay(
    ctx: &mut RequestCtx<'_>,
    guard: &InFlight<'_>,
    mut conn: UpstreamConn,
    head: ResponseHead,
) -> Outcome {
    let inst: &Instance = guard.instance();
    let status = head.status.as_u16();
    let sse = head
        .content_type
        .as_deref()
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let (client_len, pass) = plan(head.framing, ctx.http10);
    let keep_alive = ctx.keep_alive && client_len != BodyLen::Close;
    let mut out = ctx.w.scratch.take();
    let mut headers = [("", ""); 3];
    let mut n = 0;
    let ct = head.content_type.as_deref().map(|v| ("Content-Type", v));
    let ce = head
        .content_encoding
        .as_deref()
        .map(|v| ("Content-Encoding", v));
    for h in [ct, ce, Some(("X-Request-Id", ctx.request_id))]
        .into_iter()
        .flatten()
    {
        headers[n] = h;
        n += 1;
    }
    let headers = &headers[..n];
    response_head(&mut out, head.status, headers, client_len, keep_alive);
    let idle = ctx.policy.timeouts.idle;
    let mut mode = Mode::new(pass, head.framing);
    // An event stream's upstream connection moves into its task and back; a plain body is
    // relayed in place.
    let (result, started) = if sse {
        let (result, back, started) = pump_apart(ctx, guard, conn, mode, out, idle).await;
        conn = back;
        (result, started)
    } else {
        let mut seen = Seen {
            tl: &mut ctx.tl,
            started: false,
            decoded: |n| guard.decoded(n),
        };
        let r = pump(
            ctx.client, &mut conn, &mut mode, out, false, idle, &mut seen,
        );
        (r.await, seen.started)
    };
    match result {
        Ok((finished, out)) => {
            ctx.w.scratch.give(out);
            if matches!(finished, Finished::AtEnd) && head.keep_alive {
                ctx.w.pool.put_back(conn, inst);
            }
            Outcome::new(status, keep_alive)
        }
        Err(RelayError::ClientGone) => Outcome::client_gone(),
        Err(RelayError::Upstream(f)) => {
            drop(conn);
            f.record(ctx.w, inst, ctx.request_id);
            let err = f.api_error(inst);
            match ending(started, sse, client_len) {
                Ending::Answer => ctx.answer_error(&err).await,
                Ending::ErrorEvent { chunked } => {
                    let mut out = Vec::new();
                    sse::error_event(&mut out, &err, chunked);
                    let _ = ctx.write(out).await;
                    Outcome::close(err.status.as_u16())
                }
                Ending::Close => Outcome::close(err.status.as_u16()),
            }
        }
    }
}

/// `pump` for an event stream, in a task of its own (`relay_task::apart`). Returns the
/// relay's result, the upstream connection and whether anything reached the client.
async fn pump_apart(
    ctx: &mut RequestCtx<'_>,
    guard: &InFlight<'_>,
    conn: UpstreamConn,
    mut mode: Mode,
    out: Vec<u8>,
    idle: Duration,
) -> (Result<(Finished, Vec<u8>), RelayError>, UpstreamConn, bool) {
    relay_task::apart(ctx, guard, conn, false, |mut a| async move {
        let mut seen = Seen {
            tl: &mut a.tl,
            started: false,
            decoded: |n| a.decode.decoded(n),
        };
        let r = pump(
            &mut a.client,
            &mut a.conn,
            &mut mode,
            out,
            true,
            idle,
            &mut seen,
        )
        .await;
        a.started = seen.started;
        (r, a)
    })
    .await
}

/// Moves the body from `conn` to `client` until it ends. `out` starts with the response
/// head, which goes out with the first body bytes.
async fn pump<D: FnMut(u64)>(
    client: &mut ClientWriter,
    conn: &mut UpstreamConn,
    mode: &mut Mode,
    mut out: Vec<u8>,
    sse: bool,
    idle: Duration,
    seen: &mut Seen<'_, D>,
) -> Result<(Finished, Vec<u8>), RelayError> {
    let mut head_len = out.len();
    // The engine's token counts, wherever the reads cut its `usage` object.
    let mut usage = usage::Scanner::default();
    loop {
        let done = mode.process(conn, &mut out, &mut usage)?;
        if let Some(u) = usage.found() {
            seen.tl.usage = Some(u);
        }
        // The head waits for the body's first bytes (or its end) and leaves with them in one
        // write: a stream's head arrives before its first token (the engine answers at once,
        // then prefills), and two writes would cost a second send and a second client read.
        let head_alone = head_len > 0 && out.len() == head_len && !done;
        if !out.is_empty() && !head_alone {
            let body = &out[head_len..];
            let (has_body, events) = (
                !body.is_empty(),
                if sse { sse::count_events(body) } else { 0 },
            );
            out = write_client(client, out).await?;
            seen.started = true;
            head_len = 0;
            if has_body {
                seen.tl.wrote_body(events);
                (seen.decoded)(events);
            }
        }
        if done {
            return Ok((Finished::AtEnd, out));
        }
        if failure::read_more(conn, idle).await? == 0 {
            let end = mode.at_eof().ok_or(BodyFailure::Closed)?;
            if !end.is_empty() {
                out.extend_from_slice(end);
                out = write_client(client, out).await?;
            }
            return Ok((Finished::AtClose, out));
        }
    }
}

/// Per-worker free list of buffers — relay outputs, upstream request heads — so a request
/// allocates none of them in steady state.
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

    /// Keeps `buf` for a later `take`, unless it is too large, holds no memory (a buffer
    /// taken over by a `Bytes`, a body not kept) or enough are kept already.
    pub fn give(&self, mut buf: Vec<u8>) {
        let mut list = self.0.borrow_mut();
        let cap = buf.capacity();
        if cap > 0 && cap <= Self::MAX_CAPACITY && list.len() < Self::KEEP {
            buf.clear();
            list.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_decision_table() {
        use BodyLen as C;
        use Framing as U;
        let cases = [
            (U::None, false, C::Length(0), Pass::Decode),
            (U::None, true, C::Length(0), Pass::Decode),
            (U::Length(7), false, C::Length(7), Pass::Decode),
            (U::Length(7), true, C::Length(7), Pass::Decode),
            (U::Chunked, false, C::Chunked, Pass::Chunks),
            (U::Chunked, true, C::Close, Pass::Decode),
            (U::UntilClose, false, C::Chunked, Pass::WrapUntilClose),
            (U::UntilClose, true, C::Close, Pass::Decode),
        ];
        for (upstream, http10, client, pass) in cases {
            assert_eq!(
                plan(upstream, http10),
                (client, pass),
                "{upstream:?} http10={http10}"
            );
        }
    }

    #[test]
    fn a_failed_response_never_ends_like_a_finished_one() {
        for sse in [false, true] {
            for client in [BodyLen::Length(5), BodyLen::Chunked, BodyLen::Close] {
                assert_eq!(ending(false, sse, client), Ending::Answer);
            }
        }
        assert_eq!(
            ending(true, true, BodyLen::Chunked),
            Ending::ErrorEvent { chunked: true }
        );
        assert_eq!(
            ending(true, true, BodyLen::Close),
            Ending::ErrorEvent { chunked: false }
        );
        assert_eq!(ending(true, true, BodyLen::Length(5)), Ending::Close);
        assert_eq!(ending(true, false, BodyLen::Chunked), Ending::Close);
        assert_eq!(ending(true, false, BodyLen::Close), Ending::Close);
    }
}
