//! The simulated node's counters and vLLM's `/metrics` exposition: the names, types, labels
//! (`model_name`, `engine`) and histogram buckets of `vllm/v1/metrics/loggers.py`, as
//! prometheus_client renders them (counters get `_total`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// A lock-free histogram over fixed buckets (cumulative counts are summed at render time).
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (non-cumulative), plus one for +Inf.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// `n` observations of the same value.
    #[inline]
    pub fn observe_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i].fetch_add(n, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64 * n, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0u64;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b:?}\"}} {cum}.0");
        }
        cum += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cum}.0");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cum}.0");
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum:?}");
    }
}

pub struct Stats {
    pub requests: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub aborted: AtomicU64,
    pub last_abort_unix_us: AtomicU64,
    pub failures_injected: AtomicU64,
    pub success: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens actually computed (not served by the prefix cache or arrived from a
    /// prefill node): what tests check instead of timing a skipped prefill.
    pub prefilled_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub preemptions: AtomicU64,
    /// KV-cache blocks in use (not free nor evictable); with `kv_blocks` the usage gauge.
    pub kv_used_blocks: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub queue_time: Histogram,
    /// From scheduling to the first token, and to the last (vLLM V1's prefill and
    /// inference times): what a router learns the engine's speed from.
    pub prefill_time: Histogram,
    pub inference_time: Histogram,
    pub e2e: Histogram,
}

impl Default for Stats {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Stats {
            requests: z(),
            running: z(),
            waiting: z(),
            aborted: z(),
            last_abort_unix_us: z(),
            failures_injected: z(),
            success: z(),
            prompt_tokens: z(),
            prefilled_tokens: z(),
            generation_tokens: z(),
            prefix_queries: z(),
            prefix_hits: z(),
            preemptions: z(),
            kv_used_blocks: z(),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            queue_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            prefill_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            inference_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
            e2e: Histogram::new(REQUEST_LATENCY_BUCKETS),
        }
    }
}

impl Stats {
    /// A request's first token: its prompt counts as processed now (as vLLM counts
    /// `prompt_tokens_total` when the prefill completes, so the counter and the prefill
    /// times cover the same requests), with its TTFT and its time since scheduling.
    pub fn first_token(&self, prompt_tokens: usize, ttft: Duration, prefill: Duration) {
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
        self.ttft.observe(ttft);
        self.prefill_time.observe(prefill);
    }
}

/// What `/metrics` needs besides the counters.
pub struct Exposition<'a> {
    pub model: &'a str,
    /// Total KV-cache blocks (0: no KV-cache model, usage reads 0).
    pub kv_blocks: usize,
    pub block_size: usize,
    pub prefix_caching: bool,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Stats {
    pub fn render(&self, x: &Exposition) -> String {
        let labels = format!("model_name=\"{}\",engine=\"0\"", escape(x.model));
        let mut out = String::with_capacity(8 * 1024);
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {v:?}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name}_total {help}\n# TYPE {name}_total counter\n{name}_total{{{labels}}} {v}.0"
            );
        };
        let g = |a: &AtomicU64| a.load(Relaxed);
        gauge(
            &mut out,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            g(&self.running) as f64,
        );
        gauge(
            &mut out,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            g(&self.waiting) as f64,
        );
        let usage = if x.kv_blocks == 0 {
            0.0
        } else {
            g(&self.kv_used_blocks) as f64 / x.kv_blocks as f64
        };
        gauge(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            usage,
        );
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"{}\",num_gpu_blocks=\"{}\",prefix_caching_hash_algo=\"sha256\",engine=\"0\"}} 1.0",
            x.block_size,
            if x.prefix_caching { "True" } else { "False" },
            x.kv_blocks,
        );
        counter(
            &mut out,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            g(&self.prefix_queries),
        );
        counter(
            &mut out,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            g(&self.prefix_hits),
        );
        counter(
            &mut out,
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            g(&self.preemptions),
        );
        counter(
            &mut out,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            g(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            g(&self.generation_tokens),
        );
        let _ = writeln!(
            out,
            "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter\nvllm:request_success_total{{{labels},finished_reason=\"length\"}} {}.0",
            g(&self.success)
        );
        self.ttft.render(
            &mut out,
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &labels,
        );
        self.itl.render(
            &mut out,
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            &labels,
        );
        self.queue_time.render(
            &mut out,
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            &labels,
        );
        self.prefill_time.render(
            &mut out,
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            &labels,
        );
        self.inference_time.render(
            &mut out,
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            &labels,
        );
        self.e2e.render(
            &mut out,
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &labels,
        );
        let _ = writeln!(
            out,
            "# HELP dummy_aborted_requests_total Requests whose client went away before the end.\n# TYPE dummy_aborted_requests_total counter\ndummy_aborted_requests_total {}",
            g(&self.aborted)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(TTFT_BUCKETS);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10_000));
        let mut s = String::new();
        h.render(&mut s, "x", "h", "a=\"b\"");
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.001\"} 0.0\n"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.005\"} 1.0\n"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"2560.0\"} 1.0\n"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"+Inf\"} 2.0\n"));
        assert!(s.contains("x_count{a=\"b\"} 2.0\n"));
    }
}
