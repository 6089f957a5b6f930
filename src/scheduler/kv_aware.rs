//! Precise prefix routing: the instance whose engine *actually holds* the longest prefix of
//! the prompt's KV blocks (learned from the engines' KV-cache events into `kv_index`),
//! weighed against load. Cost of sending the request to an instance, in prompt tokens:
//!
//! ```text
//! cost = (prompt tokens − cached tokens there) + load there
//! ```
//!
//! where load is in tokens (prefill and dual: prompt tokens in flight and unseen; decode:
//! requests × `UNSEEN_PROMPT_TOKENS`). The lowest cost wins; without token
//! ids or KV events it is the least-loaded pick (docs/scheduling.md, "KV aware").

use super::stats::{self, Outcome, Policy};
use super::{load_key, PickContext, Scheduler};
use crate::config::Role;
use crate::engine_load::UNSEEN_PROMPT_TOKENS;
use crate::instance::Instance;
use crate::kv_index;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub struct KvAware {
    role: Role,
}

impl KvAware {
    pub fn new(role: Role) -> Self {
        KvAware { role }
    }

    /// The instance's load in prompt-token units: what it must prefill before this request
    /// (prefill and dual: prompt tokens in flight and unseen, the prefill load key); a decode
    /// node's load is its requests, each taken as `UNSEEN_PROMPT_TOKENS`.
    #[inline]
    fn load_tokens(&self, i: &Instance) -> u64 {
        match self.role {
            Role::Prefill | Role::Dual => load_key(Role::Prefill, i).0,
            Role::Decode => load_key(Role::Decode, i).0 * UNSEEN_PROMPT_TOKENS,
        }
    }
}

impl Scheduler for KvAware {
    fn pick(&self, candidates: &[Arc<Instance>], ctx: &PickContext<'_>) -> Option<Arc<Instance>> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let idx = kv_index::global();
        let block = idx.block_size.load(Ordering::Relaxed) as usize;
        let bit = |i: &Instance| i.kv_bit.load(Ordering::Relaxed);
        let wanted = candidates
            .iter()
            .filter(|i| ctx.eligible(i) && bit(i) > 0)
            .fold(0u64, |m, i| m | 1 << (bit(i) - 1));
        let mut depth = [0u32; 64];
        let keys = match ctx.tokens {
            Some(t) if block > 0 => kv_index::prompt_keys(t, block),
            _ => Vec::new(),
        };
        if wanted != 0 {
            idx.matched(&keys, wanted, &mut depth);
        }
        let prompt = ctx.tokens.map_or(ctx.prompt_tokens, |t| t.len() as u64);
        let start = (crate::ids::next_u64() % n as u64) as usize;
        let chosen = (0..n)
            .map(|k| &candidates[(start + k) % n])
            .filter(|i| ctx.eligible(i))
            .min_by_key(|i| {
                let cached = match bit(i) {
                    0 => 0,
                    b => depth[b as usize - 1] as u64 * block as u64,
                };
                prompt.saturating_sub(cached) + self.load_tokens(i)
            })
            .cloned()?;
        let blocks = match chosen.kv_bit.load(Ordering::Relaxed) {
            0 => 0,
            b => depth[b as usize - 1] as u64,
        };
        // The leg is counted by what the engine must compute (see `scheduler::take_cached`).
        super::note_cached(chosen.id, (blocks * block as u64).min(prompt));
        let outcome = if ctx.tokens.is_none() {
            Outcome::NoTokens
        } else if wanted == 0 {
            Outcome::NoEvents
        } else if blocks > 0 {
            Outcome::Hit
        } else {
            Outcome::NoMatch
        };
        stats::record(Policy::KvAware, outcome, blocks);
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::InFlight;
    use crate::scheduler::testing::instances;

    #[test]
    fn follows_cached_blocks_until_load_outweighs_them() {
        let c = instances(3, Role::Prefill);
        let idx = kv_index::global();
        idx.block_size.store(16, Ordering::Relaxed);
        // Bits 40..42: away from other tests' bits in the process-wide index.
        for (k, i) in c.iter().enumerate() {
            i.kv_bit.store(41 + k as u32, Ordering::Relaxed);
        }
        let tokens: Vec<u32> = (5000..5000 + 320).collect();
        for &key in &kv_index::prompt_keys(&tokens, 16)[..16] {
            idx.add(key, 41); // instance 1 holds 256 of the 320 tokens
        }
        let p = KvAware::new(Role::Prefill);
        let ctx = PickContext {
            tokens: Some(&tokens),
            prompt_tokens: 320,
            ..Default::default()
        };
        for _ in 0..20 {
            assert!(Arc::ptr_eq(&p.pick(&c, &ctx).unwrap(), &c[1]));
        }
        // 300 prompt tokens in flight there outweigh the 256 it holds.
        let _busy = InFlight::new(c[1].clone(), 300, 0);
        assert!(!Arc::ptr_eq(&p.pick(&c, &ctx).unwrap(), &c[1]));
        // Without token ids: least loaded.
        let ctx = PickContext {
            prompt_tokens: 320,
            ..Default::default()
        };
        assert!(!Arc::ptr_eq(&p.pick(&c, &ctx).unwrap(), &c[1]));
    }
}
