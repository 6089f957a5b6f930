//! Tokenizing a prompt in pieces whose token ids are kept: prompts that share a long prefix
//! (a system prompt, a few-shot header, a document asked about several times) tokenize only
//! what follows it. A prompt is cut at word starts — a space between two printable ASCII
//! characters — at the first after every `PIECE` bytes, so every prompt with the same
//! text up to a cut is cut there alike. Tokenizing never joins text across a cut, so a
//! piece's ids are its own whatever comes before: they are kept with the piece's text,
//! found by its hash and compared byte for byte (a collision costs a tokenization, never a
//! wrong id). The last piece (the part that is new, usually) is always tokenized.
//!
//! Exact only for tokenizers that never join text across such a cut: byte-level BPE (the
//! GPT-2, Llama 3 and Qwen pre-tokenizer regexes start a piece at a space before a word
//! and never end one with a space), no normalizer but NFC, no prefix space added, no
//! added token with a space in it, and special tokens added only in front.
//! `Pieces::for_tokenizer` checks the configuration and then compares piecewise with
//! whole tokenization on sample texts; a tokenizer that fails either (SentencePiece's
//! `Metaspace`, say) is tokenized whole (docs/scheduling.md, "Tokenizers").

use super::encode;
use crate::hash::hash64;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokenizers::Tokenizer;

/// Bytes between cuts (the first word start at or after each multiple): a prompt sharing
/// a prefix tokenizes at most about this much of it again.
const PIECE: usize = 1024;

/// Bytes kept at most per model, text and ids (4 bytes each): 16 MiB, some 3 MiB of
/// prompt text with the test tokenizer. The oldest pieces go first.
const MAX_KEPT_BYTES: usize = 16 << 20;

/// Prompt bytes whose ids came from kept pieces, over all models
/// (`proxy_tokenizer_kept_bytes_total`).
pub static KEPT_BYTES: AtomicU64 = AtomicU64::new(0);

pub struct Pieces {
    /// What the tokenizer puts before the text when asked for special tokens (a BOS).
    special_prefix: Vec<u32>,
    kept: Mutex<Kept>,
}

/// A kept piece: its text and its ids.
type Piece = (Box<str>, Arc<[u32]>);

#[derive(Default)]
struct Kept {
    pieces: HashMap<u64, Piece>,
    /// Keys in the order they were kept, for eviction; and the bytes they hold in all.
    order: VecDeque<u64>,
    bytes: usize,
}

fn size((text, ids): &Piece) -> usize {
    text.len() + 4 * ids.len()
}

impl Kept {
    fn get(&self, key: u64, text: &str) -> Option<Arc<[u32]>> {
        self.pieces
            .get(&key)
            .filter(|(t, _)| &**t == text)
            .map(|(_, ids)| ids.clone())
    }

    fn put(&mut self, key: u64, piece: Piece) {
        self.bytes += size(&piece);
        // Two threads may tokenize the same piece at once (or two pieces share a hash):
        // the later replaces the earlier.
        match self.pieces.insert(key, piece) {
            Some(old) => self.bytes -= size(&old),
            None => self.order.push_back(key),
        }
        while self.bytes > MAX_KEPT_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(p) = self.pieces.remove(&old) {
                self.bytes -= size(&p);
            }
        }
    }
}

impl Pieces {
    /// Piecewise tokenization for `t`, when it is exact (see the module's comment).
    pub fn for_tokenizer(t: &Tokenizer) -> Result<Pieces, String> {
        // The parts of its configuration that matter, not the whole (vocabulary, merges).
        let added: Vec<Value> = t
            .get_added_tokens_decoder()
            .values()
            .map(|a| serde_json::json!({ "content": a.content }))
            .collect();
        let config = serde_json::json!({
            "normalizer": serde_json::to_value(t.get_normalizer()).map_err(|e| e.to_string())?,
            "pre_tokenizer": serde_json::to_value(t.get_pre_tokenizer()).map_err(|e| e.to_string())?,
            "added_tokens": added,
        });
        joins_no_cut(&config)?;
        let sample = sample_text();
        let (with, without) = (encode(t, &sample, true)?, encode(t, &sample, false)?);
        if !with.ends_with(&without) {
            return Err("special tokens are added after the text".into());
        }
        let p = Pieces {
            special_prefix: with[..with.len() - without.len()].to_vec(),
            kept: Mutex::default(),
        };
        for (special, whole) in [(true, &with), (false, &without)] {
            // Small pieces: many cuts, each tried.
            if p.encode_with(t, &sample, special, 48)? != *whole {
                return Err("piecewise tokenization differs from whole on the sample".into());
            }
        }
        Ok(Pieces {
            kept: Mutex::default(),
            ..p
        })
    }

