//! The simulated engine's scheduler: at most `max_num_seqs` running requests, a FIFO waiting
//! queue, and a paged KV cache of `kv_blocks` blocks of `block_size` tokens with vLLM's prefix
//! caching (full prompt blocks stay cached after their request ends, keyed by vLLM's chained
//! block hash, and are evicted least-recently-used). As in vLLM, a request's prompt blocks
//! enter the cache when it is scheduled, so a request admitted while they are still being
//! computed hits them and starts once they are computed, rather than computing them again.
//! It publishes what vLLM publishes (`BlockStored` when a request's prompt blocks are
//! computed, `BlockRemoved` when a cached block is evicted, `AllBlocksCleared` on a reset).
//! docs/cli.md describes the model.
//!
//! With no limit and no KV cache (the defaults) there is no lock: admission is one atomic
//! increment, so the zero-delay mode stays as cheap as it was. Otherwise one mutex guards the
//! state; it is a simulator's lock, held for microseconds, never across an await.

use super::block_hash::{self, BlockHash};
use super::kv_events::{KvEvent, KvEventSink};
use super::stats::Stats;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct SchedConfig {
    /// 0: unlimited.
    pub max_num_seqs: usize,
    /// 0: no KV-cache model.
    pub kv_blocks: usize,
    pub block_size: usize,
    pub prefix_caching: bool,
    /// Compute time per prompt token: when the blocks a request computes become usable.
    pub prefill_per_token: Duration,
}

impl SchedConfig {
    /// Whether requests need their token ids (to hash blocks).
    pub fn needs_token_ids(&self) -> bool {
        self.kv_blocks > 0
    }
}

/// A request's prompt as the cache sees it.
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// vLLM's hash of every full block of `tokens`.
    pub hashes: Vec<BlockHash>,
}

/// How long waiting requests sleep between looks at whether they were admitted (a
/// cross-thread wake would need monoio's `sync` feature in the proxy's runtime too).
const ADMIT_POLL: Duration = Duration::from_millis(1);

const WAITING: u8 = 0;
const ADMITTED: u8 = 1;

struct Waiter {
    prompt: Option<Arc<Prompt>>,
    /// Tokens whose KV the request needs on admission (prompt, plus output after preemption).
    len: usize,
    /// Of those, the leading tokens whose KV arrived computed (from a prefill node).
    arrived: usize,
    state: AtomicU8,
    seq: Mutex<Option<Seq>>,
}

/// What a running request holds.
#[derive(Default)]
pub struct Seq {
    blocks: Vec<u32>,
    /// Leading blocks of `blocks` that are in the prefix cache (hits, then stored ones).
    cached_blocks: usize,
    /// Prompt tokens found in the cache on admission.
    pub hit_tokens: usize,
    /// When the cached blocks it hit are all computed, if another request was still
    /// computing them at its admission: it cannot start before.
    pub hits_ready_at: Option<Instant>,
    /// Blocks from here to `cached_blocks` this request put in the cache and has yet to
    /// announce (`BlockStored`, once computed).
    unannounced: usize,
}

const NIL: u32 = u32::MAX;

struct Blk {
    hash: Option<BlockHash>,
    /// While the request that cached the block is still computing it: when it will be done.
    ready_at: Option<Instant>,
    refs: u32,
    prev: u32,
    next: u32,
    free: bool,
}

/// The block pool: an intrusive LRU list of free blocks (evict from the head, free to the
/// tail), as vLLM's `FreeKVCacheBlockQueue`, and the prefix cache's hash index.
struct Pool {
    bs: usize,
    blocks: Vec<Blk>,
    head: u32,
    tail: u32,
    free_len: usize,
    cached: HashMap<BlockHash, Vec<u32>>,
}

impl Pool {
    fn new(n: usize, bs: usize) -> Pool {
        let mut p = Pool {
            bs,
            blocks: (0..n)
                .map(|_| Blk {
                    hash: None,
                    ready_at: None,
                    refs: 0,
                    prev: NIL,
                    next: NIL,
                    free: false,
                })
                .collect(),
            head: NIL,
            tail: NIL,
            free_len: 0,
            cached: HashMap::new(),
        };
        (0..n as u32).for_each(|i| p.push_free(i));
        p
    }

