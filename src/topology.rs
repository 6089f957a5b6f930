//! The shared scheduler state: an immutable topology snapshot (models → instances by role),
//! swapped whole through `arc-swap`, plus per-instance cache-padded atomics that workers
//! update without locks.

use crate::config::{Config, DisaggMode, ModelConfig, Role, SchedulerKind, SchedulingOptions};
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
    /// Process-unique, stable for the instance's life (metrics key on it).
    pub id: u64,
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
    pub breaker: crate::resilience::Breaker,
    pub load: Load,
    /// 0 until read from the instance's /v1/models.
    pub max_model_len: AtomicU64,
    pub root: OnceLock<String>,
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
            answered: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            circuit: AtomicU8::new(CIRCUIT_CLOSED),
            breaker: Default::default(),
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
            && self.breaker.allows(&self.circuit)
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
    fn new(
        instances: Vec<Arc<Instance>>,
        role: Role,
        kind: SchedulerKind,
        opts: &SchedulingOptions,
    ) -> Self {
        RoleSet {
            scheduler: scheduler::build(kind, role, opts, &instances),
            instances,
        }
    }

    pub fn any_available(&self) -> bool {
        self.instances.iter().any(|i| i.is_available())
    }
}

pub struct ModelRoute {
    pub name: String,
    pub kind: SchedulerKind,
    pub options: SchedulingOptions,
    pub scheduler_name: &'static str,
    pub mode: DisaggMode,
    pub prefill: RoleSet,
    pub decode: RoleSet,
    pub dual: RoleSet,
}

impl ModelRoute {
    /// Builds a route from instances that may already exist (their health, load and
    /// breaker state carry over into the new snapshot).
    pub fn build(
        name: &str,
        kind: SchedulerKind,
        options: SchedulingOptions,
        mode: DisaggMode,
        instances: Vec<Arc<Instance>>,
    ) -> Self {
        let of = |role: Role| -> Vec<Arc<Instance>> {
            instances
                .iter()
                .filter(|i| i.role == role)
                .cloned()
                .collect()
        };
        ModelRoute {
            name: name.to_string(),
            scheduler_name: kind.as_str(),
            mode,
            prefill: RoleSet::new(of(Role::Prefill), Role::Prefill, kind, &options),
            decode: RoleSet::new(of(Role::Decode), Role::Decode, kind, &options),
            dual: RoleSet::new(of(Role::Dual), Role::Dual, kind, &options),
            kind,
            options,
        }
    }

    fn from_config(m: &ModelConfig) -> Self {
        let name: Arc<str> = Arc::from(m.name.as_str());
        let instances = m
            .instances
            .iter()
            .map(|i| {
                Arc::new(Instance::new(
                    i.address.clone(),
                    i.socket_addr,
                    i.role,
                    name.clone(),
                ))
            })
            .collect();
        Self::build(
            &m.name,
            m.scheduler,
            m.scheduling.clone(),
            m.mode,
            instances,
        )
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
    /// Bumped on every published change; workers use it to prune their pools.
    pub generation: u64,
    /// Scheduler for models created at run time (`/instances/add` with a new model name).
    pub default_kind: SchedulerKind,
    pub default_options: SchedulingOptions,
}

impl Topology {
    pub fn from_config(cfg: &Config) -> Self {
        let first = cfg.models.first();
        Topology {
            models: cfg.models.iter().map(ModelRoute::from_config).collect(),
            generation: 0,
            default_kind: first
                .map(|m| m.scheduler)
                .unwrap_or(SchedulerKind::LoadBalanced),
            default_options: first.map(|m| m.scheduling.clone()).unwrap_or_default(),
        }
    }

    pub fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.models.iter().flat_map(|m| m.instances())
    }

    pub fn find(&self, addr: SocketAddr) -> Option<&Arc<Instance>> {
        self.instances().find(|i| i.socket_addr == addr)
    }

    /// The model a request names; with a single configured model, a request without
    /// `model` goes to it.
    pub fn route(&self, model: Option<&str>) -> Option<&ModelRoute> {
        self.route_index(model).map(|i| &self.models[i])
    }

    pub fn route_index(&self, model: Option<&str>) -> Option<usize> {
        match model {
            Some(name) => self.models.iter().position(|m| m.name == name),
            None if self.models.len() == 1 => Some(0),
            None => None,
        }
    }

