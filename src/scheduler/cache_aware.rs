//! Prefix-cache-aware routing. The "approximate radix tree" is a block-hash chain, the
//! scheme vLLM's own prefix cache uses: the prompt text is cut into fixed blocks and block k
//! is keyed by a hash of blocks 0..=k, so one lookup per block finds whether a prefix was
//! routed before and to which instance.
//!
//! The index is one `PrefixTable` per model and role, shared by every worker (fixed size,
//! atomics, no lock): a prefix seen on one worker steers the picks of all of them.

use super::prefix_index::{shared_table, PrefixTable};
use super::prefix_sync;
use super::stats::{self, Outcome, Policy};
use super::{
    hash64, in_load_band, least_loaded, rendezvous, requests, Balance, GroupCounts, PickContext,
    Scheduler, MAX_DEALS,
};
use crate::config::{Role, SchedulingOptions};
use crate::instance::Instance;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Bytes per prefix block.
pub const BLOCK: usize = 64;

pub struct CacheAware {
    role: Role,
    threshold: f64,
    balance: Balance,
    table: Arc<PrefixTable>,
    /// This replica's last new groups dealt by count (`prefix_sync`).
    recent: prefix_sync::RecentDeals,
}

impl CacheAware {
    pub fn new(model: &str, role: Role, o: &SchedulingOptions) -> Self {
        CacheAware {
            role,
            threshold: o.cache_threshold,
            balance: Balance::new(o),
            table: shared_table(model, role, o.max_tree_size),
            recent: Default::default(),
        }
    }
}

/// Chain hashes of the full blocks of `text`.
pub(crate) fn block_hashes(text: &[u8]) -> Vec<u64> {
    let mut h = 0u64;
    // Collected from an iterator of known length: one allocation and no capacity check per
    // block, which a `push` per block cost as much as the hashing.
    text.chunks_exact(BLOCK)
        .map(|block| {
            h = hash64(h, block);
            h
        })
        .collect()
}

/// The number of leading blocks of `hashes` the table knows with an instance `ok` accepts,
/// and that instance. Blocks are inserted as chains, so "block k known" implies (up to
/// eviction) "blocks 0..k known": a binary search needs log2(blocks) lookups instead of one
/// per block.
fn longest<'a>(
    table: &PrefixTable,
    hashes: &[u64],
    find: impl Fn(u64) -> Option<&'a Arc<Instance>>,
) -> Option<(usize, &'a Arc<Instance>)> {
    let probe = |k: usize| table.get(hashes[k - 1]).and_then(&find);
    // The whole prompt seen before is the common case for retries and repeated prompts.
    if let Some(i) = (!hashes.is_empty()).then(|| probe(hashes.len())).flatten() {
        return Some((hashes.len(), i));
    }
    let (mut lo, mut hi, mut best) = (0usize, hashes.len().saturating_sub(1), None);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        match probe(mid) {
            Some(i) => {
                lo = mid;
                best = Some((mid, i));
            }
            None => hi = mid - 1,
        }
    }
    best
}

impl Scheduler for CacheAware {
    /// A peer's placement; and when it is a new group dealt onto the same node at the same
    /// count as one this replica dealt a moment ago, the two replicas dealt at once from
    /// the same counts, and that node is now a group ahead: the group with the lower
    /// rendezvous score there moves to the instance with the fewest groups (every replica
    /// that sees both decides the same), and the move is sent to the peers.
    fn take_placement(&self, instances: &[Arc<Instance>], p: &prefix_sync::Received<'_>) -> bool {
        let taken = prefix_sync::take(&self.table, instances, p);
        let now = crate::resilience::now_ms();
        let own = p
            .dealt_at
            .filter(|_| taken && p.from.is_none())
            .and_then(|c| self.recent.collided(p.inst.id, c, p.key, now));
        if let Some(own) = own {
            self.part_collided(instances, p, &own);
        }
        taken
    }

    fn pick<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>> {
        self.place(candidates, ctx)
    }
}