    fn push_free(&mut self, i: u32) {
        let b = &mut self.blocks[i as usize];
        b.prev = self.tail;
        b.next = NIL;
        b.free = true;
        if self.tail == NIL {
            self.head = i;
        } else {
            self.blocks[self.tail as usize].next = i;
        }
        self.tail = i;
        self.free_len += 1;
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let b = &mut self.blocks[i as usize];
            b.free = false;
            (
                std::mem::replace(&mut b.prev, NIL),
                std::mem::replace(&mut b.next, NIL),
            )
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.free_len -= 1;
    }

    /// The least recently used free block, evicting its cached contents.
    fn alloc(&mut self, ev: &mut Vec<KvEvent>) -> Option<u32> {
        let i = self.head;
        if i == NIL {
            return None;
        }
        self.unlink(i);
        let b = &mut self.blocks[i as usize];
        b.refs = 1;
        b.ready_at = None;
        if let Some(h) = b.hash.take() {
            if let Some(ids) = self.cached.get_mut(&h) {
                ids.retain(|&x| x != i);
                if ids.is_empty() {
                    self.cached.remove(&h);
                }
            }
            ev.push(KvEvent::BlockRemoved {
                block_hashes: vec![block_hash::external(&h)],
            });
        }
        Some(i)
    }

    /// Leading blocks of `hashes` that are cached, at most `max`.
    fn lookup(&self, hashes: &[BlockHash], max: usize) -> usize {
        hashes
            .iter()
            .take(max)
            .take_while(|h| self.cached.contains_key(*h))
            .count()
    }

    /// Takes a reference on a cached block.
    fn touch(&mut self, h: &BlockHash) -> u32 {
        let i = self.cached[h][0];
        if self.blocks[i as usize].free {
            self.unlink(i);
        }
        self.blocks[i as usize].refs += 1;
        i
    }

    fn release(&mut self, blocks: &[u32]) {
        // Tail blocks first, so a chain's end is evicted before its start (as vLLM does).
        for &i in blocks.iter().rev() {
            let b = &mut self.blocks[i as usize];
            b.refs -= 1;
            if b.refs == 0 {
                self.push_free(i);
            }
        }
    }

    fn used(&self) -> u64 {
        (self.blocks.len() - self.free_len) as u64
    }
}

struct State {
    running: usize,
    waiting: VecDeque<Arc<Waiter>>,
    pool: Option<Pool>,
}

pub struct Scheduler {
    cfg: SchedConfig,
    state: Option<Mutex<State>>,
    sink: Option<Arc<dyn KvEventSink>>,
}

/// Why a request cannot run here at all.
#[derive(Debug)]
pub struct TooLarge(pub String);

impl Scheduler {
    pub fn new(cfg: SchedConfig, sink: Option<Arc<dyn KvEventSink>>) -> Scheduler {
        let limited = cfg.max_num_seqs > 0 || cfg.kv_blocks > 0;
        Scheduler {
            cfg,
            state: limited.then(|| {
                Mutex::new(State {
                    running: 0,
                    waiting: VecDeque::new(),
                    pool: (cfg.kv_blocks > 0).then(|| Pool::new(cfg.kv_blocks, cfg.block_size)),
                })
            }),
            sink,
        }
    }

    pub fn config(&self) -> &SchedConfig {
        &self.cfg
    }

    /// Refuses a request whose whole sequence can never fit in the KV cache.
    pub fn check_fits(&self, total_tokens: usize) -> Result<(), TooLarge> {
        let need = total_tokens.div_ceil(self.cfg.block_size.max(1));
        if self.cfg.kv_blocks > 0 && need > self.cfg.kv_blocks {
            return Err(TooLarge(format!(
                "the request needs {need} KV-cache blocks ({total_tokens} tokens), more than this node's {} blocks of {} tokens",
                self.cfg.kv_blocks, self.cfg.block_size
            )));
        }
        Ok(())
    }

    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        self.state
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn publish(&self, ev: Vec<KvEvent>) {
        if let (Some(s), false) = (&self.sink, ev.is_empty()) {
            s.publish(ev);
        }
    }

