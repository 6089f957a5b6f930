//! The topology snapshot: models → instances by role, each role with its scheduler. It is
//! immutable and swapped whole (`Shared::topology`); a change builds the next snapshot from
//! the current one, carrying over the instances that stay (their health, load and circuit).

use crate::config::{
    Config, DisaggMode, ModelConfig, Role, RoleSchedulers, SchedulerKind, SchedulingOptions,
};
use crate::instance::Instance;
use crate::scheduler::{self, Scheduler};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct RoleSet {
    pub instances: Vec<Arc<Instance>>,
    pub scheduler: Box<dyn Scheduler>,
}

impl RoleSet {
    fn new(
        model: &str,
        instances: Vec<Arc<Instance>>,
        role: Role,
        kind: SchedulerKind,
        opts: &SchedulingOptions,
    ) -> Self {
        RoleSet {
            scheduler: scheduler::build(kind, model, role, opts, &instances),
            instances,
        }
    }

    pub fn any_available(&self) -> bool {
        self.instances.iter().any(|i| i.is_available())
    }
}

pub struct ModelRoute {
    pub name: String,
    /// The model's `scheduling`; `roles` may give prefill and decode their own.
    pub kind: SchedulerKind,
    pub roles: RoleSchedulers,
    pub options: SchedulingOptions,
    pub mode: DisaggMode,
    pub prefill: RoleSet,
    pub decode: RoleSet,
    pub dual: RoleSet,
    /// Start-up gating, per model: set once the model could serve for the first time, and
    /// shared by every later snapshot of the same model. Until then its requests get 503;
    /// other models are never held back by it.
    pub open: Arc<AtomicBool>,
}

impl ModelRoute {
    /// The instances and scheduler of `role`.
    pub fn role_set(&self, role: Role) -> &RoleSet {
        match role {
            Role::Prefill => &self.prefill,
            Role::Decode => &self.decode,
            Role::Dual => &self.dual,
        }
    }

    /// This model's route (scheduler, mode, gate) over another list of instances.
    fn with_instances(&self, list: Vec<Arc<Instance>>) -> Self {
        Self::build(
            &self.name,
            self.kind,
            self.roles,
            self.options.clone(),
            self.mode,
            list,
            self.open.clone(),
        )
    }

    /// Builds a route from instances that may already exist (their health, load and
    /// breaker state carry over into the new snapshot).
    pub fn build(
        name: &str,
        kind: SchedulerKind,
        roles: RoleSchedulers,
        options: SchedulingOptions,
        mode: DisaggMode,
        instances: Vec<Arc<Instance>>,
        open: Arc<AtomicBool>,
    ) -> Self {
        let set = |role: Role| {
            let of_role = instances
                .iter()
                .filter(|i| i.role == role)
                .cloned()
                .collect();
            RoleSet::new(name, of_role, role, roles.for_role(role, kind), &options)
        };
        ModelRoute {
            name: name.to_string(),
            mode,
            prefill: set(Role::Prefill),
            decode: set(Role::Decode),
            dual: set(Role::Dual),
            kind,
            roles,
            options,
            open,
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
            m.role_schedulers,
            m.scheduling.clone(),
            m.mode,
            instances,
            Arc::default(),
        )
    }

    /// Whether a policy of this model reads the prompt's token ids: a role scheduled by
    /// `kv_aware` with more than one instance to choose from. With one (the common single
    /// prefill node in front of several decode nodes) there is no choice to make, and
    /// tokenizing a long prompt would only delay it (~0.2 ms per KiB, docs/benchmarks.md).
    pub fn needs_tokens(&self) -> bool {
        [
            (Role::Prefill, &self.prefill),
            (Role::Decode, &self.decode),
            (Role::Dual, &self.dual),
        ]
        .iter()
        .any(|&(r, set)| {
            self.roles.for_role(r, self.kind) == SchedulerKind::KvAware && set.instances.len() > 1
        })
    }

