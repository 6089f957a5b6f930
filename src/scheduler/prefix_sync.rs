//! Proxy replicas in front of the same instances tell each other where `cache_aware` and
//! `kv_aware` placed each new prefix group (`prefix_sync.peers`), so that every replica's
//! index and group counts describe the same placement and new groups are dealt out over
//! the nodes alike (docs/scheduling.md, "Replicas").
//!
//! This module is what the policies see: a worker that places a new group `offer`s it to
//! a bounded queue (full: dropped and counted; a request never waits), and a peer's
//! placement is merged by `take`. The sender thread and the receiving endpoint are
//! `proxy/prefix_sync.rs`.
//!
//! Two replicas placing the same new group at once, on different nodes, each receive the
//! other's placement: both keep the node with the higher rendezvous score for the group's
//! key, so they agree after one exchange whatever the order. Two placing *different* new
//! groups onto one node at one count are parted (`RecentDeals`, cache_aware).

use super::prefix_index::PrefixTable;
use crate::hash::hash64;
use crate::instance::Instance;
use crossbeam_channel::{Sender, TrySendError};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// One new group's placement: the instance, the group's key (the block its home is hashed
/// on) and the block hashes recorded for it.
pub struct Placement {
    pub instance: Arc<Instance>,
    pub key: u64,
    pub hashes: Vec<u64>,
    /// A group moved off an overloaded holder (cache_aware): that holder. None for a new
    /// group.
    pub from: Option<Arc<Instance>>,
    /// A new group dealt by count (cache_aware): the instance's count the deal was made
    /// on. Two replicas dealing different groups at once onto one node from the same count
    /// find each other by it (`CacheAware::take_placement`).
    pub dealt_at: Option<u64>,
}

/// A peer's placement, its instances resolved on this replica.
pub struct Received<'a> {
    pub inst: &'a Arc<Instance>,
    pub key: u64,
    pub hashes: &'a [u64],
    pub from: Option<&'a Arc<Instance>>,
    pub dealt_at: Option<u64>,
}

/// How long an own deal is matched against the peers' placements (`RecentDeals`): far
/// beyond the sender's 2 ms batching and a peer's answer, well short of a group's life.
const RECENT_DEAL_MS: u64 = 1_000;

/// A new group this replica dealt by count, kept a moment for `RecentDeals`.
pub struct Deal {
    pub inst: u64,
    pub key: u64,
    pub hashes: Vec<u64>,
    pub dealt_at: u64,
    pub at_ms: u64,
}

/// This replica's last few new groups dealt by count (a ring of 8, lock-free): a peer's
/// placement of another group onto the same node at the same count is a collision — both
/// replicas dealt at once from the same counts (`CacheAware::take_placement`).
#[derive(Default)]
pub struct RecentDeals {
    slots: [arc_swap::ArcSwapOption<Deal>; 8],
    next: std::sync::atomic::AtomicUsize,
}

impl RecentDeals {
    pub fn note(&self, d: Deal) {
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        self.slots[k].store(Some(Arc::new(d)));
    }

    /// An own deal of another group than `key` onto the instance `inst` at `dealt_at`,
    /// in the last `RECENT_DEAL_MS`; taken out, so that it resolves one collision.
    pub fn collided(&self, inst: u64, dealt_at: u64, key: u64, now: u64) -> Option<Arc<Deal>> {
        self.slots.iter().find_map(|s| {
            let d = s.load_full()?;
            let hit = d.inst == inst
                && d.dealt_at == dealt_at
                && d.key != key
                && now.saturating_sub(d.at_ms) < RECENT_DEAL_MS;
            if !hit {
                return None;
            }
            // Taken only if still there (another worker may have taken it).
            let before = s.compare_and_swap(&d, None);
            before
                .as_ref()
                .is_some_and(|b| Arc::ptr_eq(b, &d))
                .then_some(d)
        })
    }
}

/// What the sync did, for `/metrics`.
pub struct Stats {
    pub sent: AtomicU64,
    /// Placements held for a peer that could not be reached or refused, counted at every
    /// failed attempt (they are sent again later).
    pub failed: AtomicU64,
    /// Placements given up: the queue was full when a worker handed one over, or a peer's
    /// held batches overflowed.
    pub dropped: AtomicU64,
    pub received: AtomicU64,
    /// Received placements of a group this replica had placed elsewhere, resolved by score.
    pub conflicts: AtomicU64,
    /// Two different new groups dealt onto one node at one count by two replicas at once,
    /// one moved to the instance with the fewest (`CacheAware::take_placement`).
    pub parted: AtomicU64,
}

pub static STATS: Stats = Stats {
    sent: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    received: AtomicU64::new(0),
    conflicts: AtomicU64::new(0),
    parted: AtomicU64::new(0),
};

