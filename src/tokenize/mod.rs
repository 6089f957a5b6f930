//! Per-model Hugging Face tokenizers, in the Python proxy 1.8's layout: `tokenizer_path`
//! holds one folder per model name (`<tokenizer_path>/<model>/tokenizer.json`, and the
//! chat template from `tokenizer_config.json` or `chat_template.jinja` beside it; a model
//! `org/name` is the folder `org/name`). Loaded at start and on reload (on the control
//! thread) and shared read-only by every worker.
//!
//! Tokenizing never runs on a worker: a request that needs exact tokens hands its prompt
//! to the tokenizer threads through a bounded queue (`pool`) and its task waits for the
//! answer without blocking the worker's event loop (`wake`). When the queue is full the
//! request keeps the byte estimate. Used only when a policy or check needs exact tokens
//! (docs/scheduling.md, "Tokenizers"; the mechanism in docs/architecture.md).

mod chat;
mod pieces;
mod pool;
mod wake;

use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

pub use chat::ChatTemplate;
pub use pool::{render_metrics, set_max_queued_kib, start_threads};

pub type Tokenizer = tokenizers::Tokenizer;

/// What the proxy knows of a model's tokenization.
pub struct Model {
    pub tokenizer: Tokenizer,
    /// The chat template (None: chat requests keep the byte estimate).
    pub chat: Option<ChatTemplate>,
    /// Tokenizing in kept pieces, when that is exact for this tokenizer (None: whole).
    pieces: Option<pieces::Pieces>,
}

impl Model {
    /// `text`'s token ids, special tokens added when `add_special` (from kept pieces of
    /// earlier prompts where it can: `pieces`).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        match &self.pieces {
            Some(p) => p.encode(&self.tokenizer, text, add_special),
            None => encode(&self.tokenizer, text, add_special),
        }
    }
}

fn registry() -> &'static arc_swap::ArcSwap<HashMap<String, Arc<Model>>> {
    static R: OnceLock<arc_swap::ArcSwap<HashMap<String, Arc<Model>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Loads the tokenizer (and chat template) of each of `models` found under `root`; a
/// model without one is logged and keeps the byte estimate. Replaces the previous set.
pub fn load(root: &Path, models: &[String]) {
    let mut map = HashMap::new();
    for m in models {
        let dir = root.join(m);
        let (file, dir) = if dir.is_dir() {
            (dir.join("tokenizer.json"), Some(dir))
        } else {
            (dir, None)
        };
        match Tokenizer::from_file(&file) {
            Ok(tokenizer) => {
                let chat = dir.as_deref().and_then(|d| match ChatTemplate::load(d) {
                    Ok(c) => c,
                    Err(e) => {
                        crate::warn!(
                            "chat template of model {m} ({}): {e}; its chat prompts are counted as bytes / 4",
                            d.display()
                        );
                        None
                    }
                });
                let pieces = pieces::Pieces::for_tokenizer(&tokenizer)
                    .map_err(|e| {
                        crate::info!(
                            "tokenizer of model {m}: prompts are tokenized whole, not in kept pieces: {e}"
                        )
                    })
                    .ok();
                crate::info!(
                    "tokenizer of model {m}: {}{}{}",
                    file.display(),
                    if chat.is_some() {
                        ", with a chat template"
                    } else {
                        ""
                    },
                    if pieces.is_some() {
                        ", shared prefixes kept"
                    } else {
                        ""
                    }
                );
                map.insert(
                    m.clone(),
                    Arc::new(Model {
                        tokenizer,
                        chat,
                        pieces,
                    }),
                );
            }
            Err(e) => crate::warn!(
                "no tokenizer for model {m} ({}: {e}); its prompts are counted as bytes / 4",
                file.display()
            ),
        }
    }
    registry().store(Arc::new(map));
}

/// The tokenizer of `model`, if one was loaded.
#[inline]
pub fn get(model: &str) -> Option<Arc<Model>> {
    registry().load().get(model).cloned()
}

/// `text`'s token ids, tokenized whole; special tokens added when `add_special` (as vLLM
/// does for `/v1/completions`, not for a rendered chat).
pub fn encode(t: &Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
    t.encode(text, add_special)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| e.to_string())
}

/// A prompt to tokenize, as slices of the request body (shared, not copied): the JSON is
/// decoded on the tokenizer thread too.
pub enum Input {
    /// A completion prompt: one JSON string.
    Completion(Bytes),
    /// Chat messages (a JSON array) and what else the chat template sees.
    Chat(ChatInput),
}

pub struct ChatInput {
    pub messages: Bytes,
    /// The request's `tools` (JSON), passed to the template as vLLM does.
    pub tools: Option<Bytes>,
    /// `chat_template_kwargs` (a JSON object): extra template variables.
    pub kwargs: Option<Bytes>,
    /// `add_generation_prompt` (vLLM's default: true).
    pub add_generation_prompt: bool,
}

impl Input {
    fn len(&self) -> usize {
        match self {
            Input::Completion(b) => b.len(),
            Input::Chat(c) => c.messages.len() + c.tools.as_ref().map_or(0, |t| t.len()),
        }
    }

    fn is_chat(&self) -> bool {
        matches!(self, Input::Chat(_))
    }
}

/// The prompt's token ids as `model`'s engine will see them, computed on a tokenizer
/// thread while this task waits (the worker serves its other connections meanwhile).
/// None: no tokenizer (or chat template) for the model, the queue is full, or the input
/// cannot be tokenized exactly (counted in the metrics) — the caller keeps the estimate.
pub async fn token_ids(model: &str, input: Input) -> Option<Vec<u32>> {
    let m = get(model)?;
    if input.is_chat() && m.chat.is_none() {
        return None;
    }
    let slot = pool::submit(m, input)?;
    wake::Wait::new(slot).await
}

/// Runs one job's work: what the tokenizer thread computes.
fn run(m: &Model, input: Input) -> Result<Vec<u32>, String> {
    match input {
        Input::Completion(json) => {
            let text: String = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
            m.encode(&text, true)
        }
        Input::Chat(c) => {
            let t = m.chat.as_ref().ok_or("no chat template")?;
            let text = t.render(&c)?;
            // The template writes the special tokens itself (vLLM tokenizes a rendered chat
            // with add_special_tokens = false).
            m.encode(&text, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_the_per_model_layout_and_encodes() {
        let root = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/engine/tokenizers"
        ));
        load(
            root,
            &["test-model".to_string(), "missing/model".to_string()],
        );
        let m = get("test-model").expect("loaded");
        assert!(
            m.chat.is_some(),
            "tokenizer_config.json has a chat template"
        );
        assert!(get("missing/model").is_none());
        let ids = encode(
            &m.tokenizer,
            "Hello world, the proxy routes requests.",
            true,
        )
        .unwrap();
        assert!(!ids.is_empty() && ids.len() < 40, "{ids:?}");
        let chat = run(
            &m,
            Input::Chat(ChatInput {
                messages: Bytes::from_static(br#"[{"role":"user","content":"Hello world"}]"#),
                tools: None,
                kwargs: None,
                add_generation_prompt: true,
            }),
        )
        .unwrap();
        assert!(chat.len() > 2, "{chat:?}");
    }
}
