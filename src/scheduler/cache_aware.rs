//! Prefix-cache-aware routing. The "approximate radix tree" is a block-hash chain, the
//! scheme vLLM's own prefix cache uses: the prompt text is cut into fixed blocks and block k
//! is keyed by a hash of blocks 0..=k, so one map lookup per block finds the longest
//! prefix routed before and to which instance. Memory is bounded (`max_tree_size` entries)
//! with least-recently-used eviction.
//!
//! Each worker keeps its own index (thread-local): lookups and inserts take no lock and
//! touch no shared cache line. Workers learn independently; a session that keeps its
//! keep-alive connection stays on one worker, and all workers agree whenever load decides.

use super::{hash64, least_loaded, load_key, PickContext, Scheduler};
use crate::config::{Role, SchedulingOptions};
use crate::instance::Instance;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes per prefix block.
pub const BLOCK: usize = 64;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static INDEXES: RefCell<HashMap<u64, PrefixIndex>> = RefCell::new(HashMap::new());
}

pub struct CacheAware {
    id: u64,
    role: Role,
    threshold: f64,
    abs: u64,
    rel: f64,
    max_entries: usize,
}

impl CacheAware {
    pub fn new(role: Role, o: &SchedulingOptions) -> Self {
        CacheAware {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            role,
            threshold: o.cache_threshold,
            abs: o.balance_abs_threshold,
            rel: o.balance_rel_threshold,
            max_entries: o.max_tree_size,
        }
    }
}

impl Drop for CacheAware {
    fn drop(&mut self) {
        // Only this thread's index can be reached from here; others age out (bounded).
        let _ = INDEXES.try_with(|m| m.borrow_mut().remove(&self.id));
    }
}

/// Keys are already 64-bit hashes: hash them by passing them through.
#[derive(Default, Clone, Copy)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashIndex<V> = HashMap<u64, V, std::hash::BuildHasherDefault<PassThrough>>;

struct Entry {
    addr: SocketAddr,
    stamp: u64,
}

#[derive(Default)]
struct PrefixIndex {
    map: HashIndex<Entry>,
    /// (key, stamp) in touch order; stale pairs (older stamp than the entry's) are skipped.
    lru: VecDeque<(u64, u64)>,
    clock: u64,
}

impl PrefixIndex {
    /// Deepest block whose chain hash is known with an instance `ok` accepts.
    fn longest(
        &self,
        hashes: &[u64],
        ok: impl Fn(SocketAddr) -> bool,
    ) -> Option<(usize, SocketAddr)> {
        hashes.iter().enumerate().rev().find_map(|(k, h)| {
            self.map
                .get(h)
                .filter(|e| ok(e.addr))
                .map(|e| (k + 1, e.addr))
        })
    }

    fn insert(&mut self, hashes: &[u64], addr: SocketAddr, max: usize) {
        for &h in hashes {
            self.clock += 1;
            let stamp = self.clock;
            self.map.insert(h, Entry { addr, stamp });
            self.lru.push_back((h, stamp));
        }
        while self.map.len() > max {
            let Some((h, stamp)) = self.lru.pop_front() else {
                break;
            };
            if self.map.get(&h).is_some_and(|e| e.stamp == stamp) {
                self.map.remove(&h);
            }
        }
        if self.lru.len() > 2 * max + 1024 {
            // Drop stale pairs so the queue stays proportional to the map.
            let map = &self.map;
            self.lru
                .retain(|(h, s)| map.get(h).is_some_and(|e| e.stamp == *s));
        }
    }
}

/// Chain hashes of the full blocks of `text`.
pub(crate) fn block_hashes(text: &[u8]) -> Vec<u64> {
    let mut out = Vec::with_capacity(text.len() / BLOCK);
    let mut h = 0u64;
    for block in text.chunks_exact(BLOCK) {
        h = hash64(h, block);
        out.push(h);
    }
    out
}

