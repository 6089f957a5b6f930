//! Everything workers share: the swappable topology snapshot and policy, process-wide
//! flags, and each worker's slot of counters.

use crate::config::Config;
use crate::metrics::WorkerMetrics;
use crate::topology::Topology;
use arc_swap::{ArcSwap, Cache};
use crossbeam_utils::CachePadded;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Everything workers share: the swappable snapshot and process-wide flags.
pub struct Shared {
    pub topology: ArcSwap<Topology>,
    /// Timeouts, retries, keys and limits; replaced whole on reload.
    pub policy: ArcSwap<crate::config::Policy>,
    /// DNS discovery's names and their counters (metrics); replaced when the names change.
    pub discovery: ArcSwap<Vec<Arc<crate::discovery::TargetStats>>>,
    /// Set once start-up gating is met — a first model can serve — and stays set: the
    /// proxy's own readiness (`/health`). Each model is gated on its own (`ModelRoute::open`).
    pub ready: AtomicBool,
    /// SIGTERM/SIGINT received: finish what is in flight, take nothing new.
    pub shutting_down: AtomicBool,
    /// Requests in flight, one slot per worker (each worker writes only its own).
    pub active: Vec<CachePadded<AtomicU64>>,
    /// Metrics, one set per worker (each worker writes only its own).
    pub metrics: Vec<Arc<WorkerMetrics>>,
    /// Admission counters per model (and API key), shared by every worker.
    pub admission: crate::admission::gate::Gates,
    pub started: Instant,
    pub created_unix: u64,
    /// The span exporter when `tracing.otlp_endpoint` is set (docs/tracing.md).
    pub exporter: Option<crate::trace::Exporter>,
}

impl Shared {
    pub fn new(cfg: &Config, workers: usize) -> Arc<Self> {
        Arc::new(Shared {
            topology: ArcSwap::from_pointee(Topology::from_config(cfg)),
            policy: ArcSwap::from_pointee(cfg.policy()),
            discovery: ArcSwap::from_pointee(Vec::new()),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            active: (0..workers.max(1))
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
            metrics: (0..workers.max(1)).map(|_| Arc::default()).collect(),
            admission: crate::admission::gate::Gates::new(workers.max(1)),
            started: Instant::now(),
            created_unix: crate::ids::unix_seconds(),
            exporter: cfg.tracing.otlp_endpoint.clone().and_then(|e| {
                crate::trace::Exporter::spawn(e, cfg.tracing.service_name.clone())
                    .map_err(|err| crate::error!("tracing: cannot start the exporter: {err}"))
                    .ok()
            }),
        })
    }

    #[inline]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn active_requests(&self) -> u64 {
        self.active.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
}

/// Counts a request in its worker's slot of `Shared::active` while it lives.
pub struct ActiveRequest<'a>(&'a AtomicU64);

impl<'a> ActiveRequest<'a> {
    pub fn new(shared: &'a Shared, worker: usize) -> Self {
        let slot = &shared.active[worker % shared.active.len()];
        slot.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(slot)
    }
}

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A worker's view of one of `Shared`'s snapshots (the topology, the policy). It hands out
/// the current snapshot as an `Rc` of the shared `Arc`: a request's clone and drop touch a
/// counter of this worker's own, not the `Arc`'s, which every worker writes (a cache line
/// moving between cores twice per request). Whether a newer snapshot was published is one
/// relaxed pointer read (`arc_swap::Cache`); a reload applies to the next request, as before.
/// An idle worker keeps the snapshot it last served with until its next request.
pub struct LocalSnapshot<T: 'static> {
    latest: RefCell<Cache<Field<T>, Arc<T>>>,
    current: RefCell<Snapshot<T>>,
}

/// A snapshot as a worker hands it out (`LocalSnapshot::get`): cloned and dropped without an
/// atomic operation. It dereferences to the value, not to the shared `Arc`, so that no
/// `Arc::clone` can reach through it to the count every worker writes.
// The extra allocation is the point: one per published snapshot per worker, and it makes the
// per-request count the worker's own.
#[allow(clippy::redundant_allocation)]
pub struct Snapshot<T>(Rc<Arc<T>>);

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Snapshot(Rc::clone(&self.0))
    }
}

impl<T> std::ops::Deref for Snapshot<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// One `ArcSwap` of `Shared`, owned through the `Arc` (what `arc_swap::Cache` reads from).
struct Field<T: 'static> {
    shared: Arc<Shared>,
    pick: fn(&Shared) -> &ArcSwap<T>,
}

impl<T> std::ops::Deref for Field<T> {
    type Target = ArcSwap<T>;
    fn deref(&self) -> &ArcSwap<T> {
        (self.pick)(&self.shared)
    }
}

impl<T: 'static> LocalSnapshot<T> {
    pub fn new(shared: Arc<Shared>, pick: fn(&Shared) -> &ArcSwap<T>) -> Self {
        let mut latest = Cache::new(Field { shared, pick });
        let current = RefCell::new(Snapshot(Rc::new(Arc::clone(latest.load()))));
        LocalSnapshot {
            latest: RefCell::new(latest),
            current,
        }
    }

    /// The snapshot in force now.
    #[inline]
    pub fn get(&self) -> Snapshot<T> {
        let mut latest = self.latest.borrow_mut();
        let now = latest.load();
        let mut current = self.current.borrow_mut();
        if !Arc::ptr_eq(&current.0, now) {
            *current = Snapshot(Rc::new(Arc::clone(now)));
        }
        current.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_s_snapshot_follows_what_is_published() {
        let cfg = Config::from_yaml("model: m\ndual: [\"127.0.0.1:9\"]\n").unwrap();
        let shared = Shared::new(&cfg, 1);
        let local = LocalSnapshot::new(shared.clone(), |s| &s.policy);
        let (a, b) = (local.get(), local.get());
        // The same snapshot is the same handle: no new allocation, no shared count touched.
        assert!(Rc::ptr_eq(&a.0, &b.0));
        assert!(Arc::ptr_eq(&a.0, &shared.policy.load_full()));
        let mut next = cfg.policy();
        next.shutdown_grace = std::time::Duration::from_secs(1234);
        shared.policy.store(Arc::new(next));
        let c = local.get();
        assert_eq!(c.shutdown_grace.as_secs(), 1234);
        assert!(Arc::ptr_eq(&c.0, &shared.policy.load_full()));
        // A request that began before keeps the snapshot it began with.
        assert!(!Arc::ptr_eq(&a.0, &c.0));
    }
}
