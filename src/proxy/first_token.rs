//! `generator_on_p_node` (docs/api.md): a streaming request's first token comes from the
//! prefill node and reaches the client the moment the prefill leg ends; the decode stream
//! follows without its own first content token. Every event carries the first chunk's `id`,
//! `created` and `model`, so the client sees one consistent stream; usage is the decode
//! node's.
//!
//! Caveat: the decode engine samples its own first token and continues from that one, not
//! from the prefill node's (which it never sees). With greedy sampling both agree; with
//! temperature > 0 the text may be inconsistent at the seam.

use super::context::RequestCtx;
use super::failure::{self, BodyFailure, RelayError};
use super::outcome::Outcome;
use super::sse;
use super::upstream::{BodyDecoder, UpstreamConn};
use crate::http::chunked::LAST_CHUNK;
use crate::http::head::ResponseHead;
use crate::http::write::{response_head, BodyLen};
use crate::http::ApiError;
use crate::instance::{InFlight, Instance};
use http::StatusCode;
use serde_json::{json, Value};

pub struct FirstToken {
    id: Value,
    created: Value,
    model: Value,
    text: String,
    chat: bool,
}

impl FirstToken {
    /// The first token of a prefill response (completions `text`, chat `message.content`).
    pub fn from_prefill(body: &[u8], chat: bool) -> Option<FirstToken> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let choice = v.get("choices")?.get(0)?;
        let text = if chat {
            choice.get("message")?.get("content")?.as_str()?.to_string()
        } else {
            choice.get("text")?.as_str()?.to_string()
        };
        Some(FirstToken {
            id: v.get("id").cloned().unwrap_or(Value::Null),
            created: v.get("created").cloned().unwrap_or(Value::Null),
            model: v.get("model").cloned().unwrap_or(Value::Null),
            text,
            chat,
        })
    }

    fn first_event(&self) -> Value {
        if self.chat {
            json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": self.text}, "logprobs": null, "finish_reason": null}]})
        } else {
            json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [{"index": 0, "text": self.text, "logprobs": null, "finish_reason": null}]})
        }
    }
}

/// Writes the response head and the prefill node's token as the first event.
pub async fn send_first(ctx: &mut RequestCtx<'_>, first: &FirstToken) -> Result<(), RelayError> {
    let mut out = Vec::with_capacity(512);
    response_head(
        &mut out,
        StatusCode::OK,
        &[
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("X-Request-Id", ctx.request_id),
        ],
        BodyLen::Chunked,
        ctx.keep_alive,
    );
    sse::chunk(&mut out, first.first_event().to_string().as_bytes());
    let res = ctx.write(out).await;
    ctx.tl.wrote_body(1);
    res.map(|_| ())
}

/// What to do with one decode event.
struct Rewriter<'a> {
    first: &'a FirstToken,
    dropped_first: bool,
}

impl Rewriter<'_> {
    /// The event to send for `payload` (an SSE `data:` value), or None to drop it.
    fn rewrite(&mut self, payload: &str) -> Option<String> {
        if payload.trim() == "[DONE]" {
            return Some("[DONE]".into());
        }
        let mut v: Value = serde_json::from_str(payload).ok()?;
        v["id"] = self.first.id.clone();
        v["created"] = self.first.created.clone();
        v["model"] = self.first.model.clone();
        let has_choice = v["choices"].as_array().is_some_and(|c| !c.is_empty());
        if has_choice && !self.dropped_first {
            let c = &mut v["choices"][0];
            let content = if self.first.chat {
                c["delta"]["content"].as_str()
            } else {
                c["text"].as_str()
            };
            let finished = !c["finish_reason"].is_null();
            if content.is_none_or(str::is_empty) && !finished {
                return None; // chat's role-only opener: the first event already said it
            }
            self.dropped_first = true;
            if !finished {
                return None; // the decode node's own first token
            }
            // Keep the finish reason of a one-token answer, without its text.
            if self.first.chat {
                c["delta"] = json!({});
            } else {
                c["text"] = json!("");
            }
        }
        Some(v.to_string())
    }
}

