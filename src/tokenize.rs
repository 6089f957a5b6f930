//! Per-model Hugging Face tokenizers, in the Python proxy 1.8's layout: `tokenizer_path`
//! holds one folder per model name (`<tokenizer_path>/<model>/tokenizer.json`; a model
//! `org/name` is the folder `org/name`). Loaded at start (off the request path) and shared
//! read-only by every worker. Used only when a policy or check needs exact tokens
//! (docs/scheduling.md, "Tokenizers").

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

pub type Tokenizer = tokenizers::Tokenizer;

fn registry() -> &'static arc_swap::ArcSwap<HashMap<String, Arc<Tokenizer>>> {
    static R: OnceLock<arc_swap::ArcSwap<HashMap<String, Arc<Tokenizer>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Loads the tokenizer of each of `models` found under `root`; a model without one is
/// logged and keeps the byte estimate.
pub fn load(root: &Path, models: &[String]) {
    let mut map = HashMap::new();
    for m in models {
        let dir = root.join(m);
        let file = if dir.is_dir() {
            dir.join("tokenizer.json")
        } else {
            dir
        };
        match Tokenizer::from_file(&file) {
            Ok(t) => {
                crate::info!("tokenizer of model {m}: {}", file.display());
                map.insert(m.clone(), Arc::new(t));
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
pub fn get(model: &str) -> Option<Arc<Tokenizer>> {
    registry().load().get(model).cloned()
}

/// Token ids of a completion prompt's text, special tokens added as vLLM does for
/// `/v1/completions`.
pub fn encode(t: &Tokenizer, text: &str) -> Option<Vec<u32>> {
    t.encode(text, true).ok().map(|e| e.get_ids().to_vec())
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
        let t = get("test-model").expect("loaded");
        assert!(get("missing/model").is_none());
        let ids = encode(&t, "Hello world, the proxy routes requests.").unwrap();
        assert!(!ids.is_empty() && ids.len() < 40, "{ids:?}");
    }
}
