//! Scheduling policies behind one trait. Each model and role owns its scheduler instance
//! inside the shared topology snapshot, so its state (a round-robin cursor, say) is shared by
//! every worker through atomics.

mod round_robin;

use crate::config::SchedulerKind;
use crate::topology::Instance;
use std::sync::Arc;

pub use round_robin::RoundRobin;

/// What a policy may look at about the request being placed.
#[derive(Debug, Default, Clone, Copy)]
pub struct PickContext<'a> {
    /// Estimated prompt tokens (bytes / 4; no tokenizer on the hot path).
    pub prompt_tokens: usize,
    /// Affinity key (session header, user, client IP) for hashing policies.
    pub key: Option<&'a str>,
}

pub trait Scheduler: Send + Sync {
    fn name(&self) -> &'static str;
    /// Picks one of `candidates`; never an instance that is not available.
    fn pick(&self, candidates: &[Arc<Instance>], ctx: &PickContext<'_>) -> Option<Arc<Instance>>;
}

pub fn build(kind: SchedulerKind) -> Box<dyn Scheduler> {
    match kind {
        SchedulerKind::RoundRobin => Box::new(RoundRobin::default()),
    }
}
