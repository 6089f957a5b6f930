//! What the simulated node "computes": a deterministic tokenizer stand-in, the tokens it
//! generates, the timing of a real engine, and vLLM's exact response JSON.

use serde_json::{json, Value};
use std::time::Duration;

/// Tokenizer stand-in: every whitespace-separated word costs ceil(len/4) tokens (at least
/// one) — close to BPE counts for English text, deterministic, and cheap.
pub fn count_text_tokens(text: &str) -> usize {
    text.split_whitespace()
        .map(|w| w.len().div_ceil(4).max(1))
        .sum()
}

/// Token ids for `/tokenize`: one id per tokenizer piece (4-byte slices of words), hashed.
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    for w in text.split_whitespace() {
        for piece in w.as_bytes().chunks(4) {
            let h = piece
                .iter()
                .fold(2166136261u32, |h, &b| (h ^ b as u32).wrapping_mul(16777619));
            ids.push(h % 50_000);
        }
    }
    ids
}

const VOCAB: &[&str] = &[
    " the",
    " model",
    " answers",
    " with",
    " simulated",
    " tokens",
    " from",
    " a",
    " dummy",
    " node",
    " that",
    " behaves",
    " like",
    " vLLM",
    " for",
    " testing",
    " and",
    " load",
];

pub fn detokenize(ids: &[u64]) -> String {
    ids.iter()
        .map(|&i| VOCAB[(i as usize) % VOCAB.len()])
        .collect()
}

/// The i-th generated token.
#[inline]
pub fn token_text(i: usize) -> &'static str {
    VOCAB[i % VOCAB.len()]
}

fn count_value_tokens(v: &Value) -> usize {
    match v {
        Value::String(s) => count_text_tokens(s),
        Value::Array(items) => items
            .iter()
            .map(|x| match x {
                Value::Number(_) => 1,
                other => count_value_tokens(other),
            })
            .sum(),
        Value::Object(o) => o
            .get("text")
            .or_else(|| o.get("content"))
            .map(count_value_tokens)
            .unwrap_or(0),
        _ => 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// A prefill node's first token, so tests can see where a token came from.
pub const PREFILL_MARKER: &str = " [prefill]";

pub struct Job {
    /// Prefill nodes mark their first token with `PREFILL_MARKER`.
    pub prefill_marker: bool,
    pub kind: Kind,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub model: String,
}

#[derive(Debug)]
pub struct BadRequest(pub String);

pub const DEFAULT_MAX_TOKENS: usize = 16;

impl Job {
    pub fn from_request(
        kind: Kind,
        body: &Value,
        served_model: &str,
        max_model_len: usize,
    ) -> Result<Job, BadRequest> {
        let obj = body
            .as_object()
            .ok_or_else(|| BadRequest("request body must be a JSON object".into()))?;
        let prompt_tokens = match kind {
            Kind::Completion => match obj.get("prompt") {
                Some(p @ (Value::String(_) | Value::Array(_))) => count_value_tokens(p),
                Some(_) => return Err(BadRequest("`prompt` must be a string or a list".into())),
                None => return Err(BadRequest("`prompt` is a required field".into())),
            },
            Kind::Chat => match obj.get("messages") {
                Some(Value::Array(msgs)) => msgs
                    .iter()
                    .map(|m| 4 + m.get("content").map(count_value_tokens).unwrap_or(0))
                    .sum(),
                Some(_) => return Err(BadRequest("`messages` must be a list".into())),
                None => return Err(BadRequest("`messages` is a required field".into())),
            },
        };
        let max_tokens = obj
            .get("max_completion_tokens")
            .filter(|v| !v.is_null())
            .or_else(|| obj.get("max_tokens").filter(|v| !v.is_null()));
        let max_tokens = match max_tokens {
            None => DEFAULT_MAX_TOKENS.min(max_model_len.saturating_sub(prompt_tokens)),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => n as usize,
                _ => return Err(BadRequest("`max_tokens` must be a positive integer".into())),
            },
        };
        if prompt_tokens + max_tokens > max_model_len {
            return Err(BadRequest(format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                prompt_tokens + max_tokens
            )));
        }
        let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = stream
            && obj
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let model = obj
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(served_model)
            .to_string();
        Ok(Job {
            prefill_marker: false,
            kind,
            stream,
            include_usage,
            prompt_tokens,
            max_tokens,
            model,
        })
    }

    /// The i-th generated token of this job.
    pub fn token(&self, i: usize) -> &'static str {
        if i == 0 && self.prefill_marker {
            PREFILL_MARKER
        } else {
            token_text(i)
        }
    }

    pub fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.max_tokens,
            "completion_tokens": self.max_tokens,
        })
    }
}

