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
//!
//! Beside it, a *pending* layer: the blocks of prompts the proxy has just sent to an
//! instance, which its engine will store but has not yet announced (events lag a pick by a
//! prefill). Workers write it on every `kv_aware` pick; it expires after `PENDING_TTL_MS`,
//! a `BlockRemoved` of a block drops that block's pending entry, and `AllBlocksCleared` (or
//! relearning the instance) voids all of the instance's older entries (docs/scheduling.md,
//! "Pending blocks").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const WAYS: usize = 4;
/// Blocks the index can hold (all instances together): 16 bytes each, 4 MiB.
pub const CAPACITY: usize = 1 << 18;
/// Pending entries (blocks sent but not yet announced): 8 bytes each, 1 MiB.
pub const PENDING_CAPACITY: usize = 1 << 17;
/// How long a pending entry stands in for the engine's own events: longer than the lag of
/// a loaded engine's `BlockStored` (queue + prefill + publish), short enough that a block
/// the engine never stored (a failed request, prefix caching off) stops attracting picks.
pub const PENDING_TTL_MS: u64 = 5_000;
/// Instances (bits) the index can tell apart.
pub const MAX_INSTANCES: usize = 64;
/// Instances with a KV-events endpoint left unsubscribed because `MAX_INSTANCES` others
/// hold every bit (the subscriber's last count; `proxy_kv_events_unindexed_instances`).
pub static UNINDEXED: AtomicU64 = AtomicU64::new(0);

// A pending slot: | tag (31 bits) | instance bit + 1 (7 bits) | time, ms (26 bits) |.
const P_TIME_BITS: u32 = 26;
const P_TIME_MASK: u64 = (1 << P_TIME_BITS) - 1;
const P_BIT_SHIFT: u32 = P_TIME_BITS;
const P_TAG_SHIFT: u32 = P_TIME_BITS + 7;

