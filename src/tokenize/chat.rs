//! A model's chat template (Hugging Face `chat_template`, Jinja), rendered with minijinja
//! the way `transformers`' `apply_chat_template` and vLLM render it: `trim_blocks` and
//! `lstrip_blocks`, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, the
//! request's `tools` and `chat_template_kwargs`, `raise_exception`, `strftime_now`, a
//! `tojson` that writes what Python's `json.dumps` writes, and Python's string methods.
//! What is approximated is listed in docs/scheduling.md ("Tokenizers").

use super::ChatInput;
use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};
use std::path::Path;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template loops over a message's content parts (vLLM's "openai" content
    /// format): text parts are passed as a list, not joined into one string.
    parts: bool,
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` object.
fn token(cfg: &Json, key: &str) -> String {
    match &cfg[key] {
        Json::String(s) => s.clone(),
        Json::Object(o) => o
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the tokenizer folder `dir`: `chat_template.jinja`, else
    /// tokenizer_config.json's `chat_template` (a string, or named templates: `default`),
    /// else `chat_template.json`. Ok(None) when there is none.
    pub fn load(dir: &Path) -> Result<Option<ChatTemplate>, String> {
        let read_json = |name: &str| -> Result<Json, String> {
            match std::fs::read(dir.join(name)) {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{name}: {e}")),
                Err(_) => Ok(Json::Null),
            }
        };
        let cfg = read_json("tokenizer_config.json")?;
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(s) => Some(s),
            Err(_) => match &cfg["chat_template"] {
                Json::String(s) => Some(s.clone()),
                Json::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or_else(|| named.first())
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string),
                _ => read_json("chat_template.json")?["chat_template"]
                    .as_str()
                    .map(str::to_string),
            },
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let parts = [
            "in message['content']",
            "in message[\"content\"]",
            "in message.content",
            "in content",
        ]
        .iter()
        .any(|p| source.contains(p));
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source)
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        Ok(Some(ChatTemplate {
            env,
            bos: token(&cfg, "bos_token"),
            eos: token(&cfg, "eos_token"),
            parts,
        }))
    }

    /// The prompt text the engine will tokenize for these messages.
    pub fn render(&self, c: &ChatInput) -> Result<String, String> {
        let mut messages: Json = serde_json::from_slice(&c.messages).map_err(|e| e.to_string())?;
        for m in messages.as_array_mut().ok_or("messages is not a list")? {
            self.prepare(m)?;
        }
        let mut ctx = Map::new();
        if let Some(kwargs) = &c.kwargs {
            if let Json::Object(kw) = serde_json::from_slice(kwargs).map_err(|e| e.to_string())? {
                ctx.extend(kw);
            }
        }
        ctx.insert("messages".into(), messages);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(c.add_generation_prompt),
        );
        ctx.entry("bos_token")
            .or_insert(Json::String(self.bos.clone()));
        ctx.entry("eos_token")
            .or_insert(Json::String(self.eos.clone()));
        if let Some(tools) = &c.tools {
            let tools: Json = serde_json::from_slice(tools).map_err(|e| e.to_string())?;
            if !tools.is_null() {
                ctx.insert("tools".into(), tools);
            }
        }
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(Value::from(Serde(Json::Object(ctx))))
            .map_err(|e| format!("the chat template failed: {e}"))
    }

    /// One message as vLLM hands it to the template: text parts joined with newlines (or
    /// kept as a list for a template that loops over them), tool-call arguments parsed from
    /// their JSON text. A non-text part (image, audio, file) cannot be counted here.
    fn prepare(&self, m: &mut Json) -> Result<(), String> {
        let Some(obj) = m.as_object_mut() else {
            return Err("a message is not an object".into());
        };
        if let Some(Json::Array(parts)) = obj.get("content") {
            let mut texts = Vec::with_capacity(parts.len());
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("text"), Some(t)) => texts.push(t.to_string()),
                    (kind, _) => {
                        return Err(format!(
                            "a content part of type {} is not counted",
                            kind.unwrap_or("?")
                        ))
                    }
                }
            }
            if !self.parts {
                obj.insert("content".into(), Json::String(texts.join("\n")));
            }
        }
        if let Some(Json::Array(calls)) = obj.get_mut("tool_calls") {
            for call in calls {
                let f = &mut call["function"];
                if let Some(args) = f["arguments"].as_str() {
                    if let Ok(parsed @ Json::Object(_)) = serde_json::from_str(args) {
                        f["arguments"] = parsed;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as the `tojson` of
/// `transformers` writes it (`", "` and `": "` between items without indent).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let bad = |e: serde_json::Error| Error::new(ErrorKind::InvalidOperation, e.to_string());
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let f = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut s = serde_json::Serializer::with_formatter(&mut out, f);
            serde::Serialize::serialize(&value, &mut s).map_err(bad)?;
        }
        None => {
            let mut s = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            serde::Serialize::serialize(&value, &mut s).map_err(bad)?;
        }
    }
    Ok(Value::from_safe_string(
        String::from_utf8(out).unwrap_or_default(),
    ))
}

struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(w, first)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        python_separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Python's `json.dumps` item separator: `", "` before every item but the first.
fn python_separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

/// `strftime_now(format)`: the local time now, as templates that print today's date use it.
fn strftime_now(format: String) -> Result<Value, Error> {
    let fmt = std::ffi::CString::new(format)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut buf = [0u8; 256];
    // SAFETY: time/localtime_r write into the local `tm`, strftime writes at most
    // buf.len() bytes into buf and returns how many it wrote.
    let n = unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm)
    };
    Ok(Value::from(String::from_utf8_lossy(&buf[..n]).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn template(source: &str) -> ChatTemplate {
        let dir = std::env::temp_dir().join(format!("xpyd-chat-{}", crate::ids::next_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = serde_json::json!({"chat_template": source, "bos_token": {"content": "<s>"}, "eos_token": "</s>"});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::load(&dir).unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        t
    }

    fn input(messages: &str, tools: Option<&str>) -> ChatInput {
        ChatInput {
            messages: Bytes::copy_from_slice(messages.as_bytes()),
            tools: tools.map(|t| Bytes::copy_from_slice(t.as_bytes())),
            kwargs: None,
            add_generation_prompt: true,
        }
    }

    #[test]
    fn renders_like_transformers() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        );
        let out = t
            .render(&input(
                r#"[{"role":"user","content":[{"type":"text","text":" a"},{"type":"text","text":"b "}]}]"#,
                Some(r#"[{"type":"function","function":{"name":"f","parameters":{"x":[1,2]}}}]"#),
            ))
            .unwrap();
        assert_eq!(
            out,
            "<s><|user|>\na\nb</s>\n[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"x\": [1, 2]}}}]<|assistant|>\n"
        );
    }

    #[test]
    fn non_text_parts_and_template_errors_are_refused() {
        let t = template("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}{{ messages[0]['content'].strip() }}");
        assert!(t
            .render(&input(r#"[{"role":"user","content":"x"}]"#, None))
            .unwrap_err()
            .contains("system first"));
        assert!(t
            .render(&input(
                r#"[{"role":"system","content":[{"type":"image_url","image_url":{"url":"u"}}]}]"#,
                None
            ))
            .unwrap_err()
            .contains("image_url"));
        assert_eq!(
            t.render(&input(r#"[{"role":"system","content":" hi "}]"#, None))
                .unwrap(),
            "hi"
        );
    }
}
