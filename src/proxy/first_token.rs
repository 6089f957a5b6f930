//! `generator_on_p_node` (docs/api.md): a streaming request's first token comes from the
//! prefill node and reaches the client the moment the prefill leg ends; the decode stream
//! follows without its own first content token. Every event carries the first chunk's `id`,
//! `created` and `model`, so the client sees one consistent stream; usage is the decode
//! node's.
//!
//! Caveat: the decode engine samples its own first token and continues from that one, not
//! from the prefill node's (which it never sees). With greedy sampling both agree; with
//! temperature > 0 the text may be inconsistent at the seam.

use super::relay::{sse_error_chunk, Outcome, Timeline};
use super::upstream::{BodyDecoder, UpstreamConn};
use super::Worker;
use crate::http::chunked::{encode_chunk, LAST_CHUNK};
use crate::http::head::ResponseHead;
use crate::http::write::{response_head, BodyLen};
use crate::instance::Instance;
use http::StatusCode;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use serde_json::{json, Value};
use std::time::Instant;

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

fn sse_chunk(out: &mut Vec<u8>, payload: &str) {
    encode_chunk(out, format!("data: {payload}\n\n").as_bytes());
}

/// Writes the response head and the prefill node's token as the first event.
pub async fn send_first(
    client: &mut TcpStream,
    first: &FirstToken,
    request_id: &str,
    keep_alive: bool,
    tl: &mut Timeline,
) -> Result<(), ()> {
    let mut out = Vec::with_capacity(512);
    response_head(
        &mut out,
        StatusCode::OK,
        &[
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("X-Request-Id", request_id),
        ],
        BodyLen::Chunked,
        keep_alive,
    );
    sse_chunk(&mut out, &first.first_event().to_string());
    let (res, _) = client.write_all(out).await;
    let now = Instant::now();
    tl.first_byte = Some(now);
    tl.last_event = Some(now);
    tl.events = 1;
    res.map(|_| ()).map_err(|_| ())
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
#[allow(clippy::too_many_arguments)]
pub async fn relay_rest(
    w: &Worker,
    inst: &Instance,
    mut conn: UpstreamConn,
    head: ResponseHead,
    client: &mut TcpStream,
    first: &FirstToken,
    keep_alive: bool,
    tl: &mut Timeline,
) -> Outcome {
    let mut rw = Rewriter {
        first,
        dropped_first: false,
    };
    let mut dec = BodyDecoder::new(head.framing);
    let mut sse: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut eof = false;
    loop {
        // Move decoded body bytes into `sse`; the peer closing ends a close-delimited body.
        let done = match dec.decode(&mut conn.buf, &mut sse) {
            Ok(d) => d || eof,
            Err(_) => return Outcome::close(200),
        };
        // Complete events.
        while let Some(end) = sse.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = sse.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                if let Some(payload) = line.strip_prefix("data:") {
                    if let Some(p) = rw.rewrite(payload.trim_start()) {
                        sse_chunk(&mut out, &p);
                        tl.events += 1;
                    }
                }
            }
        }
        if done {
            out.extend_from_slice(LAST_CHUNK);
        }
        if !out.is_empty() {
            let (res, buf) = client.write_all(out).await;
            out = buf;
            out.clear();
            if res.is_err() {
                return Outcome::close(499);
            }
            tl.last_event = Some(Instant::now());
        }
        if done {
            if head.keep_alive {
                w.pool.put_back(conn, inst);
            }
            return Outcome::new(200, keep_alive);
        }
        let idle = w.policy().timeouts.idle;
        match monoio::time::timeout(idle, conn.buf.fill(&mut conn.stream)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) if dec.ends_at_eof() => eof = true,
            Err(_) => {
                // Same as the plain relay: the client learns why its stream stops.
                inst.record_failure(&w.policy().circuit);
                crate::warn!(
                    "decode instance {} sent nothing for {idle:?} mid-stream; ending it",
                    inst.address
                );
                let msg = format!("upstream {} stalled mid-stream", inst.address);
                return fail_stream(client, &msg, "timeout_error", 504).await;
            }
            Ok(_) => {
                inst.record_failure(&w.policy().circuit);
                crate::warn!("decode instance {} ended the stream early", inst.address);
                return Outcome::close(200);
            }
        }
    }
}

/// The decode leg failed after the first event went out: an SSE error event, then close.
pub async fn fail_stream(client: &mut TcpStream, message: &str, kind: &str, code: u16) -> Outcome {
    let mut out = Vec::new();
    sse_error_chunk(&mut out, message, kind, code);
    let _ = client.write_all(out).await;
    Outcome::close(200)
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