    /// `t.encode(text, add_special)`'s ids, from kept pieces where it can.
    pub fn encode(&self, t: &Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        self.encode_with(t, text, add_special, PIECE)
    }

    fn encode_with(
        &self,
        t: &Tokenizer,
        text: &str,
        add_special: bool,
        piece: usize,
    ) -> Result<Vec<u32>, String> {
        let mut out = if add_special {
            self.special_prefix.clone()
        } else {
            Vec::new()
        };
        let (mut start, mut kept_bytes) = (0, 0);
        for end in cuts(text.as_bytes(), piece) {
            let part = &text[start..end];
            let key = hash64(0, part.as_bytes());
            let hit = self.kept.lock().ok().and_then(|k| k.get(key, part));
            match hit {
                Some(ids) => {
                    out.extend_from_slice(&ids);
                    kept_bytes += part.len();
                }
                None => {
                    let ids: Arc<[u32]> = encode(t, part, false)?.into();
                    out.extend_from_slice(&ids);
                    if let Ok(mut k) = self.kept.lock() {
                        k.put(key, (part.into(), ids));
                    }
                }
            }
            start = end;
        }
        out.extend(encode(t, &text[start..], false)?);
        KEPT_BYTES.fetch_add(kept_bytes as u64, Ordering::Relaxed);
        Ok(out)
    }
}

/// The cuts of `text`: at each multiple of `piece` bytes, the first space at or after it
/// that sits between two printable ASCII characters (so a cut never splits a character,
/// a run of spaces, or a space from the word it starts), in increasing order and short
/// of the end.
fn cuts(text: &[u8], piece: usize) -> impl Iterator<Item = usize> + '_ {
    let word_start = |i: usize| {
        text[i] == b' '
            && i > 0
            && i + 1 < text.len()
            && text[i - 1].is_ascii_graphic()
            && text[i + 1].is_ascii_graphic()
    };
    let mut next = piece;
    std::iter::from_fn(move || {
        while next < text.len() {
            let from = next;
            let at = (from..text.len()).find(|&i| word_start(i));
            match at {
                Some(i) => {
                    next = (i / piece + 1) * piece;
                    return Some(i);
                }
                None => next = text.len(),
            }
        }
        None
    })
}

/// Whether `config` (a tokenizer's JSON) describes one that never joins text across a
/// word start: Err says why not.
fn joins_no_cut(config: &Value) -> Result<(), String> {
    match config.get("normalizer") {
        None | Some(Value::Null) => {}
        Some(n) if n.get("type").and_then(Value::as_str) == Some("NFC") => {}
        Some(_) => return Err("it has a normalizer".into()),
    }
    // Added tokens are matched in the text before any piece is made: one with a space in
    // it could be cut in two.
    let added = config.get("added_tokens").and_then(Value::as_array);
    let spaced = added.into_iter().flatten().find_map(|a| {
        let c = a.get("content").and_then(Value::as_str)?;
        c.contains(' ').then_some(c)
    });
    if let Some(c) = spaced {
        return Err(format!("its added token {c:?} holds a space"));
    }
    let pre = config.get("pre_tokenizer").unwrap_or(&Value::Null);
    let steps: Vec<&Value> = match pre.get("type").and_then(Value::as_str) {
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some(_) => vec![pre],
        None => return Err("it has no pre-tokenizer".into()),
    };
    let mut byte_level = false;
    for s in steps {
        match s.get("type").and_then(Value::as_str) {
            Some("ByteLevel") => {
                if s.get("add_prefix_space").and_then(Value::as_bool) == Some(true) {
                    return Err("its byte-level pre-tokenizer adds a prefix space".into());
                }
                byte_level = true;
            }
            // The pattern is checked on the sample texts.
            Some("Split") | Some("Digits") => {}
            other => return Err(format!("its pre-tokenizer {other:?} is not byte-level")),
        }
    }
    if byte_level {
        Ok(())
    } else {
        Err("its pre-tokenizer is not byte-level".into())
    }
}

