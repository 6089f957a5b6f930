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

/// A tokenizer: the built-in stand-in, or (in the `xpyd-dummy` binary) a Hugging Face
/// `tokenizer.json`.
pub trait Tokenize: Send + Sync {
    fn encode(&self, text: &str) -> Vec<u32>;

    /// A chat request's prompt. Without the model's chat template this renders ChatML
    /// (`<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
    /// `<|im_start|>assistant\n`) and encodes it; docs/cli.md says so.
    fn encode_chat(&self, messages: &[Value]) -> Vec<u32> {
        let mut text = String::new();
        for m in messages {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = m.get("content").map(content_text).unwrap_or_default();
            text.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        text.push_str("<|im_start|>assistant\n");
        self.encode(&text)
    }
}

/// The built-in tokenizer (see `tokenize`); a chat message costs 4 template tokens plus its
/// content's, as the counts always did.
pub struct Builtin;

impl Tokenize for Builtin {
    fn encode(&self, text: &str) -> Vec<u32> {
        tokenize(text)
    }

    fn encode_chat(&self, messages: &[Value]) -> Vec<u32> {
        let mut ids = Vec::new();
        for m in messages {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            ids.extend([50_000, piece_id(role.as_bytes()), 50_001, 50_002]);
            if let Some(c) = m.get("content") {
                ids.extend(value_token_ids(c, self));
            }
        }
        ids
    }
}

/// The text of a message's `content` (a string, or the `text` of its parts).
pub fn content_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str).or_else(|| p.as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn piece_id(piece: &[u8]) -> u32 {
    let h = piece
        .iter()
        .fold(2166136261u32, |h, &b| (h ^ b as u32).wrapping_mul(16777619));
    h % 50_000
}

/// Token ids of a completion `prompt` (or a message part): strings are encoded, numbers are
/// token ids already, lists are concatenated.
fn value_token_ids(v: &Value, tok: &dyn Tokenize) -> Vec<u32> {
    match v {
        Value::String(s) => tok.encode(s),
        Value::Array(items) => items
            .iter()
            .flat_map(|x| match x {
                Value::Number(n) => vec![n.as_u64().unwrap_or(0) as u32],
                other => value_token_ids(other, tok),
            })
            .collect(),
        Value::Object(o) => o
            .get("text")
            .or_else(|| o.get("content"))
            .map(|x| value_token_ids(x, tok))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The prompt's token ids as the engine sees them (used when the KV-cache model or a real
/// tokenizer is on; otherwise only `count_text_tokens` runs).
pub fn prompt_token_ids(kind: Kind, body: &Value, tok: &dyn Tokenize) -> Vec<u32> {
    match kind {
        Kind::Completion => body.get("prompt").map(|p| value_token_ids(p, tok)),
        Kind::Chat => body
            .get("messages")
            .and_then(Value::as_array)
            .map(|m| tok.encode_chat(m)),
    }
    .unwrap_or_default()
}

/// Token ids for `/tokenize`: one id per tokenizer piece (4-byte slices of words), hashed.
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    for w in text.split_whitespace() {
        for piece in w.as_bytes().chunks(4) {
            ids.push(piece_id(piece));
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
        counted: Option<usize>,
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
        let prompt_tokens = counted.unwrap_or(prompt_tokens);
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

/// Engine timing (docs/cli.md, "Timing model"): a prefill costs its uncomputed prompt
/// tokens × `prefill_per_token`; each decode step costs `decode_per_token` plus
/// `decode_per_seq` for every other running sequence in the batch.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub prefill_per_token: Duration,
    pub decode_per_token: Duration,
    pub decode_per_seq: Duration,
}

impl Timing {
    /// The decode step with `running` sequences in the batch.
    #[inline]
    pub fn decode_step(&self, running: u64) -> Duration {
        if self.decode_per_seq.is_zero() {
            self.decode_per_token
        } else {
            self.decode_per_token + self.decode_per_seq * running.saturating_sub(1) as u32
        }
    }

    /// Until the first token: the prefill of `prefill_tokens`, or one decode step when
    /// nothing is left to compute (a decode node whose KV arrived).
    pub fn first_token(&self, prefill_tokens: usize, running: u64) -> Duration {
        if prefill_tokens == 0 {
            self.decode_step(running)
        } else {
            self.prefill_per_token * prefill_tokens as u32
        }
    }

    pub fn is_zero(&self) -> bool {
        self.prefill_per_token.is_zero()
            && self.decode_per_token.is_zero()
            && self.decode_per_seq.is_zero()
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
        let j = Job::from_request(Kind::Completion, &body, "m", 100, None).unwrap();
        assert_eq!((j.prompt_tokens, j.max_tokens), (3, 5));
        let body = json!({"prompt": "x", "max_tokens": 500});
        assert!(Job::from_request(Kind::Completion, &body, "m", 100, None).is_err());
    }

    #[test]
    fn decode_step_grows_with_the_batch() {
        let ms = Duration::from_millis;
        let t = Timing {
            prefill_per_token: ms(2),
            decode_per_token: ms(10),
            decode_per_seq: ms(1),
        };
        assert_eq!(t.decode_step(1), ms(10));
        assert_eq!(t.decode_step(64), ms(73));
        assert_eq!(t.first_token(100, 1), ms(200));
        // Nothing to prefill (KV arrived): the first token is one decode step.
        assert_eq!(t.first_token(0, 3), ms(12));
    }

    #[test]
    fn builtin_ids_match_counts() {
        let body = json!({"messages": [{"role": "user", "content": "hello wonderful world"}]});
        let ids = prompt_token_ids(Kind::Chat, &body, &Builtin);
        let j = Job::from_request(Kind::Chat, &body, "m", 100, None).unwrap();
        assert_eq!(ids.len(), j.prompt_tokens);
        let body = json!({"prompt": "hello wonderful world"});
        let ids = prompt_token_ids(Kind::Completion, &body, &Builtin);
        assert_eq!(ids.len(), count_text_tokens("hello wonderful world"));
        let body = json!({"prompt": [5, 6, 7]});
        assert_eq!(
            prompt_token_ids(Kind::Completion, &body, &Builtin),
            vec![5, 6, 7]
        );
    }

    #[test]
    fn stream_event_is_valid_json() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
        let j = Job::from_request(Kind::Chat, &body, "m\"x", 100, None).unwrap();
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