impl CacheAware {
    /// Two new groups, this replica's `own` and a peer's `p`, dealt onto one node at one
    /// count (`take_placement`): the one with the lower rendezvous score for that node
    /// moves to the available instance with the fewest groups (ties: the moving group's
    /// rendezvous home), when that node is two or more groups ahead of it.
    fn part_collided(
        &self,
        instances: &[Arc<Instance>],
        p: &prefix_sync::Received<'_>,
        own: &prefix_sync::Deal,
    ) {
        let x = p.inst;
        let score = |key: u64| (hash64(key, x.address.as_bytes()), key);
        let (key, hashes) = if score(own.key) < score(p.key) {
            (own.key, &own.hashes[..])
        } else {
            (p.key, p.hashes)
        };
        let groups = |i: &Instance| i.prefix_groups.load(Ordering::Relaxed);
        let to = instances
            .iter()
            .filter(|i| !Arc::ptr_eq(i, x) && i.is_available())
            .min_by_key(|i| {
                (
                    groups(i),
                    std::cmp::Reverse(hash64(key, i.address.as_bytes())),
                )
            });
        let Some(to) = to.filter(|to| groups(x) >= groups(to) + 2) else {
            return;
        };
        self.table.insert_chain(hashes, PrefixTable::slot_id(to.id));
        prefix_sync::move_count(x, to);
        prefix_sync::STATS.parted.fetch_add(1, Ordering::Relaxed);
        if prefix_sync::enabled() {
            prefix_sync::offer(prefix_sync::Placement {
                instance: to.clone(),
                key,
                hashes: hashes.to_vec(),
                from: Some(x.clone()),
                dealt_at: None,
            });
        }
    }