/// Text that exercises what a cut could break: words, numbers, runs of spaces and
/// newlines, tabs, punctuation, contractions, code and non-ASCII letters.
fn sample_text() -> String {
    let lines = [
        "You are a helpful assistant. Answer the question below, and be concise.",
        "It's 2026; we'll ship 12345 tokens at 3.14159 per   second, don't we?",
        "fn main() { let x = vec![1, 2, 3]; println!(\"{x:?}\"); }  // code",
        "Naïve café résumé: 日本語のテキスト and Ελληνικά words mixed in.",
        "Wait... what?! (yes) [no] {maybe} <tag attr=\"v\"> a+b=c 100% #1 @user",
        "\tTabbed line\t with\ttabs,   and  double  spaces  \n\n  indented after blank",
        "A list: - one\n - two\n - three\n\nThe end of the section.",
    ];
    let mut s = String::new();
    for k in 0..6 {
        for (n, l) in lines.iter().enumerate() {
            s.push_str(l);
            s.push_str(if (k + n) % 3 == 0 { "\n" } else { " " });
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_tokenizer() -> Tokenizer {
        Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/engine/tokenizers/test-model/tokenizer.json"
        ))
        .unwrap()
    }

    #[test]
    fn cuts_fall_on_word_starts_after_each_piece() {
        let text = b"aaaa bbbb  cccc dddd\neeee ffff";
        let c: Vec<usize> = cuts(text, 8).collect();
        // After 8: not the run of two spaces at 9-10, the single space at 15; after 16:
        // not the newline at 20, the space at 25.
        assert_eq!(c, vec![15, 25]);
        assert!(cuts(b"no_spaces_here_at_all", 4).next().is_none());
        assert!(cuts(b"", 4).next().is_none());
    }

    /// Prompts that share a prefix: the second tokenizes from kept pieces, and every
    /// answer equals whole tokenization.
    #[test]
    fn pieces_are_kept_and_exact() {
        let t = test_tokenizer();
        let p = Pieces::for_tokenizer(&t).expect("a byte-level BPE");
        let prefix = sample_text().repeat(4);
        for q in ["What is the capital of France?", "And  of\nSpain? 42"] {
            let text = format!("{prefix} {q}");
            let before = KEPT_BYTES.load(Ordering::Relaxed);
            let ids = p.encode(&t, &text, true).unwrap();
            assert_eq!(ids, t.encode(text.as_str(), true).unwrap().get_ids());
            let kept = KEPT_BYTES.load(Ordering::Relaxed) - before;
            if q.starts_with("And") {
                assert!(
                    kept as usize > prefix.len() - 2 * PIECE,
                    "{kept} of {}",
                    text.len()
                );
            }
        }
    }

    /// Found by its text, not its hash alone; the oldest pieces go past the bound.
    #[test]
    fn kept_pieces_are_compared_and_bounded() {
        let mut k = Kept::default();
        k.put(7, ("one piece".into(), Arc::from(vec![1u32, 2])));
        assert_eq!(k.get(7, "one piece").as_deref(), Some(&[1, 2][..]));
        assert!(k.get(7, "another piece").is_none(), "same hash, other text");
        let big: Box<str> = "x".repeat(1 << 20).into();
        for key in 100..120 {
            k.put(key, (big.clone(), Arc::from(vec![0u32; 1000])));
        }
        assert!(k.bytes <= MAX_KEPT_BYTES, "{}", k.bytes);
        assert!(k.get(7, "one piece").is_none(), "the oldest went first");
        assert!(k.get(119, &big).is_some());
    }

    #[test]
    fn a_tokenizer_that_joins_across_a_cut_is_refused() {
        let mut config = serde_json::to_value(test_tokenizer()).unwrap();
        config["pre_tokenizer"] = serde_json::json!({
            "type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true
        });
        assert!(joins_no_cut(&config).is_err());
        config["pre_tokenizer"] = serde_json::json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        });
        assert!(joins_no_cut(&config).is_err());
        config["pre_tokenizer"] = serde_json::json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        });
        config["normalizer"] = serde_json::json!({"type": "Lowercase"});
        assert!(joins_no_cut(&config).is_err());
        config["normalizer"] = Value::Null;
        assert!(joins_no_cut(&config).is_ok());
        config["added_tokens"] = serde_json::json!([{"id": 5, "content": "<|a b|>"}]);
        assert!(joins_no_cut(&config).is_err());
    }
}
