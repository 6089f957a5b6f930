use super::{hash64, least_loaded, PickContext, Scheduler};
use crate::config::{Role, SchedulingOptions};
use crate::instance::Instance;
use std::sync::Arc;

/// Sticky routing by key (`X-Session-ID`, else `user`, else client IP) on a hash ring with
/// virtual nodes: adding or removing one of N instances moves only the keys that instance
/// takes or gives up (~1/N). Bounded load: an instance already above
/// `(1 + ε) × average` in-flight passes the key to the next one on the ring, so one hot
/// session cannot melt a node.
/// No instance is considered overloaded below this many requests in flight.
const MIN_BOUND: u64 = 4;

pub struct ConsistentHash {
    /// (point, index into the role's instance list), sorted by point.
    ring: Vec<(u64, u32)>,
    epsilon: f64,
}

impl ConsistentHash {
    pub fn new(instances: &[Arc<Instance>], opts: &SchedulingOptions) -> Self {
        let mut ring = Vec::with_capacity(instances.len() * opts.virtual_nodes);
        for (idx, inst) in instances.iter().enumerate() {
            for v in 0..opts.virtual_nodes {
                ring.push((hash64(v as u64, inst.address.as_bytes()), idx as u32));
            }
        }
        ring.sort_unstable();
        ConsistentHash {
            ring,
            epsilon: opts.hash_load_factor,
        }
    }
}

impl Scheduler for ConsistentHash {
    fn pick<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>> {
        let Some(key) = ctx.key else {
            return least_loaded(Role::Decode, candidates, ctx);
        };
        if self.ring.is_empty() {
            return None;
        }
        // Bound: ceil((1+ε) × (in flight + this one) / eligible instances).
        let (mut total, mut eligible) = (0u64, 0u64);
        for i in candidates.iter().filter(|i| ctx.eligible(i)) {
            total += i.in_flight();
            eligible += 1;
        }
        if eligible == 0 {
            return None;
        }
        // The floor keeps light, bursty load (a handful in flight) from scattering sessions:
        // bounded load matters when a node is really busy.
        let bound = (((1.0 + self.epsilon) * (total + 1) as f64 / eligible as f64).ceil() as u64)
            .max(MIN_BOUND);
        let h = hash64(0, key.as_bytes());
        let start = self.ring.partition_point(|&(p, _)| p < h);
        let n = self.ring.len();
        let mut last = u32::MAX;
        for k in 0..n {
            let idx = self.ring[(start + k) % n].1;
            if idx == last {
                continue;
            }
            last = idx;
            let Some(inst) = candidates.get(idx as usize) else {
                continue;
            };
            if ctx.eligible(inst) && inst.in_flight() < bound {
                return Some(inst);
            }
        }
        least_loaded(Role::Decode, candidates, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::InFlight;
    use crate::scheduler::testing::instances;

    fn owner(ch: &ConsistentHash, c: &[Arc<Instance>], key: &str) -> String {
        let ctx = PickContext {
            key: Some(key),
            ..Default::default()
        };
        ch.pick(c, &ctx).unwrap().address.clone()
    }

    #[test]
    fn adding_one_of_eight_moves_only_its_share() {
        let opts = SchedulingOptions::default();
        let nine = instances(9, Role::Decode);
        let eight = nine[..8].to_vec();
        let (a, b) = (
            ConsistentHash::new(&eight, &opts),
            ConsistentHash::new(&nine, &opts),
        );
        let keys: Vec<String> = (0..10_000).map(|k| format!("session-{k}")).collect();
        let mut moved_to_new = 0;
        let mut moved_elsewhere = 0;
        for k in &keys {
            let (before, after) = (owner(&a, &eight, k), owner(&b, &nine, k));
            if before != after {
                if after == nine[8].address {
                    moved_to_new += 1;
                } else {
                    moved_elsewhere += 1;
                }
            }
        }
        // Keys not taken by the new instance keep their owner (≥ 95 %; ideally all).
        let kept = (keys.len() - moved_to_new - moved_elsewhere) as f64
            / (keys.len() - moved_to_new) as f64;
        assert!(kept >= 0.95, "kept {kept}");
        assert_eq!(moved_elsewhere, 0);
        // The new instance takes about 1/9 of the keys.
        let share = moved_to_new as f64 / keys.len() as f64;
        assert!((0.07..0.16).contains(&share), "new instance took {share}");
    }

    #[test]
    fn bounded_load_holds_for_a_hot_key() {
        let c = instances(4, Role::Decode);
        let ch = ConsistentHash::new(&c, &SchedulingOptions::default());
        let ctx = PickContext {
            key: Some("hot"),
            ..Default::default()
        };
        let mut guards = Vec::new();
        for _ in 0..400 {
            guards.push(InFlight::new(ch.pick(&c, &ctx).unwrap(), 0, 0));
        }
        let max = c.iter().map(|i| i.in_flight()).max().unwrap();
        // ε = 0.25: nobody above ceil(1.25 × 400 / 4) = 125.
        assert!(max <= 125, "max in flight {max}");
        // And while load is light, the key sticks to one instance.
        drop(guards);
        let first = owner(&ch, &c, "hot");
        assert!((0..50).all(|_| owner(&ch, &c, "hot") == first));
    }
}