impl Scheduler for CacheAware {
    fn pick(&self, candidates: &[Arc<Instance>], ctx: &PickContext<'_>) -> Option<Arc<Instance>> {
        let (mut min, mut max, mut any) = (u64::MAX, 0u64, false);
        for i in candidates.iter().filter(|i| ctx.eligible(i)) {
            let l = load_key(self.role, i).0;
            min = min.min(l);
            max = max.max(l);
            any = true;
        }
        if !any {
            return None;
        }
        let hashes = block_hashes(ctx.prompt_text);
        let mut matched = 0;
        let imbalanced = max - min > self.abs && max as f64 > min as f64 * self.rel;
        let chosen = if imbalanced || hashes.is_empty() {
            least_loaded(self.role, candidates, ctx)
        } else {
            let find = |addr: SocketAddr| {
                candidates
                    .iter()
                    .find(|i| i.socket_addr == addr && ctx.eligible(i))
            };
            let hit = INDEXES.with(|m| {
                m.borrow()
                    .get(&self.id)
                    .and_then(|idx| idx.longest(&hashes, |a| find(a).is_some()))
            });
            match hit {
                Some((blocks, addr))
                    if (blocks * BLOCK) as f64 >= self.threshold * ctx.prompt_text.len() as f64 =>
                {
                    matched = blocks;
                    find(addr).cloned()
                }
                _ => least_loaded(self.role, candidates, ctx),
            }
        }?;
        if !hashes.is_empty() {
            // Blocks up to the match already point at `chosen`: refresh the deepest one and
            // add the new tail, instead of rewriting the whole chain on every request.
            let from = matched.saturating_sub(1);
            INDEXES.with(|m| {
                m.borrow_mut().entry(self.id).or_default().insert(
                    &hashes[from..],
                    chosen.socket_addr,
                    self.max_entries,
                )
            });
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::InFlight;
    use crate::scheduler::testing::instances;

    fn pick(ca: &CacheAware, c: &[Arc<Instance>], text: &str) -> Arc<Instance> {
        let ctx = PickContext {
            prompt_text: text.as_bytes(),
            ..Default::default()
        };
        ca.pick(c, &ctx).unwrap()
    }

    #[test]
    fn repeated_prefix_returns_to_the_same_instance() {
        let c = instances(4, Role::Decode);
        let ca = CacheAware::new(Role::Decode, &SchedulingOptions::default());
        let mut guards = Vec::new();
        let doc = "You are a helpful assistant. ".repeat(20);
        let mut owners = std::collections::HashMap::new();
        for s in 0..8 {
            let system = format!("session {s}: {doc}");
            for q in 0..5 {
                let inst = pick(&ca, &c, &format!("{system} question {q}"));
                let first = owners.entry(s).or_insert_with(|| inst.address.clone());
                assert_eq!(*first, inst.address, "session {s} moved");
                guards.push(InFlight::new(inst, 0, 0));
            }
        }
        // Eight sessions spread over the instances rather than piling on one.
        let used: std::collections::HashSet<_> = owners.values().collect();
        assert!(used.len() >= 3, "{owners:?}");
    }

    #[test]
    fn still_balances_when_every_request_shares_the_prefix() {
        let c = instances(4, Role::Decode);
        let opts = SchedulingOptions::default();
        let ca = CacheAware::new(Role::Decode, &opts);
        let text = "the same very long shared system prompt ".repeat(30);
        let guards: Vec<_> = (0..1000)
            .map(|_| InFlight::new(pick(&ca, &c, &text), 0, 0))
            .collect();
        let loads: Vec<u64> = c.iter().map(|i| i.in_flight()).collect();
        let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        // Load decides as soon as the spread passes both thresholds.
        let bound = (min + opts.balance_abs_threshold)
            .max((min as f64 * opts.balance_rel_threshold) as u64);
        assert!(max <= bound + 1, "{loads:?}");
        assert!(min > 0, "{loads:?}");
        drop(guards);
    }

    #[test]
    fn memory_is_bounded() {
        let c = instances(2, Role::Decode);
        let opts = SchedulingOptions {
            max_tree_size: 100,
            ..Default::default()
        };
        let ca = CacheAware::new(Role::Decode, &opts);
        for k in 0..200 {
            pick(&ca, &c, &format!("{k} {}", "x".repeat(1024)));
        }
        INDEXES.with(|m| {
            let m = m.borrow();
            let idx = m.get(&ca.id).unwrap();
            assert!(idx.map.len() <= 100);
            assert!(idx.lru.len() <= 2 * 100 + 1024 + 16);
        });
    }
}
