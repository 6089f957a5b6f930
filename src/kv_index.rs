//! The global index of which instance's engine holds which KV-cache blocks, learned from the
//! engines' own KV-cache events (`proxy::kv_events`, control side) and read by the
//! `kv_aware` policy on every worker without a lock.
//!
//! A block is keyed by a chain hash of the *token ids* it covers and of every block before it
//! (`chain`), computed the same way from a prompt's token ids and from the `token_ids` that
//! vLLM's `BlockStored` events carry. The engine's own block hashes are used only to find a
//! stored block's parent and to apply `BlockRemoved`: they depend on vLLM's hash function
//! and `PYTHONHASHSEED`, which the proxy never needs to reproduce (docs/scheduling.md).
//!
//! The table is fixed-size and 4-way set-associative like the prefix index: a slot is a key
//! and a 64-bit mask of instances (each subscribed instance owns one bit). One writer (the
//! subscriber thread); readers check the key before and after reading the mask, so a slot
//! being rewritten is seen either whole or not at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const WAYS: usize = 4;
/// Blocks the index can hold (all instances together): 16 bytes each, 4 MiB.
pub const CAPACITY: usize = 1 << 18;

pub struct KvIndex {
    keys: Box<[AtomicU64]>,
    masks: Box<[AtomicU64]>,
    set_mask: u64,
    /// Tokens per block, as the events report it (0 until the first `BlockStored`).
    pub block_size: AtomicU64,
}

/// The process's index.
pub fn global() -> &'static KvIndex {
    static INDEX: OnceLock<KvIndex> = OnceLock::new();
    INDEX.get_or_init(|| KvIndex::new(CAPACITY))
}

/// The key of a block of `tokens` following the block keyed `parent` (0 for the first).
#[inline]
pub fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut bytes = [0u8; 4 * 64];
    let mut h = parent ^ 0x6b76_5f63_6861_696e; // "kv_chain"
    for part in tokens.chunks(64) {
        for (i, t) in part.iter().enumerate() {
            bytes[4 * i..4 * i + 4].copy_from_slice(&t.to_le_bytes());
        }
        h = crate::hash::hash64(h, &bytes[..4 * part.len()]);
    }
    h.max(1) // 0 marks an empty slot
}

/// The keys of the full blocks of `tokens`.
pub fn prompt_keys(tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut h = 0;
    for b in tokens.chunks_exact(block_size) {
        h = chain(h, b);
        out.push(h);
    }
    out
}

impl KvIndex {
    pub fn new(capacity: usize) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        KvIndex {
            keys: (0..sets * WAYS).map(|_| AtomicU64::new(0)).collect(),
            masks: (0..sets * WAYS).map(|_| AtomicU64::new(0)).collect(),
            set_mask: sets as u64 - 1,
            block_size: AtomicU64::new(0),
        }
    }

    #[inline]
    fn set(&self, key: u64) -> std::ops::Range<usize> {
        let s = (key & self.set_mask) as usize * WAYS;
        s..s + WAYS
    }

    /// The instances (bits) holding the block `key`.
    #[inline]
    pub fn get(&self, key: u64) -> u64 {
        for w in self.set(key) {
            if self.keys[w].load(Ordering::Acquire) == key {
                let m = self.masks[w].load(Ordering::Acquire);
                if self.keys[w].load(Ordering::Acquire) == key {
                    return m;
                }
            }
        }
        0
    }

    /// Writer only: the instance with `bit` holds `key`.
    pub fn add(&self, key: u64, bit: u32) {
        let range = self.set(key);
        let mut free = None;
        for w in range.clone() {
            let k = self.keys[w].load(Ordering::Relaxed);
            if k == key {
                let m = self.masks[w].load(Ordering::Relaxed);
                self.masks[w].store(m | 1 << bit, Ordering::Release);
                return;
            }
            if k == 0 && free.is_none() {
                free = Some(w);
            }
        }
        // A full set: replace a random way (that block's holders are forgotten; a missed hit
        // costs one prefill, never a wrong answer).
        let w = free.unwrap_or(range.start + (crate::ids::next_u64() % WAYS as u64) as usize);
        self.keys[w].store(0, Ordering::Release);
        self.masks[w].store(1 << bit, Ordering::Release);
        self.keys[w].store(key, Ordering::Release);
    }

    /// Writer only: the instance with `bit` no longer holds `key`.
    pub fn remove(&self, key: u64, bit: u32) {
        for w in self.set(key) {
            if self.keys[w].load(Ordering::Relaxed) == key {
                let m = self.masks[w].load(Ordering::Relaxed) & !(1 << bit);
                if m == 0 {
                    self.keys[w].store(0, Ordering::Release);
                }
                self.masks[w].store(m, Ordering::Release);
                return;
            }
        }
    }

    /// For each instance bit in `wanted`, how many leading blocks of `keys` it holds; one
    /// lookup per block until no wanted instance holds the next one.
    pub fn matched(&self, keys: &[u64], wanted: u64, out: &mut [u32; 64]) {
        let mut alive = wanted;
        for (depth, &k) in keys.iter().enumerate() {
            alive &= self.get(k);
            if alive == 0 {
                return;
            }
            let mut m = alive;
            while m != 0 {
                let b = m.trailing_zeros();
                out[b as usize] = depth as u32 + 1;
                m &= m - 1;
            }
        }
    }
}