    fn place<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>> {
        let min = candidates
            .iter()
            .filter(|i| ctx.eligible(i))
            .map(|i| requests(self.role, i))
            .min()?;
        let overloaded = |i: &Instance| self.balance.overloaded(i, requests(self.role, i), min);
        let own;
        let hashes: &[u64] = match ctx.prompt_hashes {
            Some(kept) => kept.get_or_init(|| block_hashes(ctx.prompt_text)),
            None => {
                own = block_hashes(ctx.prompt_text);
                &own
            }
        };
        let find = |sid: u64| {
            candidates
                .iter()
                .find(|i| PrefixTable::slot_id(i.id) == sid && ctx.eligible(i))
        };
        let found = longest(&self.table, hashes, find);
        // A new prefix group goes to the instance with the fewest groups (this replica's
        // and, with `prefix_sync`, its peers'), among those within the load band; ties, and
        // a group moved off an overloaded node, to the rendezvous home keyed by the first
        // block past what is known. Dealt by count, not by room as kv_aware's are (`Room`):
        // counts change only as groups are placed, so replicas that share placements see
        // the same ones (docs/scheduling.md, "New prefixes", "Replicas").
        let key_at = |known: usize| match hashes.get(known.min(hashes.len().saturating_sub(1))) {
            Some(&h) => h,
            None => hash64(0, ctx.prompt_text),
        };
        let home = |key: u64, counts: Option<&GroupCounts>| {
            let ok = |i: &Instance| !overloaded(i) && in_load_band(self.role, i, min);
            let groups = |i: &Instance| counts.map_or(0, |c| c.of(i));
            let fewest = candidates
                .iter()
                .filter(|i| counts.is_some() && ctx.eligible(i) && ok(i))
                .map(|i| groups(i))
                .min();
            rendezvous(candidates, ctx, key, |i| {
                ok(i) && fewest.is_none_or(|f| groups(i) <= f)
            })
            .or_else(|| least_loaded(self.role, candidates, ctx))
        };
        // A new group's deal stands only while the counts it was dealt by hold there
        // (`GroupCounts`: two workers dealing at once would both pick the fewest), and it
        // is counted at once: true then. Not for a retry (`exclude`), which counts nothing,
        // nor after `MAX_DEALS` lost deals (the claim below counts it).
        let deal = |key: u64| {
            let mut deals = 0;
            loop {
                deals += 1;
                let counts = GroupCounts::read(candidates, ctx);
                let chosen = home(key, Some(&counts))?;
                if !ctx.exclude.is_empty() || deals == MAX_DEALS {
                    return Some((chosen, None));
                }
                let at = counts.of(chosen);
                if counts.reserve(chosen) {
                    return Some((chosen, Some(at)));
                }
            }
        };
        // The count the new group was dealt at, once counted (`deal`).
        let (mut matched, mut placed, mut moved, mut reserved) = (0, None, None, None);
        let chosen = match found {
            Some((blocks, inst))
                if (blocks * BLOCK) as f64 >= self.threshold * ctx.prompt_text.len() as f64 =>
            {
                if overloaded(inst) {
                    stats::record(Policy::CacheAware, Outcome::Imbalanced, 0);
                    // The group's deepest known block names it to the peers (they know it
                    // where this replica did, if they agree).
                    moved = Some((hashes[blocks - 1], inst.clone()));
                    home(key_at(blocks), None)
                } else {
                    matched = blocks;
                    stats::record(Policy::CacheAware, Outcome::Hit, blocks as u64);
                    Some(inst)
                }
            }
            other => {
                stats::record(Policy::CacheAware, Outcome::NoMatch, 0);
                let known = other.map_or(0, |(b, _)| b);
                let key = key_at(known);
                // A prompt shorter than one block has no prefix to share: it goes to its
                // hash's home and is not counted as a group (nor sent to peers).
                let group = !hashes.is_empty();
                // With the blocks after the key (see the claim below).
                placed = group.then_some((key, known.min(hashes.len().saturating_sub(1)) + 1));
                if group {
                    deal(key).map(|(chosen, at)| {
                        reserved = at;
                        chosen
                    })
                } else {
                    home(key, None)
                }
            }
        }?;
        // Blocks up to the match already point at `chosen` (or a racing worker's pick):
        // refresh the deepest one and add the new tail. Not for a retry (`exclude`): its
        // node is a detour around one failure, and recording it would move the group
        // there on this replica alone while every other replica keeps it home (the likely
        // cause of the 9/11 splits the two-replica test showed under load: one request
        // off, the rest of one replica following it). A node that is really down becomes
        // ineligible, and then every replica moves the group alike.
        if !ctx.exclude.is_empty() {
            return Some(chosen);
        }
        // A new group is claimed by its key first: a worker that placed the same group a
        // moment earlier (its other requests arrive together) wins, and this request
        // follows it instead of counting the group twice on another node. The blocks after
        // the key are written before it: a worker looking the group up between the claim
        // and the chain would otherwise match the key block alone, below the threshold,
        // and place the group once more under the next block's key (seen under load: a
        // replica's count one above its peer's).
        let mut chosen = chosen;
        let mut placed = placed.map(|(key, tail)| {
            self.table
                .insert_chain(&hashes[tail..], PrefixTable::slot_id(chosen.id));
            key
        });
        if let Some(key) = placed {
            if let Err(holder) = self.table.try_claim(key, PrefixTable::slot_id(chosen.id)) {
                // Placed already (by another worker, or a peer's placement taken meanwhile)
                // and counted there, even when it is the node this pick chose: the deal's
                // count is given back.
                placed = None;
                if reserved.take().is_some() {
                    prefix_sync::uncount(chosen);
                }
                let first = candidates
                    .iter()
                    .find(|i| PrefixTable::slot_id(i.id) == holder);
                if let Some(first) = first.filter(|f| !Arc::ptr_eq(f, chosen)) {
                    // A holder that is not eligible now (unhealthy: the lookup passed it
                    // over, so the request looked new) keeps the group's count: the group
                    // moves here, as off an overloaded holder, rather than being counted
                    // twice.
                    if ctx.eligible(first) {
                        chosen = first;
                    } else {
                        moved = Some((key, first.clone()));
                    }
                }
            }
        }
        let sid = PrefixTable::slot_id(chosen.id);
        self.table
            .insert_chain(&hashes[matched.saturating_sub(1)..], sid);
        // What the peers hear of: a new group (counted here), or a move off an overloaded
        // holder (its count goes with it), which they follow so that the replicas keep
        // sending the group to one node instead of each to its own.
        let shared = match (placed, moved) {
            (Some(key), _) => {
                if reserved.is_none() {
                    chosen.prefix_groups.fetch_add(1, Ordering::Relaxed);
                }
                Some((key, None))
            }
            (None, Some((key, from))) if !Arc::ptr_eq(&from, chosen) => {
                prefix_sync::move_count(&from, chosen);
                Some((key, Some(from)))
            }
            _ => None,
        };
        if let Some((key, from)) = shared.filter(|_| prefix_sync::enabled() || cfg!(test)) {
            // A new group dealt by count is kept a moment, for a peer's deal at the same
            // count onto the same node (`take_placement`).
            let dealt_at = reserved.filter(|_| from.is_none());
            if let Some(at) = dealt_at {
                self.recent.note(prefix_sync::Deal {
                    inst: chosen.id,
                    key,
                    hashes: hashes.to_vec(),
                    dealt_at: at,
                    at_ms: crate::resilience::now_ms(),
                });
            }
            if prefix_sync::enabled() {
                prefix_sync::offer(prefix_sync::Placement {
                    instance: chosen.clone(),
                    key,
                    hashes: hashes.to_vec(),
                    from,
                    dealt_at,
                });
            }
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::InFlight;
    use crate::scheduler::testing::{group_counts, instances};

    fn pick<'c>(ca: &CacheAware, c: &'c [Arc<Instance>], text: &str) -> &'c Arc<Instance> {
        let ctx = PickContext {
            prompt_text: text.as_bytes(),
            ..Default::default()
        };
        ca.pick(c, &ctx).unwrap()
    }

