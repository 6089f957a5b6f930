//! Scheduling policies behind one trait. Each model and role owns its scheduler inside the
//! shared topology snapshot, so a policy's state (a round-robin cursor, a hash ring) is
//! shared by every worker and read without locks. Prefill and decode legs pick
//! independently. See docs/scheduling.md for when to use which.

mod cache_aware;
mod consistent_hash;
mod kv_aware;
mod load_balanced;
mod power_of_two;
pub mod prefix_index;
pub mod prefix_sync;
mod round_robin;
pub mod stats;

use crate::config::{Role, SchedulerKind, SchedulingOptions};
use crate::engine_load::Fresh;
use crate::instance::Instance;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use cache_aware::CacheAware;
pub use consistent_hash::ConsistentHash;
pub use kv_aware::KvAware;
pub use load_balanced::LoadBalanced;
pub use power_of_two::PowerOfTwo;
pub use round_robin::RoundRobin;

/// What a policy may look at about the request being placed.
#[derive(Debug, Default, Clone, Copy)]
pub struct PickContext<'a> {
    /// Estimated prompt tokens: body bytes of the prompt / 4 (no tokenizer on the hot path).
    pub prompt_tokens: u64,
    /// Tokens the request may generate (`max_tokens`, or a default).
    pub decode_tokens: u64,
    /// Affinity key for hashing: `X-Session-ID`, else the body's `user`, else the client IP.
    pub key: Option<&'a str>,
    /// The prompt as raw JSON text (string, token-id list or messages), for prefix routing.
    pub prompt_text: &'a [u8],
    /// The prompt's token ids when known (a token-id prompt, or a configured tokenizer),
    /// for `kv_aware`.
    pub tokens: Option<&'a [u32]>,
    /// Instances this request already failed on (retries go elsewhere).
    pub exclude: &'a [SocketAddr],
    /// `prompt_text`'s block hashes (`cache_aware`), made by the request's first pick and kept
    /// for its other legs and retries: a 1P+1D request hashed a 4 KiB prompt twice, ~4k
    /// instructions each (docs/benchmarks.md, "a prompt hashed once per request"). `None`:
    /// each pick hashes its own.
    pub prompt_hashes: Option<&'a std::cell::OnceCell<Vec<u64>>>,
}

impl PickContext<'_> {
    /// An instance this request may go to: available, the prompt fits its context, and it
    /// has not failed this request already.
    #[inline]
    pub fn eligible(&self, i: &Instance) -> bool {
        i.is_available() && i.fits(self.prompt_tokens) && !self.exclude.contains(&i.socket_addr)
    }
}

pub trait Scheduler: Send + Sync {
    /// Picks one of `candidates` for which `ctx.eligible` holds, or None. A borrow, not a
    /// clone: the leg counts itself through it (`InFlight`) without writing the instance's
    /// `Arc` count, which every worker would write.
    fn pick<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>>;

    /// A peer replica placed (or moved) a prefix group (`prefix_sync`) on one of
    /// `instances`. A prefix policy records it as its own placement would be; true when
    /// taken (or already held).
    fn take_placement(&self, _instances: &[Arc<Instance>], _p: &prefix_sync::Received<'_>) -> bool {
        false
    }
}

pub fn build(
    kind: SchedulerKind,
    model: &str,
    role: Role,
    opts: &SchedulingOptions,
    instances: &[Arc<Instance>],
) -> Box<dyn Scheduler> {
    match kind {
        SchedulerKind::RoundRobin => Box::new(RoundRobin::default()),
        SchedulerKind::LoadBalanced => Box::new(LoadBalanced::new(role)),
        SchedulerKind::PowerOfTwo => Box::new(PowerOfTwo::new(role)),
        SchedulerKind::ConsistentHash => Box::new(ConsistentHash::new(instances, opts)),
        SchedulerKind::CacheAware => Box::new(CacheAware::new(model, role, opts)),
        SchedulerKind::KvAware => Box::new(KvAware::new(role, opts)),
    }
}

/// Load as the role sees it, lower is better: the local in-flight counts, plus what the
/// engine reports beyond them when its /metrics were scraped (see `engine_load::load_key`).
#[inline]
pub(crate) fn load_key(role: Role, i: &Instance) -> (u64, u64) {
    load_key_at(role, i, i.engine.last().as_ref())
}

/// `load_key` with `i`'s engine sample already read, for a check that needs the sample
/// itself too: one read, so that a scrape landing in between cannot mix two samples.
#[inline]
fn load_key_at(role: Role, i: &Instance, engine: Option<&Fresh>) -> (u64, u64) {
    crate::engine_load::load_key(role, i.load.snapshot(), engine, i.engine.batch_seen())
}

