//! One backend instance as every worker sees it: its address and role, its health and
//! circuit, and its in-flight load in cache-padded atomics that workers update without
//! locks.

use crate::config::{CircuitConfig, Role};
use crate::resilience::{Breaker, Circuit, Transition};
use crossbeam_utils::CachePadded;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

pub struct Instance {
    /// Process-unique, stable for the instance's life (metrics key on it).
    pub id: u64,
    pub address: String,
    pub socket_addr: SocketAddr,
    pub role: Role,
    pub model: Arc<str>,
    health: AtomicU8,
    /// Removed by an operator: finishes what it has, gets nothing new.
    pub draining: AtomicBool,
    /// Circuit breaker (see `resilience`); only an open circuit blocks picks.
    pub breaker: Breaker,
    pub load: CachePadded<Load>,
    /// The engine's own numbers from its /metrics (control side writes, schedulers read).
    pub engine: crate::engine_load::EngineLoad,
    /// The instance's bit in the KV index + 1 (0: no KV events), set by the subscriber.
    pub kv_bit: std::sync::atomic::AtomicU32,
    pub kv_stats: crate::kv_index::KvStats,
    /// New prefix groups the prefix policies placed here (this replica's and its peers'):
    /// new groups are dealt to the instances with the fewest (`scheduler::GroupCounts`).
    pub prefix_groups: AtomicU64,
    /// 0 until read from the instance's /v1/models.
    pub max_model_len: AtomicU64,
    pub root: OnceLock<String>,
    /// Set by the control thread when the instance's /v1/models does not list the model it
    /// is configured for (its requests would come back 404 `model_not_found`): what it
    /// lists instead. Never read on the request path.
    pub model_mismatch: std::sync::Mutex<Option<String>>,
    /// Unix seconds of the last health probe (0: never).
    pub last_check: AtomicU64,
}

impl Instance {
    pub fn new(address: String, socket_addr: SocketAddr, role: Role, model: Arc<str>) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Instance {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            address,
            socket_addr,
            role,
            model,
            health: AtomicU8::new(Health::Unknown as u8),
            draining: AtomicBool::new(false),
            breaker: Default::default(),
            load: CachePadded::default(),
            engine: Default::default(),
            kv_bit: Default::default(),
            kv_stats: Default::default(),
            prefix_groups: AtomicU64::new(0),
            max_model_len: AtomicU64::new(0),
            root: OnceLock::new(),
            model_mismatch: Default::default(),
            last_check: AtomicU64::new(0),
        }
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Relaxed);
    }

    /// Whether the scheduler may send new requests here: healthy, not draining, circuit
    /// not open.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.health() == Health::Healthy
            && !self.draining.load(Ordering::Relaxed)
            && self.breaker.allows()
    }

    /// Whether a prompt of `prompt_tokens` (estimated) fits this instance's context.
    #[inline]
    pub fn fits(&self, prompt_tokens: u64) -> bool {
        let max = self.max_model_len.load(Ordering::Relaxed);
        max == 0 || prompt_tokens < max
    }

    pub fn in_flight(&self) -> u64 {
        self.load.requests.load(Ordering::Relaxed)
    }

    /// The circuit's state now (time-driven: see `Breaker::state`).
    pub fn circuit(&self) -> Circuit {
        self.breaker.state()
    }

    /// Records a failed request or probe against the circuit.
    pub fn record_failure(&self, cfg: &CircuitConfig) {
        if self.breaker.record_failure(cfg) == Some(Transition::Opened) {
            crate::warn!(
                "circuit of {} ({}) opened for {:?}",
                self.address,
                self.role.as_str(),
                cfg.timeout
            );
        }
    }

    /// Records a successful request or probe.
    pub fn record_success(&self, cfg: &CircuitConfig) {
        if self.breaker.record_success(cfg) == Some(Transition::Closed) {
            crate::warn!(
                "circuit of {} ({}) closed again",
                self.address,
                self.role.as_str()
            );
        }
    }

    /// One entry of `/status/instances` and `/health`.
    pub fn status_json(&self) -> serde_json::Value {
        let (req, prompt, decode) = self.load.snapshot();
        let max = self.max_model_len.load(Ordering::Relaxed);
        serde_json::json!({
            "address": self.address,
            "role": self.role.as_str(),
            "model": &*self.model,
            "status": self.health().as_str(),
            "circuit": self.circuit().as_str(),
            "draining": self.draining.load(Ordering::Relaxed),
            "active_requests": req,
            "in_flight_prompt_tokens": prompt,
            "in_flight_decode_tokens": decode,
            "last_check": self.last_check.load(Ordering::Relaxed),
            "max_model_len": (max > 0).then_some(max),
            "engine": self.engine.status_json(),
            "kv_events": self.kv_stats.status_json(self.kv_bit.load(Ordering::Relaxed) > 0),
            "prefix_groups": self.prefix_groups.load(Ordering::Relaxed),
        })
    }
}