    /// Admits a request (waiting in FIFO order if it must). Dropping the future while it
    /// waits takes the request out of the queue.
    /// `arrived`: leading prompt tokens whose KV came computed from a prefill node.
    pub async fn enter<'a>(
        &'a self,
        stats: &'a Stats,
        prompt: Option<Arc<Prompt>>,
        len: usize,
        arrived: usize,
    ) -> Ticket<'a> {
        let seq = self
            .wait_admitted(stats, prompt.clone(), len, arrived)
            .await;
        Ticket {
            sched: self,
            stats,
            prompt,
            seq: Some(seq),
        }
    }

    async fn wait_admitted(
        &self,
        stats: &Stats,
        prompt: Option<Arc<Prompt>>,
        len: usize,
        arrived: usize,
    ) -> Seq {
        let w = match self.arrive(stats, prompt, len, arrived) {
            Ok(seq) => return seq,
            Err(w) => w,
        };
        let guard = WaitGuard {
            sched: self,
            stats,
            w: &w,
        };
        while w.state.load(std::sync::atomic::Ordering::Acquire) != ADMITTED {
            monoio::time::sleep(ADMIT_POLL).await;
        }
        std::mem::forget(guard);
        let seq = w.seq.lock().unwrap_or_else(|e| e.into_inner()).take();
        seq.unwrap_or_default()
    }

    /// Admits a new request at once if nobody waits and it fits, else queues it.
    fn arrive(
        &self,
        stats: &Stats,
        prompt: Option<Arc<Prompt>>,
        len: usize,
        arrived: usize,
    ) -> Result<Seq, Arc<Waiter>> {
        let Some(mut st) = self.lock() else {
            stats.running.fetch_add(1, Relaxed);
            return Ok(Seq::default());
        };
        let w = Arc::new(Waiter {
            prompt,
            len,
            arrived,
            state: AtomicU8::new(WAITING),
            seq: Mutex::new(None),
        });
        if st.waiting.is_empty() {
            let mut ev = Vec::new();
            if let Some(seq) = self.try_admit(&mut st, &w, stats, &mut ev) {
                self.publish(ev);
                return Ok(seq);
            }
        }
        st.waiting.push_back(w.clone());
        stats.waiting.store(st.waiting.len() as u64, Relaxed);
        Err(w)
    }

    /// Admits `w` now if a batch slot and its blocks are free.
    fn try_admit(
        &self,
        st: &mut State,
        w: &Waiter,
        stats: &Stats,
        ev: &mut Vec<KvEvent>,
    ) -> Option<Seq> {
        if self.cfg.max_num_seqs > 0 && st.running >= self.cfg.max_num_seqs {
            return None;
        }
        let mut seq = Seq::default();
        if let Some(pool) = st.pool.as_mut() {
            let bs = pool.bs;
            let hashes: &[BlockHash] = w.prompt.as_ref().map_or(&[], |p| &p.hashes);
            // vLLM always computes at least the last token, so a full hit stops one short.
            let max_hits = if self.cfg.prefix_caching {
                w.len.saturating_sub(1) / bs
            } else {
                0
            };
            let hits = pool.lookup(hashes, max_hits);
            let hits_free = hashes[..hits]
                .iter()
                .filter(|h| pool.blocks[pool.cached[*h][0] as usize].free)
                .count();
            let needed = w.len.div_ceil(bs).max(1) - hits;
            if pool.free_len - hits_free < needed {
                return None;
            }
            let now = Instant::now();
            let hits_ready_at = hashes[..hits]
                .iter()
                .filter_map(|h| pool.blocks[pool.cached[h][0] as usize].ready_at)
                .filter(|&t| t > now)
                .max();
            seq.blocks = hashes[..hits].iter().map(|h| pool.touch(h)).collect();
            for _ in 0..needed {
                seq.blocks.extend(pool.alloc(ev));
            }
            seq.cached_blocks = hits;
            seq.hit_tokens = hits * bs;
            seq.hits_ready_at = hits_ready_at;
            seq.unannounced = hits;
            if self.cfg.prefix_caching {
                // The rest of the prompt's full blocks enter the cache now, as vLLM caches
                // them when it schedules them (`allocate_slots`): a request admitted while
                // they are computed hits them, and waits until they are ready.
                let computed = (hits * bs).max(w.arrived);
                let ready = hits_ready_at.unwrap_or(now)
                    + self.cfg.prefill_per_token * w.len.saturating_sub(computed) as u32;
                let to = hashes.len().min(seq.blocks.len());
                for (&i, &h) in seq.blocks[hits..to].iter().zip(&hashes[hits..to]) {
                    let b = &mut pool.blocks[i as usize];
                    b.hash = Some(h);
                    b.ready_at = (ready > now).then_some(ready);
                    pool.cached.entry(h).or_default().push(i);
                }
                seq.cached_blocks = seq.cached_blocks.max(to);
            }
            stats.kv_used_blocks.store(pool.used(), Relaxed);
            if self.cfg.prefix_caching {
                let queried = w.prompt.as_ref().map_or(0, |p| p.tokens.len());
                stats.prefix_queries.fetch_add(queried as u64, Relaxed);
                stats.prefix_hits.fetch_add(seq.hit_tokens as u64, Relaxed);
            }
        }
        st.running += 1;
        stats.running.store(st.running as u64, Relaxed);
        Some(seq)
    }

    /// Admits waiting requests from the head of the queue while they fit.
    fn admit_waiting(&self, st: &mut State, stats: &Stats, ev: &mut Vec<KvEvent>) {
        while let Some(w) = st.waiting.front().cloned() {
            match self.try_admit(st, &w, stats, ev) {
                Some(seq) => {
                    st.waiting.pop_front();
                    *w.seq.lock().unwrap_or_else(|e| e.into_inner()) = Some(seq);
                    w.state
                        .store(ADMITTED, std::sync::atomic::Ordering::Release);
                }
                None => break,
            }
        }
        stats.waiting.store(st.waiting.len() as u64, Relaxed);
    }

    fn release(&self, st: &mut State, seq: Seq, stats: &Stats) {
        if let Some(pool) = st.pool.as_mut() {
            pool.release(&seq.blocks);
            stats.kv_used_blocks.store(pool.used(), Relaxed);
        }
        st.running -= 1;
        stats.running.store(st.running as u64, Relaxed);
    }

    /// vLLM's `reset_prefix_cache`: forgets every cached block, publishing
    /// `AllBlocksCleared`. Refused (false) while requests hold blocks, as vLLM refuses.
    pub fn reset_prefix_cache(&self) -> bool {
        let Some(mut st) = self.lock() else {
            return true;
        };
        let Some(pool) = st.pool.as_mut() else {
            return true;
        };
        if pool.free_len != pool.blocks.len() {
            return false;
        }
        pool.cached.clear();
        pool.blocks.iter_mut().for_each(|b| {
            b.hash = None;
            b.ready_at = None;
        });
        self.publish(vec![KvEvent::AllBlocksCleared]);
        true
    }
}