thread_local! {
    static CACHED: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A policy that knows how much of the prompt the picked instance holds says so here
/// (same thread, right before the pick returns), so that the leg is counted by what that
/// engine must compute rather than by the whole prompt.
pub(crate) fn note_cached(instance_id: u64, tokens: u64) {
    CACHED.with(|c| c.set((instance_id, tokens)));
}

/// The prompt tokens the picked instance already holds, as its policy noted (0 if none).
pub fn take_cached(instance_id: u64) -> u64 {
    CACHED.with(|c| {
        let (id, t) = c.replace((0, 0));
        if id == instance_id {
            t
        } else {
            0
        }
    })
}

/// The least loaded eligible instance. The scan starts at a random offset so that ties
/// (an idle cluster) spread over the instances instead of all going to the first.
pub(crate) fn least_loaded<'c>(
    role: Role,
    candidates: &'c [Arc<Instance>],
    ctx: &PickContext<'_>,
) -> Option<&'c Arc<Instance>> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let start = (crate::ids::next_u64() % n as u64) as usize;
    (0..n)
        .map(|k| &candidates[(start + k) % n])
        .filter(|i| ctx.eligible(i))
        .min_by_key(|i| load_key(role, i))
}

/// The home of a new prefix: among the eligible instances whose load `in_band` accepts, the
/// one with the highest rendezvous score `hash(key, address)`. Every proxy replica (and
/// worker) with the same instances and a similar view of their load computes the same
/// home for the same prompt, so a prefix group's first requests agree on one node even
/// before anyone has learned where the group lives (docs/scheduling.md, "New prefixes").
pub(crate) fn rendezvous<'c>(
    candidates: &'c [Arc<Instance>],
    ctx: &PickContext<'_>,
    key: u64,
    in_band: impl Fn(&Instance) -> bool,
) -> Option<&'c Arc<Instance>> {
    candidates
        .iter()
        .filter(|i| ctx.eligible(i) && in_band(i))
        .max_by_key(|i| hash64(key, i.address.as_bytes()))
}

/// Room for a new prefix group: an instance whose engine holds at most `slack` KV blocks
/// (about one prompt's worth) more than the emptiest eligible one, when every eligible
/// instance publishes KV events (otherwise every instance has room). Every replica counts
/// the same events, so new groups are dealt out over the nodes evenly, and the same way
/// everywhere, rather than by the hash alone (docs/scheduling.md, "New prefixes"). Full
/// caches all hold about as much: then it is the hash alone.
pub(crate) struct Room {
    fewest: u64,
    slack: u64,
    all_publish: bool,
    /// The group counts new groups are dealt by (see `groups`); None when they are not.
    counts: Option<GroupCounts>,
}

/// How long an engine's storing of a prompt this proxy did not send (`KvStats::unsent_ms`)
/// means another router is in front of it.
pub const OTHER_SENDERS_MS: u64 = 60_000;

impl Room {
    pub fn of(candidates: &[Arc<Instance>], ctx: &PickContext<'_>, slack: u64, now: u64) -> Room {
        let (mut fewest, mut all_publish, mut others) = (u64::MAX, true, false);
        for i in candidates.iter().filter(|i| ctx.eligible(i)) {
            all_publish &= i.kv_bit.load(Ordering::Relaxed) > 0;
            fewest = fewest.min(i.kv_stats.blocks.load(Ordering::Relaxed));
            let unsent = i.kv_stats.unsent_ms.load(Ordering::Relaxed);
            others |= unsent > 0 && now.saturating_sub(unsent) < OTHER_SENDERS_MS;
        }
        let count_groups = prefix_sync::enabled() || !others;
        Room {
            fewest,
            slack,
            all_publish,
            counts: count_groups.then(|| GroupCounts::read(candidates, ctx)),
        }
    }

    /// The new groups placed on `i` (`Instance::prefix_groups`), when this proxy is the only
    /// router in front of the instances (none of their engines stored a prompt it did not
    /// send in the last `OTHER_SENDERS_MS`) or the replicas share their placements
    /// (`prefix_sync`); otherwise 0 for every instance: a replica's own counts drift from
    /// an unsynced replica's with the groups only it sees, while the engines' events are
    /// what every replica sees alike (docs/scheduling.md, "Replicas"). As read when the
    /// deal began (`GroupCounts`).
    #[inline]
    pub fn groups(&self, i: &Instance) -> u64 {
        self.counts.as_ref().map_or(0, |c| c.of(i))
    }