    /// The snapshot for a reloaded config: instances that stay (same model, role and
    /// address) keep their state; the ones that left are returned to be drained.
    pub fn reloaded(&self, cfg: &Config) -> (Topology, Vec<Arc<Instance>>) {
        let mut kept: Vec<Arc<Instance>> = Vec::new();
        let models = cfg
            .models
            .iter()
            .map(|m| {
                let name: Arc<str> = Arc::from(m.name.as_str());
                let list = m
                    .instances
                    .iter()
                    .map(|i| {
                        let old = self.instances().find(|o| {
                            o.socket_addr == i.socket_addr
                                && o.role == i.role
                                && *o.model == *m.name
                        });
                        match old {
                            Some(o) => {
                                kept.push(o.clone());
                                o.clone()
                            }
                            None => Arc::new(Instance::new(
                                i.address.clone(),
                                i.socket_addr,
                                i.role,
                                name.clone(),
                            )),
                        }
                    })
                    .collect();
                ModelRoute::build(&m.name, m.scheduler, m.scheduling.clone(), m.mode, list)
            })
            .collect();
        let gone = self
            .instances()
            .filter(|o| !kept.iter().any(|k| Arc::ptr_eq(k, o)))
            .cloned()
            .collect();
        let first = cfg.models.first();
        let next = Topology {
            models,
            generation: self.generation + 1,
            default_kind: first.map(|m| m.scheduler).unwrap_or(self.default_kind),
            default_options: first
                .map(|m| m.scheduling.clone())
                .unwrap_or_else(|| self.default_options.clone()),
        };
        (next, gone)
    }

    /// A new snapshot with `inst` added (to a new model if its model is unknown).
    pub fn with_added(&self, inst: Arc<Instance>) -> Result<Topology, String> {
        if self.find(inst.socket_addr).is_some() {
            return Err(format!("instance {} is already configured", inst.address));
        }
        let mut models: Vec<ModelRoute> = Vec::with_capacity(self.models.len() + 1);
        let mut placed = false;
        for m in &self.models {
            let mut list: Vec<Arc<Instance>> = m.instances().cloned().collect();
            if m.name == *inst.model {
                list.push(inst.clone());
                placed = true;
            }
            models.push(ModelRoute::build(
                &m.name,
                m.kind,
                m.options.clone(),
                m.mode,
                list,
            ));
        }
        if !placed {
            let name = inst.model.clone();
            models.push(ModelRoute::build(
                &name,
                self.default_kind,
                self.default_options.clone(),
                DisaggMode::Direct,
                vec![inst],
            ));
        }
        Ok(self.next(models))
    }

    /// A new snapshot without the instance at `addr`, and that instance.
    pub fn with_removed(&self, addr: SocketAddr) -> Result<(Topology, Arc<Instance>), String> {
        let gone = self
            .find(addr)
            .cloned()
            .ok_or_else(|| format!("no instance at {addr}"))?;
        let models = self
            .models
            .iter()
            .map(|m| {
                let list = m
                    .instances()
                    .filter(|i| !Arc::ptr_eq(i, &gone))
                    .cloned()
                    .collect();
                ModelRoute::build(&m.name, m.kind, m.options.clone(), m.mode, list)
            })
            .collect();
        Ok((self.next(models), gone))
    }

    fn next(&self, models: Vec<ModelRoute>) -> Topology {
        Topology {
            models,
            generation: self.generation + 1,
            default_kind: self.default_kind,
            default_options: self.default_options.clone(),
        }
    }
}

/// Everything workers share: the swappable snapshot and process-wide flags.
pub struct Shared {
    pub topology: ArcSwap<Topology>,
    /// Timeouts, retries, keys and limits; replaced whole on reload.
    pub policy: ArcSwap<crate::config::Policy>,
    /// Set once every model can serve (startup gating); stays set.
    pub ready: AtomicBool,
    /// SIGTERM/SIGINT received: finish what is in flight, take nothing new.
    pub shutting_down: AtomicBool,
    /// Requests in flight, one slot per worker (each worker writes only its own).
    pub active: Vec<CachePadded<AtomicU64>>,
    /// Metrics, one set per worker (each worker writes only its own).
    pub metrics: Vec<Arc<crate::metrics::WorkerMetrics>>,
    pub started: Instant,
    pub created_unix: u64,
}

impl Shared {
    pub fn new(cfg: &Config, workers: usize) -> Arc<Self> {
        Arc::new(Shared {
            topology: ArcSwap::from_pointee(Topology::from_config(cfg)),
            policy: ArcSwap::from_pointee(cfg.policy()),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            active: (0..workers.max(1))
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
            metrics: (0..workers.max(1)).map(|_| Arc::default()).collect(),
            started: Instant::now(),
            created_unix: crate::ids::unix_seconds(),
        })
    }

    #[inline]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn active_requests(&self) -> u64 {
        self.active.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
}

/// Counts a request in its worker's slot of `Shared::active` while it lives.
pub struct ActiveRequest<'a>(&'a AtomicU64);

impl<'a> ActiveRequest<'a> {
    pub fn new(shared: &'a Shared, worker: usize) -> Self {
        let slot = &shared.active[worker % shared.active.len()];
        slot.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(slot)
    }
}

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
