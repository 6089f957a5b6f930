//! What every worker shares about one model's admission: the slots in use, the requests
//! waiting (summed over the workers' queues), the token bucket, one such set per API key,
//! and the counters `/metrics` and `/status` show. Atomics only, each hot one on its own
//! cache line.

use super::bucket::Bucket;
use crate::hash::FastHash;
use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why a request was answered 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Over `max_concurrent_requests` with no queue (`queue_size: 0`).
    Concurrency,
    /// The queue (or the key's share of it) was full.
    QueueFull,
    /// Waited `queue_timeout_seconds` without a slot.
    QueueTimeout,
    /// `tokens_per_second` (or the key's share of it) spent.
    TokenRate,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Concurrency,
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::TokenRate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Concurrency => "concurrency",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::TokenRate => "token_rate",
        }
    }
}

/// Upper bounds (seconds) of the queue-time histogram's buckets.
pub const QUEUE_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Slots, queue and bucket: one for the model, one per API key.
#[derive(Default)]
pub struct Counters {
    pub in_flight: CachePadded<AtomicU64>,
    pub queued: CachePadded<AtomicU64>,
    pub bucket: CachePadded<Bucket>,
    pub rejected: [AtomicU64; 4],
    pub admitted: AtomicU64,
    pub tokens: Tokens,
}

/// Token usage the engines reported, (prompt, completion), in one slot per worker, summed
/// when read: every request adds to it, and one shared cache line would move between the
/// workers' cores with each.
pub struct Tokens(Box<[CachePadded<[AtomicU64; 2]>]>);

impl Tokens {
    pub fn new(workers: usize) -> Self {
        Tokens(
            (0..workers.max(1))
                .map(|_| CachePadded::default())
                .collect(),
        )
    }

    fn add(&self, worker: usize, prompt: u64, completion: u64) {
        let slot = &self.0[worker % self.0.len()];
        slot[0].fetch_add(prompt, Ordering::Relaxed);
        slot[1].fetch_add(completion, Ordering::Relaxed);
    }

    /// (prompt, completion), over every worker.
    pub fn totals(&self) -> (u64, u64) {
        self.0.iter().fold((0, 0), |(p, c), s| {
            (
                p + s[0].load(Ordering::Relaxed),
                c + s[1].load(Ordering::Relaxed),
            )
        })
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens::new(1)
    }
}

impl Counters {
    /// Counters whose token usage has a slot for each of `workers`.
    pub fn new(workers: usize) -> Self {
        Counters {
            tokens: Tokens::new(workers),
            ..Counters::default()
        }
    }