    #[test]
    fn repeated_prefix_returns_to_the_same_instance() {
        let c = instances(4, Role::Decode);
        let ca = CacheAware::new("t-repeat", Role::Decode, &SchedulingOptions::default());
        let mut guards = Vec::new();
        let doc = "You are a helpful assistant. ".repeat(20);
        let mut owners = std::collections::HashMap::new();
        for s in 0..8 {
            let system = format!("session {s}: {doc}");
            for q in 0..5 {
                let inst = pick(&ca, &c, &format!("{system} question {q}"));
                let first = owners.entry(s).or_insert_with(|| inst.address.clone());
                assert_eq!(*first, inst.address, "session {s} moved");
                guards.push(InFlight::new(inst, 0, 0));
            }
        }
        // Eight sessions spread over the instances rather than piling on one.
        let used: std::collections::HashSet<_> = owners.values().collect();
        assert!(used.len() >= 3, "{owners:?}");
    }

    /// The hashes one pick made are the prompt's, and a pick that uses them places the
    /// request as one that hashes the prompt itself.
    #[test]
    fn a_request_s_picks_share_its_prompt_hashes() {
        let c = instances(4, Role::Decode);
        let ca = CacheAware::new(
            "t-shared-hashes",
            Role::Decode,
            &SchedulingOptions::default(),
        );
        let text = format!("group: {}", "shared system prompt. ".repeat(40));
        let kept = std::cell::OnceCell::new();
        let ctx = PickContext {
            prompt_text: text.as_bytes(),
            prompt_hashes: Some(&kept),
            ..Default::default()
        };
        let first = ca.pick(&c, &ctx).unwrap();
        assert_eq!(kept.get(), Some(&block_hashes(text.as_bytes())));
        let own = ca
            .pick(
                &c,
                &PickContext {
                    prompt_hashes: None,
                    ..ctx
                },
            )
            .unwrap();
        let shared = ca.pick(&c, &ctx).unwrap();
        assert!(Arc::ptr_eq(first, own) && Arc::ptr_eq(first, shared));
    }

    /// A retry's detour (the group's node excluded once) does not move the group.
    #[test]
    fn a_retry_does_not_move_the_group() {
        let c = instances(4, Role::Decode);
        let ca = CacheAware::new("t-retry", Role::Decode, &SchedulingOptions::default());
        let text = format!("group: {}", "shared system prompt. ".repeat(40));
        let home = pick(&ca, &c, &format!("{text} q1"));
        let exclude = [home.socket_addr];
        let q2 = format!("{text} q2");
        let ctx = PickContext {
            prompt_text: q2.as_bytes(),
            exclude: &exclude,
            ..Default::default()
        };
        let detour = ca.pick(&c, &ctx).unwrap();
        assert!(!Arc::ptr_eq(detour, home));
        for q in 3..6 {
            let again = pick(&ca, &c, &format!("{text} q{q}"));
            assert_eq!(again.address, home.address, "question {q}");
        }
    }

