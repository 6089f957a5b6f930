//! The shared scheduler state: an immutable topology snapshot (models → instances by role),
//! swapped whole through `arc-swap`, plus per-instance cache-padded atomics that workers
//! update without locks.

use crate::config::{Config, ModelConfig, Role};
use crate::scheduler::{self, Scheduler};
use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

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
    pub address: String,
    pub socket_addr: SocketAddr,
    pub role: Role,
    pub model: Arc<str>,
    health: AtomicU8,
    /// Set once the instance answered its first health probe.
    pub answered: AtomicBool,
    /// Removed by an operator: finishes what it has, gets nothing new.
    pub draining: AtomicBool,
    /// Circuit breaker state (see `resilience`); only `Open` blocks picks.
    pub circuit: AtomicU8,
    pub load: Load,
    /// 0 until read from the instance's /v1/models.
    pub max_model_len: AtomicU64,
    pub root: OnceLock<String>,
    /// Unix seconds of the last health probe (0: never).
    pub last_check: AtomicU64,
}

impl Instance {
    pub fn new(address: String, socket_addr: SocketAddr, role: Role, model: Arc<str>) -> Self {
        Instance {
            address,
            socket_addr,
            role,
            model,
            health: AtomicU8::new(Health::Unknown as u8),
            answered: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            circuit: AtomicU8::new(CIRCUIT_CLOSED),
            load: Load::default(),
            max_model_len: AtomicU64::new(0),
            root: OnceLock::new(),
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
        if h == Health::Healthy {
            self.answered.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the scheduler may send new requests here: healthy, not draining, circuit
    /// not open.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.health() == Health::Healthy
            && !self.draining.load(Ordering::Relaxed)
            && self.circuit.load(Ordering::Relaxed) != CIRCUIT_OPEN
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

    pub fn circuit_str(&self) -> &'static str {
        match self.circuit.load(Ordering::Relaxed) {
            CIRCUIT_OPEN => "open",
            CIRCUIT_HALF_OPEN => "half_open",
            _ => "closed",
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
            "circuit": self.circuit_str(),
            "draining": self.draining.load(Ordering::Relaxed),
            "active_requests": req,
            "in_flight_prompt_tokens": prompt,
            "in_flight_decode_tokens": decode,
            "last_check": self.last_check.load(Ordering::Relaxed),
            "max_model_len": (max > 0).then_some(max),
        })
    }
}

pub const CIRCUIT_CLOSED: u8 = 0;
pub const CIRCUIT_OPEN: u8 = 1;
pub const CIRCUIT_HALF_OPEN: u8 = 2;

/// In-flight load of one instance; each counter on its own cache line because every worker
/// writes them.
#[derive(Default)]
pub struct Load {
    pub requests: CachePadded<AtomicU64>,
    pub prompt_tokens: CachePadded<AtomicU64>,
    pub decode_tokens: CachePadded<AtomicU64>,
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
pub struct InFlight {
    inst: Arc<Instance>,
    prompt_tokens: u64,
    decode_tokens: u64,
}

impl InFlight {
    pub fn new(inst: Arc<Instance>, prompt_tokens: u64, decode_tokens: u64) -> Self {
        inst.load.requests.fetch_add(1, Ordering::Relaxed);
        inst.load
            .prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        inst.load
            .decode_tokens
            .fetch_add(decode_tokens, Ordering::Relaxed);
        InFlight {
            inst,
            prompt_tokens,
            decode_tokens,
        }
    }
    pub fn instance(&self) -> &Arc<Instance> {
        &self.inst
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let l = &self.inst.load;
        l.requests.fetch_sub(1, Ordering::Relaxed);
        l.prompt_tokens
            .fetch_sub(self.prompt_tokens, Ordering::Relaxed);
        l.decode_tokens
            .fetch_sub(self.decode_tokens, Ordering::Relaxed);
    }
}

pub struct RoleSet {
    pub instances: Vec<Arc<Instance>>,
    pub scheduler: Box<dyn Scheduler>,
}

impl RoleSet {
    fn new(instances: Vec<Arc<Instance>>, role: Role, m: &ModelConfig) -> Self {
        RoleSet {
            scheduler: scheduler::build(m.scheduler, role, &m.scheduling, &instances),
            instances,
        }
    }

    pub fn any_available(&self) -> bool {
        self.instances.iter().any(|i| i.is_available())
    }
}

pub struct ModelRoute {
    pub name: String,
    pub scheduler_name: &'static str,
    pub prefill: RoleSet,
    pub decode: RoleSet,
    pub dual: RoleSet,
}

impl ModelRoute {
    fn new(m: &ModelConfig) -> Self {
        let name: Arc<str> = Arc::from(m.name.as_str());
        let of = |role: Role| -> Vec<Arc<Instance>> {
            m.instances
                .iter()
                .filter(|i| i.role == role)
                .map(|i| {
                    Arc::new(Instance::new(
                        i.address.clone(),
                        i.socket_addr,
                        role,
                        name.clone(),
                    ))
                })
                .collect()
        };
        ModelRoute {
            name: m.name.clone(),
            scheduler_name: m.scheduler.as_str(),
            prefill: RoleSet::new(of(Role::Prefill), Role::Prefill, m),
            decode: RoleSet::new(of(Role::Decode), Role::Decode, m),
            dual: RoleSet::new(of(Role::Dual), Role::Dual, m),
        }
    }

    pub fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.prefill
            .instances
            .iter()
            .chain(&self.decode.instances)
            .chain(&self.dual.instances)
    }

    /// A healthy prefill + decode pair, or a healthy dual instance, exists now.
    pub fn can_serve(&self) -> bool {
        (self.prefill.any_available() && self.decode.any_available()) || self.dual.any_available()
    }

    /// Smallest context length reported by the model's instances (None until one reported).
    pub fn max_model_len(&self) -> Option<u64> {
        self.instances()
            .map(|i| i.max_model_len.load(Ordering::Relaxed))
            .filter(|&v| v > 0)
            .min()
    }

    pub fn root(&self) -> Option<&str> {
        self.instances()
            .find_map(|i| i.root.get().map(String::as_str))
    }
}

pub struct Topology {
    pub models: Vec<ModelRoute>,
}

impl Topology {
    pub fn from_config(cfg: &Config) -> Self {
        Topology {
            models: cfg.models.iter().map(ModelRoute::new).collect(),
        }
    }

    pub fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.models.iter().flat_map(|m| m.instances())
    }

    /// The model a request names; with a single configured model, a request without
    /// `model` goes to it.
    pub fn route(&self, model: Option<&str>) -> Option<&ModelRoute> {
        match model {
            Some(name) => self.models.iter().find(|m| m.name == name),
            None if self.models.len() == 1 => self.models.first(),
            None => None,
        }
    }
}

/// Everything workers share: the swappable snapshot and process-wide flags.
pub struct Shared {
    pub topology: ArcSwap<Topology>,
    /// Latched once every configured instance answered its /health.
    pub ready: AtomicBool,
    pub started: Instant,
    pub created_unix: u64,
}

impl Shared {
    pub fn new(cfg: &Config) -> Arc<Self> {
        Arc::new(Shared {
            topology: ArcSwap::from_pointee(Topology::from_config(cfg)),
            ready: AtomicBool::new(false),
            started: Instant::now(),
            created_unix: crate::ids::unix_seconds(),
        })
    }

    #[inline]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
