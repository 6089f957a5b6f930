//! `generator_on_p_node` (docs/api.md): a streaming request's first token comes from the
//! prefill node and reaches the client the moment the prefill leg ends; the decode stream
//! follows without its own first content token. Every event carries the first chunk's `id`,
//! `created` and `model`, so the client sees one consistent stream; usage is the decode
//! node's.
//!
//! Caveat: the decode engine samples its own first token and continues from that one, not
//! from the prefill node's (which it never sees). With greedy sampling both agree; with
//! temperature > 0 the text may be inconsistent at the seam.

use super::context::{write_client, RequestCtx};
use super::failure::{self, BodyFailure, RelayError};
use super::outcome::Outcome;
use super::raw_object::{rewrite_members, RawObject};
use super::relay_task::{self, Apart};
use super::sse;
use super::upstream::{BodyDecoder, UpstreamConn};
use crate::admission::usage;
use crate::http::chunked::LAST_CHUNK;
use crate::http::head::{Framing, ResponseHead};
use crate::http::write::{response_head, BodyLen};
use crate::http::ApiError;
use crate::instance::{InFlight, Instance};
use http::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

pub struct FirstToken {
    id: Value,
    created: Value,
    model: Value,
    /// `id`, `created` and `model` as JSON text, which every later event is given.
    identity: [(&'static str, String); 3],
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
        let field = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
        let (id, created, model) = (field("id"), field("created"), field("model"));
        Some(FirstToken {
            identity: [
                ("id", id.to_string()),
                ("created", created.to_string()),
                ("model", model.to_string()),
            ],
            id,
            created,
            model,
            text,
            chat,
        })
    }

    fn identity(&self) -> [(&str, &str); 3] {
        self.identity.each_ref().map(|(k, v)| (*k, v.as_str()))
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
    /// The rewritten event.
    out: Vec<u8>,
}

impl Rewriter<'_> {
    /// The event to send for `payload` (an SSE `data:` value), or None to drop it: a payload
    /// that is not a JSON object is dropped.
    fn rewrite(&mut self, payload: &str) -> Option<&[u8]> {
        if payload.trim() == "[DONE]" {
            return Some(b"[DONE]");
        }
        self.out.clear();
        if self.dropped_first {
            // Past the decode node's own first token only the stream's identity changes: set
            // in the event's own text, which is not parsed into a tree and written again (a
            // tenth of the instructions per token), reading its top level only.
            let identity = self.first.identity();
            if !rewrite_members(payload, &identity, &mut self.out) {
                let obj = RawObject::parse(payload).ok()?;
                obj.write_with(&mut self.out, &identity);
            }
            return Some(&self.out);
        }
        let mut v: Value = serde_json::from_str(payload).ok()?;
        if !v.is_object() {
            return None;
        }
        v["id"] = self.first.id.clone();
        v["created"] = self.first.created.clone();
        v["model"] = self.first.model.clone();
        let has_choice = v["choices"].as_array().is_some_and(|c| !c.is_empty());
        if has_choice {
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
        serde_json::to_writer(&mut self.out, &v).ok()?;
        Some(&self.out)
    }
}

/// Relays the decode stream after the first event, rewritten event by event, in a task of
/// its own (`relay_task::apart`) as `relay` does an event stream.
pub async fn relay_rest(
    ctx: &mut RequestCtx<'_>,
    guard: &InFlight<'_>,
    conn: UpstreamConn,
    head: ResponseHead,
    first: FirstToken,
) -> Outcome {
    let inst: &Instance = guard.instance();
    let idle = ctx.policy.timeouts.idle;
    let framing = head.framing;
    let (result, conn, _) = relay_task::apart(ctx, guard, conn, true, |mut a| async move {
        let r = pump_rest(&mut a, framing, &first, idle).await;
        (r, a)
    })
    .await;
    match result {
        Ok(()) => {
            if head.keep_alive {
                ctx.w.pool.put_back(conn, inst);
            }
            Outcome::new(200, ctx.keep_alive)
        }
        Err(RelayError::ClientGone) => Outcome::client_gone(),
        Err(RelayError::Upstream(f)) => {
            drop(conn);
            f.record(ctx.w, inst, ctx.request_id);
            fail_stream(ctx, &f.api_error(inst)).await
        }
    }
}

async fn pump_rest(
    a: &mut Apart,
    framing: Framing,
    first: &FirstToken,
    idle: Duration,
) -> Result<(), RelayError> {
    let mut rw = Rewriter {
        first,
        dropped_first: false,
        out: Vec::new(),
    };
    let mut dec = BodyDecoder::new(framing);
    let mut events = sse::Splitter::default();
    // The engine's token counts, from the decode stream's last event.
    let mut usage = usage::Scanner::default();
    let mut out: Vec<u8> = Vec::new();
    let mut eof = false;
    loop {
        // Move decoded body bytes into the splitter; the peer closing ends a close-delimited
        // body.
        let from = events.input().len();
        let done = dec
            .decode(&mut a.conn.buf, events.input())
            .map_err(|_| BodyFailure::Framing)?
            || eof;
        usage.feed(&events.input()[from..]);
        if let Some(u) = usage.found() {
            a.tl.usage = Some(u);
        }
        let mut sent = 0;
        events.each_event(|event| {
            for payload in sse::data_values(event) {
                if let Some(p) = rw.rewrite(&payload) {
                    sse::chunk(&mut out, p);
                    sent += 1;
                }
            }
        });
        if done {
            out.extend_from_slice(LAST_CHUNK);
        }
        if !out.is_empty() {
            out = write_client(&mut a.client, out).await?;
            a.tl.wrote_body(sent);
            a.decode.decoded(sent);
        }
        if done {
            return Ok(());
        }
        if failure::read_more(&mut a.conn, idle).await? == 0 {
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

    fn rewriter(first: &FirstToken) -> Rewriter<'_> {
        Rewriter {
            first,
            dropped_first: false,
            out: Vec::new(),
        }
    }

    fn json_of(bytes: Option<&[u8]>) -> Value {
        serde_json::from_slice(bytes.expect("an event, not dropped")).unwrap()
    }

    fn completion(t: &str, fin: &str) -> String {
        format!(
            r#"{{"id":"cmpl-D","object":"text_completion","created":2,"model":"m","choices":[{{"index":0,"text":"{t}","finish_reason":{fin}}}]}}"#
        )
    }

    #[test]
    fn drops_the_decode_first_token_and_unifies_ids() {
        let first = FirstToken::from_prefill(
            br#"{"id":"cmpl-P","created":1,"model":"m","choices":[{"text":" [prefill]"}]}"#,
            false,
        )
        .unwrap();
        let mut rw = rewriter(&first);
        assert!(rw.rewrite(&completion(" a", "null")).is_none());
        let second = json_of(rw.rewrite(&completion(" b", "null")));
        assert_eq!(second["id"], "cmpl-P");
        assert_eq!(second["created"], 1);
        assert_eq!(second["choices"][0]["text"], " b");
        assert_eq!(rw.rewrite("[DONE]").unwrap(), b"[DONE]");
    }

    #[test]
    fn later_events_keep_their_text_but_the_identity() {
        let first = FirstToken::from_prefill(
            br#"{"id":"cmpl-\"P\"","created":1,"model":"m","choices":[{"text":"x"}]}"#,
            false,
        )
        .unwrap();
        let mut rw = rewriter(&first);
        assert!(rw.rewrite(&completion(" a", "null")).is_none());
        let event = completion(" b", "null");
        let got = String::from_utf8(rw.rewrite(&event).unwrap().to_vec()).unwrap();
        // In the event's own order and spelling, the identity aside.
        let want = event
            .replace(r#""id":"cmpl-D""#, r#""id":"cmpl-\"P\"""#)
            .replace(r#""created":2"#, r#""created":1"#);
        assert_eq!(got, want);
        // Members the event lacks are added.
        let bare = json_of(rw.rewrite(r#"{"choices":[]}"#));
        assert_eq!(bare["id"], "cmpl-\"P\"");
        assert_eq!(bare["model"], "m");
        assert_eq!(bare["choices"], json!([]));
    }

    #[test]
    fn payloads_that_are_not_json_objects_are_dropped() {
        let first = FirstToken::from_prefill(
            br#"{"id":"c","created":1,"model":"m","choices":[{"text":"x"}]}"#,
            false,
        )
        .unwrap();
        let mut rw = rewriter(&first);
        for bad in ["5", r#""text""#, "[1,2]", "true", "{", "not json"] {
            assert!(rw.rewrite(bad).is_none(), "before the first token: {bad}");
        }
        assert!(rw.rewrite(&completion(" a", "null")).is_none());
        for bad in ["5", r#""text""#, "[1,2]", "true", "{", "not json"] {
            assert!(rw.rewrite(bad).is_none(), "after the first token: {bad}");
        }
    }

    #[test]
    fn one_token_answer_keeps_its_finish_reason() {
        let first = FirstToken::from_prefill(
            br#"{"id":"c","created":1,"model":"m","choices":[{"message":{"content":"x"}}]}"#,
            true,
        )
        .unwrap();
        let mut rw = rewriter(&first);
        assert!(rw
            .rewrite(
                r#"{"choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#
            )
            .is_none());
        let last = json_of(
            rw.rewrite(r#"{"choices":[{"delta":{"content":"y"},"finish_reason":"length"}]}"#),
        );
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert!(last["choices"][0]["delta"]["content"].is_null());
    }

    /// Any JSON a decode node might send, shaped around the members the rewriter reads.
    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z ]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            let key = prop_oneof![
                Just("id".to_string()),
                Just("choices".to_string()),
                Just("delta".to_string()),
                Just("content".to_string()),
                Just("text".to_string()),
                Just("finish_reason".to_string()),
                "[a-z]{1,4}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((key, inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever the decode node sends, the rewriter answers with JSON (or `[DONE]`, or
        /// drops the event), and never panics.
        #[test]
        fn the_rewriter_never_panics(
            events in proptest::collection::vec(json_value(), 0..8),
            chat in proptest::prelude::any::<bool>(),
        ) {
            let first = FirstToken::from_prefill(
                br#"{"id":"c","created":1,"model":"m","choices":[{"text":"x","message":{"content":"x"}}]}"#,
                chat,
            )
            .unwrap();
            let mut rw = rewriter(&first);
            for e in events {
                if let Some(out) = rw.rewrite(&e.to_string()) {
                    proptest::prop_assert!(serde_json::from_slice::<Value>(out).is_ok());
                }
            }
        }
    }
}
