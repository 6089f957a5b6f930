//! Latency histograms: a worker's single-writer buckets, and their sum over workers as
//! rendered in the exposition.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds in seconds: 1 ms to 10 min, for LLM latencies.
pub const BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Single-writer increment: the owning worker is the only writer, so no read-modify-write
/// instruction is needed; readers may see the value a moment late, never torn.
#[inline]
pub(super) fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

#[derive(Default)]
pub struct Histogram {
    /// Non-cumulative counts; the last slot is above the largest bound (+Inf).
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        bump(&self.counts[idx], 1);
        bump(&self.sum_micros, d.as_micros() as u64);
    }

    pub(super) fn add_to(&self, acc: &mut HistAcc) {
        for (a, c) in acc.counts.iter_mut().zip(&self.counts) {
            *a += c.load(Ordering::Relaxed);
        }
        acc.sum_micros += self.sum_micros.load(Ordering::Relaxed);
    }
}

#[derive(Default, Clone)]
pub(super) struct HistAcc {
    pub(super) counts: [u64; BUCKETS.len() + 1],
    sum_micros: u64,
}

impl HistAcc {
    /// Writes the `_bucket`, `_sum` and `_count` lines; the count is the sum of the buckets,
    /// so the exposition is consistent even while workers keep recording.
    pub(super) fn render(&self, out: &mut String, name: &str, labels: &str) {
        render_histogram(
            out,
            name,
            labels,
            &BUCKETS,
            &self.counts,
            self.sum_micros as f64 / 1e6,
        );
    }
}

/// A histogram's `_bucket`, `_sum` and `_count` lines from non-cumulative `counts` (one per
/// bound, then the one above the largest); the count is the last cumulative bucket, so the
/// lines agree even while writers keep recording. `labels` without braces, may be empty.
pub fn render_histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    counts: &[u64],
    sum: f64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cum = 0;
    for (b, c) in bounds.iter().zip(counts) {
        cum += c;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
    }
    cum += counts.get(bounds.len()).copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
    let lb = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{lb} {sum}");
    let _ = writeln!(out, "{name}_count{lb} {cum}");
}