pub struct KvIndex {
    keys: Box<[AtomicU64]>,
    masks: Box<[AtomicU64]>,
    set_mask: u64,
    /// Tokens per block, as the events report it (0 until the first `BlockStored`).
    pub block_size: AtomicU64,
    /// `resilience::now_ms()` when `block_size` took its value: picks before it pended
    /// nothing (no keys without a block size).
    pub sized_ms: AtomicU64,
    /// The pending layer (see the module comment); any thread writes it.
    pending: Box<[AtomicU64]>,
    pending_mask: u64,
    /// Per instance bit: `now_ms()` when its pending entries were last voided (cleared,
    /// relearned, unsubscribed); entries written before it no longer count.
    voided_ms: [AtomicU64; MAX_INSTANCES],
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
        Self::with_pending(capacity, PENDING_CAPACITY)
    }

    pub fn with_pending(capacity: usize, pending: usize) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1).next_power_of_two();
        let psets = pending.div_ceil(WAYS).max(1).next_power_of_two();
        KvIndex {
            keys: (0..sets * WAYS).map(|_| AtomicU64::new(0)).collect(),
            masks: (0..sets * WAYS).map(|_| AtomicU64::new(0)).collect(),
            set_mask: sets as u64 - 1,
            block_size: AtomicU64::new(0),
            sized_ms: AtomicU64::new(0),
            pending: (0..psets * WAYS).map(|_| AtomicU64::new(0)).collect(),
            pending_mask: psets as u64 - 1,
            voided_ms: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The engines' block size, from a `BlockStored` (`authoritative`: the events' blocks
    /// are what prompts are matched against) or, until one comes, from an engine's
    /// `vllm:cache_config_info` (the scraper), so that the first prompts are keyed,
    /// pended and counted too. `now` from `resilience::now_ms`.
    pub fn learn_block_size(&self, size: u64, authoritative: bool, now: u64) {
        let old = if authoritative {
            self.block_size.swap(size, Ordering::Relaxed)
        } else {
            match self
                .block_size
                .compare_exchange(0, size, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(old) | Err(old) => old,
            }
        };
        if old != size && (authoritative || old == 0) {
            self.sized_ms.store(now, Ordering::Relaxed);
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

    #[inline]
    fn pending_set(&self, key: u64) -> &[AtomicU64] {
        let s = (key & self.pending_mask) as usize * WAYS;
        &self.pending[s..s + WAYS]
    }

    /// Any thread: the block `key` was just sent to the instance with `bit` (`now` from
    /// `resilience::now_ms`). An entry that already says so is only rewritten when its time
    /// changed, so a hot prefix's shared blocks cost one store per pick at most.
    #[inline]
    pub fn pend(&self, key: u64, bit: u32, now: u64) {
        let tag = key >> P_TAG_SHIFT;
        let entry = tag << P_TAG_SHIFT | (bit as u64 + 1) << P_BIT_SHIFT | (now & P_TIME_MASK);
        let set = self.pending_set(key);
        let mut free = None;
        for w in set {
            let v = w.load(Ordering::Relaxed);
            if v != 0 && v >> P_TAG_SHIFT == tag {
                if v != entry {
                    w.store(entry, Ordering::Relaxed);
                }
                return;
            }
            if free.is_none() && (v == 0 || !self.pending_alive(v, now)) {
                free = Some(w);
            }
        }
        // Racing writers may both take one slot: last writer wins, the layer is a hint.
        let victim = free.unwrap_or_else(|| &set[(crate::ids::next_u64() % WAYS as u64) as usize]);
        victim.store(entry, Ordering::Relaxed);
    }

    /// Whether a pending slot's entry still counts at `now`: younger than the TTL and than
    /// the last voiding of its instance.
    #[inline]
    fn pending_alive(&self, v: u64, now: u64) -> bool {
        let bit = ((v >> P_BIT_SHIFT) & 0x7f) as usize;
        if bit == 0 || bit > MAX_INSTANCES {
            return false;
        }
        let age = now.wrapping_sub(v) & P_TIME_MASK;
        let voided = now.saturating_sub(self.voided_ms[bit - 1].load(Ordering::Relaxed));
        age < PENDING_TTL_MS && age < voided
    }

    /// The instance bit a live pending entry gives the block `key`, if any.
    #[inline]
    pub fn pending(&self, key: u64, now: u64) -> Option<u32> {
        let tag = key >> P_TAG_SHIFT;
        self.pending_set(key).iter().find_map(|w| {
            let v = w.load(Ordering::Relaxed);
            (v != 0 && v >> P_TAG_SHIFT == tag && self.pending_alive(v, now))
                .then(|| ((v >> P_BIT_SHIFT) & 0x7f) as u32 - 1)
        })
    }

    /// The engine of `bit` announced the removal of `key`: its pending entry goes too (a
    /// pick that follows it would find the block gone).
    pub fn unpend(&self, key: u64, bit: u32) {
        let tag = key >> P_TAG_SHIFT;
        for w in self.pending_set(key) {
            let v = w.load(Ordering::Relaxed);
            if v != 0 && v >> P_TAG_SHIFT == tag && (v >> P_BIT_SHIFT) & 0x7f == bit as u64 + 1 {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Every pending entry of `bit` written before now stops counting (its engine cleared
    /// its cache, or what we knew of it is being relearned, or the bit changes hands).
    pub fn void_pending(&self, bit: u32) {
        if let Some(v) = self.voided_ms.get(bit as usize) {
            v.store(crate::resilience::now_ms(), Ordering::Relaxed);
        }
    }

    /// The deepest block of `keys` with a live pending entry for an instance in `wanted`,
    /// as (blocks, bit). Entries are written as whole chains and key k names the whole
    /// prefix 0..=k, so a binary search over the chain needs log2(blocks) lookups.
    pub fn pending_depth(&self, keys: &[u64], wanted: u64, now: u64) -> Option<(usize, u32)> {
        let probe = |k: usize| {
            self.pending(keys[k - 1], now)
                .filter(|b| wanted & 1 << b != 0)
        };
        if keys.is_empty() {
            return None;
        }
        if let Some(b) = probe(keys.len()) {
            return Some((keys.len(), b));
        }
        let (mut lo, mut hi, mut best) = (0usize, keys.len() - 1, None);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            match probe(mid) {
                Some(b) => {
                    lo = mid;
                    best = Some((mid, b));
                }
                None => hi = mid - 1,
            }
        }
        best
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
    /// Chains stored from the root that this proxy had not sent (`kv_events::Applied::Unsent`),
    /// and `resilience::now_ms()` of the last one (0: none yet).
    pub unsent: AtomicU64,
    pub unsent_ms: AtomicU64,
    pub last_seq: AtomicU64,
    /// Blocks the index holds for the instance.
    pub blocks: AtomicU64,
    /// Receive time minus the last batch's publish timestamp (`ts`), in ms.
    pub lag_ms: AtomicU64,
    /// `resilience::now_ms()` of the last batch (0: none yet).
    pub last_event_ms: AtomicU64,
    /// 1 while the instance has an endpoint but no bit (more than `MAX_INSTANCES` publish).
    pub over_limit: AtomicU64,
}

impl KvStats {
    pub fn status_json(&self, subscribed: bool) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = g(&self.last_event_ms);
        serde_json::json!({
            "subscribed": subscribed,
            "over_instance_limit": g(&self.over_limit) == 1,
            "blocks": g(&self.blocks),
            "batches": g(&self.batches),
            "last_seq": g(&self.last_seq),
            "seq_gaps": g(&self.gaps),
            "lag_seconds": g(&self.lag_ms) as f64 / 1000.0,
            "publisher_restarts": g(&self.restarts),
            "undecodable": g(&self.bad),
            "orphan_chains": g(&self.orphans),
            "unsent_chains": g(&self.unsent),
            "last_event_age_seconds": (last > 0)
                .then(|| crate::resilience::now_ms().saturating_sub(last) as f64 / 1000.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scraped block size stands in until an event says; an event's is never overridden
    /// by a scrape. `sized_ms` moves only when the size takes a new value.
    #[test]
    fn block_size_from_scrapes_until_events_say() {
        let idx = KvIndex::new(64);
        idx.learn_block_size(16, false, 10);
        assert_eq!(idx.block_size.load(Ordering::Relaxed), 16);
        idx.learn_block_size(32, false, 20);
        assert_eq!(idx.block_size.load(Ordering::Relaxed), 16);
        idx.learn_block_size(16, true, 30);
        assert_eq!(idx.sized_ms.load(Ordering::Relaxed), 10);
        idx.learn_block_size(32, true, 40);
        idx.learn_block_size(16, false, 50);
        assert_eq!(idx.block_size.load(Ordering::Relaxed), 32);
        assert_eq!(idx.sized_ms.load(Ordering::Relaxed), 40);
    }

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
    fn pending_entries_live_until_removed_voided_or_expired() {
        let idx = KvIndex::with_pending(1024, 1024);
        let keys = prompt_keys(&(0..64).collect::<Vec<u32>>(), 16);
        let now = crate::resilience::now_ms() + 10;
        for &k in &keys {
            idx.pend(k, 3, now);
        }
        assert_eq!(idx.pending(keys[3], now), Some(3));
        assert_eq!(idx.pending_depth(&keys, 1 << 3, now), Some((4, 3)));
        assert_eq!(idx.pending_depth(&keys, 1 << 4, now), None); // not a wanted instance
                                                                 // Expired.
        assert_eq!(idx.pending(keys[3], now + PENDING_TTL_MS), None);
        // Removed: that block's entry only; another instance's removal leaves it.
        idx.unpend(keys[3], 4);
        assert_eq!(idx.pending(keys[3], now), Some(3));
        idx.unpend(keys[3], 3);
        assert_eq!(idx.pending(keys[3], now), None);
        assert_eq!(idx.pending_depth(&keys, 1 << 3, now), Some((3, 3)));
        // Voided: every entry of the instance written before.
        idx.void_pending(3);
        let later = crate::resilience::now_ms() + 1;
        assert_eq!(idx.pending_depth(&keys, 1 << 3, later), None);
        idx.pend(keys[0], 3, later);
        assert_eq!(idx.pending(keys[0], later), Some(3));
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
