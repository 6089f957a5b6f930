//! Prometheus metrics (docs/metrics.md) recorded per worker without locks and without atomics shared
//! between cores: each worker owns a `WorkerMetrics` and is its only writer (plain
//! load + store on its own cache lines); a scrape reads every worker's values and sums them.
//! Labelled series (instance pairs, instances) are created by their worker on first use
//! and published through an `ArcSwap` list, so the scraper can find them.

use crate::config::Role;
use crate::hash::FastHash;
use crate::instance::Instance;
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod histogram;
mod python;
mod render;

use histogram::bump;
pub use histogram::{render_histogram, Histogram, BUCKETS};
pub use render::{header, render, Scrape};

/// The `endpoint` label of `proxy_requests_total` / `proxy_request_duration_seconds`
/// (which routes count in which: `proxy::route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    Completions,
    ChatCompletions,
    Models,
    Health,
    Ping,
    Status,
    Metrics,
    Instances,
    Forwarded,
    Other,
}

impl Series {
    const ALL: [Series; 10] = [
        Series::Completions,
        Series::ChatCompletions,
        Series::Models,
        Series::Health,
        Series::Ping,
        Series::Status,
        Series::Metrics,
        Series::Instances,
        Series::Forwarded,
        Series::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Series::Completions => "/v1/completions",
            Series::ChatCompletions => "/v1/chat/completions",
            Series::Models => "/v1/models",
            Series::Health => "/health",
            Series::Ping => "/ping",
            Series::Status => "/status",
            Series::Metrics => "/metrics",
            Series::Instances => "/instances",
            Series::Forwarded => "forwarded",
            Series::Other => "other",
        }
    }
}

/// Status codes with their own series; anything else is counted as `status="other"`.
const STATUSES: [u16; 19] = [
    200, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 431, 499, 500, 501, 502, 503, 504, 0,
];

fn status_index(s: u16) -> usize {
    STATUSES[..STATUSES.len() - 1]
        .iter()
        .position(|&x| x == s)
        .unwrap_or(STATUSES.len() - 1)
}

/// Error kinds of `proxy_instance_errors_total`.
#[derive(Clone, Copy)]
pub enum ErrorType {
    Connect = 0,
    Timeout = 1,
    Status5xx = 2,
    Closed = 3,
    BadResponse = 4,
}

const ERROR_TYPES: [&str; 5] = ["connect", "timeout", "status_5xx", "closed", "bad_response"];

pub struct PairMetrics {
    model: Arc<str>,
    prefill: String,
    decode: String,
    pub prefill_duration: Histogram,
    pub kv_transfer: Histogram,
    pub decode_duration: Histogram,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
}

/// A worker's own record of one instance: its request and error counters, and what a
/// finished request names the instance by (its pair's series, its log line, its spans). A
/// request keeps this, not the instance's `Arc`: that count is on a line every worker writes.
pub struct InstanceMetrics {
    pub id: u64,
    pub address: String,
    pub socket_addr: SocketAddr,
    role: &'static str,
    model: Arc<str>,
    requests: AtomicU64,
    errors: [AtomicU64; ERROR_TYPES.len()],
}

impl InstanceMetrics {
    #[inline]
    pub fn request(&self) {
        bump(&self.requests, 1);
    }
    #[inline]
    pub fn error(&self, t: ErrorType) {
        bump(&self.errors[t as usize], 1);
    }
}

/// One worker's metrics; written only by that worker.
#[derive(Default)]
pub struct WorkerMetrics {
    requests: [[AtomicU64; STATUSES.len()]; Series::ALL.len()],
    durations: [Histogram; Series::ALL.len()],
    retries: AtomicU64,
    pairs: ArcSwap<Vec<Arc<PairMetrics>>>,
    instances: ArcSwap<Vec<Arc<InstanceMetrics>>>,
}

impl WorkerMetrics {
    #[inline]
    pub fn request(&self, series: Series, status: u16, took: Duration) {
        bump(&self.requests[series as usize][status_index(status)], 1);
        self.durations[series as usize].observe(took);
    }

    #[inline]
    pub fn retry(&self) {
        bump(&self.retries, 1);
    }
}

/// The worker-local index over its published series (no synchronisation needed).
#[derive(Default)]
pub struct LocalIndex {
    pairs: RefCell<HashMap<(u64, u64), Arc<PairMetrics>, FastHash>>,
    instances: RefCell<HashMap<u64, Arc<InstanceMetrics>, FastHash>>,
}

impl LocalIndex {
    pub fn pair(
        &self,
        m: &WorkerMetrics,
        prefill: Option<&InstanceMetrics>,
        decode: &InstanceMetrics,
    ) -> Arc<PairMetrics> {
        let key = (prefill.map_or(0, |p| p.id), decode.id);
        if let Some(p) = self.pairs.borrow().get(&key) {
            return p.clone();
        }
        let p = Arc::new(PairMetrics {
            model: decode.model.clone(),
            prefill: prefill.map(|p| p.address.clone()).unwrap_or_default(),
            decode: decode.address.clone(),
            prefill_duration: Histogram::default(),
            kv_transfer: Histogram::default(),
            decode_duration: Histogram::default(),
            ttft: Histogram::default(),
            tpot: Histogram::default(),
            e2e: Histogram::default(),
        });
        self.pairs.borrow_mut().insert(key, p.clone());
        m.pairs.rcu(|list| {
            let mut l = Vec::clone(list);
            l.push(p.clone());
            l
        });
        p
    }

    pub fn instance(&self, m: &WorkerMetrics, inst: &Instance) -> Arc<InstanceMetrics> {
        if let Some(i) = self.instances.borrow().get(&inst.id) {
            return i.clone();
        }
        let i = Arc::new(InstanceMetrics {
            id: inst.id,
            address: inst.address.clone(),
            socket_addr: inst.socket_addr,
            role: inst.role.as_str(),
            model: inst.model.clone(),
            requests: AtomicU64::new(0),
            errors: Default::default(),
        });
        self.instances.borrow_mut().insert(inst.id, i.clone());
        m.instances.rcu(|list| {
            let mut l = Vec::clone(list);
            l.push(i.clone());
            l
        });
        i
    }
}

#[cfg(test)]
mod tests;
