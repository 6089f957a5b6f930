//! Precise prefix routing: what the engines *actually hold* of the prompt's KV blocks
//! (learned from their KV-cache events into `kv_index`, plus the blocks this proxy just sent
//! and the engine has not announced yet: the pending layer). With the engines' speed known
//! from their metrics, the instance expected to return the first token soonest (prefill of
//! what it lacks + the wait for a batch slot); otherwise the longest holder unless it is
//! overloaded. A new prefix goes to the instance holding the fewest groups when this proxy's
//! counts are the ones that matter (it is the only router, or replicas share placements),
//! else to one with room in its cache; then to its rendezvous home, the same on every
//! replica. Without token ids it is the least-loaded pick (docs/scheduling.md, "KV aware",
//! "New prefixes").

use super::stats::{self, Outcome, Policy};
use super::{
    hash64, in_load_band, least_loaded, rendezvous, requests, Balance, PickContext, Room,
    Scheduler, MAX_DEALS,
};
use crate::config::{Role, SchedulingOptions};
use crate::engine_load::{self, Speed};
use crate::instance::Instance;
use crate::kv_index;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub struct KvAware {
    role: Role,
    /// `cache_threshold`: the share of the uncached prompt one instance must hold beyond
    /// the others for the prefix to count as known (else it is placed as a new one).
    threshold: f64,
    balance: Balance,
}

impl KvAware {
    pub fn new(role: Role, opts: &SchedulingOptions) -> Self {
        KvAware {
            role,
            threshold: opts.cache_threshold,
            balance: Balance::new(opts),
        }
    }
}

impl Scheduler for KvAware {
    /// A peer's new group: its blocks count as sent there (the pending layer, as this
    /// proxy's own picks do) and the group is counted there once (`count_once`).
    fn take_placement(
        &self,
        _instances: &[Arc<Instance>],
        p: &super::prefix_sync::Received<'_>,
    ) -> bool {
        let (inst, key, hashes) = (p.inst, p.key, p.hashes);
        let b = inst.kv_bit.load(Ordering::Relaxed);
        // kv_aware sends no moves: the engines' events say where a group went.
        if b == 0 || hashes.is_empty() || p.from.is_some() {
            return false;
        }
        let idx = kv_index::global();
        let now = crate::resilience::now_ms();
        if idx.pending(key, now) != Some(b - 1) {
            for &k in hashes {
                idx.pend(k, b - 1, now);
            }
        }
        super::prefix_sync::count_once(inst, key);
        true
    }

