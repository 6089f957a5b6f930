//! What an instance's engine says about its own load, scraped from its Prometheus
//! `/metrics` by the control side (`proxy::scrape`) and read by the schedulers: vLLM's
//! running and waiting requests and KV-cache usage. Stored in atomics, one writer (the
//! scraper), read without locks by every worker. See docs/scheduling.md ("Engine load").

use crate::config::Role;
use crate::resilience::now_ms;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The numbers of one scrape.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct EngineSample {
    pub running: u64,
    pub waiting: u64,
    /// KV-cache usage as a fraction (vLLM's `kv_cache_usage_perc` is 0..1 despite its name).
    pub kv_usage: Option<f64>,
}

/// Parses vLLM's metrics text: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
/// `vllm:kv_cache_usage_perc` (or the older `vllm:gpu_cache_usage_perc`). Several series of
/// one name (engines, data-parallel ranks) add up; usage takes the highest. None when the
/// text has neither queue gauge (not a vLLM engine, or one too old).
pub fn parse(text: &str) -> Option<EngineSample> {
    let (mut running, mut waiting, mut usage) = (None::<f64>, None::<f64>, None::<f64>);
    for line in text.lines() {
        if line.starts_with('#') || !line.starts_with("vllm:") {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        // The value follows the labels (which may contain spaces inside quotes).
        let rest = match line[name_end..].strip_prefix('{') {
            Some(labels) => match labels.rfind('}') {
                Some(close) => &labels[close + 1..],
                None => continue,
            },
            None => &line[name_end..],
        };
        let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        match name {
            "vllm:num_requests_running" => *running.get_or_insert(0.0) += v,
            "vllm:num_requests_waiting" => *waiting.get_or_insert(0.0) += v,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                usage = Some(usage.map_or(v, |u| u.max(v)))
            }
            _ => {}
        }
    }
    if running.is_none() && waiting.is_none() {
        return None;
    }
    Some(EngineSample {
        running: running.unwrap_or(0.0) as u64,
        waiting: waiting.unwrap_or(0.0) as u64,
        kv_usage: usage.map(|u| u.min(1.0)),
    })
}

/// An instance's engine numbers as last scraped. Written by the scraper only.
#[derive(Default)]
pub struct EngineLoad {
    running: AtomicU64,
    waiting: AtomicU64,
    /// KV-cache usage in millionths, `u64::MAX` when the engine does not report it.
    kv_usage_ppm: AtomicU64,
    /// This proxy's own in-flight requests to the instance when the sample was taken.
    local_at_scrape: AtomicU64,
    /// The most requests seen running while others waited: the engine's batch, as far as
    /// the samples tell (0: never seen full). Admission's estimate of an engine's queue.
    batch_seen: AtomicU64,
    /// `now_ms()` of the last successful scrape; 0 when there is no sample to route on
    /// (never scraped, or the scraper dropped a stale one: readers need no clock).
    scraped_at_ms: AtomicU64,
    pub scrapes_ok: AtomicU64,
    pub scrapes_failed: AtomicU64,
}

/// A sample that is fresh enough to route on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fresh {
    pub sample: EngineSample,
    pub local_at_scrape: u64,
}

impl EngineLoad {
    /// Publishes a sample; `local` is this proxy's in-flight count at the time of the scrape.
    pub fn store(&self, s: EngineSample, local: u64) {
        self.running.store(s.running, Ordering::Relaxed);
        self.waiting.store(s.waiting, Ordering::Relaxed);
        self.kv_usage_ppm.store(
            s.kv_usage.map_or(u64::MAX, |u| (u * 1e6) as u64),
            Ordering::Relaxed,
        );
        self.local_at_scrape.store(local, Ordering::Relaxed);
        if s.waiting > 0 {
            self.batch_seen.fetch_max(s.running, Ordering::Relaxed);
        }
        // Last, with Release: a reader that sees the new time sees the numbers above.
        self.scraped_at_ms.store(now_ms(), Ordering::Release);
        self.scrapes_ok.fetch_add(1, Ordering::Relaxed);
    }

    /// A failed scrape: counted, and the sample dropped once it is older than `max_age`
    /// (routing falls back to the local counts). `max_age` zero drops it at once.
    pub fn failed(&self, max_age: Duration) {
        self.scrapes_failed.fetch_add(1, Ordering::Relaxed);
        if self
            .age_ms()
            .is_some_and(|a| a >= max_age.as_millis() as u64)
        {
            self.scraped_at_ms.store(0, Ordering::Release);
        }
    }

    /// The sample to route on, if any (see `scraped_at_ms`).
    pub fn last(&self) -> Option<Fresh> {
        let at = self.scraped_at_ms.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let ppm = self.kv_usage_ppm.load(Ordering::Relaxed);
        Some(Fresh {
            sample: EngineSample {
                running: self.running.load(Ordering::Relaxed),
                waiting: self.waiting.load(Ordering::Relaxed),
                kv_usage: (ppm != u64::MAX).then(|| ppm as f64 / 1e6),
            },
            local_at_scrape: self.local_at_scrape.load(Ordering::Relaxed),
        })
    }

    /// The most requests the engine was seen running with a queue (0: never).
    pub fn batch_seen(&self) -> u64 {
        self.batch_seen.load(Ordering::Relaxed)
    }