static OUTBOX: OnceLock<Sender<Placement>> = OnceLock::new();

/// Sets the sender's end of the queue (once per process; false when already set).
pub fn install(tx: Sender<Placement>) -> bool {
    OUTBOX.set(tx).is_ok()
}

/// Peers are configured (set at start and on every reload).
static ON: AtomicBool = AtomicBool::new(false);

/// Whether new placements are shared (peers configured and the sender running).
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Hands a placement to the sender; never blocks.
pub fn offer(p: Placement) {
    let Some(tx) = OUTBOX.get() else { return };
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(p) {
        STATS.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Follows the policy's peer list (start, reload).
pub fn configure(peers: &[String]) {
    ON.store(
        !peers.is_empty() && OUTBOX.get().is_some(),
        Ordering::Relaxed,
    );
}

/// A batch as it goes over the wire: `{"placements": [{model, role, instance, key,
/// hashes}]}` (docs/api.md, `POST /admin/prefixes`).
pub fn encode(batch: &[Placement]) -> Vec<u8> {
    let list: Vec<Value> = batch
        .iter()
        .map(|p| {
            json!({
                "model": &*p.instance.model,
                "role": p.instance.role.as_str(),
                "instance": p.instance.address,
                "key": p.key,
                "hashes": p.hashes,
                "from": p.from.as_ref().map(|f| &f.address),
                "dealt_at": p.dealt_at,
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "placements": list })).unwrap_or_default()
}

/// Counts the group `key` on `inst` (`Instance::prefix_groups`) unless it was counted there
/// already: once, whichever comes first of this replica's own placement and a peer's, and
/// whatever the order of the messages, so replicas that share placements end with the same
/// counts (kv_aware: two replicas that placed a group apart count it on both nodes, each
/// once).
pub fn count_once(inst: &Instance, key: u64) {
    if first_count(inst, key) {
        inst.prefix_groups.fetch_add(1, Ordering::Relaxed);
    }
}

/// `count_once` for a group a deal has counted on `inst` already (`Room::reserve`): the
/// count stays when it is the group's first there, else it is given back.
pub fn keep_reserved(inst: &Instance, key: u64) {
    if !first_count(inst, key) {
        uncount(inst);
    }
}

/// Whether the group `key` is counted on `inst` for the first time (and now marked so).
/// A fixed-size table of atomics; an entry evicted long after is counted again.
fn first_count(inst: &Instance, key: u64) -> bool {
    static COUNTED: OnceLock<PrefixTable> = OnceLock::new();
    let table = COUNTED.get_or_init(|| PrefixTable::new(1 << 16));
    table
        .try_claim(hash64(key, inst.address.as_bytes()), 1)
        .is_ok()
}

/// A group went from `from` to `to` (a move, or a conflict resolved): its count goes with
/// it, so that a group is counted where the table has it (cache_aware; a later conflict
/// takes the count back from the holder, which must be where it is).
pub fn move_count(from: &Instance, to: &Instance) {
    uncount(from);
    to.prefix_groups.fetch_add(1, Ordering::Relaxed);
}

/// One group fewer on `inst` (never below none).
pub fn uncount(inst: &Instance) {
    let _ = inst
        .prefix_groups
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(1))
        });
}

/// Records a peer's placement of the group `key` on `inst`, unless this replica placed the
/// group on an instance with a higher score for the key (then the peer moves instead).
/// A peer's move is followed when this replica still has the group where the peer had it
/// (two replicas that moved it apart at once keep their own: each ignores the other's).
/// The group's count goes where the group goes. True when the placement was taken or
/// already held.
pub fn take(table: &PrefixTable, instances: &[Arc<Instance>], p: &Received<'_>) -> bool {
    let (inst, key, hashes) = (p.inst, p.key, p.hashes);
    let sid = PrefixTable::slot_id(inst.id);
    if let Some(from) = p.from {
        if table.get(key) != Some(PrefixTable::slot_id(from.id)) {
            return false;
        }
        table.insert_chain(hashes, sid);
        move_count(from, inst);
        return true;
    }
    match table.get(key) {
        Some(s) if s == sid => return true,
        Some(s) => {
            let score = |i: &Instance| hash64(key, i.address.as_bytes());
            if let Some(mine) = instances.iter().find(|i| PrefixTable::slot_id(i.id) == s) {
                STATS.conflicts.fetch_add(1, Ordering::Relaxed);
                if score(mine) > score(inst) {
                    return false;
                }
                table.insert_chain(hashes, sid);
                move_count(mine, inst);
                return true;
            }
        }
        None => {}
    }
    table.insert_chain(hashes, sid);
    inst.prefix_groups.fetch_add(1, Ordering::Relaxed);
    true
}