    fn pick<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let Some(tokens) = ctx.tokens else {
            stats::record(Policy::KvAware, Outcome::NoTokens, 0);
            return least_loaded(self.role, candidates, ctx);
        };
        let idx = kv_index::global();
        let block = idx.block_size.load(Ordering::Relaxed) as usize;
        let bit = |i: &Instance| i.kv_bit.load(Ordering::Relaxed);
        let wanted = candidates
            .iter()
            .filter(|i| ctx.eligible(i) && bit(i) > 0)
            .fold(0u64, |m, i| m | 1 << (bit(i) - 1));
        let mut depth = [0u32; 64];
        let keys = kv_index::prompt_keys(tokens, block);
        let now = crate::resilience::now_ms();
        // The bit (+1) of the instance this proxy last sent the prompt's prefix to, if any.
        let mut latest = 0;
        if wanted != 0 && !keys.is_empty() {
            idx.matched(&keys, wanted, &mut depth);
            // Blocks sent there but not yet announced count as held (`kv_index`, pending).
            if let Some((d, b)) = idx.pending_depth(&keys, wanted, now) {
                depth[b as usize] = depth[b as usize].max(d as u32);
                latest = b + 1;
            }
        }
        let prompt = tokens.len() as u64;
        let blocks_of = |i: &Instance| match bit(i) {
            0 => 0,
            b => depth[b as usize - 1] as u64,
        };
        let held = |i: &Instance| (blocks_of(i) * block as u64).min(prompt);
        // `least`: what every eligible publishing instance holds (a shared header); with
        // fewer than two publishing there is nothing to compare, it is 0.
        let (mut min, mut least, mut publishing, mut deepest) = (u64::MAX, u64::MAX, 0, 0);
        for i in candidates.iter().filter(|i| ctx.eligible(i)) {
            min = min.min(requests(self.role, i));
            if bit(i) > 0 {
                least = least.min(blocks_of(i));
                publishing += 1;
            }
            deepest = deepest.max(blocks_of(i) as usize);
        }
        if min == u64::MAX {
            return None;
        }
        let least_blocks = if publishing < 2 { 0 } else { least as usize };
        let least = (least_blocks as u64 * block as u64).min(prompt);
        // The instance holding the most of the prompt among those not overloaded; among
        // equal holders the highest rendezvous score on the deepest block they hold, so a
        // group stays on one of its holders (and every replica picks the same one) instead
        // of spreading over all of them. It is followed when it holds a good share more
        // than the least holding instance: a header every node holds is not a group's prefix.
        let tie = |i: &Instance| {
            let k = keys.get((blocks_of(i) as usize).wrapping_sub(1)).copied();
            (
                bit(i) == latest,
                hash64(k.unwrap_or(0), i.address.as_bytes()),
            )
        };
        let known =
            |h: u64| h > least && (h - least) as f64 >= self.threshold * (prompt - least) as f64;
        // The group's own first block past what every instance holds (past a shared
        // header): it does not change as the group's holders evict its tail, so the group
        // keeps its home; and every replica computes the same.
        let group = match keys.get(least_blocks.min(keys.len().saturating_sub(1))) {
            Some(&k) => k,
            None => kv_index::chain(0, &tokens[..tokens.len().min(64)]),
        };
        let choose = |room: &Room| -> Option<&'c Arc<Instance>> {
            let by_cost = match self.role {
                Role::Decode => None,
                Role::Prefill | Role::Dual => {
                    // The most any eligible instance holds, in tokens (held follows blocks).
                    let most = (deepest as u64 * block as u64).min(prompt);
                    soonest_first_token(candidates, ctx, prompt, most, &held, room, group)
                }
            };
            if by_cost.is_some() {
                return by_cost;
            }
            if let Some(best) = candidates
                .iter()
                .filter(|i| {
                    ctx.eligible(i) && !self.balance.overloaded(i, requests(self.role, i), min)
                })
                .max_by_key(|i| (held(i), tie(i)))
                .filter(|b| known(held(b)))
            {
                return Some(best);
            }
            // A new prefix (or its holders are overloaded): within the load band, first the
            // instances holding the fewest groups (as cache_aware deals; all equal when
            // groups are not counted, see `Room::groups`), since counts move at once and the
            // engines' blocks only a prefill later; among those one with room; then the
            // rendezvous home keyed by the group's first block, so that every replica sends
            // the group's first requests to the same node.
            let band = |i: &Instance| in_load_band(self.role, i, min);
            let fewest = candidates
                .iter()
                .filter(|i| ctx.eligible(i) && band(i))
                .map(|i| room.groups(i))
                .min();
            let dealt = |i: &Instance| band(i) && fewest.is_none_or(|f| room.groups(i) <= f);
            rendezvous(candidates, ctx, group, |i| dealt(i) && room.has(i))
                .or_else(|| rendezvous(candidates, ctx, group, dealt))
                .or_else(|| rendezvous(candidates, ctx, group, band))
        };
        let outcome_of = |chosen: &Instance| {
            let blocks = blocks_of(chosen);
            if wanted == 0 {
                Outcome::NoEvents
            } else if blocks == 0 && deepest > 0 && known(deepest as u64 * block as u64) {
                Outcome::Imbalanced // the prefix is held, but by nodes outside the load band
            } else if blocks > 0 {
                Outcome::Hit
            } else {
                Outcome::NoMatch
            }
        };
        // A new group (nothing held or pending anywhere that counts) is counted where it
        // went. Dealt by count, the deal stands only if the chosen instance's count is still
        // the one it was dealt by (`GroupCounts`): else another worker's group went there
        // meanwhile, and this one is dealt again on the new counts.
        let mut deals = 0;
        let (chosen, outcome) = loop {
            // Room for a new group: at most one prompt's worth of blocks above the emptiest.
            let room = Room::of(candidates, ctx, keys.len().max(1) as u64, now);
            let chosen = choose(&room)?;
            let outcome = outcome_of(chosen);
            if outcome != Outcome::NoMatch || keys.is_empty() || !ctx.exclude.is_empty() {
                break (chosen, outcome);
            }
            deals += 1;
            if room.reserve(chosen) {
                super::prefix_sync::keep_reserved(chosen, group);
                break (chosen, outcome);
            }
            if deals == MAX_DEALS {
                super::prefix_sync::count_once(chosen, group);
                break (chosen, outcome);
            }
        };
        let blocks = blocks_of(chosen);
        // The leg is counted by what the engine must compute (see `scheduler::take_cached`).
        super::note_cached(chosen.id, held(chosen));
        // The engine will hold the prompt's blocks once it has run it: say so now, for the
        // picks that come before its events do. The deepest block already known is
        // refreshed, the rest of the chain added.
        if let b @ 1.. = bit(chosen) {
            for &k in &keys[(blocks as usize).saturating_sub(1)..] {
                idx.pend(k, b - 1, now);
            }
        }
        // A new group is told to the peer replicas, whose next requests of the group then
        // follow it before the engine's events say so.
        if deals > 0 && super::prefix_sync::enabled() {
            super::prefix_sync::offer(super::prefix_sync::Placement {
                instance: Arc::clone(chosen),
                key: group,
                hashes: keys.clone(),
                from: None,
                dealt_at: None,
            });
        }
        stats::record(Policy::KvAware, outcome, blocks);
        Some(chosen)
    }
}