    /// Whether start-up gating let this model through (see `open`).
    #[inline]
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Instances whose /v1/models does not list this model, with what they list instead.
    pub fn model_mismatches(&self) -> Vec<(String, String)> {
        self.instances()
            .filter_map(|i| {
                let reported = i.model_mismatch.lock().ok()?.clone()?;
                Some((i.address.clone(), reported))
            })
            .collect()
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
    pub default_roles: RoleSchedulers,
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
            default_roles: first.map(|m| m.role_schedulers).unwrap_or_default(),
            default_options: first.map(|m| m.scheduling.clone()).unwrap_or_default(),
        }
    }

    pub fn instances(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.models.iter().flat_map(|m| m.instances())
    }

    /// The gating flag of model `name` in this snapshot, or a new (closed) one.
    fn gate_of(&self, name: &str) -> Arc<AtomicBool> {
        self.models
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.open.clone())
            .unwrap_or_default()
    }

    pub fn find(&self, addr: SocketAddr) -> Option<&Arc<Instance>> {
        self.instances().find(|i| i.socket_addr == addr)
    }

    /// The model a request names; with a single configured model, a request without
    /// `model` goes to it.
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
                ModelRoute::build(
                    &m.name,
                    m.scheduler,
                    m.role_schedulers,
                    m.scheduling.clone(),
                    m.mode,
                    list,
                    self.gate_of(&m.name),
                )
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
            default_roles: first
                .map(|m| m.role_schedulers)
                .unwrap_or(self.default_roles),
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
            models.push(m.with_instances(list));
        }
        if !placed {
            let name = inst.model.clone();
            models.push(ModelRoute::build(
                &name,
                self.default_kind,
                self.default_roles,
                self.default_options.clone(),
                DisaggMode::Direct,
                vec![inst],
                Arc::default(),
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
                m.with_instances(list)
            })
            .collect();
        Ok((self.next(models), gone))
    }

    /// A new snapshot with `added` in (each to its model, created if unknown) and `removed`
    /// out, published as one change (DNS discovery applies a whole answer at once).
    pub fn with_changes(&self, added: &[Arc<Instance>], removed: &[Arc<Instance>]) -> Topology {
        let keep = |i: &&Arc<Instance>| !removed.iter().any(|r| Arc::ptr_eq(r, i));
        let mut models: Vec<ModelRoute> = self
            .models
            .iter()
            .map(|m| {
                let mut list: Vec<Arc<Instance>> = m.instances().filter(keep).cloned().collect();
                list.extend(added.iter().filter(|a| *a.model == *m.name).cloned());
                m.with_instances(list)
            })
            .collect();
        for a in added {
            if !models.iter().any(|m| *m.name == *a.model) {
                let list = added
                    .iter()
                    .filter(|o| o.model == a.model)
                    .cloned()
                    .collect();
                models.push(ModelRoute::build(
                    &a.model,
                    self.default_kind,
                    self.default_roles,
                    self.default_options.clone(),
                    DisaggMode::Direct,
                    list,
                    Arc::default(),
                ));
            }
        }
        self.next(models)
    }

    fn next(&self, models: Vec<ModelRoute>) -> Topology {
        Topology {
            models,
            generation: self.generation + 1,
            default_kind: self.default_kind,
            default_roles: self.default_roles,
            default_options: self.default_options.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Health;

    fn config(yaml: &str) -> Config {
        Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn addrs(t: &Topology) -> Vec<String> {
        t.instances().map(|i| i.address.clone()).collect()
    }

    #[test]
    fn a_reload_keeps_the_instances_that_stay_and_returns_the_ones_that_left() {
        let before = Topology::from_config(&config(
            "model: m\nprefill: [\"127.0.0.1:1001\"]\ndecode: [\"127.0.0.1:1002\", \"127.0.0.1:1003\"]\n",
        ));
        let kept = before
            .find("127.0.0.1:1002".parse().unwrap())
            .unwrap()
            .clone();
        kept.set_health(Health::Healthy);
        let (after, gone) = before.reloaded(&config(
            "model: m\nprefill: [\"127.0.0.1:1001\"]\ndecode: [\"127.0.0.1:1002\", \"127.0.0.1:1004\"]\n",
        ));
        assert_eq!(after.generation, before.generation + 1);
        assert_eq!(
            addrs(&after),
            ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1004"]
        );
        let same = after.find(kept.socket_addr).unwrap();
        assert!(Arc::ptr_eq(same, &kept), "state carries over");
        assert_eq!(same.health(), Health::Healthy);
        let new = after.find("127.0.0.1:1004".parse().unwrap()).unwrap();
        assert_eq!(new.health(), Health::Unknown);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].address, "127.0.0.1:1003");
    }

    #[test]
    fn a_changed_role_or_model_is_a_new_instance() {
        let before = Topology::from_config(&config(
            "model: m\nprefill: [\"127.0.0.1:1001\"]\ndecode: [\"127.0.0.1:1002\"]\n",
        ));
        // 1001 turns decode, 1002 prefill: both old instances leave, two new ones come.
        let (after, gone) = before.reloaded(&config(
            "model: m\nprefill: [\"127.0.0.1:1002\"]\ndecode: [\"127.0.0.1:1001\"]\n",
        ));
        assert_eq!(gone.len(), 2);
        assert!(after
            .instances()
            .all(|i| before.instances().all(|o| !Arc::ptr_eq(i, o))));
        let (renamed, gone) = after.reloaded(&config(
            "model: other\nprefill: [\"127.0.0.1:1002\"]\ndecode: [\"127.0.0.1:1001\"]\n",
        ));
        assert_eq!(gone.len(), 2);
        assert_eq!(renamed.models[0].name, "other");
        assert_eq!(renamed.route_index(None), Some(0));
        assert_eq!(renamed.route_index(Some("m")), None);
    }

    #[test]
    fn added_and_removed_instances() {
        let t = Topology::from_config(&config("model: m\ndual: [\"127.0.0.1:1001\"]\n"));
        let dup = Arc::new(Instance::new(
            "127.0.0.1:1001".into(),
            "127.0.0.1:1001".parse().unwrap(),
            Role::Dual,
            Arc::from("m"),
        ));
        assert!(t.with_added(dup).is_err(), "an address is configured once");
        let other = Arc::new(Instance::new(
            "127.0.0.1:1002".into(),
            "127.0.0.1:1002".parse().unwrap(),
            Role::Dual,
            Arc::from("n"),
        ));
        let t2 = t.with_added(other).unwrap();
        assert_eq!(t2.models.len(), 2, "an unknown model is created");
        assert_eq!(
            t2.route_index(None),
            None,
            "two models: `model` is required"
        );
        let (t3, gone) = t2.with_removed("127.0.0.1:1001".parse().unwrap()).unwrap();
        assert_eq!(gone.address, "127.0.0.1:1001");
        assert_eq!(addrs(&t3), ["127.0.0.1:1002"]);
        assert_eq!(t3.generation, 2);
        assert!(t3.with_removed("127.0.0.1:1001".parse().unwrap()).is_err());
    }
}