    /// A group whose node went unhealthy moves with its count: the next request looks
    /// new (the lookup passes the holder over) but is not counted a second time.
    #[test]
    fn a_group_off_an_unhealthy_node_moves_with_its_count() {
        let c = instances(4, Role::Decode);
        let ca = CacheAware::new("t-unhealthy", Role::Decode, &SchedulingOptions::default());
        let text = format!("group: {}", "shared system prompt. ".repeat(40));
        let home = pick(&ca, &c, &format!("{text} q1"));
        let groups = || group_counts(&c);
        assert_eq!(groups().iter().sum::<u64>(), 1);
        home.set_health(crate::instance::Health::Unhealthy);
        let away = pick(&ca, &c, &format!("{text} q2"));
        assert!(!Arc::ptr_eq(away, home));
        assert_eq!(groups().iter().sum::<u64>(), 1, "{:?}", groups());
        assert_eq!(away.prefix_groups.load(Ordering::Relaxed), 1);
        // The group stays where it went.
        home.set_health(crate::instance::Health::Healthy);
        assert!(Arc::ptr_eq(pick(&ca, &c, &format!("{text} q3")), away));
    }

    #[test]
    fn still_balances_when_every_request_shares_the_prefix() {
        let c = instances(4, Role::Decode);
        let opts = SchedulingOptions::default();
        let ca = CacheAware::new("t-balance", Role::Decode, &opts);
        let text = "the same very long shared system prompt ".repeat(30);
        let guards: Vec<_> = (0..1000)
            .map(|_| InFlight::new(pick(&ca, &c, &text), 0, 0))
            .collect();
        let loads: Vec<u64> = c.iter().map(|i| i.in_flight()).collect();
        let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        // Load decides as soon as the spread passes both thresholds.
        let bound = (min + opts.balance_abs_threshold)
            .max((min as f64 * opts.balance_rel_threshold) as u64);
        assert!(max <= bound + 1, "{loads:?}");
        assert!(min > 0, "{loads:?}");
        drop(guards);
    }

    /// New groups are dealt out: twelve on four nodes, three each, whatever their hashes.
    #[test]
    fn new_groups_are_dealt_out_evenly() {
        let c = instances(4, Role::Dual);
        let ca = CacheAware::new("t-deal", Role::Dual, &SchedulingOptions::default());
        let mut per_node = std::collections::HashMap::new();
        for g in 0..12 {
            let text = format!("group {g}: {}", "a shared system prompt. ".repeat(30));
            let home = pick(&ca, &c, &format!("{text} q0")).address.clone();
            for q in 1..4 {
                assert_eq!(pick(&ca, &c, &format!("{text} q{q}")).address, home);
            }
            *per_node.entry(home).or_insert(0) += 1;
        }
        let counts: Vec<i32> = per_node.values().copied().collect();
        assert_eq!(counts, vec![3; 4], "{per_node:?}");
    }

    /// Workers dealing new groups at the same instant keep the counts even.
    #[test]
    fn workers_dealing_at_once_keep_the_counts_even() {
        let c = instances(4, Role::Dual);
        let ca = CacheAware::new("t-rounds", Role::Dual, &SchedulingOptions::default());
        crate::scheduler::testing::deal_in_rounds(&c, 300, |g| {
            pick(&ca, &c, &format!("group {g}: {}", "shared. ".repeat(40)));
        });
    }