/// Engine timing: when each generated token is ready, relative to the request's arrival.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub prefill_per_token: Duration,
    pub decode_per_token: Duration,
    /// A decode node does not recompute the prompt (its KV cache arrives from prefill).
    pub skip_prefill: bool,
}

impl Timing {
    /// Delay before token `i` (0-based) may be sent, counted from the previous token.
    pub fn before_token(&self, i: usize, prompt_tokens: usize) -> Duration {
        if i == 0 {
            if self.skip_prefill {
                self.decode_per_token
            } else {
                self.prefill_per_token * prompt_tokens as u32
            }
        } else {
            self.decode_per_token
        }
    }

    pub fn total(&self, prompt_tokens: usize, tokens: usize) -> Duration {
        (0..tokens)
            .map(|i| self.before_token(i, prompt_tokens))
            .sum()
    }
}

/// Pre-rendered pieces of a streamed response, so each event costs one small copy.
pub struct StreamFrames {
    prefix: String,
    object_tail: String,
}

impl StreamFrames {
    pub fn new(job: &Job, id: &str, created: u64) -> Self {
        let model = serde_json::to_string(&job.model).unwrap_or_else(|_| "\"\"".into());
        let object = match job.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        StreamFrames {
            prefix: format!(
                "data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{model},\"choices\":["
            ),
            object_tail: "]}\n\n".to_string(),
        }
    }

    /// Chat's first event: the assistant role, no content yet (as vLLM sends it).
    pub fn role_event(&self) -> String {
        format!(
            "{}{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}{}",
            self.prefix, self.object_tail
        )
    }

    pub fn token_event(&self, kind: Kind, text: &str, last: bool) -> String {
        let text = serde_json::to_string(text).unwrap_or_default();
        let finish = if last { "\"length\"" } else { "null" };
        match kind {
            Kind::Completion => format!(
                "{}{{\"index\":0,\"text\":{text},\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null}}{}",
                self.prefix, self.object_tail
            ),
            Kind::Chat => format!(
                "{}{{\"index\":0,\"delta\":{{\"content\":{text}}},\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null}}{}",
                self.prefix, self.object_tail
            ),
        }
    }

    pub fn usage_event(&self, usage: &Value) -> String {
        format!(
            "{}],\"usage\":{}}}\n\n",
            self.prefix,
            serde_json::to_string(usage).unwrap_or_default()
        )
    }
}

pub const DONE_EVENT: &str = "data: [DONE]\n\n";

/// The non-streamed body.
pub fn full_body(job: &Job, id: &str, created: u64, kv: Option<&Value>) -> Value {
    let text: String = (0..job.max_tokens).map(|i| job.token(i)).collect();
    let mut v = match job.kind {
        Kind::Completion => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": job.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": "length",
                "stop_reason": null,
                "prompt_logprobs": null,
            }],
            "usage": job.usage(),
        }),
        Kind::Chat => json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": job.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": null,
                "finish_reason": "length",
                "stop_reason": null,
            }],
            "usage": job.usage(),
            "prompt_logprobs": null,
        }),
    };
    if let Some(kv) = kv {
        v["kv_transfer_params"] = kv.clone();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts() {
        assert_eq!(count_text_tokens("hello world"), 4);
        assert_eq!(count_text_tokens("a b c"), 3);
        let body = json!({"prompt": [1, 2, 3], "max_tokens": 5});
        let j = Job::from_request(Kind::Completion, &body, "m", 100).unwrap();
        assert_eq!((j.prompt_tokens, j.max_tokens), (3, 5));
        let body = json!({"prompt": "x", "max_tokens": 500});
        assert!(Job::from_request(Kind::Completion, &body, "m", 100).is_err());
    }

    #[test]
    fn stream_event_is_valid_json() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
        let j = Job::from_request(Kind::Chat, &body, "m\"x", 100).unwrap();
        let f = StreamFrames::new(&j, "chatcmpl-1", 5);
        for ev in [
            f.role_event(),
            f.token_event(Kind::Chat, " \"q\"", true),
            f.usage_event(&j.usage()),
        ] {
            let payload = ev.strip_prefix("data: ").unwrap().trim_end();
            let v: Value = serde_json::from_str(payload).unwrap();
            assert_eq!(v["id"], "chatcmpl-1");
        }
    }
}