    /// Milliseconds since the sample was taken (reads the clock: not for the pick path).
    pub fn age_ms(&self) -> Option<u64> {
        match self.scraped_at_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(now_ms().saturating_sub(at)),
        }
    }

    /// The `/status/instances` view of it.
    pub fn status_json(&self) -> serde_json::Value {
        match self.last() {
            None => serde_json::json!({
                "scraped": false,
                "scrapes_failed": self.scrapes_failed.load(Ordering::Relaxed),
            }),
            Some(f) => serde_json::json!({
                "scraped": true,
                "num_requests_running": f.sample.running,
                "num_requests_waiting": f.sample.waiting,
                "kv_cache_usage_perc": f.sample.kv_usage,
                "age_seconds": self.age_ms().unwrap_or(0) as f64 / 1000.0,
                "scrapes_failed": self.scrapes_failed.load(Ordering::Relaxed),
            }),
        }
    }
}

/// Requests a pick should assume are queued or running on an instance beyond what this
/// proxy has in flight there itself: the engine's running + waiting at the last scrape,
/// minus this proxy's own in-flight count at that time (those are already counted locally),
/// plus the waiting ones again (a queued request is worse than a running one: it has not
/// started and everything it waits behind must finish first). Requests this proxy sent or
/// finished since the scrape are in the local count, so they are neither missed nor
/// counted twice.
#[inline]
pub fn unseen_requests(f: &Fresh) -> u64 {
    let s = &f.sample;
    (s.running + s.waiting).saturating_sub(f.local_at_scrape) + s.waiting
}

/// Prompt tokens assumed per request the proxy did not send itself (prefill load is
/// counted in tokens; the engine reports requests).
pub const UNSEEN_PROMPT_TOKENS: u64 = 512;

/// Load as `role` sees it, lower is better, from the local in-flight counts `(requests,
/// prompt tokens, decode tokens)` and the engine's numbers when fresh. Prefill is bound by
/// prompt tokens, decode by requests (then KV-cache use, then decode tokens).
#[inline]
pub fn load_key(role: Role, local: (u64, u64, u64), engine: Option<&Fresh>) -> (u64, u64) {
    let (req, prompt, decode) = local;
    let unseen = engine.map_or(0, unseen_requests);
    match role {
        Role::Prefill => (prompt + unseen * UNSEEN_PROMPT_TOKENS, req + unseen),
        Role::Decode | Role::Dual => {
            let kv = engine
                .and_then(|f| f.sample.kv_usage)
                .map_or(0, |u| (u * 1000.0) as u64);
            (req + unseen, kv << 32 | decode.min(u32::MAX as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.5
vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0
"#;

    #[test]
    fn parses_vllm_gauges() {
        let s = parse(VLLM).unwrap();
        assert_eq!(s.running, 3);
        assert_eq!(s.waiting, 8);
        assert_eq!(s.kv_usage, Some(0.5));
    }

    #[test]
    fn older_gpu_cache_name_and_no_labels() {
        let s = parse("vllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.9\n").unwrap();
        assert_eq!((s.running, s.waiting, s.kv_usage), (2, 0, Some(0.9)));
    }

    #[test]
    fn not_an_engine() {
        assert_eq!(parse("proxy_requests_total 5\n"), None);
        assert_eq!(parse(""), None);
        // Garbage values are skipped, never a panic.
        assert_eq!(
            parse("vllm:num_requests_waiting{a=\"b c\"} NaN\nvllm:num_requests_waiting{\n"),
            None
        );
        let s = parse("vllm:num_requests_waiting{a=\"b c\"} 4\n").unwrap();
        assert_eq!(s.waiting, 4);
    }

    #[test]
    fn unseen_requests_do_not_double_count_our_own() {
        let f = |running, waiting, local| Fresh {
            sample: EngineSample {
                running,
                waiting,
                kv_usage: None,
            },
            local_at_scrape: local,
        };
        // All of the engine's requests are ours: nothing unseen.
        assert_eq!(unseen_requests(&f(4, 0, 4)), 0);
        // Another proxy's two requests, one of ours queued: 2 + the queued one again.
        assert_eq!(unseen_requests(&f(5, 1, 4)), 3);
        // A long queue weighs double.
        assert_eq!(unseen_requests(&f(8, 40, 0)), 88);
    }

    #[test]
    fn stale_samples_are_dropped_by_the_writer() {
        let e = EngineLoad::default();
        assert!(e.last().is_none());
        let s = EngineSample {
            running: 1,
            waiting: 2,
            kv_usage: Some(0.5),
        };
        e.store(s, 1);
        let f = e.last().unwrap();
        assert_eq!((f.sample, f.local_at_scrape), (s, 1));
        // A failure within the allowed age keeps the sample; past it, drops it.
        e.failed(Duration::from_secs(60));
        assert!(e.last().is_some());
        e.failed(Duration::ZERO);
        assert!(e.last().is_none());
        assert_eq!(e.scrapes_failed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn queue_outweighs_local_in_flight() {
        let busy = Fresh {
            sample: EngineSample {
                running: 8,
                waiting: 20,
                kv_usage: Some(0.9),
            },
            local_at_scrape: 0,
        };
        let idle = (3, 3000, 300);
        assert!(
            load_key(Role::Decode, idle, None) < load_key(Role::Decode, (0, 0, 0), Some(&busy))
        );
        assert!(
            load_key(Role::Prefill, idle, None) < load_key(Role::Prefill, (0, 0, 0), Some(&busy))
        );
    }
}
