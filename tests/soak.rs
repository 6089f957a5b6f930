//! Bounded soak: many mixed requests over many connections against 2P+4D zero-delay nodes,
//! one decode node killed and restarted in the middle. No request that started after the
//! failure was detected may fail; file descriptors and RSS return to their warmed-up
//! baseline. Ignored by default (it is a load test); `.ci/run` runs it with a small count:
//! `SOAK_REQUESTS=4000 SOAK_CONNS=200 cargo test --release --test soak -- --ignored`.

mod common;

use common::*;
use serde_json::json;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// With SOAK_DEBUG set, prints the proxy's sockets by state and peer (to find a leak).
fn debug_sockets(pid: u32) {
    if std::env::var("SOAK_DEBUG").is_err() {
        return;
    }
    let cmd = format!("ss -tanp | grep 'pid={pid},' | awk '{{print $1, $5}}' | sort | uniq -c | sort -rn | head -20");
    if let Ok(out) = std::process::Command::new("sh").arg("-c").arg(cmd).output() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// When the load may stop: after `total` requests, and — with a failure to wait for — only
/// once a quarter of that many started after the failure was detected (a fast machine
/// could otherwise finish before detection and test nothing), within `LOAD_LIMIT`.
struct StopRule {
    total: usize,
    detected_us: Option<Arc<AtomicU64>>,
    started_after: AtomicUsize,
}

const LOAD_LIMIT: Duration = Duration::from_secs(30);

impl StopRule {
    fn until(total: usize, detected_us: Option<Arc<AtomicU64>>) -> Self {
        StopRule {
            total,
            detected_us,
            started_after: AtomicUsize::new(0),
        }
    }

    fn done(&self, i: usize, t0: Instant) -> bool {
        if i < self.total {
            return false;
        }
        match &self.detected_us {
            None => true,
            Some(_) => {
                self.started_after.load(Ordering::Relaxed) >= self.total / 4
                    || t0.elapsed() > LOAD_LIMIT
            }
        }
    }

    fn record_start(&self, started_us: u64) {
        if let Some(d) = &self.detected_us {
            if started_us > d.load(Ordering::Relaxed) {
                self.started_after.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs requests over `conns` client threads until `stop` says so; returns (start offset
/// µs, ok) for each.
fn load(url: &str, stop: StopRule, conns: usize, t0: Instant) -> Vec<(u64, bool)> {
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(stop.total)));
    let stop = Arc::new(stop);
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let (url, next, results, stop) =
                (url.to_string(), next.clone(), results.clone(), stop.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let a = agent();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if stop.done(i, t0) {
                            break;
                        }
                        let started = t0.elapsed().as_micros() as u64;
                        stop.record_start(started);
                        let stream_it = (i + c) % 3 == 0;
                        let body = json!({"model": MODEL, "prompt": format!("soak {i}"), "max_tokens": 8, "stream": stream_it});
                        let ok = match a.post(&url).set("Content-Type", "application/json").send_json(body) {
                            Ok(r) => {
                                let mut s = String::new();
                                r.status() == 200
                                    && std::io::Read::read_to_string(&mut r.into_reader(), &mut s).is_ok()
                                    && (!stream_it || s.trim_end().ends_with("data: [DONE]"))
                            }
                            Err(_) => false,
                        };
                        results.lock().unwrap().push((started, ok));
                    }
                })
                .unwrap()
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

#[test]
#[ignore = "load test; run by .ci/run with a small count"]
fn soak_with_a_node_killed_and_restarted() {
    let total = env_usize("SOAK_REQUESTS", 10_000);
    let conns = env_usize("SOAK_CONNS", 1000);
    let ps: Vec<Proc> = (0..2).map(|_| dummy("prefill", &[])).collect();
    let mut ds: Vec<Proc> = (0..4).map(|_| dummy("decode", &[])).collect();
    let yaml = format!(
        "{}circuit_breaker:\n  failure_threshold: 3\n  timeout_duration_seconds: 1\nretry:\n  initial_backoff_ms: 5\ntimeouts:\n  pool_idle_seconds: 0.5\n",
        pd_yaml(&ps.iter().collect::<Vec<_>>(), &ds.iter().collect::<Vec<_>>())
    );
    let proxy = proxy_with(&yaml, true);
    let pid = proxy.child.id();
    let url = proxy.url("/v1/completions");

    // Warm up with the same load so that pools and buffers reach their working size.
    let warm = load(&url, StopRule::until(total, None), conns, Instant::now());
    assert!(warm.iter().all(|r| r.1), "warm-up failures");
    // Idle upstream connections expire after 0.5 s (swept every second): what is left is
    // the proxy's own baseline.
    std::thread::sleep(Duration::from_millis(2000));
    let (fd0, rss0) = (fds(pid), rss_kb(pid));
    debug_sockets(pid);

    let t0 = Instant::now();
    let victim_port = ds[3].addr.port();
    let victim_addr = ds[3].addr.to_string();
    let detected_us = Arc::new(AtomicU64::new(u64::MAX));
    let chaos = {
        let (detected_us, proxy_url) = (detected_us.clone(), proxy.url("/status/instances"));
        let victim = ds.remove(3);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(victim); // kill -9
            let give_up = Instant::now() + Duration::from_secs(10);
            while Instant::now() < give_up {
                let (_, v) = get_json(&proxy_url);
                let down = v["instances"].as_array().unwrap().iter().any(|i| {
                    i["address"] == victim_addr.as_str()
                        && (i["circuit"] == "open" || i["status"] == "unhealthy")
                });
                if down {
                    detected_us.store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(500));
            // Restart on the same port.
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xpyd-dummy"));
            cmd.args([
                "--port",
                &victim_port.to_string(),
                "--mode",
                "decode",
                "--model",
                MODEL,
                "--workers",
                "1",
            ])
            .env("PREFILL_DELAY_PER_TOKEN", "0")
            .env("DECODE_DELAY_PER_TOKEN", "0");
            spawn_listening(cmd)
        })
    };
    let results = load(
        &url,
        StopRule::until(total, Some(detected_us.clone())),
        conns,
        t0,
    );
    let _restarted = chaos.join().unwrap();
    let detected = detected_us.load(Ordering::Relaxed);
    let failed_after: Vec<_> = results
        .iter()
        .filter(|(s, ok)| !ok && *s > detected)
        .collect();
    let failed_before = results
        .iter()
        .filter(|(s, ok)| !ok && *s <= detected)
        .count();
    eprintln!(
        "soak: {} requests over {conns} connections in {:?}; failure detected after {} ms; {failed_before} failed before detection, {} of {} after",
        results.len(),
        t0.elapsed(),
        detected / 1000,
        failed_after.len(),
        results.iter().filter(|(s, _)| *s > detected).count()
    );
    assert!(results.len() >= total);
    assert!(detected != u64::MAX, "the killed node was never detected");
    assert!(
        failed_after.is_empty(),
        "{} requests failed after detection",
        failed_after.len()
    );
    let after = results.iter().filter(|(s, _)| *s > detected).count();
    assert!(
        after > 0,
        "no request ran after detection within the load's time limit"
    );

    // Client connections are gone and idle upstream ones expire (0.5 s, swept every
    // second): back to the baseline, or a leak.
    let settled = poll_until(Duration::from_secs(15), || fds(pid) <= fd0 + 2);
    let (fd1, rss1) = (fds(pid), rss_kb(pid));
    debug_sockets(pid);
    eprintln!("soak: fds {fd0} -> {fd1}, RSS {rss0} kB -> {rss1} kB");
    assert!(settled, "file descriptors leaked: {fd0} -> {fd1}");
    assert!(
        rss1 <= rss0 + rss0 / 2 + 8 * 1024,
        "RSS grew: {rss0} kB -> {rss1} kB"
    );
}
