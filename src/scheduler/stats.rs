//! What the prefix policies decided, for the metrics: per policy, picks by outcome (a
//! prefix hit, or a fallback to a load-only pick and why) and the matched prefix length in
//! blocks. Counted in per-thread slots (cache-padded, so workers do not share a line) and
//! summed when scraped.

use crossbeam_utils::CachePadded;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    CacheAware = 0,
    KvAware = 1,
}

const POLICIES: [&str; 2] = ["cache_aware", "kv_aware"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Followed a matched prefix.
    Hit = 0,
    /// No known prefix (or below `cache_threshold`): load decided.
    NoMatch = 1,
    /// cache_aware's balance check overrode the prefix.
    Imbalanced = 2,
    /// kv_aware without the prompt's token ids (a text or chat prompt).
    NoTokens = 3,
    /// kv_aware with no eligible instance publishing KV events.
    NoEvents = 4,
}

const OUTCOMES: [&str; 5] = [
    "prefix_hit",
    "no_match",
    "imbalanced",
    "no_tokens",
    "no_events",
];
/// Upper bounds of the matched-blocks histogram.
const BUCKETS: [u64; 9] = [0, 1, 2, 4, 8, 16, 32, 64, 128];

#[derive(Default)]
struct Slot {
    picks: [[AtomicU64; 5]; 2],
    buckets: [[AtomicU64; BUCKETS.len() + 1]; 2],
    blocks_sum: [AtomicU64; 2],
}

const SLOTS: usize = 16;

fn slots() -> &'static [CachePadded<Slot>] {
    static S: std::sync::OnceLock<Vec<CachePadded<Slot>>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        (0..SLOTS)
            .map(|_| CachePadded::new(Slot::default()))
            .collect()
    })
}

thread_local! {
    static MINE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS
    };
}

/// Records one pick of `policy`: its outcome and the blocks of the prompt it matched.
#[inline]
pub fn record(policy: Policy, outcome: Outcome, matched_blocks: u64) {
    let s = &slots()[MINE.with(|m| *m)];
    let p = policy as usize;
    s.picks[p][outcome as usize].fetch_add(1, Ordering::Relaxed);
    let b = BUCKETS
        .iter()
        .position(|&u| matched_blocks <= u)
        .unwrap_or(BUCKETS.len());
    s.buckets[p][b].fetch_add(1, Ordering::Relaxed);
    s.blocks_sum[p].fetch_add(matched_blocks, Ordering::Relaxed);
}

fn sum(f: impl Fn(&Slot) -> u64) -> u64 {
    slots().iter().map(|s| f(s)).sum()
}

