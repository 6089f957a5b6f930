//! What an instance's engine says about its own load, scraped from its Prometheus
//! `/metrics` by the control side (`proxy::scrape`) and read by the schedulers: vLLM's
//! running and waiting requests and KV-cache usage. Stored in atomics, one writer (the
//! scraper), read without locks by every worker, with the engine's speed learned from its
//! counters and the load key the policies compare. Reading the metrics text:
//! `metrics_text`. See docs/scheduling.md ("Engine load").

mod metrics_text;

pub use metrics_text::{block_size, parse, parse_metrics, parse_totals, EngineSample, Totals};

use crate::config::Role;
use crate::resilience::now_ms;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What an engine's counters say about its speed, learned between two scrapes and
/// smoothed: kv_aware's expected time to first token (docs/scheduling.md, "KV aware").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speed {
    /// Nanoseconds of prefill per prompt token the engine computed (cache hits excluded).
    pub prefill_ns_per_token: u64,
    /// Microseconds a request spends in the batch, from its scheduling to its last token.
    pub run_us: u64,
}

/// Fewest computed prompt tokens between two scrapes for a prefill-speed sample: a few
/// short prompts say more about the per-request overhead than the per-token cost.
const MIN_SPEED_TOKENS: f64 = 256.0;

/// The speed `prev` → `now` shows, for the parts with enough traffic; None where counters
/// went back (an engine restart) or nothing finished.
fn speed_between(prev: &Totals, now: &Totals) -> (Option<u64>, Option<u64>) {
    let d = |a: f64, b: f64| (b >= a).then_some(b - a);
    let prefill = (|| {
        let tokens =
            d(prev.prompt_tokens, now.prompt_tokens)? - d(prev.prefix_hits, now.prefix_hits)?;
        let secs = d(prev.prefill_s, now.prefill_s)?;
        (tokens >= MIN_SPEED_TOKENS && secs > 0.0).then(|| (secs * 1e9 / tokens) as u64)
    })();
    let run = (|| {
        let n = d(prev.run_n, now.run_n)?;
        let secs = d(prev.run_s, now.run_s)?;
        (n >= 1.0).then(|| (secs * 1e6 / n) as u64)
    })();
    (prefill, run)
}

/// The shortest stretch of an engine's counters a speed sample is taken over, however
/// often they are scraped. A short stretch holds a request or two, and one request says
/// little: a prefix hit that waited for blocks still being computed shows a long prefill
/// for a few computed tokens, and vLLM counts cache hits at scheduling, prompt tokens at
/// the first token and prefill time when the request finishes, so a short stretch pairs
/// one request's tokens with another's time. Scraping every 0.1 s, samples swung so much
/// that kv_aware moved groups for nothing (prefix affinity 0.58–0.62 and hit rate 0.82,
/// against 0.74–0.81 and 0.87–0.89 scraping every 0.5 s; docs/benchmarks.md). Frequent
/// scrapes still refresh the queue gauges.
pub const SPEED_WINDOW_MS: u64 = 500;

/// Whether any counter went back (an engine restart): the stretch teaches nothing.
fn went_back(prev: &Totals, now: &Totals) -> bool {
    now.prompt_tokens < prev.prompt_tokens
        || now.prefix_hits < prev.prefix_hits
        || now.prefill_s < prev.prefill_s
        || now.run_s < prev.run_s
        || now.run_n < prev.run_n
}

/// A new sample weighs 30 %: a few scrapes follow a change of load, one odd interval does
/// not swing the routing.
fn smooth(old: u64, new: u64) -> u64 {
    if old == 0 {
        new
    } else {
        (old * 7 + new * 3) / 10
    }
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
    /// The peer replicas' in flight there, as they report it (`prefix_sync`), and its sum
    /// when the sample was taken.
    pub peers: crate::peer_load::PeerLoad,
    peers_at_scrape: AtomicU64,
    /// The most requests seen running while others waited: the engine's batch, as far as
    /// the samples tell (0: never seen full). Admission's estimate of an engine's queue.
    batch_seen: AtomicU64,
    /// `now_ms()` of the last successful scrape; 0 when there is no sample to route on
    /// (never scraped, or the scraper dropped a stale one: readers need no clock).
    scraped_at_ms: AtomicU64,
    /// `Speed`, learned (0: not yet).
    prefill_ns_per_token: AtomicU64,
    run_us: AtomicU64,
    /// The counters at the start of the current speed stretch and `now_ms()` then (the
    /// scraper's own: never read on a pick).
    totals: std::sync::Mutex<Option<(Totals, u64)>>,
    pub scrapes_ok: AtomicU64,
    pub scrapes_failed: AtomicU64,
}

