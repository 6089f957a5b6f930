use super::{PickContext, Scheduler};
use crate::topology::Instance;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One cursor per model and role, shared by all workers, skipping unavailable instances.
#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Scheduler for RoundRobin {
    fn name(&self) -> &'static str {
        "roundrobin"
    }

    fn pick(&self, candidates: &[Arc<Instance>], _ctx: &PickContext<'_>) -> Option<Arc<Instance>> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &candidates[(start + k) % n])
            .find(|i| i.is_available())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::topology::Health;

    fn inst(port: u16) -> Arc<Instance> {
        let i = Instance::new(
            format!("127.0.0.1:{port}"),
            format!("127.0.0.1:{port}").parse().unwrap(),
            Role::Decode,
            Arc::from("m"),
        );
        i.set_health(Health::Healthy);
        Arc::new(i)
    }

    #[test]
    fn cycles_and_skips_unhealthy() {
        let c = vec![inst(1), inst(2), inst(3)];
        let rr = RoundRobin::default();
        let ctx = PickContext::default();
        let ports: Vec<u16> = (0..6)
            .map(|_| rr.pick(&c, &ctx).unwrap().socket_addr.port())
            .collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
        c[1].set_health(Health::Unhealthy);
        let ports: Vec<u16> = (0..4)
            .map(|_| rr.pick(&c, &ctx).unwrap().socket_addr.port())
            .collect();
        assert!(!ports.contains(&2));
        for i in &c {
            i.set_health(Health::Unhealthy);
        }
        assert!(rr.pick(&c, &ctx).is_none());
    }
}