/// Takes a waiting request out of the queue if its task goes away before admission.
struct WaitGuard<'a> {
    sched: &'a Scheduler,
    stats: &'a Stats,
    w: &'a Arc<Waiter>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let Some(mut st) = self.sched.lock() else {
            return;
        };
        st.waiting.retain(|x| !Arc::ptr_eq(x, self.w));
        let mut ev = Vec::new();
        if self.w.state.load(std::sync::atomic::Ordering::Acquire) == ADMITTED {
            if let Some(seq) = self.w.seq.lock().unwrap_or_else(|e| e.into_inner()).take() {
                self.sched.release(&mut st, seq, self.stats);
            }
        }
        // It may have been the head blocking others.
        self.sched.admit_waiting(&mut st, self.stats, &mut ev);
        self.sched.publish(ev);
    }
}

/// A running request's hold on the engine; dropping it frees its batch slot and blocks.
pub struct Ticket<'a> {
    sched: &'a Scheduler,
    stats: &'a Stats,
    prompt: Option<Arc<Prompt>>,
    seq: Option<Seq>,
}

/// The request lost its blocks to preemption and must be recomputed.
pub struct Preempted;

impl Ticket<'_> {
    pub fn hit_tokens(&self) -> usize {
        self.seq.as_ref().map_or(0, |s| s.hit_tokens)
    }

    /// The KV-cache block ids the request holds.
    pub fn block_ids(&self) -> &[u32] {
        self.seq.as_ref().map_or(&[], |s| &s.blocks)
    }

    /// When the cached blocks this request hit are all computed, if later than its admission.
    pub fn hits_ready_at(&self) -> Option<Instant> {
        self.seq.as_ref().and_then(|s| s.hits_ready_at)
    }

    /// The prompt has been computed: the full blocks it put in the cache at admission are
    /// announced (`BlockStored`), as vLLM publishes them after the step that computed them.
    pub fn prompt_computed(&mut self) {
        let (Some(prompt), Some(seq)) = (&self.prompt, self.seq.as_mut()) else {
            return;
        };
        let (from, to) = (seq.unannounced, seq.cached_blocks);
        seq.unannounced = to;
        let bs = self.sched.cfg.block_size.max(1);
        if to > from && to <= prompt.hashes.len() {
            let ev = KvEvent::BlockStored {
                block_hashes: prompt.hashes[from..to]
                    .iter()
                    .map(block_hash::external)
                    .collect(),
                parent_block_hash: from
                    .checked_sub(1)
                    .map(|p| block_hash::external(&prompt.hashes[p])),
                token_ids: prompt.tokens[from * bs..to * bs].to_vec(),
                block_size: bs,
            };
            self.sched.publish(vec![ev]);
        }
    }

    /// Makes room for a sequence of `len` tokens, taking a block when the last is full.
    /// With no block free, the request is preempted (vLLM would preempt the newest running
    /// request; the simulator preempts the one that ran out): it gives its blocks back.
    pub fn grow(&mut self, len: usize) -> Result<(), Preempted> {
        let Some(seq) = self.seq.as_mut() else {
            return Ok(());
        };
        let bs = self.sched.cfg.block_size.max(1);
        if self.sched.cfg.kv_blocks == 0 || seq.blocks.len() * bs >= len {
            return Ok(());
        }
        let Some(mut st) = self.sched.lock() else {
            return Ok(());
        };
        let mut ev = Vec::new();
        let got = st.pool.as_mut().and_then(|p| p.alloc(&mut ev));
        let out = match got {
            Some(i) => {
                seq.blocks.push(i);
                if let Some(p) = st.pool.as_ref() {
                    self.stats.kv_used_blocks.store(p.used(), Relaxed);
                }
                Ok(())
            }
            None => {
                let seq = self.seq.take().unwrap_or_default();
                self.sched.release(&mut st, seq, self.stats);
                self.stats.preemptions.fetch_add(1, Relaxed);
                Err(Preempted)
            }
        };
        self.sched.publish(ev);
        out
    }

    /// After preemption: waits at the head of the queue to be admitted again for `len`
    /// tokens; returns the prompt tokens found cached.
    pub async fn readmit(&mut self, len: usize, arrived: usize) -> usize {
        let w = Arc::new(Waiter {
            prompt: self.prompt.clone(),
            len,
            arrived,
            state: AtomicU8::new(WAITING),
            seq: Mutex::new(None),
        });
        if let Some(mut st) = self.sched.lock() {
            st.waiting.push_front(w.clone());
            let mut ev = Vec::new();
            self.sched.admit_waiting(&mut st, self.stats, &mut ev);
            self.sched.publish(ev);
        }
        let guard = WaitGuard {
            sched: self.sched,
            stats: self.stats,
            w: &w,
        };
        while w.state.load(std::sync::atomic::Ordering::Acquire) != ADMITTED {
            monoio::time::sleep(ADMIT_POLL).await;
        }
        std::mem::forget(guard);
        let seq = w
            .seq
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let hits = seq.hit_tokens;
        self.seq = Some(seq);
        hits
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // Blocks it cached are announced even when it ends before its first token (a client
        // gone): vLLM publishes them after the step that scheduled them, whatever follows.
        self.prompt_computed();
        let Some(seq) = self.seq.take() else {
            return;
        };
        match self.sched.lock() {
            None => {
                self.stats.running.fetch_sub(1, Relaxed);
            }
            Some(mut st) => {
                self.sched.release(&mut st, seq, self.stats);
                let mut ev = Vec::new();
                self.sched.admit_waiting(&mut st, self.stats, &mut ev);
                self.sched.publish(ev);
            }
        }
    }
}

#[cfg(test)]
mod tests;