/// A sample that is fresh enough to route on.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Fresh {
    pub sample: EngineSample,
    pub local_at_scrape: u64,
    /// The peer replicas' requests there (`PeerLoad`) when the sample was taken, and now.
    pub peers_at_scrape: u64,
    pub peers_now: u64,
}

#[cfg(test)]
impl Fresh {
    /// A sample of `running` and `waiting` taken while this proxy had `local` in flight,
    /// no peers: the unit tests' engine state.
    pub(crate) fn of(running: u64, waiting: u64, local: u64) -> Fresh {
        Fresh {
            sample: EngineSample {
                running,
                waiting,
                kv_usage: None,
            },
            local_at_scrape: local,
            ..Default::default()
        }
    }
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
        self.peers_at_scrape
            .store(self.peers.sum(), Ordering::Relaxed);
        if s.waiting > 0 {
            self.batch_seen.fetch_max(s.running, Ordering::Relaxed);
        }
        // Last, with Release: a reader that sees the new time sees the numbers above.
        self.scraped_at_ms.store(now_ms(), Ordering::Release);
        self.scrapes_ok.fetch_add(1, Ordering::Relaxed);
    }

    /// Learns the engine's speed from its counters, scraped at `at_ms` (`now_ms()`), over
    /// stretches of at least `SPEED_WINDOW_MS` (see `Speed`).
    pub fn store_totals(&self, now: Totals, at_ms: u64) {
        let Ok(mut prev) = self.totals.lock() else {
            return;
        };
        if let Some((p, since)) = *prev {
            if went_back(&p, &now) {
                // Restarted: a new stretch from here.
            } else if at_ms.saturating_sub(since) < SPEED_WINDOW_MS {
                return; // the stretch goes on
            } else {
                let (prefill, run) = speed_between(&p, &now);
                for (v, cell) in [(prefill, &self.prefill_ns_per_token), (run, &self.run_us)] {
                    if let Some(v) = v.filter(|&v| v > 0) {
                        cell.store(smooth(cell.load(Ordering::Relaxed), v), Ordering::Relaxed);
                    }
                }
            }
        }
        *prev = Some((now, at_ms));
    }

    /// The engine's learned speed, once both parts are known.
    #[inline]
    pub fn speed(&self) -> Option<Speed> {
        let prefill_ns_per_token = self.prefill_ns_per_token.load(Ordering::Relaxed);
        let run_us = self.run_us.load(Ordering::Relaxed);
        (prefill_ns_per_token > 0 && run_us > 0).then_some(Speed {
            prefill_ns_per_token,
            run_us,
        })
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
            peers_at_scrape: self.peers_at_scrape.load(Ordering::Relaxed),
            peers_now: self.peers.sum(),
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
        let mut v = match self.last() {
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
                "scrapes_ok": self.scrapes_ok.load(Ordering::Relaxed),
                "scrapes_failed": self.scrapes_failed.load(Ordering::Relaxed),
            }),
        };
        // What kv_aware estimates with (learned, kept across failed scrapes).
        if let Some(o) = v.as_object_mut() {
            o.insert("peer_requests".into(), self.peers.sum().into());
            let batch = self.batch_seen();
            o.insert("batch_seen".into(), (batch > 0).then_some(batch).into());
            let speed = self.speed();
            o.insert(
                "prefill_us_per_token".into(),
                speed.map(|s| s.prefill_ns_per_token as f64 / 1000.0).into(),
            );
            o.insert(
                "mean_run_seconds".into(),
                speed.map(|s| s.run_us as f64 / 1e6).into(),
            );
        }
        v
    }
}

/// Requests on the engine that this proxy did not send (other replicas', other clients'):
/// its running + waiting at the last scrape minus this proxy's own in-flight count at that
/// time. Requests this proxy sent or finished since the scrape are in its live local count,
/// so they are neither missed nor counted twice. The peer replicas' part is their live
/// report instead of what the scrape saw of it (`PeerLoad`; both 0 without `prefix_sync`).
#[inline]
pub fn others(f: &Fresh) -> u64 {
    f.peers_now + unreported(f)
}

/// Of `others`, the requests no peer replica reports: known only from the scrape, so up
/// to an interval old (other routers', clients going straight to the engine; all of the
/// others without `prefix_sync`).
#[inline]
pub fn unreported(f: &Fresh) -> u64 {
    let total = f.sample.running + f.sample.waiting;
    total.saturating_sub(f.local_at_scrape + f.peers_at_scrape)
}

