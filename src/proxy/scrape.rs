//! The engine-metrics scraper: a control-side thread (never a worker) that reads every
//! instance's Prometheus `/metrics` at a fixed interval, all instances in parallel, each with
//! a timeout, and publishes vLLM's queue and KV-cache numbers, and the engine's speed learned
//! from its timing counters, into the instance's `EngineLoad` for the schedulers. A failure
//! is counted and, once the last good sample is three intervals old, the sample is dropped:
//! routing falls back to the proxy's own in-flight counts, exactly as for an engine without
//! these metrics.

use crate::config::EngineMetricsConfig;
use crate::engine_load;
use crate::http::blocking;
use crate::instance::Instance;
use crate::shared::Shared;
use std::sync::Arc;
use std::time::Instant;

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("xpyd-scrape".into())
        .spawn(move || run(&shared))?;
    Ok(())
}

fn run(shared: &Shared) {
    let mut next = Instant::now();
    loop {
        let cfg = shared.policy.load().engine_metrics.clone();
        if cfg.enabled {
            let topo = shared.topology.load_full();
            let instances: Vec<&Arc<Instance>> = topo.instances().collect();
            // In parallel: one slow or dead engine must not delay the others' numbers.
            std::thread::scope(|s| {
                for inst in instances {
                    let cfg = &cfg;
                    let _ = std::thread::Builder::new()
                        .name("xpyd-scrape-one".into())
                        .spawn_scoped(s, move || scrape(inst, cfg));
                }
            });
        }
        next += cfg.interval;
        let now = Instant::now();
        if next < now {
            next = now; // a round longer than the interval: start the next one at once
        }
        std::thread::sleep(next - now);
    }
}

fn scrape(inst: &Instance, cfg: &EngineMetricsConfig) {
    let max_age = cfg.interval * 3;
    let answer = blocking::request(&inst.address, "GET", "/metrics", None, cfg.timeout, |_| {});
    let text = match &answer {
        Ok(r) if r.status == 200 => String::from_utf8_lossy(&r.body),
        _ => Default::default(),
    };
    if let Some(t) = engine_load::parse_totals(&text) {
        inst.engine.store_totals(t);
    }
    match engine_load::parse(&text) {
        // The local count at the moment the numbers arrived: see `unseen_requests`.
        Some(s) => inst.engine.store(s, inst.in_flight()),
        None => inst.engine.failed(max_age),
    }
}
