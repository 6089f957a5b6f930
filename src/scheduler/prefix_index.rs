//! The prefix index every worker shares: a fixed-size, 4-way set-associative table of
//! `AtomicU64`s that overwrites like a CPU cache. Each slot packs the high bits of a block's
//! chain hash (the tag) with the id of the instance the block was routed to, so a lookup is
//! one or two cache-line reads and an insert one relaxed store: no lock, no allocation, and
//! memory fixed when the table is built. Two workers racing on one slot both write a valid
//! entry; the index is a routing hint, so last-writer-wins is all it needs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

const WAYS: usize = 4;
/// Low bits of a slot hold the instance id; the rest is the tag.
const ID_BITS: u32 = 20;
const ID_MASK: u64 = (1 << ID_BITS) - 1;

pub struct PrefixTable {
    slots: Box<[AtomicU64]>,
    /// Number of sets − 1 (sets are a power of two).
    set_mask: u64,
}

impl PrefixTable {
    /// A table of at least `entries` slots (rounded up to a power of two, at least one set).
    pub fn new(entries: usize) -> Self {
        let sets = (entries.div_ceil(WAYS)).max(1).next_power_of_two();
        PrefixTable {
            slots: (0..sets * WAYS).map(|_| AtomicU64::new(0)).collect(),
            set_mask: sets as u64 - 1,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The instance id stored for slot use: never 0 (0 marks an empty slot).
    #[inline]
    pub fn slot_id(instance_id: u64) -> u64 {
        instance_id % ID_MASK + 1
    }

    #[inline]
    fn set(&self, hash: u64) -> &[AtomicU64] {
        // The set comes from the low bits, the tag from the high ones: independent.
        let s = (hash & self.set_mask) as usize * WAYS;
        &self.slots[s..s + WAYS]
    }

    /// The slot id (see `slot_id`) stored for `hash`, if any.
    #[inline]
    pub fn get(&self, hash: u64) -> Option<u64> {
        let tag = hash & !ID_MASK;
        self.set(hash).iter().find_map(|w| {
            let v = w.load(Ordering::Relaxed);
            (v != 0 && v & !ID_MASK == tag).then_some(v & ID_MASK)
        })
    }

    /// Records that `hash` went to the instance with slot id `sid`. An unchanged entry is
    /// not rewritten, so hot prefixes stay shared read-only in every core's cache.
    #[inline]
    pub fn insert(&self, hash: u64, sid: u64) {
        let tag = hash & !ID_MASK;
        let entry = tag | (sid & ID_MASK);
        let set = self.set(hash);
        let mut empty = None;
        for w in set {
            let v = w.load(Ordering::Relaxed);
            if v != 0 && v & !ID_MASK == tag {
                if v != entry {
                    w.store(entry, Ordering::Relaxed);
                }
                return;
            }
            if v == 0 && empty.is_none() {
                empty = Some(w);
            }
        }
        // Full set: random replacement (as CPU caches do), cheap and without shared state.
        let victim = empty.unwrap_or_else(|| &set[(crate::ids::next_u64() % WAYS as u64) as usize]);
        victim.store(entry, Ordering::Relaxed);
    }

    /// Records every block of a chain → `sid` (a prefix placed or moved whole).
    pub fn insert_chain(&self, hashes: &[u64], sid: u64) {
        for &h in hashes {
            self.insert(h, sid);
        }
    }

    /// Records `hash` → `sid` unless another entry for `hash` is there already: Ok when this
    /// call placed it, else the slot id already there (even when it is `sid`: placed by
    /// another). Two workers placing one new prefix at once both see the first one's
    /// choice: the first empty way is taken with a compare-and-swap, so only one of them
    /// can fill it. (A full set falls back to `insert`: a rare race there costs one
    /// request's placement, not correctness.)
    pub fn try_claim(&self, hash: u64, sid: u64) -> Result<(), u64> {
        let tag = hash & !ID_MASK;
        let entry = tag | (sid & ID_MASK);
        let set = self.set(hash);
        loop {
            let mut empty = None;
            for w in set {
                let v = w.load(Ordering::Acquire);
                if v != 0 && v & !ID_MASK == tag {
                    return Err(v & ID_MASK);
                }
                if v == 0 && empty.is_none() {
                    empty = Some(w);
                }
            }
            let Some(w) = empty else {
                self.insert(hash, sid);
                return Ok(());
            };
            if w.compare_exchange(0, entry, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
            // Someone filled that way first: look again (it may be this very prefix).
        }
    }

    /// Forgets every entry (tests, and an operator who wants a cold start).
    pub fn clear(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// Entries in use (a full scan: for status pages and tests, not the request path).
    pub fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The table of one model and role, kept across topology rebuilds (a reload or an added
/// instance does not forget what was learned) while some scheduler holds it. Called when a
/// snapshot is built (control thread), never on the request path.
pub fn shared_table(model: &str, role: crate::config::Role, entries: usize) -> Arc<PrefixTable> {
    type Registry = HashMap<(String, crate::config::Role, usize), Weak<PrefixTable>>;
    static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
    let mut guard = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let reg = guard.get_or_insert_with(HashMap::new);
    reg.retain(|_, w| w.strong_count() > 0);
    let key = (model.to_string(), role, entries);
    if let Some(t) = reg.get(&key).and_then(Weak::upgrade) {
        return t;
    }
    let t = Arc::new(PrefixTable::new(entries));
    reg.insert(key, Arc::downgrade(&t));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_and_finds_and_overwrites() {
        let t = PrefixTable::new(64);
        assert_eq!(t.capacity(), 64);
        assert_eq!(t.get(0xdead_beef_0000_1234), None);
        t.insert(0xdead_beef_0000_1234, 7);
        assert_eq!(t.get(0xdead_beef_0000_1234), Some(7));
        t.insert(0xdead_beef_0000_1234, 9);
        assert_eq!(t.get(0xdead_beef_0000_1234), Some(9));
        assert_eq!(t.len(), 1);
        // Same set, another tag: a different entry.
        assert_eq!(t.get(0xaaaa_beef_0000_1234), None);
    }

    #[test]
    fn memory_is_fixed_and_recent_entries_survive() {
        let t = PrefixTable::new(1024);
        for k in 0..100_000u64 {
            t.insert(crate::hash::hash64(1, &k.to_le_bytes()), 1 + k % 5);
        }
        assert_eq!(t.capacity(), 1024);
        assert!(t.len() <= 1024);
        // The last insert is always present.
        let last = crate::hash::hash64(1, &99_999u64.to_le_bytes());
        assert_eq!(t.get(last), Some(1 + 99_999 % 5));
    }

    #[test]
    fn slot_ids_are_never_zero() {
        assert_ne!(PrefixTable::slot_id(ID_MASK), 0);
        assert_ne!(PrefixTable::slot_id(0), 0);
        assert_eq!(PrefixTable::slot_id(5), 6);
    }

    #[test]
    fn registry_shares_one_table_per_model_and_role() {
        use crate::config::Role;
        let a = shared_table("reg-m", Role::Decode, 256);
        let b = shared_table("reg-m", Role::Decode, 256);
        assert!(Arc::ptr_eq(&a, &b));
        let c = shared_table("reg-m", Role::Prefill, 256);
        assert!(!Arc::ptr_eq(&a, &c));
    }

    /// Threads claiming one new hash for different instances all end with the same one,
    /// and exactly one of them placed it.
    #[test]
    fn one_claim_wins_a_race() {
        for round in 0..200u64 {
            let t = Arc::new(PrefixTable::new(64));
            let hash = round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let got: Vec<Result<(), u64>> = (1..=4u64)
                .map(|sid| {
                    let t = t.clone();
                    std::thread::spawn(move || t.try_claim(hash, sid))
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            assert_eq!(got.iter().filter(|g| g.is_ok()).count(), 1, "round {round}");
            let holder = t.get(hash);
            assert!(
                got.iter()
                    .all(|g| g.err().is_none_or(|h| Some(h) == holder)),
                "round {round}: {got:?}"
            );
        }
    }
}
