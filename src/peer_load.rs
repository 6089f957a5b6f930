//! What the peer replicas (`prefix_sync.peers`) have in flight on one instance, as their
//! load reports say (docs/scheduling.md, "Replicas"). A replica learns its peers' requests
//! on an engine otherwise only from the engine's scraped numbers, up to an interval old;
//! under load that stale view sent each replica's new requests to the nodes the other had
//! just filled. Reports come every `prefix_sync::LOAD_EVERY`; a worker taking one writes
//! the peer's slot with atomic stores, the scraper's thread frees slots no report renewed
//! for `TTL_MS`, and picks read one sum.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Peers one instance's table can tell apart (more report: the extra ones are not counted).
pub const SLOTS: usize = 8;
/// A peer's count stops counting this long after its last report (a replica that stopped).
pub const TTL_MS: u64 = 1_000;

#[derive(Default)]
pub struct PeerLoad {
    slots: [Slot; SLOTS],
    /// The slots' counts summed. Signed: a slot rewritten while it expires may leave it
    /// below zero for a moment, which reads as 0.
    sum: AtomicI64,
}

#[derive(Default)]
struct Slot {
    /// The reporting replica's id (0: free).
    replica: AtomicU64,
    count: AtomicU64,
    at_ms: AtomicU64,
}

impl PeerLoad {
    /// Peer `replica` (non-zero) has `count` requests in flight on the instance at `now`
    /// (`resilience::now_ms`).
    pub fn report(&self, replica: u64, count: u64, now: u64) {
        let slot = self
            .slots
            .iter()
            .find(|s| s.replica.load(Ordering::Acquire) == replica)
            .or_else(|| {
                self.slots.iter().find(|s| {
                    s.replica
                        .compare_exchange(0, replica, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                })
            });
        if let Some(s) = slot {
            s.at_ms.store(now, Ordering::Relaxed);
            let old = s.count.swap(count, Ordering::AcqRel);
            self.sum
                .fetch_add(count as i64 - old as i64, Ordering::Relaxed);
        }
    }

    /// Frees the slots of peers that have not reported for `TTL_MS` (the scraper's thread).
    pub fn expire(&self, now: u64) {
        for s in &self.slots {
            let free = s.replica.load(Ordering::Acquire) == 0;
            let stale = now.saturating_sub(s.at_ms.load(Ordering::Relaxed)) > TTL_MS;
            if free || stale {
                let old = s.count.swap(0, Ordering::AcqRel);
                self.sum.fetch_sub(old as i64, Ordering::Relaxed);
                if stale {
                    s.replica.store(0, Ordering::Release);
                }
            }
        }
    }

    /// The peers' requests in flight on the instance.
    #[inline]
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Relaxed).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_replace_and_expire() {
        let p = PeerLoad::default();
        p.report(7, 5, 100);
        p.report(9, 3, 100);
        assert_eq!(p.sum(), 8);
        p.report(7, 2, 200); // a peer's new count replaces its old one
        assert_eq!(p.sum(), 5);
        p.expire(900);
        assert_eq!(p.sum(), 5);
        p.report(9, 4, 1_000);
        p.expire(100 + TTL_MS + 101); // 7 last reported at 200: gone; 9 at 1000: kept
        assert_eq!(p.sum(), 4);
        // Its slot is free for another peer.
        for r in 10..10 + SLOTS as u64 {
            p.report(r, 1, 1_300);
        }
        assert_eq!(p.sum(), 4 + SLOTS as u64 - 1, "one slot is still 9's");
    }
}