/// Requests a pick should assume on an instance beyond `local` (this proxy's in flight
/// there now): the others, plus — once the engine's batch is known (`batch_seen`) — every
/// request now queued behind the full batch counted again (a queued request has not
/// started and waits behind every running one). The queue is estimated from the live total
/// (local + others), not from the scraped waiting count: that is up to an interval old, and
/// every pick reading it meanwhile would avoid a node that has long drained and pile onto
/// the others (measured: the decode leg of 1P+3D, docs/benchmarks.md).
#[inline]
pub fn unseen_requests(f: &Fresh, local: u64, batch: u64) -> u64 {
    let others = others(f);
    others + queued(local + others, batch)
}

/// Of `on_engine` requests, those waiting behind the engine's full batch of `batch` (a
/// batch never seen full, 0, queues nobody): the one queue estimate both the load keys and
/// `kv_aware`'s wait for a slot use.
#[inline]
pub fn queued(on_engine: u64, batch: u64) -> u64 {
    match batch {
        0 => 0,
        b => on_engine.saturating_sub(b),
    }
}

/// Prompt tokens assumed per request the proxy did not send itself (prefill load is
/// counted in tokens; the engine reports requests).
pub const UNSEEN_PROMPT_TOKENS: u64 = 512;

/// KV-cache use from which an engine counts as nearly full: past it a new sequence may
/// preempt a running one (vLLM recomputes or swaps it), so such a node ranks after every
/// other with as many requests.
pub const KV_NEARLY_FULL: f64 = 0.9;

