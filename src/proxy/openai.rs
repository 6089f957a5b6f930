//! Looking into OpenAI request bodies without deserialising them: one pass splits the top
//! level object into (key, raw JSON value) pairs that borrow the body. Validation reads the
//! few fields it needs; the prefill body is re-assembled from the raw pairs, so a 4 MiB
//! prompt is copied once and never re-encoded. The decode leg forwards the original bytes.

use super::raw_object::push_member;
pub use super::raw_object::RawObject;
use crate::http::ApiError;
use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// What the proxy needs to know about an inference request.
pub struct Inspected<'a> {
    pub obj: RawObject<'a>,
    pub model: Option<Cow<'a, str>>,
    /// The prompt / messages as raw JSON text: its length gives the token estimate
    /// (bytes / 4), its content the prefix for cache-aware routing.
    pub prompt: &'a [u8],
    /// `max_completion_tokens` or `max_tokens` when given as a number.
    pub max_tokens: Option<u64>,
    /// The body's `user`, a consistent-hash key.
    pub user: Option<Cow<'a, str>>,
    /// `stream: true`.
    pub stream: bool,
}

impl Inspected<'_> {
    pub fn prompt_tokens(&self) -> u64 {
        (self.prompt.len() / 4) as u64
    }
}

/// The token ids of a prompt given as a list of integers (`"prompt": [1, 2, 3]`), the form
/// that needs no tokenizer; None for text, chat messages or a batch of prompts.
pub fn token_ids(prompt: &[u8]) -> Option<Vec<u32>> {
    if prompt.first() != Some(&b'[') {
        return None;
    }
    serde_json::from_slice::<Vec<u32>>(prompt).ok()
}

/// A raw JSON string's value: borrowed when it has no escapes (the usual model name or
/// user), decoded otherwise; None when the value is not a string.
fn json_str(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    // Raw JSON text from `RawObject` is valid: without a backslash the quotes found are the
    // string's own, and it holds no control characters.
    if !inner.contains(['\\', '"']) {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

fn first_byte(v: &str) -> u8 {
    v.as_bytes().first().copied().unwrap_or(b' ')
}

pub fn inspect<'a>(endpoint: Endpoint, body: &'a [u8]) -> Result<Inspected<'a>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "request body is empty; expected a JSON object",
        ));
    }
    let obj = RawObject::parse_bytes(body).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            ApiError::bad_request("request body must be a JSON object")
        } else {
            ApiError::bad_request(format!("request body is not valid JSON: {e}"))
        }
    })?;
    let model = match obj.get("model") {
        None => None,
        Some("null") => None,
        Some(v) => Some(json_str(v).ok_or_else(|| {
            ApiError::bad_request("`model` must be a string").with_param("model")
        })?),
    };
    let (field, ok_first): (&'static str, &[u8]) = match endpoint {
        Endpoint::Completions => ("prompt", b"\"["),
        Endpoint::ChatCompletions => ("messages", b"["),
    };
    let prompt = match obj.get(field) {
        None => {
            return Err(
                ApiError::bad_request(format!("`{field}` is a required field")).with_param(field),
            )
        }
        Some(v) if !ok_first.contains(&first_byte(v)) => {
            let expected = match endpoint {
                Endpoint::Completions => "a string, a list of strings or a list of token ids",
                Endpoint::ChatCompletions => "a list of messages",
            };
            return Err(
                ApiError::bad_request(format!("`{field}` must be {expected}")).with_param(field),
            );
        }
        Some(v) => v.as_bytes(),
    };
    let number = |k: &str| obj.get(k).and_then(|v| v.parse::<u64>().ok());
    let max_tokens = number("max_completion_tokens").or_else(|| number("max_tokens"));
    let user = obj.get("user").and_then(json_str);
    let stream = obj.get("stream") == Some("true");
    Ok(Inspected {
        obj,
        model,
        prompt,
        max_tokens,
        user,
        stream,
    })
}

/// What the prefill leg of a NIXL request asks for: keep the KV cache for a remote decode.
const NIXL_PREFILL_PARAMS: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// The prefill leg's body (docs/api.md): the client's request with `max_tokens: 1`
/// (and `max_completion_tokens: 1` where the client used it), `stream: false`, and no
/// `stream_options` / `min_tokens`; in NIXL mode with `kv_transfer_params` asking for a
/// remote decode.
pub fn prefill_body(obj: &RawObject<'_>) -> Vec<u8> {
    prefill_body_for(obj, false)
}

/// Room for `obj`'s members written out again (`push_member`), escapes in keys aside.
fn members_len(obj: &RawObject<'_>) -> usize {
    obj.fields.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
}