/// The instance expected to return the prompt's first token soonest, when every eligible
/// instance's engine speed is known (`EngineLoad::speed`, learned from its vLLM timing
/// metrics; else None and the balance thresholds decide): for each, the wait for a batch
/// slot plus the prefill of what it does not hold, and that prefill once more for blocks
/// another instance already holds (`most`: the most any eligible one holds; a copy evicts
/// other prefixes). Near-equal estimates
/// (within a tenth of computing the whole prompt) go to the instance holding more, then to
/// one holding the fewest groups (`Room::groups`), then to one with room for a new group,
/// then to the group's rendezvous home, so that a group stays on one node and replicas agree on
/// new ones (docs/scheduling.md, "KV aware").
fn soonest_first_token<'c>(
    candidates: &'c [Arc<Instance>],
    ctx: &PickContext<'_>,
    prompt: u64,
    most: u64,
    held: &impl Fn(&Instance) -> u64,
    room: &Room,
    group: u64,
) -> Option<&'c Arc<Instance>> {
    let mut fastest = u64::MAX;
    for i in candidates.iter().filter(|i| ctx.eligible(i)) {
        fastest = fastest.min(i.engine.speed()?.prefill_ns_per_token);
    }
    let cost = |i: &Instance, mut speed: Speed| {
        // Every engine's prefill is priced at the fastest learned rate. The learned rates
        // are not comparable between engines: a rate is prefill time over computed tokens,
        // and every prefill carries a fixed cost (an engine step), so an engine that mostly
        // computes short suffixes — a group's holder — looks several times slower per token
        // than one computing whole prompts (measured: 85 against 314 µs per token on like
        // engines). Each replica also learns its own; priced apart, a new group's home would
        // follow that bias, and differ between replicas, instead of the shared tie-break.
        speed.prefill_ns_per_token = fastest;
        // Recomputing blocks another instance holds makes a second copy, which takes cache
        // space that other prefixes' blocks held: charged as their prefill once more.
        // (Saturating: an instance's health may change between the passes.)
        let copied = most.saturating_sub(held(i)) * speed.prefill_ns_per_token / 1000;
        expected_first_token_us(i, prompt - held(i), speed) + copied
    };
    let (mut best, mut first) = (u64::MAX, None);
    for i in candidates.iter().filter(|i| ctx.eligible(i)) {
        let c = cost(i, i.engine.speed()?);
        if c < best {
            (best, first) = (c, Some(i));
        }
    }
    let margin = (prompt * fastest / 10_000).max(1_000);
    // Second pass over the same estimates (in-flight counts may have moved meanwhile: the
    // cheapest of the first pass stands in if none is left in the band).
    candidates
        .iter()
        .filter(|i| {
            ctx.eligible(i)
                && i.engine
                    .speed()
                    .is_some_and(|s| cost(i, s) <= best.saturating_add(margin))
        })
        .max_by_key(|i| {
            (
                held(i),
                std::cmp::Reverse(room.groups(i)),
                room.has(i),
                hash64(group, i.address.as_bytes()),
            )
        })
        .or(first)
}