/// Relays the decode stream after the first event, rewritten event by event.
pub async fn relay_rest(
    ctx: &mut RequestCtx<'_>,
    guard: &InFlight<'_>,
    mut conn: UpstreamConn,
    head: ResponseHead,
    first: &FirstToken,
) -> Outcome {
    let inst: &Instance = guard.instance();
    match pump_rest(ctx, &mut conn, &head, first, guard).await {
        Ok(()) => {
            if head.keep_alive {
                ctx.w.pool.put_back(conn, inst);
            }
            Outcome::new(200, ctx.keep_alive)
        }
        Err(RelayError::ClientGone) => Outcome::client_gone(),
        Err(RelayError::Upstream(f)) => {
            f.record(ctx.w, inst, ctx.request_id);
            fail_stream(ctx, &f.api_error(inst)).await
        }
    }
}

async fn pump_rest(
    ctx: &mut RequestCtx<'_>,
    conn: &mut UpstreamConn,
    head: &ResponseHead,
    first: &FirstToken,
    guard: &InFlight<'_>,
) -> Result<(), RelayError> {
    let idle = ctx.policy.timeouts.idle;
    let mut rw = Rewriter {
        first,
        dropped_first: false,
    };
    let mut dec = BodyDecoder::new(head.framing);
    let mut events = sse::Splitter::default();
    let mut out: Vec<u8> = Vec::new();
    let mut eof = false;
    loop {
        // Move decoded body bytes into the splitter; the peer closing ends a close-delimited
        // body.
        let done = dec
            .decode(&mut conn.buf, events.input())
            .map_err(|_| BodyFailure::Framing)?
            || eof;
        let mut sent = 0;
        while let Some(event) = events.next_event() {
            for payload in sse::data_values(&event) {
                if let Some(p) = rw.rewrite(&payload) {
                    sse::chunk(&mut out, p.as_bytes());
                    sent += 1;
                }
            }
        }
        if done {
            out.extend_from_slice(LAST_CHUNK);
        }
        if !out.is_empty() {
            out = ctx.write(out).await?;
            ctx.tl.wrote_body(sent);
            guard.decoded(sent);
        }
        if done {
            return Ok(());
        }
        if failure::read_more(conn, idle).await? == 0 {
            if !dec.ends_at_eof() {
                return Err(BodyFailure::Closed.into());
            }
            eof = true;
        }
    }
}

/// The decode leg failed after the first event went out: an SSE error event, then close.
/// Recorded with the error's status, not the 200 the head said.
pub async fn fail_stream(ctx: &mut RequestCtx<'_>, err: &ApiError) -> Outcome {
    let mut out = Vec::new();
    sse::error_event(&mut out, err, true);
    let _ = ctx.write(out).await;
    Outcome::close(err.status.as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_decode_first_token_and_unifies_ids() {
        let first = FirstToken::from_prefill(
            br#"{"id":"cmpl-P","created":1,"model":"m","choices":[{"text":" [prefill]"}]}"#,
            false,
        )
        .unwrap();
        let mut rw = Rewriter {
            first: &first,
            dropped_first: false,
        };
        let ev = |t: &str, fin: &str| {
            format!(
                r#"{{"id":"cmpl-D","created":2,"model":"m","choices":[{{"index":0,"text":"{t}","finish_reason":{fin}}}]}}"#
            )
        };
        assert!(rw.rewrite(&ev(" a", "null")).is_none());
        let second: Value = serde_json::from_str(&rw.rewrite(&ev(" b", "null")).unwrap()).unwrap();
        assert_eq!(second["id"], "cmpl-P");
        assert_eq!(second["created"], 1);
        assert_eq!(rw.rewrite("[DONE]").unwrap(), "[DONE]");
    }

    #[test]
    fn one_token_answer_keeps_its_finish_reason() {
        let first = FirstToken::from_prefill(
            br#"{"id":"c","created":1,"model":"m","choices":[{"message":{"content":"x"}}]}"#,
            true,
        )
        .unwrap();
        let mut rw = Rewriter {
            first: &first,
            dropped_first: false,
        };
        assert!(rw
            .rewrite(
                r#"{"choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#
            )
            .is_none());
        let last: Value = serde_json::from_str(
            &rw.rewrite(r#"{"choices":[{"delta":{"content":"y"},"finish_reason":"length"}]}"#)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert!(last["choices"][0]["delta"]["content"].is_null());
    }
}