/// In-flight load of one instance. Every worker writes it, and a request changes the three
/// counters together (when it starts and when it ends), so they share one cache line, theirs
/// alone (`Instance::load` is padded): one line moves between cores per change, not three.
#[derive(Default)]
pub struct Load {
    pub requests: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub decode_tokens: AtomicU64,
}

impl Load {
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.prompt_tokens.load(Ordering::Relaxed),
            self.decode_tokens.load(Ordering::Relaxed),
        )
    }
}

/// Counts a request against an instance for as long as it lives; every exit path (success,
/// error, client disconnect, unwinding) releases it.
pub struct InFlight<'a> {
    /// Borrowed from the request's topology snapshot: no reference count is written per
    /// leg (the `Arc`'s count is on a line every worker writes).
    inst: &'a Arc<Instance>,
    prompt_tokens: u64,
    /// Decode tokens still counted on the instance: the request's `max_tokens` less what
    /// has streamed out (`decoded`).
    decode_tokens: std::cell::Cell<u64>,
}

impl<'a> InFlight<'a> {
    pub fn new(inst: &'a Arc<Instance>, prompt_tokens: u64, decode_tokens: u64) -> Self {
        // The counters' line is written by every worker: no atomic add of a zero (a
        // prefill leg counts no decode tokens, a decode leg no prompt tokens).
        let l = &inst.load;
        l.requests.fetch_add(1, Ordering::Relaxed);
        if prompt_tokens > 0 {
            l.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        }
        if decode_tokens > 0 {
            l.decode_tokens.fetch_add(decode_tokens, Ordering::Relaxed);
        }
        InFlight {
            inst,
            prompt_tokens,
            decode_tokens: std::cell::Cell::new(decode_tokens),
        }
    }
    pub fn instance(&self) -> &'a Arc<Instance> {
        self.inst
    }

    /// `n` more tokens of the answer streamed out: they no longer count as in flight, so
    /// the instance's decode tokens say how much its requests have *left* — which of two
    /// nodes with as many requests frees a batch slot first (docs/scheduling.md).
    pub fn decoded(&self, n: u64) {
        let mut left = self.decode_tokens.get();
        release_decoded(self.inst, &mut left, n);
        self.decode_tokens.set(left);
    }

    /// The decode tokens this request still counts, handed to a task of its own that relays
    /// the answer (`DecodeLeft`); this guard then releases none of them.
    pub fn hand_over_decode(&self) -> DecodeLeft {
        DecodeLeft {
            inst: self.inst.clone(),
            left: self.decode_tokens.replace(0),
        }
    }
}

/// Takes up to `n` of the `left` decode tokens off the instance's count.
fn release_decoded(inst: &Instance, left: &mut u64, n: u64) {
    let n = n.min(*left);
    if n > 0 {
        inst.load.decode_tokens.fetch_sub(n, Ordering::Relaxed);
        *left -= n;
    }
}

/// A request's decode tokens still counted on an instance, owned by the task that relays its
/// streamed answer (`InFlight::hand_over_decode`): released as tokens stream out, the rest when
/// it is dropped, however the relay ends.
pub struct DecodeLeft {
    inst: Arc<Instance>,
    left: u64,
}

impl DecodeLeft {
    /// As `InFlight::decoded`.
    pub fn decoded(&mut self, n: u64) {
        release_decoded(&self.inst, &mut self.left, n);
    }
}

impl Drop for DecodeLeft {
    fn drop(&mut self) {
        let left = self.left;
        release_decoded(&self.inst, &mut self.left, left);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let l = &self.inst.load;
        l.requests.fetch_sub(1, Ordering::Relaxed);
        if self.prompt_tokens > 0 {
            l.prompt_tokens
                .fetch_sub(self.prompt_tokens, Ordering::Relaxed);
        }
        let decode = self.decode_tokens.get();
        if decode > 0 {
            l.decode_tokens.fetch_sub(decode, Ordering::Relaxed);
        }
    }
}