pub fn prefill_body_for(obj: &RawObject<'_>, nixl: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(members_len(obj) + 64);
    write_prefill_body(&mut out, obj, nixl);
    out
}

/// `prefill_body_for`, appended to `out` (a worker's free buffer, on the request path).
pub fn write_prefill_body(out: &mut Vec<u8>, obj: &RawObject<'_>, nixl: bool) {
    out.push(b'{');
    let mut used_mct = false;
    for (k, v) in &obj.fields {
        match k.as_ref() {
            "max_completion_tokens" => {
                used_mct = true;
                continue;
            }
            "max_tokens" | "stream" | "stream_options" | "min_tokens" => continue,
            "kv_transfer_params" if nixl => continue,
            _ => {}
        }
        push_member(out, k, v);
    }
    out.extend_from_slice(b"\"max_tokens\":1,\"stream\":false");
    if used_mct {
        out.extend_from_slice(b",\"max_completion_tokens\":1");
    }
    if nixl {
        out.extend_from_slice(b",\"kv_transfer_params\":");
        out.extend_from_slice(NIXL_PREFILL_PARAMS.as_bytes());
    }
    out.push(b'}');
}

/// The `kv_transfer_params` object of a prefill response, as raw JSON (None when absent or
/// not an object).
pub fn kv_params_of(prefill_response: &[u8]) -> Option<String> {
    let obj = RawObject::parse_bytes(prefill_response).ok()?;
    let v = obj.get("kv_transfer_params")?;
    v.starts_with('{').then(|| v.to_string())
}

/// The client's body with `kv_transfer_params` set to `kv` (raw JSON), for the decode leg
/// of a NIXL request; every other member is copied verbatim, in order.
pub fn with_kv_params(obj: &RawObject<'_>, kv: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(members_len(obj) + kv.len() + 32);
    obj.write_with(&mut out, &[("kv_transfer_params", kv)]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn prefill_rewrite() {
        let body = br#"{"model":"m","prompt":"hi \"there\"","max_tokens":50,"stream":true,"stream_options":{"include_usage":true},"min_tokens":3,"temperature":0.5,"we\u0069rd":1}"#;
        let i = inspect(Endpoint::Completions, body).unwrap();
        assert_eq!(i.model.as_deref(), Some("m"));
        let p: Value = serde_json::from_slice(&prefill_body(&i.obj)).unwrap();
        assert_eq!(p["max_tokens"], 1);
        assert_eq!(p["stream"], false);
        assert!(p.get("stream_options").is_none());
        assert!(p.get("min_tokens").is_none());
        assert!(p.get("max_completion_tokens").is_none());
        assert_eq!(p["temperature"], 0.5);
        assert_eq!(p["prompt"], "hi \"there\"");
        assert_eq!(p["weird"], 1);
    }

    #[test]
    fn nixl_bodies() {
        let body = br#"{"prompt":"x","kv_transfer_params":{"old":1},"n":2}"#;
        let i = inspect(Endpoint::Completions, body).unwrap();
        let p: Value = serde_json::from_slice(&prefill_body_for(&i.obj, true)).unwrap();
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(p["kv_transfer_params"]["remote_host"], Value::Null);
        let kv = kv_params_of(
            br#"{"id":"x","kv_transfer_params":{"remote_engine_id":"e","remote_block_ids":[1,2]}}"#,
        )
        .unwrap();
        let d: Value = serde_json::from_slice(&with_kv_params(&i.obj, &kv)).unwrap();
        assert_eq!(d["kv_transfer_params"]["remote_block_ids"][1], 2);
        assert_eq!(d["n"], 2);
        assert!(kv_params_of(br#"{"kv_transfer_params":null}"#).is_none());
    }

    #[test]
    fn chat_mct() {
        let body = br#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":9}"#;
        let i = inspect(Endpoint::ChatCompletions, body).unwrap();
        let p: Value = serde_json::from_slice(&prefill_body(&i.obj)).unwrap();
        assert_eq!(p["max_completion_tokens"], 1);
        assert_eq!(p["max_tokens"], 1);
    }

    #[test]
    fn validation_errors_name_the_field() {
        let e = inspect(Endpoint::Completions, br#"{"model":"m"}"#)
            .err()
            .unwrap();
        assert_eq!(e.param, Some("prompt"));
        let e = inspect(Endpoint::ChatCompletions, br#"{"messages":"x"}"#)
            .err()
            .unwrap();
        assert_eq!(e.param, Some("messages"));
        assert!(inspect(Endpoint::Completions, b"{not json").is_err());
        assert!(inspect(Endpoint::Completions, b"[1,2]").is_err());
        assert!(inspect(Endpoint::Completions, br#"{"prompt":"x","model":5}"#).is_err());
    }
}