    /// Takes a slot if fewer than `limit` are in use (0: no limit).
    pub fn try_take(&self, limit: u64) -> bool {
        if limit == 0 {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.in_flight
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    pub fn reject(&self, r: Reason) {
        self.rejected[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn rejected(&self, r: Reason) -> u64 {
        self.rejected[r as usize].load(Ordering::Relaxed)
    }

    /// Token usage the engine reported for one request, served by `worker`.
    pub fn usage(&self, worker: usize, prompt: u64, completion: u64) {
        self.tokens.add(worker, prompt, completion);
    }
}

/// One API key's counters, named in metrics by its position in `api_keys` (the key itself
/// is a secret).
pub struct KeyGate {
    /// The key (weights are configured by key).
    pub key: String,
    /// Its position in `api_keys`, as the last reload left it.
    index: AtomicUsize,
    pub c: Counters,
}

impl KeyGate {
    pub fn index(&self) -> usize {
        self.index.load(Ordering::Relaxed)
    }

    /// Its name in metrics and `/status`.
    pub fn label(&self) -> String {
        format!("api_keys[{}]", self.index())
    }
}

pub struct ModelGate {
    pub c: Counters,
    /// Numbers the model's waiters in arrival order, across workers.
    pub tickets: CachePadded<AtomicU64>,
    /// Per worker, the ticket of its oldest waiter that could take a slot (`u64::MAX`:
    /// none): a worker hands a free slot to its own waiter only if no older one waits on
    /// another worker, so the queue is FIFO across workers too (within one tick).
    pub heads: Vec<CachePadded<AtomicU64>>,
    /// Created on a key's first request; removed when a reload drops the key from
    /// `api_keys` (`Gates::retain_keys`).
    keys: ArcSwap<HashMap<String, Arc<KeyGate>>>,
    /// Time waited by requests that queued and were then admitted.
    queue_time: [AtomicU64; QUEUE_BUCKETS.len() + 1],
    queue_time_sum_us: AtomicU64,
}

impl ModelGate {
    pub fn new(workers: usize) -> Self {
        ModelGate {
            c: Counters::new(workers),
            tickets: Default::default(),
            heads: (0..workers.max(1))
                .map(|_| CachePadded::new(AtomicU64::new(u64::MAX)))
                .collect(),
            keys: ArcSwap::from_pointee(HashMap::new()),
            queue_time: Default::default(),
            queue_time_sum_us: AtomicU64::new(0),
        }
    }
}

impl ModelGate {
    /// The counters of `key`, `api_keys[index]`, created on first use.
    pub fn key(&self, key: &str, index: usize) -> Arc<KeyGate> {
        get_or_insert(&self.keys, key, || KeyGate {
            key: key.to_string(),
            index: AtomicUsize::new(index),
            c: Counters::new(self.heads.len()),
        })
    }

    pub fn keys(&self) -> Vec<Arc<KeyGate>> {
        let mut v: Vec<_> = self.keys.load().values().cloned().collect();
        v.sort_by_key(|k| k.index());
        v
    }

    /// Forgets the keys not in `api_keys` (their requests still in flight hold their own
    /// counters to the end) and renumbers the others.
    fn retain_keys(&self, api_keys: &[String]) {
        let place = |k: &str| api_keys.iter().position(|x| x == k);
        let map = self.keys.load();
        for k in map.values() {
            if let Some(i) = place(&k.key) {
                k.index.store(i, Ordering::Relaxed);
            }
        }
        if map.keys().all(|k| place(k).is_some()) {
            return;
        }
        self.keys.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.retain(|k, _| place(k).is_some());
            m
        });
    }

    pub fn observe_queue_time(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = QUEUE_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(QUEUE_BUCKETS.len());
        self.queue_time[i].fetch_add(1, Ordering::Relaxed);
        self.queue_time_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Non-cumulative bucket counts (the last above the largest bound) and the sum in s.
    pub fn queue_time(&self) -> (Vec<u64>, f64) {
        (
            self.queue_time
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            self.queue_time_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// Every model's gate, by name; a model's gate outlives reloads, so requests in flight
/// keep counting against the limits the next config sets.
pub struct Gates {
    map: ArcSwap<HashMap<String, Arc<ModelGate>, FastHash>>,
    workers: usize,
}

impl Gates {
    pub fn new(workers: usize) -> Self {
        Gates {
            map: ArcSwap::from_pointee(HashMap::default()),
            workers,
        }
    }
}

impl Gates {
    /// `model`'s gate, created on its first request (lock-free).
    pub fn get(&self, model: &str) -> Arc<ModelGate> {
        get_or_insert(&self.map, model, || ModelGate::new(self.workers))
    }

    /// Every gate, by model name.
    pub fn all(&self) -> Vec<(String, Arc<ModelGate>)> {
        let mut v: Vec<_> = self
            .map
            .load()
            .iter()
            .map(|(k, g)| (k.clone(), g.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn find(&self, model: &str) -> Option<Arc<ModelGate>> {
        self.map.load().get(model).cloned()
    }

    /// After a reload: the keys `api_keys` no longer lists lose their counters, the others
    /// take their new positions. The control thread also runs it on every probe round, for
    /// a gate a worker still holding the previous key list created after the reload's pass.
    pub fn retain_keys(&self, api_keys: &[String]) {
        for g in self.map.load().values() {
            g.retain_keys(api_keys);
        }
    }
}

/// `key`'s entry of a map the workers share, made by `make` when there is none: a lock-free
/// insert, where a racing insert of the same key wins and both use its entry.
fn get_or_insert<T, S: BuildHasher + Clone>(
    map: &ArcSwap<HashMap<String, Arc<T>, S>>,
    key: &str,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    if let Some(v) = map.load().get(key) {
        return v.clone();
    }
    let fresh = Arc::new(make());
    let mut out = fresh.clone();
    map.rcu(|m| {
        let mut m = HashMap::clone(m);
        out = m
            .entry(key.to_string())
            .or_insert_with(|| fresh.clone())
            .clone();
        m
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_taken_only_under_the_limit() {
        let c = Counters::default();
        assert!(c.try_take(2));
        assert!(c.try_take(2));
        assert!(!c.try_take(2));
        c.release();
        assert!(c.try_take(2));
        assert_eq!(c.in_flight(), 2);
    }

    #[test]
    fn gates_and_key_gates_are_created_once() {
        let g = Gates::new(2);
        let a = g.get("m");
        assert!(Arc::ptr_eq(&a, &g.get("m")));
        let k = a.key("sk-1", 0);
        assert!(Arc::ptr_eq(&k, &a.key("sk-1", 5)));
        assert_eq!(a.keys().len(), 1);
        assert_eq!(k.label(), "api_keys[0]");
    }

    #[test]
    fn token_usage_is_counted_per_worker_and_summed() {
        let g = Gates::new(2);
        let m = g.get("m");
        m.c.usage(0, 10, 1);
        m.c.usage(1, 5, 2);
        // A worker index past the gate's slots (a gate made before a resize) still counts.
        m.c.usage(7, 1, 1);
        assert_eq!(m.c.tokens.totals(), (16, 4));
        let k = m.key("sk", 0);
        k.c.usage(1, 3, 3);
        assert_eq!(k.c.tokens.totals(), (3, 3));
    }

    #[test]
    fn a_reload_forgets_dropped_keys_and_renumbers_the_others() {
        let g = Gates::new(1);
        let m = g.get("m");
        let (a, b) = (m.key("sk-a", 0), m.key("sk-b", 1));
        b.c.usage(0, 3, 4);
        g.retain_keys(&["sk-c".into(), "sk-b".into()]);
        let left = m.keys();
        assert_eq!(left.len(), 1);
        assert!(Arc::ptr_eq(&left[0], &b));
        assert_eq!(b.label(), "api_keys[1]");
        g.retain_keys(&["sk-b".into()]);
        assert_eq!(b.label(), "api_keys[0]");
        // The dropped key's gate lives on for whoever still holds it, outside the map.
        assert_eq!(a.label(), "api_keys[0]");
        g.retain_keys(&[]);
        assert!(m.keys().is_empty());
    }
}