    /// Counts a new group on `i`, the instance the deal chose: false when the counts it was
    /// dealt by have changed there since (`GroupCounts::reserve`) and the deal must be made
    /// again. Not dealing by count, nothing to keep: counted at once.
    pub fn reserve(&self, i: &Instance) -> bool {
        match &self.counts {
            Some(c) => c.reserve(i),
            None => {
                i.prefix_groups.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    #[inline]
    pub fn has(&self, i: &Instance) -> bool {
        !self.all_publish
            || i.kv_stats.blocks.load(Ordering::Relaxed) <= self.fewest.saturating_add(self.slack)
    }
}

/// The new-group counts (`Instance::prefix_groups`) of the eligible instances as one deal
/// read them, so that the deal stands only while they hold: two workers dealing at the
/// same instant both read the same counts and would both send their groups to the one
/// holding the fewest, leaving it two ahead (seen once in 42 runs of six copies of the
/// burst test). `reserve` counts the chosen group with a compare-and-swap from the count
/// the deal saw; the loser deals again on the new counts. Instances past the first `CAP`
/// eligible ones are read live and counted without the check.
pub(crate) struct GroupCounts {
    /// (instance id, count), open addressing by id (ids start at 1: 0 is an empty slot);
    /// at most `CAP` entries, half the slots, so a lookup is a probe or two.
    slots: [(u64, u64); GroupCounts::SLOTS],
}

/// How many times a new group is dealt before it is counted where the last deal put it,
/// whatever the counts did meanwhile (`GroupCounts::reserve`): a bound for a burst of
/// workers dealing at once.
pub(crate) const MAX_DEALS: u32 = 4;

impl GroupCounts {
    const CAP: usize = 32;
    const SLOTS: usize = 2 * Self::CAP;

    pub fn read(candidates: &[Arc<Instance>], ctx: &PickContext<'_>) -> Self {
        let mut c = GroupCounts {
            slots: [(0, 0); Self::SLOTS],
        };
        for i in candidates
            .iter()
            .filter(|i| ctx.eligible(i))
            .take(Self::CAP)
        {
            let mut k = i.id as usize % Self::SLOTS;
            while c.slots[k].0 != 0 {
                k = (k + 1) % Self::SLOTS;
            }
            c.slots[k] = (i.id, i.prefix_groups.load(Ordering::Relaxed));
        }
        c
    }

    fn seen(&self, i: &Instance) -> Option<u64> {
        let mut k = i.id as usize % Self::SLOTS;
        loop {
            match self.slots[k] {
                (0, _) => return None,
                (id, n) if id == i.id => return Some(n),
                _ => k = (k + 1) % Self::SLOTS,
            }
        }
    }

    /// `i`'s count as the deal read it.
    #[inline]
    pub fn of(&self, i: &Instance) -> u64 {
        self.seen(i)
            .unwrap_or_else(|| i.prefix_groups.load(Ordering::Relaxed))
    }

    /// Counts a new group on `i` when its count is still the one read; false (nothing
    /// counted) when another group was counted there since.
    pub fn reserve(&self, i: &Instance) -> bool {
        match self.seen(i) {
            Some(n) => i
                .prefix_groups
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok(),
            None => {
                i.prefix_groups.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }
}

/// Requests above the least loaded instance's that a new prefix's home may carry.
const NEW_PREFIX_SLACK: u64 = 4;

/// Whether `i` may be a new prefix's home when the least loaded eligible instance has `min`
/// requests: at most 1.5× that, or `NEW_PREFIX_SLACK` above it (at light load a replica's
/// view of the others' load is a few requests off, and that must not change the answer),
/// widened by the requests `i`'s engine reported that this proxy did not send and no peer
/// replica reports (`engine_load::unreported`). Those come from a scrape up to an interval
/// old: when requests are short next to the interval they still count a group that has
/// moved on, and two replicas' views of the node differ by about that much (eight copies
/// of the two-replica test at once: without the widening 2 of 16 runs split a group about
/// 9/11, one replica having passed its home over; with it 0 of 24). The peers' reported
/// requests are as fresh as this replica's own and widen nothing.
#[inline]
pub(crate) fn in_load_band(role: Role, i: &Instance, min: u64) -> bool {
    let engine = i.engine.last();
    let unseen = engine.as_ref().map_or(0, crate::engine_load::unreported);
    requests_at(role, i, engine.as_ref()) <= min + (min / 2).max(NEW_PREFIX_SLACK + unseen)
}

/// In-flight requests on `i` as `role` counts them (the engine's unseen ones included):
/// the unit of the prefix policies' balance checks, as in sglang's router.
#[inline]
pub(crate) fn requests(role: Role, i: &Instance) -> u64 {
    requests_at(role, i, i.engine.last().as_ref())
}

/// `requests` with `i`'s engine sample already read (see `load_key_at`).
#[inline]
fn requests_at(role: Role, i: &Instance, engine: Option<&Fresh>) -> u64 {
    let k = load_key_at(role, i, engine);
    match role {
        Role::Prefill => k.1,
        Role::Decode | Role::Dual => k.0,
    }
}

/// The prefix policies' balance check (`balance_abs_threshold`, `balance_rel_threshold`):
/// an instance is overloaded when it has more than `abs` requests above the least loaded
/// and more than `rel` times as many; a known prefix is not followed there.
#[derive(Clone, Copy)]
pub(crate) struct Balance {
    pub abs: u64,
    pub rel: f64,
}

impl Balance {
    pub fn new(o: &SchedulingOptions) -> Self {
        Balance {
            abs: o.balance_abs_threshold,
            rel: o.balance_rel_threshold,
        }
    }

    /// Whether `i`, with `load` requests against the least loaded's `min`, is overloaded.
    /// The absolute threshold is at most half the engine's batch when the engine has been
    /// seen with a full batch (requests waiting behind it, `EngineLoad::batch_seen`): what
    /// slows a node is requests waiting for a batch slot, so on engines of 4 slots a node
    /// is 2 requests ahead before it queues, long before the configured 8. Every replica
    /// sees the same engine numbers, so they agree on it (docs/scheduling.md).
    #[inline]
    pub fn overloaded(&self, i: &Instance, load: u64, min: u64) -> bool {
        let abs = match i.engine.batch_seen() {
            0 => self.abs,
            batch => self.abs.min((batch / 2).max(1)),
        };
        load.saturating_sub(min) > abs && load as f64 > min as f64 * self.rel
    }
}

pub(crate) use crate::hash::hash64;

/// Instances and engine states for the policies' unit tests and benches/scheduler.rs: one
/// place for both (a bench sees only the library's public items).
#[doc(hidden)]
pub mod testing {
    use super::*;
    use crate::engine_load::{EngineSample, Totals, SPEED_WINDOW_MS};
    use crate::instance::Health;

    /// `n` healthy instances of model `m` in `role`, at 10.0.0.1:8000 onwards.
    pub fn instances(n: usize, role: Role) -> Vec<Arc<Instance>> {
        (0..n)
            .map(|k| {
                let addr = format!("10.0.{}.{}:8000", k / 200, k % 200 + 1);
                let i = Instance::new(addr.clone(), addr.parse().unwrap(), role, Arc::from("m"));
                i.set_health(Health::Healthy);
                Arc::new(i)
            })
            .collect()
    }

    /// Gives every instance's engine a learned speed (75 µs per prefill token, 0.6 s in the
    /// batch per request) and a batch of 4 seen full with one waiting, as two scrapes of its
    /// metrics would.
    pub fn learn_speed(inst: &[Arc<Instance>]) {
        for i in inst {
            i.engine.store_totals(Totals::default(), 0);
            i.engine.store_totals(
                Totals {
                    prompt_tokens: 10_000.0,
                    prefill_s: 0.75,
                    run_s: 6.0,
                    run_n: 10.0,
                    ..Default::default()
                },
                SPEED_WINDOW_MS,
            );
            let full = EngineSample {
                running: 4,
                waiting: 1,
                kv_usage: None,
            };
            i.engine.store(full, 0);
        }
    }

    /// Each instance's new-group count (`Instance::prefix_groups`), in order.
    pub fn group_counts(c: &[Arc<Instance>]) -> Vec<u64> {
        c.iter()
            .map(|i| i.prefix_groups.load(Ordering::Relaxed))
            .collect()
    }

    /// Deals new groups from as many threads as there are instances, in rounds of one new
    /// group each (`pick(g)` places group `g`), and fails unless every round leaves every
    /// instance with exactly one group more: workers dealing at the same instant must not
    /// both take the one with the fewest (`GroupCounts`).
    pub fn deal_in_rounds(c: &[Arc<Instance>], rounds: u32, pick: impl Fn(u32) + Sync) {
        let counts = || group_counts(c);
        let workers = c.len() as u32;
        let round = std::sync::Barrier::new(c.len());
        let uneven = std::sync::Mutex::new(None);
        std::thread::scope(|s| {
            for w in 0..workers {
                let (round, uneven, counts, pick) = (&round, &uneven, &counts, &pick);
                s.spawn(move || {
                    for r in 0..rounds {
                        round.wait();
                        pick(r * workers + w);
                        if round.wait().is_leader() {
                            let n = counts();
                            if n.iter().any(|&k| k != u64::from(r + 1)) {
                                uneven.lock().unwrap().get_or_insert((r, n));
                            }
                        }
                    }
                });
            }
        });
        let uneven = uneven.into_inner().unwrap();
        assert_eq!(uneven, None, "the first uneven (round, counts)");
    }
}