    /// Two replicas that deal two different new groups onto one node at one count (at
    /// once, before either hears of the other's) part them when each hears of the
    /// other's: both move the same group to the same node, and their counts agree.
    #[test]
    fn two_replicas_part_groups_dealt_onto_one_node_at_once() {
        let o = SchedulingOptions::default();
        // The same four nodes as each replica sees them (own counts), own indexes.
        let (ca, cb) = (instances(4, Role::Dual), instances(4, Role::Dual));
        let (a, b) = (
            CacheAware::new("t-part-a", Role::Dual, &o),
            CacheAware::new("t-part-b", Role::Dual, &o),
        );
        let text = |g: &str| format!("group {g}: {}", "a shared system prompt. ".repeat(8));
        let g = text("G");
        let x = pick(&a, &ca, &g).address.clone();
        // A group B deals onto the same node with no counts yet: its key's rendezvous home.
        let home = |t: &str| {
            let key = block_hashes(t.as_bytes())[0];
            cb.iter()
                .max_by_key(|i| hash64(key, i.address.as_bytes()))
                .unwrap()
                .address
                .clone()
        };
        let h = (0..)
            .map(|k| text(&format!("H{k}")))
            .find(|t| home(t) == x)
            .unwrap();
        assert_eq!(pick(&b, &cb, &h).address, x);
        // Each hears of the other's deal, made at count 0.
        let at = |c: &[Arc<Instance>]| c.iter().position(|i| i.address == x).unwrap();
        let (gh, hh) = (block_hashes(g.as_bytes()), block_hashes(h.as_bytes()));
        let take = |r: &CacheAware, c: &[Arc<Instance>], hashes: &[u64]| {
            let p = prefix_sync::Received {
                inst: &c[at(c)],
                key: hashes[0],
                hashes,
                from: None,
                dealt_at: Some(0),
            };
            r.take_placement(c, &p)
        };
        assert!(take(&a, &ca, &hh));
        assert!(take(&b, &cb, &gh));
        let (na, nb) = (group_counts(&ca), group_counts(&cb));
        assert_eq!(na, nb);
        assert_eq!(na[at(&ca)], 1, "{na:?}");
        assert_eq!(na.iter().sum::<u64>(), 2);
        // Each group on one node, the same on both replicas, and not both on x.
        let (ga, gb) = (
            pick(&a, &ca, &g).address.clone(),
            pick(&b, &cb, &g).address.clone(),
        );
        let (ha, hb) = (
            pick(&a, &ca, &h).address.clone(),
            pick(&b, &cb, &h).address.clone(),
        );
        assert_eq!((&ga, &ha), (&gb, &hb));
        assert_ne!(ga, ha);
    }

    /// A prompt shorter than one block is no group: it is not counted, so a stream of
    /// short prompts (probes, warm-ups) does not skew how the groups are dealt.
    #[test]
    fn short_prompts_are_not_counted_as_groups() {
        let c = instances(4, Role::Dual);
        let ca = CacheAware::new("t-short", Role::Dual, &SchedulingOptions::default());
        for k in 0..20 {
            pick(&ca, &c, &format!("warm {k}"));
        }
        assert_eq!(group_counts(&c).iter().sum::<u64>(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let c = instances(2, Role::Decode);
        let opts = SchedulingOptions {
            max_tree_size: 100,
            ..Default::default()
        };
        let ca = CacheAware::new("t-bounded", Role::Decode, &opts);
        for k in 0..200 {
            pick(&ca, &c, &format!("{k} {}", "x".repeat(1024)));
        }
        assert!(ca.table.capacity() <= 128);
        assert!(ca.table.len() <= ca.table.capacity());
    }

    #[test]
    fn a_prefix_learned_on_one_thread_steers_the_others() {
        let c = instances(4, Role::Decode);
        let ca = Arc::new(CacheAware::new(
            "t-threads",
            Role::Decode,
            &SchedulingOptions::default(),
        ));
        let system = "A long shared system prompt for every thread. ".repeat(20);
        let first = pick(&ca, &c, &format!("{system} q0")).address.clone();
        let others: Vec<String> = (1..8)
            .map(|t| {
                let (ca, c, text) = (ca.clone(), c.clone(), format!("{system} q{t}"));
                std::thread::spawn(move || pick(&ca, &c, &text).address.clone())
            })
            .map(|h| h.join().unwrap())
            .collect();
        assert!(others.iter().all(|a| *a == first), "{first} vs {others:?}");
    }
}