/// One instance's KV-event stream as the subscriber saw it (for `/status/instances` and
/// the metrics).
#[derive(Default)]
pub struct KvStats {
    pub batches: AtomicU64,
    /// Sequence gaps seen (filled by replay, or the instance relearned).
    pub gaps: AtomicU64,
    /// Publisher restarts (the sequence went back).
    pub restarts: AtomicU64,
    /// Undecodable messages.
    pub bad: AtomicU64,
    /// Stored chains skipped because their parent block was unknown.
    pub orphans: AtomicU64,
    pub last_seq: AtomicU64,
    /// Blocks the index holds for the instance.
    pub blocks: AtomicU64,
    /// Receive time minus the last batch's publish timestamp (`ts`), in ms.
    pub lag_ms: AtomicU64,
    /// `resilience::now_ms()` of the last batch (0: none yet).
    pub last_event_ms: AtomicU64,
}

impl KvStats {
    pub fn status_json(&self, subscribed: bool) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = g(&self.last_event_ms);
        serde_json::json!({
            "subscribed": subscribed,
            "blocks": g(&self.blocks),
            "batches": g(&self.batches),
            "last_seq": g(&self.last_seq),
            "seq_gaps": g(&self.gaps),
            "lag_seconds": g(&self.lag_ms) as f64 / 1000.0,
            "publisher_restarts": g(&self.restarts),
            "undecodable": g(&self.bad),
            "orphan_chains": g(&self.orphans),
            "last_event_age_seconds": (last > 0)
                .then(|| crate::resilience::now_ms().saturating_sub(last) as f64 / 1000.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_match_remove() {
        let idx = KvIndex::new(1024);
        let toks: Vec<u32> = (0..64).collect();
        let keys = prompt_keys(&toks, 16);
        assert_eq!(keys.len(), 4);
        for &k in &keys[..3] {
            idx.add(k, 0);
        }
        for &k in &keys[..1] {
            idx.add(k, 5);
        }
        let mut out = [0u32; 64];
        idx.matched(&keys, 1 | 1 << 5, &mut out);
        assert_eq!((out[0], out[5]), (3, 1));
        idx.remove(keys[1], 0);
        let mut out = [0u32; 64];
        idx.matched(&keys, 1 | 1 << 5, &mut out);
        assert_eq!((out[0], out[5]), (1, 1));
        idx.remove(keys[0], 5);
        assert_eq!(idx.get(keys[0]), 1);
    }

    #[test]
    fn chain_depends_on_every_earlier_token() {
        let a = prompt_keys(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        let b = prompt_keys(&[9, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_ne!(a[1], b[1]);
        assert_eq!(a, prompt_keys(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4));
        assert_eq!(a[0], chain(0, &[1, 2, 3, 4]));
        assert_eq!(a[1], chain(a[0], &[5, 6, 7, 8]));
    }

    #[test]
    fn bounded() {
        let idx = KvIndex::new(64);
        for k in 1..10_000u64 {
            idx.add(crate::hash::hash64(0, &k.to_le_bytes()), (k % 3) as u32);
        }
        assert_eq!(idx.keys.len(), 64);
    }
}
