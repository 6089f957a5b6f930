use super::{PickContext, Scheduler};
use crate::instance::Instance;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One cursor per model and role, shared by all workers (so two workers do not both start
/// at instance 0), skipping ineligible instances.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Scheduler for RoundRobin {
    fn pick<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &candidates[(start + k) % n])
            .find(|i| ctx.eligible(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::instance::Health;
    use crate::scheduler::testing::instances;

    #[test]
    fn cycles_and_skips_unhealthy() {
        let c = instances(3, Role::Decode);
        let rr = RoundRobin::default();
        let ctx = PickContext::default();
        let ports: Vec<String> = (0..6)
            .map(|_| rr.pick(&c, &ctx).unwrap().address.clone())
            .collect();
        assert_eq!(ports[..3], ports[3..]);
        c[1].set_health(Health::Unhealthy);
        assert!((0..4).all(|_| rr.pick(&c, &ctx).unwrap().address != c[1].address));
        for i in &c {
            i.set_health(Health::Unhealthy);
        }
        assert!(rr.pick(&c, &ctx).is_none());
    }

    #[test]
    fn exact_across_two_threads() {
        let c = instances(4, Role::Decode);
        let rr = Arc::new(RoundRobin::default());
        let counts: Vec<Vec<usize>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let (rr, c) = (rr.clone(), c.clone());
                    s.spawn(move || {
                        let mut n = vec![0usize; 4];
                        for _ in 0..10_000 {
                            let p = rr.pick(&c, &PickContext::default()).unwrap();
                            n[c.iter().position(|x| Arc::ptr_eq(x, p)).unwrap()] += 1;
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let total: Vec<usize> = (0..4).map(|k| counts[0][k] + counts[1][k]).collect();
        assert_eq!(
            total,
            vec![5_000; 4],
            "shared cursor must be exact: {total:?}"
        );
    }
}