/// The sync's counters in the Prometheus text format (docs/metrics.md).
pub fn render(out: &mut String) {
    use std::fmt::Write;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let _ = write!(
        out,
        "# HELP proxy_prefix_sync_placements_total New prefix placements shared with peer replicas, by outcome.\n\
         # TYPE proxy_prefix_sync_placements_total counter\n\
         proxy_prefix_sync_placements_total{{outcome=\"sent\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"failed\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"dropped\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"received\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"conflict\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"parted\"}} {}\n",
        n(&STATS.sent),
        n(&STATS.failed),
        n(&STATS.dropped),
        n(&STATS.received),
        n(&STATS.conflicts),
        n(&STATS.parted),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::scheduler::testing::instances;

    /// Two replicas placed one new group on different nodes at once; each takes the
    /// other's placement by the same rule, and both end on one node with one group counted.
    #[test]
    fn replicas_that_placed_a_group_apart_agree_after_one_exchange() {
        for key in 0..64u64 {
            let c = instances(4, Role::Dual);
            let (a, b) = (PrefixTable::new(64), PrefixTable::new(64));
            let hashes = [key, key ^ 0xabcdef, key.wrapping_mul(31)];
            let sid = |i: &Instance| PrefixTable::slot_id(i.id);
            // Replica A put the group on node 0, replica B on node 1 (counts shared: the
            // nodes are the same objects here, as both replicas count one placement each).
            for h in hashes {
                a.insert(h, sid(&c[0]));
                b.insert(h, sid(&c[1]));
            }
            c[0].prefix_groups.fetch_add(1, Ordering::Relaxed);
            // Each receives the other's placement.
            let from = |inst| Received {
                inst,
                key,
                hashes: &hashes,
                from: None,
                dealt_at: None,
            };
            take(&a, &c, &from(&c[1]));
            take(&b, &c, &from(&c[0]));
            let (on_a, on_b) = (a.get(key), b.get(key));
            assert_eq!(on_a, on_b, "key {key}");
            for h in hashes {
                assert_eq!(a.get(h), on_a, "key {key}: every block follows");
                assert_eq!(b.get(h), on_b);
            }
        }
    }

    #[test]
    fn a_new_placement_is_taken_and_counted() {
        let c = instances(2, Role::Dual);
        let t = PrefixTable::new(64);
        let new = Received {
            inst: &c[1],
            key: 7,
            hashes: &[7, 8],
            from: None,
            dealt_at: None,
        };
        assert!(take(&t, &c, &new));
        assert_eq!(t.get(8), Some(PrefixTable::slot_id(c[1].id)));
        assert_eq!(c[1].prefix_groups.load(Ordering::Relaxed), 1);
        // The same again (a duplicate message) changes nothing.
        assert!(take(&t, &c, &new));
        assert_eq!(c[1].prefix_groups.load(Ordering::Relaxed), 1);
    }

    /// A peer moved a group off an overloaded holder: followed while this replica still
    /// has it there, not once it has it elsewhere; the group's count goes with it.
    #[test]
    fn a_peer_s_move_is_followed_from_where_the_group_was() {
        let c = instances(3, Role::Dual);
        let t = PrefixTable::new(64);
        let sid = |i: &Instance| Some(PrefixTable::slot_id(i.id));
        t.insert(5, PrefixTable::slot_id(c[0].id));
        c[0].prefix_groups.store(1, Ordering::Relaxed);
        let counts = || crate::scheduler::testing::group_counts(&c);
        let moved = |to, from| Received {
            inst: to,
            key: 5,
            hashes: &[5, 6],
            from: Some(from),
            dealt_at: None,
        };
        assert!(take(&t, &c, &moved(&c[1], &c[0])));
        assert_eq!((t.get(5), t.get(6)), (sid(&c[1]), sid(&c[1])));
        assert_eq!(counts(), [0, 1, 0]);
        // Another peer's move from node 0 comes too late: the group is on node 1 here.
        assert!(!take(&t, &c, &moved(&c[2], &c[0])));
        assert_eq!(t.get(5), sid(&c[1]));
        assert_eq!(counts(), [0, 1, 0]);
        // A peer's new placement of the group that wins the conflict takes the count from
        // where the group is now (node 1), not where it was first counted (node 0).
        let score = |i: &Instance| hash64(5, i.address.as_bytes());
        let winner = c
            .iter()
            .filter(|i| score(i) > score(&c[1]))
            .max_by_key(|i| score(i));
        let w = winner.expect("a node that outscores node 1 for key 5");
        let new = Received {
            inst: w,
            key: 5,
            hashes: &[5, 6],
            from: None,
            dealt_at: None,
        };
        assert!(take(&t, &c, &new));
        assert_eq!(counts().iter().sum::<u64>(), 1);
        assert_eq!(w.prefix_groups.load(Ordering::Relaxed), 1);
    }
}
