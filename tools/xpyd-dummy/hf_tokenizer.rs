//! A Hugging Face `tokenizer.json` (the `tokenizers` crate, pure-Rust regex) as the
//! simulated node's tokenizer.

use serde_json::Value;
use xpyd::dummy::engine::Tokenize;

pub struct HfTokenizer(tokenizers::Tokenizer);

impl HfTokenizer {
    pub fn load(path: &str) -> Result<HfTokenizer, String> {
        let file = if std::path::Path::new(path).is_dir() {
            std::path::Path::new(path).join("tokenizer.json")
        } else {
            path.into()
        };
        tokenizers::Tokenizer::from_file(&file)
            .map(HfTokenizer)
            .map_err(|e| format!("--tokenizer {}: {e}", file.display()))
    }

    fn ids(&self, text: &str, special: bool) -> Vec<u32> {
        self.0
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

impl Tokenize for HfTokenizer {
    /// As vLLM's completions endpoint: special tokens (e.g. BOS) added.
    fn encode(&self, text: &str) -> Vec<u32> {
        self.ids(text, true)
    }

    /// The ChatML rendering of `Tokenize::encode_chat`, without added special tokens (a
    /// chat template carries its own, so vLLM encodes chat prompts without them).
    fn encode_chat(&self, messages: &[Value]) -> Vec<u32> {
        let mut text = String::new();
        for m in messages {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = m
                .get("content")
                .map(xpyd::dummy::engine::content_text)
                .unwrap_or_default();
            text.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        text.push_str("<|im_start|>assistant\n");
        self.ids(&text, false)
    }
}
