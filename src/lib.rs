//! xpyd: a thread-per-core, io_uring proxy for disaggregated (prefill/decode) LLM serving.
//!
//! Layers, outermost first: `runtime` (threads, event loops, listeners) → `proxy` (connection
//! loop, routing, the P/D flow, relaying, upstream pool) → `http` (parsing and framing) —
//! with `shared` (→ `topology` → `scheduler` → `instance` → `resilience`) as the state
//! shared between workers, `config` as its source, and `dummy` as the simulated vLLM node used by tests, benchmarks and the demo.

pub mod log;

pub mod admission;
pub mod clock;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod discovery;
pub mod dummy;
pub mod engine_load;
pub mod hash;
pub mod http;
pub mod ids;
pub mod instance;
pub mod kv_index;
pub mod metrics;
pub mod peer_load;
pub mod proxy;
pub mod resilience;
pub mod runtime;
pub mod scheduler;
pub mod shared;
pub mod tokenize;
pub mod topology;
pub mod trace;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The mutation tests' deterministic generator (xorshift64): each call gives a number in
/// `0..n`, the same sequence on every run.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    }
}

/// One random edit of `m` for the mutation tests: a byte of `bytes` written over, inserted
/// at, or a byte removed from a random place.
#[cfg(test)]
pub(crate) fn test_mutate(m: &mut Vec<u8>, bytes: &[u8], next: &mut impl FnMut(usize) -> usize) {
    let at = next(m.len());
    let b = bytes[next(bytes.len())];
    match next(3) {
        0 => m[at] = b,
        1 => m.insert(at, b),
        _ => {
            m.remove(at);
        }
    }
}
