use super::{load_key, PickContext, Scheduler};
use crate::config::Role;
use crate::instance::Instance;
use std::sync::Arc;

/// Two random eligible instances, the less loaded wins: nearly the balance of
/// least-loaded with O(1) work and no herd behaviour when load readings lag.
pub struct PowerOfTwo {
    role: Role,
}

impl PowerOfTwo {
    pub fn new(role: Role) -> Self {
        PowerOfTwo { role }
    }
}

impl Scheduler for PowerOfTwo {
    fn pick<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let r = crate::ids::next_u64();
        let a = (r % n as u64) as usize;
        let b = if n > 1 {
            (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n
        } else {
            a
        };
        let (ia, ib) = (&candidates[a], &candidates[b]);
        match (ctx.eligible(ia), ctx.eligible(ib)) {
            (true, true) => Some(if load_key(self.role, ib) < load_key(self.role, ia) {
                ib
            } else {
                ia
            }),
            (true, false) => Some(ia),
            (false, true) => Some(ib),
            // Both samples ineligible: fall back to any eligible one.
            (false, false) => super::least_loaded(self.role, candidates, ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::InFlight;
    use crate::scheduler::testing::instances;

    /// Places 10,000 long-lived requests; reports the most loaded instance's count.
    fn max_load(pick: impl for<'c> Fn(&'c [Arc<Instance>]) -> &'c Arc<Instance>) -> u64 {
        let c = instances(16, Role::Decode);
        let mut guards = Vec::new();
        for _ in 0..10_000 {
            guards.push(InFlight::new(pick(&c), 0, 0));
        }
        c.iter().map(|i| i.in_flight()).max().unwrap()
    }

    #[test]
    fn beats_random_on_max_load() {
        let p2 = PowerOfTwo::new(Role::Decode);
        let two = max_load(|c| p2.pick(c, &PickContext::default()).unwrap());
        let random = max_load(|c| &c[(crate::ids::next_u64() % c.len() as u64) as usize]);
        // Ideal is 625 per instance; random overshoots by tens, power of two by a few.
        assert!(two < random, "power of two {two} vs random {random}");
        assert!(two <= 630, "power of two max load {two}");
    }
}