/// Load as `role` sees it, lower is better, from the local in-flight counts `(requests,
/// prompt tokens, decode tokens left)` and the engine's numbers when fresh. Prefill is
/// bound by prompt tokens; decode by requests, then a nearly full KV cache, then the decode
/// tokens its requests have left (the node that frees a batch slot first: with answers of
/// similar length, picking among equals by request count alone spreads them worse than a
/// plain rotation does — docs/scheduling.md).
#[inline]
pub fn load_key(
    role: Role,
    local: (u64, u64, u64),
    engine: Option<&Fresh>,
    batch: u64,
) -> (u64, u64) {
    let (req, prompt, decode) = local;
    let unseen = engine.map_or(0, |f| unseen_requests(f, req, batch));
    match role {
        Role::Prefill => (prompt + unseen * UNSEEN_PROMPT_TOKENS, req + unseen),
        Role::Decode | Role::Dual => {
            let full = engine
                .and_then(|f| f.sample.kv_usage)
                .is_some_and(|u| u >= KV_NEARLY_FULL);
            (
                req + unseen,
                (full as u64) << 32 | decode.min(u32::MAX as u64),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unseen_requests_do_not_double_count_our_own() {
        let f = Fresh::of;
        // All of the engine's requests are ours: nothing unseen.
        assert_eq!(unseen_requests(&f(4, 0, 4), 4, 4), 0);
        // Another proxy's two requests (ours: 4 then and now) in a batch of 4: 2 others
        // and the 2 queued now counted again.
        assert_eq!(unseen_requests(&f(5, 1, 4), 4, 4), 4);
        // The queue seen at the scrape has drained since (we have 1 in flight now): only
        // the others count, not the stale waiting number.
        assert_eq!(unseen_requests(&f(4, 2, 4), 1, 4), 2);
        // A long queue weighs double; the batch unknown: no queue term.
        assert_eq!(unseen_requests(&f(8, 40, 0), 0, 8), 88);
        assert_eq!(unseen_requests(&f(8, 40, 0), 0, 0), 48);
    }

    /// The peer replicas' part of the others is their live report, not the scrape's.
    #[test]
    fn peers_count_as_they_report_now() {
        let f = |peers_at_scrape, peers_now| Fresh {
            peers_at_scrape,
            peers_now,
            ..Fresh::of(10, 0, 2)
        };
        // 10 on the engine: 2 ours, 6 the peers', 2 from elsewhere.
        assert_eq!(others(&f(6, 6)), 8);
        // The peers finished five since the scrape; they sent three more.
        assert_eq!(others(&f(6, 1)), 3);
        assert_eq!(others(&f(6, 9)), 11);
        // No peers reporting: as before.
        assert_eq!(others(&f(0, 0)), 8);
    }

    #[test]
    fn speed_is_learned_from_the_timing_counters() {
        let text = |prompt: f64, hits: f64, prefill: f64, run: f64, n: f64| {
            format!(
                "vllm:prompt_tokens_total{{engine=\"0\"}} {prompt}\n\
                 vllm:prefix_cache_hits_total{{engine=\"0\"}} {hits}\n\
                 vllm:request_prefill_time_seconds_sum{{engine=\"0\"}} {prefill}\n\
                 vllm:request_prefill_time_seconds_count{{engine=\"0\"}} {n}\n\
                 vllm:request_inference_time_seconds_sum{{engine=\"0\"}} {run}\n\
                 vllm:request_inference_time_seconds_count{{engine=\"0\"}} {n}\n"
            )
        };
        let e = EngineLoad::default();
        let t0 = 1_000_000;
        e.store_totals(parse_totals(&text(1000.0, 0.0, 0.1, 1.0, 2.0)).unwrap(), t0);
        assert_eq!(e.speed(), None, "one scrape is no interval");
        // A scrape sooner than the window after the first extends the stretch: an odd
        // short one (all of its prompt tokens, none of their prefill time) teaches nothing.
        e.store_totals(
            parse_totals(&text(9000.0, 0.0, 0.1, 1.0, 2.0)).unwrap(),
            t0 + 100,
        );
        assert_eq!(e.speed(), None, "a stretch shorter than the window");
        // 10 requests: 20,000 prompt tokens of which 12,000 cached: 8,000 computed in
        // 0.6 s = 75 µs each; 6 s in the batch = 600 ms each.
        let at = t0 + SPEED_WINDOW_MS;
        e.store_totals(
            parse_totals(&text(21_000.0, 12_000.0, 0.7, 7.0, 12.0)).unwrap(),
            at,
        );
        let s = e.speed().unwrap();
        assert_eq!((s.prefill_ns_per_token, s.run_us), (75_000, 600_000));
        // A restarted engine's counters go back: nothing learned from that interval.
        e.store_totals(
            parse_totals(&text(10.0, 0.0, 0.01, 0.1, 1.0)).unwrap(),
            at + 5000,
        );
        assert_eq!(e.speed(), Some(s));
        // Without vLLM's prefill/inference histograms: TTFT − queue and e2e − queue.
        let old = |ttft: f64, queue: f64, e2e: f64, n: f64, prompt: f64| {
            format!(
                "vllm:prompt_tokens_total {prompt}\nvllm:time_to_first_token_seconds_sum {ttft}\n\
                 vllm:request_queue_time_seconds_sum {queue}\n\
                 vllm:e2e_request_latency_seconds_sum {e2e}\n\
                 vllm:e2e_request_latency_seconds_count {n}\n"
            )
        };
        let t = parse_totals(&old(3.0, 1.0, 10.0, 4.0, 5000.0)).unwrap();
        assert_eq!((t.prefill_s, t.run_s, t.run_n), (2.0, 9.0, 4.0));
        assert_eq!(parse_totals("vllm:num_requests_running 1\n"), None);
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
            ..Default::default()
        };
        let idle = (3, 3000, 300);
        assert!(
            load_key(Role::Decode, idle, None, 0)
                < load_key(Role::Decode, (0, 0, 0), Some(&busy), 8)
        );
        assert!(
            load_key(Role::Prefill, idle, None, 0)
                < load_key(Role::Prefill, (0, 0, 0), Some(&busy), 8)
        );
    }

    #[test]
    fn among_equal_requests_decode_goes_where_less_is_left_unless_the_cache_is_nearly_full() {
        let at = |kv: f64| Fresh {
            sample: EngineSample {
                running: 2,
                waiting: 0,
                kv_usage: Some(kv),
            },
            local_at_scrape: 2,
            ..Default::default()
        };
        // Same requests; the one with fewer decode tokens left wins whatever the cache use
        // below nearly full (a scraped number up to an interval old)...
        let (a, b) = (at(0.7), at(0.3));
        assert!(
            load_key(Role::Decode, (2, 0, 40), Some(&a), 4)
                < load_key(Role::Decode, (2, 0, 300), Some(&b), 4)
        );
        // ...but a nearly full cache ranks after it (a new sequence could preempt one).
        let full = at(KV_NEARLY_FULL);
        assert!(
            load_key(Role::Decode, (2, 0, 300), Some(&b), 4)
                < load_key(Role::Decode, (2, 0, 40), Some(&full), 4)
        );
        // Requests still come first.
        assert!(
            load_key(Role::Decode, (1, 0, 900), Some(&full), 4)
                < load_key(Role::Decode, (2, 0, 0), Some(&b), 4)
        );
    }
}
