//! Everything workers share: the swappable topology snapshot and policy, process-wide
//! flags, and each worker's slot of counters.

use crate::config::Config;
use crate::metrics::WorkerMetrics;
use crate::topology::Topology;
use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
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
