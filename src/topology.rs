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
    pub in_flight: CachePadded<AtomicU64>,
    /// 0 until read from the instance's /v1/models.
    pub max_model_len: AtomicU64,
    pub root: OnceLock<String>,
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
            in_flight: CachePadded::new(AtomicU64::new(0)),
            max_model_len: AtomicU64::new(0),
            root: OnceLock::new(),
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

    /// Whether the scheduler may send new requests here.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.health() == Health::Healthy
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts a request against an instance for as long as it lives; every exit path (success,
/// error, client disconnect, unwinding) releases it.
pub struct InFlight(Arc<Instance>);

impl InFlight {
    pub fn new(inst: Arc<Instance>) -> Self {
        inst.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(inst)
    }
    pub fn instance(&self) -> &Arc<Instance> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct RoleSet {
    pub instances: Vec<Arc<Instance>>,
    pub scheduler: Box<dyn Scheduler>,
}

impl RoleSet {
    fn new(instances: Vec<Arc<Instance>>, kind: crate::config::SchedulerKind) -> Self {
        RoleSet {
            instances,
            scheduler: scheduler::build(kind),
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
            prefill: RoleSet::new(of(Role::Prefill), m.scheduler),
            decode: RoleSet::new(of(Role::Decode), m.scheduler),
            dual: RoleSet::new(of(Role::Dual), m.scheduler),
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
