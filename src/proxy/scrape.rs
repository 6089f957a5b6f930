//! The engine-metrics scraper: a control-side thread (never a worker) that reads every
//! instance's Prometheus `/metrics` at a fixed interval, all instances in parallel, each with
//! a timeout, and publishes vLLM's queue and KV-cache numbers, and the engine's speed learned
//! from its timing counters, into the instance's `EngineLoad` for the schedulers. A failure
//! is counted and, once the last good sample is three intervals old, the sample is dropped:
//! routing falls back to the proxy's own in-flight counts, exactly as for an engine without
//! these metrics.
//!
//! While an engine that has requests in flight is still being learned (its batch never seen
//! full, or its speed unknown), rounds come four times as often, for at most
//! `LEARNING_ROUNDS` rounds per instance: at a cold start `kv_aware` routes by the balance
//! rule until it knows every engine's speed, and counts no wait for a batch slot until it
//! has seen the batch full, so every interval without them piles requests onto the nodes
//! that hold the new prefixes (docs/scheduling.md, "KV aware").

use super::contain::step;
use crate::config::EngineMetricsConfig;
use crate::engine_load;
use crate::http::blocking;
use crate::instance::Instance;
use crate::shared::Shared;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Fast rounds an instance may ask for while it is being learned (then: the interval).
const LEARNING_ROUNDS: u32 = 40;

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("xpyd-scrape".into())
        .spawn(move || run(&shared))?;
    Ok(())
}

/// Whether `inst`'s engine still has something to teach that only a busy engine shows.
fn learning(inst: &Instance) -> bool {
    inst.in_flight() > 0 && (inst.engine.batch_seen() == 0 || inst.engine.speed().is_none())
}

