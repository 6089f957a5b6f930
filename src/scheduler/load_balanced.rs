use super::{least_loaded, PickContext, Scheduler};
use crate::config::Role;
use crate::instance::Instance;
use std::sync::Arc;

/// The default: prefill goes to the instance with the fewest prompt tokens in flight
/// (prefill time grows with prompt length), decode to the fewest requests in flight (decode
/// batches by sequence), ties broken by decode tokens in flight.
pub struct LoadBalanced {
    role: Role,
}

impl LoadBalanced {
    pub fn new(role: Role) -> Self {
        LoadBalanced { role }
    }
}

impl Scheduler for LoadBalanced {
    fn pick<'c>(
        &self,
        candidates: &'c [Arc<Instance>],
        ctx: &PickContext<'_>,
    ) -> Option<&'c Arc<Instance>> {
        least_loaded(self.role, candidates, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::InFlight;
    use crate::scheduler::testing::instances;

    #[test]
    fn prefill_follows_token_weight() {
        let c = instances(2, Role::Prefill);
        let lb = LoadBalanced::new(Role::Prefill);
        // One long prompt on instance 0 outweighs three short ones on instance 1.
        let _a = InFlight::new(&c[0], 8000, 0);
        let _b: Vec<_> = (0..3).map(|_| InFlight::new(&c[1], 100, 0)).collect();
        let ctx = PickContext {
            prompt_tokens: 50,
            ..Default::default()
        };
        assert!(Arc::ptr_eq(lb.pick(&c, &ctx).unwrap(), &c[1]));
        // Decode counts requests instead.
        let lb = LoadBalanced::new(Role::Decode);
        assert!(Arc::ptr_eq(lb.pick(&c, &ctx).unwrap(), &c[0]));
    }

    #[test]
    fn decode_ties_broken_by_decode_tokens() {
        let c = instances(2, Role::Decode);
        let _a = InFlight::new(&c[0], 0, 900);
        let _b = InFlight::new(&c[1], 0, 10);
        let lb = LoadBalanced::new(Role::Decode);
        assert!(Arc::ptr_eq(
            lb.pick(&c, &PickContext::default()).unwrap(),
            &c[1]
        ));
    }

    #[test]
    fn decode_tokens_streamed_out_no_longer_count() {
        let c = instances(2, Role::Decode);
        let a = InFlight::new(&c[0], 0, 100);
        let _b = InFlight::new(&c[1], 0, 60);
        let lb = LoadBalanced::new(Role::Decode);
        let pick = || lb.pick(&c, &PickContext::default()).unwrap();
        assert!(Arc::ptr_eq(pick(), &c[1]));
        // 50 of instance 0's 100 tokens went out: it has 50 left, fewer than 60.
        a.decoded(50);
        assert_eq!(c[0].load.snapshot(), (1, 0, 50));
        assert!(Arc::ptr_eq(pick(), &c[0]));
        // More than announced (a usage chunk, an engine ignoring max_tokens) stops at zero,
        // and the guard's drop takes back only what is left.
        a.decoded(80);
        assert_eq!(c[0].load.snapshot(), (1, 0, 0));
        drop(a);
        assert_eq!(c[0].load.snapshot(), (0, 0, 0));
    }

    #[test]
    fn counters_return_to_zero() {
        let c = instances(1, Role::Decode);
        {
            let _g = InFlight::new(&c[0], 5, 7);
            assert_eq!(c[0].load.snapshot(), (1, 5, 7));
        }
        assert_eq!(c[0].load.snapshot(), (0, 0, 0));
    }
}