/// The routing metrics in Prometheus text format.
pub fn render(out: &mut String, instances: &[&crate::instance::Instance]) {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    use crate::metrics::{header, render_histogram};
    header(
        out,
        "proxy_routing_picks_total",
        "counter",
        "Prefix-policy picks, by outcome: prefix_hit, or why load decided (no_match, imbalanced, no_tokens, no_events).",
    );
    for (p, pn) in POLICIES.iter().enumerate() {
        for (o, on) in OUTCOMES.iter().enumerate() {
            let n = sum(|s| g(&s.picks[p][o]));
            let _ = writeln!(
                out,
                "proxy_routing_picks_total{{policy=\"{pn}\",outcome=\"{on}\"}} {n}"
            );
        }
    }
    let blocks = "proxy_routing_matched_prefix_blocks";
    header(
        out,
        blocks,
        "histogram",
        "Matched prompt prefix per pick, in blocks (cache_aware: 64-byte blocks; kv_aware: the engines' KV blocks).",
    );
    let bounds: Vec<f64> = BUCKETS.iter().map(|&b| b as f64).collect();
    for (p, pn) in POLICIES.iter().enumerate() {
        let counts: Vec<u64> = (0..=BUCKETS.len())
            .map(|b| sum(|s| g(&s.buckets[p][b])))
            .collect();
        let total = sum(|s| g(&s.blocks_sum[p])) as f64;
        render_histogram(
            out,
            blocks,
            &format!("policy=\"{pn}\""),
            &bounds,
            &counts,
            total,
        );
    }
    // What the proxy believes about each engine, and how fresh it is.
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let gauge = |out: &mut String,
                 name: &str,
                 kind: &str,
                 help: &str,
                 rows: &mut dyn Iterator<Item = (String, String)>| {
        crate::metrics::header(out, name, kind, help);
        for (inst, v) in rows {
            let _ = writeln!(out, "{name}{{instance=\"{inst}\"}} {v}");
        }
    };
    let each = |f: &dyn Fn(&crate::instance::Instance) -> Option<String>| -> Vec<(String, String)> {
        instances
            .iter()
            .filter_map(|i| f(i).map(|v| (esc(&i.address), v)))
            .collect()
    };
    let engine = |f: fn(&crate::engine_load::EngineSample) -> Option<f64>| {
        each(&move |i| {
            i.engine
                .last()
                .and_then(|s| f(&s.sample))
                .map(|v| v.to_string())
        })
    };
    gauge(
        out,
        "proxy_engine_num_requests_waiting",
        "gauge",
        "The engine's waiting requests, as last scraped from its /metrics.",
        &mut engine(|s| Some(s.waiting as f64)).into_iter(),
    );
    gauge(
        out,
        "proxy_engine_num_requests_running",
        "gauge",
        "The engine's running requests, as last scraped.",
        &mut engine(|s| Some(s.running as f64)).into_iter(),
    );
    gauge(
        out,
        "proxy_engine_kv_cache_usage_perc",
        "gauge",
        "The engine's KV-cache usage (0-1), as last scraped.",
        &mut engine(|s| s.kv_usage).into_iter(),
    );
    gauge(
        out,
        "proxy_engine_metrics_age_seconds",
        "gauge",
        "Age of the engine numbers the proxy routes on.",
        &mut each(&|i| i.engine.age_ms().map(|a| (a as f64 / 1000.0).to_string())).into_iter(),
    );
    gauge(
        out,
        "proxy_engine_scrape_failures_total",
        "counter",
        "Failed scrapes of the engine's /metrics.",
        &mut each(&|i| Some(g(&i.engine.scrapes_failed).to_string())).into_iter(),
    );
    let _ = writeln!(
        out,
        "# HELP proxy_kv_events_unindexed_instances Instances with a KV-events endpoint not subscribed because {} others already are (the index's limit).\n# TYPE proxy_kv_events_unindexed_instances gauge\nproxy_kv_events_unindexed_instances {}",
        crate::kv_index::MAX_INSTANCES,
        crate::kv_index::UNINDEXED.load(Ordering::Relaxed)
    );
    let subscribed = |i: &crate::instance::Instance| i.kv_bit.load(Ordering::Relaxed) > 0;
    let kv = |f: fn(&crate::kv_index::KvStats) -> u64| {
        each(&move |i| subscribed(i).then(|| f(&i.kv_stats).to_string()))
    };
    gauge(
        out,
        "proxy_kv_events_blocks",
        "gauge",
        "KV blocks indexed for the instance.",
        &mut kv(|s| s.blocks.load(Ordering::Relaxed)).into_iter(),
    );
    gauge(
        out,
        "proxy_kv_events_batches_total",
        "counter",
        "KV-event batches received.",
        &mut kv(|s| s.batches.load(Ordering::Relaxed)).into_iter(),
    );
    gauge(
        out,
        "proxy_kv_events_seq_gaps_total",
        "counter",
        "Sequence gaps in the instance's KV events.",
        &mut kv(|s| s.gaps.load(Ordering::Relaxed)).into_iter(),
    );
    gauge(
        out,
        "proxy_kv_events_unsent_chains_total",
        "counter",
        "Chains the instance stored from the root that this proxy had not sent (another router's or client's prompts).",
        &mut kv(|s| s.unsent.load(Ordering::Relaxed)).into_iter(),
    );
    gauge(
        out,
        "proxy_kv_events_publisher_restarts_total",
        "counter",
        "Times the instance's publisher restarted its sequence.",
        &mut kv(|s| s.restarts.load(Ordering::Relaxed)).into_iter(),
    );
    gauge(
        out,
        "proxy_kv_events_lag_seconds",
        "gauge",
        "Receive time minus the publish timestamp of the last batch.",
        &mut each(&|i| {
            subscribed(i)
                .then(|| (i.kv_stats.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0).to_string())
        })
        .into_iter(),
    );
}