fn run(shared: &Shared) {
    // The loop ticks every quarter interval; a round runs at every fourth tick, or at the
    // next one while an engine is being learned.
    let mut next = Instant::now();
    let mut ticks_since_round = u32::MAX;
    // Fast rounds each instance (by id) has used.
    let mut fast: HashMap<u64, u32> = HashMap::new();
    let mut unsynced = Unsynced::default();
    loop {
        let cfg = shared.policy.load().engine_metrics.clone();
        ticks_since_round = ticks_since_round.saturating_add(1);
        if cfg.enabled {
            let topo = shared.topology.load_full();
            let instances: Vec<&Arc<Instance>> = topo.instances().collect();
            let now = crate::resilience::now_ms();
            for i in &instances {
                i.engine.peers.expire(now); // peer replicas that stopped reporting
            }
            fast.retain(|id, _| instances.iter().any(|i| i.id == *id));
            let learners: Vec<u64> = instances
                .iter()
                .filter(|i| learning(i))
                .map(|i| i.id)
                .collect();
            let hurry = learners
                .iter()
                .any(|id| fast.get(id).is_none_or(|&used| used < LEARNING_ROUNDS));
            if ticks_since_round >= 4 || hurry {
                if ticks_since_round < 4 {
                    for id in learners {
                        *fast.entry(id).or_default() += 1;
                    }
                }
                ticks_since_round = 0;
                // In parallel: one slow or dead engine must not delay the others' numbers.
                std::thread::scope(|s| {
                    for inst in instances {
                        let cfg = &cfg;
                        let _ = std::thread::Builder::new()
                            .name("xpyd-scrape-one".into())
                            .spawn_scoped(s, move || {
                                step(format_args!("scraping {}", inst.address), || {
                                    scrape(inst, cfg)
                                })
                            });
                    }
                });
                unsynced.round(shared, &topo);
            }
        }
        next += cfg.interval / 4;
        let now = Instant::now();
        if next < now {
            next = now; // a round longer than a tick: the next tick at once
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
    let (sample, totals) = engine_load::parse_metrics(&text);
    // Only until the index has a block size (a scrape's or an event's): then the text
    // need not be searched again.
    let idx = crate::kv_index::global();
    if inst.kv_bit.load(Ordering::Relaxed) > 0 && idx.block_size.load(Ordering::Relaxed) == 0 {
        if let Some(size) = engine_load::block_size(&text) {
            idx.learn_block_size(size, false, crate::resilience::now_ms());
        }
    }
    if let Some(t) = totals {
        inst.engine.store_totals(t, crate::resilience::now_ms());
    }
    match sample {
        // The local count at the moment the numbers arrived: see `unseen_requests`.
        Some(s) => inst.engine.store(s, inst.in_flight()),
        None => inst.engine.failed(max_age),
    }
}

/// Notices another router in front of cache_aware's instances while `prefix_sync` has no
/// peers: engines that keep reporting requests this proxy did not send. cache_aware deals
/// new groups by its own counts, which another replica's do not match, so the two would
/// place a group's first requests apart (docs/scheduling.md, "Replicas"). Said once.
#[derive(Default)]
struct Unsynced {
    rounds: u32,
    said: bool,
}

impl Unsynced {
    /// Rounds in a row with unseen requests before it is said.
    const ROUNDS: u32 = 5;

    fn round(&mut self, shared: &Shared, topo: &crate::topology::Topology) {
        if self.said || !shared.policy.load().prefix_sync.peers.is_empty() {
            return;
        }
        use crate::config::{Role, SchedulerKind};
        let unseen = topo.models.iter().any(|m| {
            [Role::Prefill, Role::Decode, Role::Dual]
                .into_iter()
                .filter(|&r| m.roles.for_role(r, m.kind) == SchedulerKind::CacheAware)
                .flat_map(|r| m.role_set(r).instances.iter())
                .any(|i| i.engine.last().is_some_and(|f| engine_load::others(&f) > 0))
        });
        self.rounds = if unseen { self.rounds + 1 } else { 0 };
        if self.rounds >= Self::ROUNDS {
            self.said = true;
            crate::warn!(
                "cache_aware: the instances keep serving requests this proxy did not send; if \
                 other xpyd replicas route to them, list them in prefix_sync.peers so that \
                 the replicas place prefix groups alike (docs/scheduling.md, \"Replicas\")"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_load::EngineSample;

    fn shared(yaml: &str) -> Arc<Shared> {
        Shared::new(&crate::config::Config::from_yaml(yaml).unwrap(), 1)
    }

    fn busy(shared: &Shared, others: u64) {
        for i in shared.topology.load().instances() {
            let s = EngineSample {
                running: others,
                ..Default::default()
            };
            i.engine.store(s, 0);
        }
    }

    /// Said after five rounds in a row of requests this proxy did not send, and only for
    /// cache_aware without peers.
    #[test]
    fn another_router_in_front_of_cache_aware_is_noticed() {
        let base = "model: m\ndual: [\"127.0.0.1:9\"]\n";
        let s = shared(&format!("{base}scheduling: cache_aware\n"));
        let mut u = Unsynced::default();
        busy(&s, 2);
        for _ in 0..Unsynced::ROUNDS - 1 {
            u.round(&s, &s.topology.load());
        }
        assert!(!u.said);
        busy(&s, 0);
        u.round(&s, &s.topology.load()); // a quiet round starts over
        busy(&s, 2);
        for _ in 0..Unsynced::ROUNDS {
            u.round(&s, &s.topology.load());
        }
        assert!(u.said);
        for yaml in [
            format!("{base}scheduling: kv_aware\n"),
            format!("{base}scheduling: cache_aware\nadmin_api_key: k\nprefix_sync:\n  peers: [\"h:1\"]\n"),
        ] {
            let s = shared(&yaml);
            let mut u = Unsynced::default();
            busy(&s, 2);
            for _ in 0..2 * Unsynced::ROUNDS {
                u.round(&s, &s.topology.load());
            }
            assert!(!u.said, "{yaml}");
        }
    }
}