/// Microseconds until `i` would return the first token of a prompt of which it must
/// compute `uncached` tokens: its prefill at the engine's learned speed, plus, when the
/// engine's batch is full, a slot's share of a request's time in the batch for every
/// request ahead. The requests on the engine are this proxy's in flight there plus the
/// others it reported at the last scrape; the batch is the most it was seen running with
/// requests waiting (never seen full: no wait).
#[inline]
fn expected_first_token_us(i: &Instance, uncached: u64, speed: Speed) -> u64 {
    let prefill = uncached * speed.prefill_ns_per_token / 1000;
    let batch = i.engine.batch_seen();
    let others = i.engine.last().map_or(0, |f| engine_load::others(&f));
    // Behind a full batch once this request joins (itself included): each waits a slot's
    // share of a request's time in the batch.
    let ahead = engine_load::queued(i.in_flight() + others + 1, batch);
    prefill + ahead * speed.run_us / batch.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_load::EngineSample;
    use crate::instance::InFlight;
    use crate::scheduler::testing::{instances, learn_speed};

    fn ctx(tokens: &[u32]) -> PickContext<'_> {
        PickContext {
            tokens: Some(tokens),
            prompt_tokens: tokens.len() as u64,
            ..Default::default()
        }
    }

    /// Gives `c`'s instances the bits `first..`, away from other tests' bits in the
    /// process-wide index.
    fn bits(c: &[Arc<Instance>], first: u32) {
        kv_index::global().block_size.store(16, Ordering::Relaxed);
        for (k, i) in c.iter().enumerate() {
            i.kv_bit.store(first + 1 + k as u32, Ordering::Relaxed);
        }
    }

    #[test]
    fn follows_cached_blocks_until_overloaded() {
        let c = instances(3, Role::Prefill);
        bits(&c, 40);
        let idx = kv_index::global();
        let tokens: Vec<u32> = (5000..5000 + 320).collect();
        for &key in &kv_index::prompt_keys(&tokens, 16)[..16] {
            idx.add(key, 41); // instance 1 holds 256 of the 320 tokens
        }
        let p = KvAware::new(Role::Prefill, &SchedulingOptions::default());
        for _ in 0..20 {
            assert!(Arc::ptr_eq(p.pick(&c, &ctx(&tokens)).unwrap(), &c[1]));
        }
        // 8 requests in flight there: not overloaded yet (`balance_abs_threshold`), the
        // prefix still wins; with 9 it is, and the prompt goes elsewhere.
        let mut busy: Vec<_> = (0..8).map(|_| InFlight::new(&c[1], 100, 0)).collect();
        assert!(Arc::ptr_eq(p.pick(&c, &ctx(&tokens)).unwrap(), &c[1]));
        busy.push(InFlight::new(&c[1], 100, 0));
        assert!(!Arc::ptr_eq(p.pick(&c, &ctx(&tokens)).unwrap(), &c[1]));
        // Without token ids: least loaded.
        let ctx = PickContext {
            prompt_tokens: 320,
            ..Default::default()
        };
        assert!(!Arc::ptr_eq(p.pick(&c, &ctx).unwrap(), &c[1]));
    }

    #[test]
    fn an_engine_seen_with_a_full_batch_is_overloaded_sooner() {
        use crate::engine_load::EngineSample;
        let c = instances(3, Role::Prefill);
        bits(&c, 50);
        let idx = kv_index::global();
        let tokens: Vec<u32> = (7000..7000 + 320).collect();
        for &key in &kv_index::prompt_keys(&tokens, 16)[..16] {
            idx.add(key, 51); // instance 1 holds 256 of the 320 tokens
        }
        let p = KvAware::new(Role::Prefill, &SchedulingOptions::default());
        let _busy: Vec<_> = (0..3).map(|_| InFlight::new(&c[1], 100, 0)).collect();
        // 3 requests ahead of the others: under the configured 8, the prefix wins.
        assert!(Arc::ptr_eq(p.pick(&c, &ctx(&tokens)).unwrap(), &c[1]));
        // Its engine was once seen running 4 with a queue (the sample itself has expired,
        // so only the batch it showed counts): more than 2 ahead is overloaded now.
        c[1].engine.store(
            EngineSample {
                running: 4,
                waiting: 1,
                kv_usage: None,
            },
            0,
        );
        c[1].engine.failed(std::time::Duration::ZERO);
        assert!(c[1].engine.last().is_none());
        assert!(!Arc::ptr_eq(p.pick(&c, &ctx(&tokens)).unwrap(), &c[1]));
    }

    /// Engines whose speed is known (`learn_speed`), idle now: this proxy has nothing in
    /// flight, nor does anyone else.
    fn learned(c: &[Arc<Instance>]) {
        learn_speed(c);
        for i in c {
            i.engine.store(EngineSample::default(), 0);
        }
    }

    /// With the engines' speed known, the pick is the soonest first token: the holder while
    /// it has a free slot, and while waiting for one costs less than computing the prefix
    /// elsewhere; then a free node (which then holds the group too).
    #[test]
    fn soonest_first_token_weighs_the_queue_against_the_prefill() {
        let c = instances(4, Role::Dual);
        bits(&c, 20);
        learned(&c);
        let idx = kv_index::global();
        // 2,000 cached tokens + a 96-token suffix: 7 ms to compute there, 157 ms elsewhere.
        let tokens: Vec<u32> = (9000..9000 + 2096).collect();
        for &key in &kv_index::prompt_keys(&tokens, 16)[..125] {
            idx.add(key, 21); // instance 1
        }
        let p = KvAware::new(Role::Dual, &SchedulingOptions::default());
        let mut busy = Vec::new();
        // Free slots (0..3 in flight), then the batch's last slot (3 in flight): the holder.
        for _ in 0..4 {
            assert!(Arc::ptr_eq(p.pick(&c, &ctx(&tokens)).unwrap(), &c[1]));
            busy.push(InFlight::new(&c[1], 100, 0));
        }
        // Batch full: one ahead = 150 ms of waiting + 7 ms, two ahead 307 ms, against
        // 157 ms elsewhere + 150 ms for the copy: still the holder (near-equal at two: the
        // one holding more).
        for _ in 0..2 {
            assert!(Arc::ptr_eq(p.pick(&c, &ctx(&tokens)).unwrap(), &c[1]));
            busy.push(InFlight::new(&c[1], 100, 0));
        }
        // Three ahead (457 ms): a free node computes it sooner.
        let moved = p.pick(&c, &ctx(&tokens)).unwrap();
        assert!(!Arc::ptr_eq(moved, &c[1]));
        drop(busy);
        // Two replicas with the same view (instances without KV bits: nothing learned,
        // nothing pending) agree on every new prefix's node, and use all of them.
        let d = instances(4, Role::Dual);
        learned(&d);
        let q = KvAware::new(Role::Dual, &SchedulingOptions::default());
        let mut homes = std::collections::HashSet::new();
        for g in 0..24u32 {
            let t: Vec<u32> = (0..600).map(|k| 100_000 + g * 1000 + k).collect();
            let (x, y) = (p.pick(&d, &ctx(&t)).unwrap(), q.pick(&d, &ctx(&t)).unwrap());
            assert!(Arc::ptr_eq(x, y), "group {g}");
            homes.insert(x.address.clone());
        }
        assert_eq!(homes.len(), 4);
    }

    /// With another router in front of the engines, new groups go to the engines holding
    /// the fewest blocks (as their events tell every replica alike), with or without the
    /// engines' speed, and by the hash among equal caches. This proxy alone, it deals them
    /// by its own counts first (they move at once, the engines' blocks a prefill later).
    #[test]
    fn new_groups_are_dealt_by_count_or_to_the_emptiest_caches() {
        for with_speed in [false, true] {
            let c = instances(4, Role::Dual);
            bits(&c, 30);
            if with_speed {
                learned(&c);
            }
            let p = KvAware::new(Role::Dual, &SchedulingOptions::default());
            let others = |seen: bool| {
                let at = if seen {
                    crate::resilience::now_ms().max(1)
                } else {
                    0
                };
                c[2].kv_stats.unsent_ms.store(at, Ordering::Relaxed);
            };
            let deal = |first: u32, n: u32| {
                let mut per = [0; 4];
                for g in first..first + n {
                    let t: Vec<u32> = (0..400).map(|k| g * 1000 + k).collect();
                    let at = p.pick(&c, &ctx(&t)).unwrap();
                    per[c.iter().position(|i| Arc::ptr_eq(i, at)).unwrap()] += 1;
                }
                per
            };
            others(true);
            for (i, blocks) in c.iter().zip([300, 40, 300, 300]) {
                i.kv_stats.blocks.store(blocks, Ordering::Relaxed);
            }
            // 400 tokens = 25 blocks: instance 1 is within one prompt of the emptiest.
            assert_eq!(deal(300, 12), [0, 12, 0, 0], "speed known: {with_speed}");
            // Alone: instance 1 counts twelve groups, so the next 24 go to the other three.
            others(false);
            assert_eq!(deal(400, 24), [8, 0, 8, 8], "speed known: {with_speed}");
            assert_eq!(deal(500, 12), [4, 0, 4, 4], "speed known: {with_speed}");
            // Equal counts: among them, to the emptiest cache.
            assert_eq!(deal(600, 1), [0, 1, 0, 0], "speed known: {with_speed}");
            // Equal caches, another router: by the hash (the same on every replica).
            others(true);
            for i in &c {
                i.kv_stats.blocks.store(300, Ordering::Relaxed);
            }
            let homes = deal(700, 24);
            assert!(
                homes.iter().all(|&h| h > 0),
                "speed known: {with_speed}: {homes:?}"
            );
        }
    }

    /// A new prefix's first request is placed by rendezvous; the ones after it follow the
    /// blocks sent there (pending) before any event confirms them, until the engine says
    /// it dropped them.
    #[test]
    fn pending_blocks_steer_until_removed_or_cleared() {
        let c = instances(4, Role::Dual);
        bits(&c, 50);
        let idx = kv_index::global();
        let p = KvAware::new(Role::Dual, &SchedulingOptions::default());
        let prompt = |q: u32| -> Vec<u32> {
            let mut t: Vec<u32> = (7000..7000 + 256).collect();
            t.extend([q; 16]);
            t
        };
        let first = p.pick(&c, &ctx(&prompt(0))).unwrap();
        // Requests in flight there (the group's first among them) do not move the group.
        let _busy: Vec<_> = (0..8).map(|_| InFlight::new(first, 300, 0)).collect();
        for q in 1..10 {
            let i = p.pick(&c, &ctx(&prompt(q))).unwrap();
            assert!(Arc::ptr_eq(i, first), "request {q} left the group's node");
        }
        let b = first.kv_bit.load(Ordering::Relaxed) - 1;
        let keys = kv_index::prompt_keys(&prompt(0), 16);
        assert_eq!(idx.pending(keys[15], crate::resilience::now_ms()), Some(b));
        // BlockRemoved of the group's blocks (as the subscriber applies it): gone.
        for &k in &keys {
            idx.unpend(k, b);
        }
        assert_eq!(idx.pending(keys[15], crate::resilience::now_ms()), None);
        // Pending again, then AllBlocksCleared voids every older entry of that instance.
        p.pick(&c, &ctx(&prompt(11)));
        let holder = (0..4)
            .find(|&k| idx.pending(keys[15], crate::resilience::now_ms()) == Some(50 + k as u32));
        let holder = holder.expect("a pick writes pending entries") as u32 + 50;
        std::thread::sleep(std::time::Duration::from_millis(2)); // ms clock: a later ms
        idx.void_pending(holder);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(idx.pending(keys[15], crate::resilience::now_ms()), None);
    }

    /// Workers dealing new groups at the same instant keep the counts even.
    #[test]
    fn workers_dealing_at_once_keep_the_counts_even() {
        let c = instances(4, Role::Dual);
        bits(&c, 60);
        let p = KvAware::new(Role::Dual, &SchedulingOptions::default());
        crate::scheduler::testing::deal_in_rounds(&c, 300, |g| {
            let base = 1_000_000 + g * 64;
            let t: Vec<u32> = (base..base + 64).collect();
            p.pick(&c, &ctx(&t)).unwrap();
        });
    }

    /// Two schedulers (two proxy replicas) that have learned nothing agree on every new
    /// prefix's node, and still use all of them.
    #[test]
    fn new_prefixes_get_the_same_home_on_every_replica() {
        let c = instances(4, Role::Dual); // no KV bits: nothing learned, nothing pending
        let (a, b) = (
            KvAware::new(Role::Dual, &SchedulingOptions::default()),
            KvAware::new(Role::Dual, &SchedulingOptions::default()),
        );
        let mut homes = std::collections::HashSet::new();
        for g in 0..40u32 {
            let t: Vec<u32> = (0..200).map(|k| g * 1000 + k).collect();
            let (x, y) = (a.pick(&c, &ctx(&t)).unwrap(), b.pick(&c, &ctx(&t)).unwrap());
            assert!(Arc::ptr_eq(x, y), "group {g}");
            homes.insert(x.address.clone());
        }
        assert_eq!(homes.len(), 4);
        // Outside the load band the home passes the group on (spread stays bounded).
        let t: Vec<u32> = (0..200).collect();
        let home = a.pick(&c, &ctx(&t)).unwrap();
        let _busy: Vec<_> = (0..5).map(|_| InFlight::new(home, 0, 0)).collect();
        assert!(!Arc::ptr_eq(a.pick(&c, &ctx(&t)).unwrap(), home));
    }
}
