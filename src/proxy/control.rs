//! The control thread: the one writer of the shared state. It probes every instance's
//! `/health` on its own schedule (feeding health and the circuit breakers), gates startup,
//! follows `dns://` names (`discovery.rs`), and applies admin changes by publishing whole new
//! topology snapshots. Workers never wait on it, except an admin request waiting for its own
//! answer.

use super::contain::step;
use crate::config::{CircuitConfig, Config, HealthConfig, Role, RoleGap, StartupConfig};
use crate::discovery::{Discovery, Resolved};
use crate::http::blocking;
use crate::instance::{Health, Instance};
use crate::shared::Shared;
use crate::topology::Topology;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the control thread answers an admin command with.
pub type Reply = Result<Value, ControlError>;

/// Why an admin command was refused; the admin API maps each kind to its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// No instance at that address, or a model that is not configured (404).
    NotFound(String),
    /// The change conflicts with what is configured: a duplicate address (409).
    Conflict(String),
    /// The change would not pass config validation: a bad address, a role the model
    /// cannot take (400).
    Invalid(String),
    /// `/admin/reload`: the file is invalid, or there is none (400).
    Reload(String),
}

impl ControlError {
    pub fn message(&self) -> &str {
        match self {
            ControlError::NotFound(m)
            | ControlError::Conflict(m)
            | ControlError::Invalid(m)
            | ControlError::Reload(m) => m,
        }
    }
}

pub enum Command {
    Add {
        address: String,
        role: Role,
        model: String,
        /// Create the model when it is not configured (else an unknown model is refused).
        create_model: bool,
        reply: Sender<Reply>,
    },
    Remove {
        address: String,
        reply: Sender<Reply>,
    },
    /// Re-read the config file; on success swap in its models and instances.
    Reload { reply: Option<Sender<Reply>> },
    /// Answers of DNS lookups (from discovery's resolver thread).
    Resolved(Resolved),
}

struct Control {
    shared: Arc<Shared>,
    health: HealthConfig,
    circuit: CircuitConfig,
    startup: StartupConfig,
    /// Removed instances still finishing requests.
    draining: Vec<Arc<Instance>>,
    discovery: Discovery,
    startup_reported: bool,
    /// When the last "waiting for instances" line was logged.
    last_heartbeat: Option<Instant>,
    /// Every model has passed start-up gating once: probe at the steady-state interval.
    gating_done: bool,
    /// The configuration the proxy started with: its listener, thread and pool settings stay
    /// in force until a restart, and its command-line overrides outlive reloads.
    at_start: Config,
}

pub fn spawn(shared: Arc<Shared>, cfg: &Config) -> std::io::Result<Sender<Command>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let answers = tx.clone();
    let discovery = Discovery::new(
        cfg,
        Arc::new(move |r| {
            let _ = answers.send(Command::Resolved(r));
        }),
    );
    shared.discovery.store(Arc::new(discovery.stats()));
    let mut c = Control {
        shared,
        health: cfg.health.clone(),
        circuit: cfg.circuit.clone(),
        startup: cfg.startup.clone(),
        draining: Vec::new(),
        discovery,
        startup_reported: false,
        last_heartbeat: None,
        gating_done: false,
        at_start: cfg.clone(),
    };
    std::thread::Builder::new()
        .name("xpyd-control".into())
        .spawn(move || c.run(rx))?;
    Ok(tx)
}

impl Control {
    fn run(&mut self, rx: Receiver<Command>) {
        let mut next_probe = Instant::now();
        loop {
            // DNS lookups run on discovery's own thread; their answers come back as commands.
            if self
                .discovery
                .next_due()
                .is_some_and(|d| d <= Instant::now())
            {
                self.discovery.start_due();
            }
            if next_probe <= Instant::now() {
                step("control thread: a probe round", || self.probe_round());
                let every = if self.gating_done {
                    self.health.interval
                } else {
                    self.health.startup_probe_interval
                };
                next_probe = Instant::now() + every;
            }
            let due = self
                .discovery
                .next_due()
                .map_or(next_probe, |d| d.min(next_probe));
            let wait = due.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                // A panicking admin command's caller is answered 503 (its reply is dropped).
                Ok(cmd) => step("control thread: a command", || self.apply(cmd)),
                Err(RecvTimeoutError::Timeout) => {}
                // Channel gone: keep probing on schedule.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        }
    }

    /// Applies DNS answers: newcomers are probed before workers see them (they take
    /// traffic once healthy), addresses that left are drained.
    fn discovered(&mut self, resolved: Resolved) {
        let topo = self.shared.topology.load_full();
        let changes = self.discovery.apply(resolved, &topo);
        if changes.is_empty() {
            return;
        }
        std::thread::scope(|s| {
            for inst in &changes.added {
                s.spawn(|| probe(inst, &self.health, &self.circuit));
            }
        });
        let next = topo.with_changes(&changes.added, &changes.removed);
        self.shared.topology.store(Arc::new(next));
        self.update_readiness(&self.shared.topology.load_full());
        for g in &changes.removed {
            g.draining.store(true, Ordering::Relaxed);
            if g.in_flight() > 0 {
                self.draining.push(g.clone());
            }
        }
    }

    fn probe_round(&mut self) {
        let topo = self.shared.topology.load_full();
        let instances: Vec<Arc<Instance>> = topo.instances().cloned().collect();
        // In parallel, so that one slow instance does not delay the others; the gate opens
        // as soon as the answers so far allow it, not when the slowest probe (a node that
        // never answers holds its probe for the whole timeout) gives up.
        let (health, circuit, shared) = (&self.health, &self.circuit, &self.shared);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            for inst in &instances {
                let done = done_tx.clone();
                s.spawn(move || {
                    probe(inst, health, circuit);
                    let _ = done.send(());
                });
            }
            drop(done_tx);
            for () in done_rx.iter() {
                open_gates(shared, &topo, false);
            }
        });
        self.update_readiness(&topo);
        // Catches a key gate created by a request that read the key list a reload dropped.
        self.shared
            .admission
            .retain_keys(&self.shared.policy.load().api_keys);
        self.draining.retain(|i| {
            let busy = i.in_flight() > 0;
            if !busy {
                crate::info!("instance {} drained", i.address);
            }
            busy
        });
    }

    /// Start-up gating, per model: a model serves from the first moment it has a serving
    /// path; the proxy is ready (`/health` 200) once a first model does. A model without
    /// nodes holds back only its own requests. `startup.wait_timeout_seconds: 0` (1.2's "skip
    /// discovery") opens every model at once; instances join routing as probes pass.
    fn update_readiness(&mut self, topo: &Topology) {
        open_gates(&self.shared, topo, self.startup.wait_timeout.is_zero());
        let waiting: Vec<&str> = topo
            .models
            .iter()
            .filter(|m| !m.is_open())
            .map(|m| m.name.as_str())
            .collect();
        self.gating_done = waiting.is_empty();
        if self.gating_done {
            return;
        }
        self.heartbeat(topo);
        let waited = self.shared.started.elapsed();
        if waited < self.startup.wait_timeout || self.startup_reported {
            return;
        }
        self.startup_reported = true;
        let missing: Vec<String> = topo
            .models
            .iter()
            .filter(|m| !m.is_open())
            .flat_map(|m| m.instances())
            .filter(|i| !i.is_available())
            .map(|i| format!("{} ({}, {})", i.address, i.role.as_str(), i.model))
            .collect();
        crate::error!(
            "no serving path after {:?} for model(s) {}; their requests get 503; unavailable: {}",
            waited,
            waiting.join(", "),
            missing.join(", ")
        );
        if self.startup.exit_on_timeout && !self.shared.is_ready() {
            crate::error!("startup.exit_on_timeout is set and no model can serve: exiting");
            std::process::exit(3);
        }
    }

    /// While waiting for a serving path: how many instances of each role are up, every
    /// `startup.heartbeat_interval_seconds`.
    fn heartbeat(&mut self, topo: &Topology) {
        let due = self
            .last_heartbeat
            .is_none_or(|t| t.elapsed() >= self.startup.heartbeat_interval);
        if !due {
            return;
        }
        self.last_heartbeat = Some(Instant::now());
        let counts: Vec<String> = Role::ALL
            .into_iter()
            .filter_map(|role| {
                let of_role = topo.instances().filter(|i| i.role == role);
                let (up, all) = of_role.fold((0, 0), |(u, a), i| {
                    (u + usize::from(i.is_available()), a + 1)
                });
                (all > 0).then(|| format!("{role} {up}/{all}"))
            })
            .collect();
        crate::info!("waiting for instances: {} up", counts.join(", "));
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Add {
                address,
                role,
                model,
                create_model,
                reply,
            } => {
                let res = self.add(&address, role, &model, create_model);
                let _ = reply.send(res);
            }
            Command::Remove { address, reply } => {
                let res = self.remove(&address);
                let _ = reply.send(res);
            }
            Command::Reload { reply } => {
                let res = self.reload();
                match &res {
                    Ok(_) => crate::warn!("configuration reloaded"),
                    Err(e) => crate::error!(
                        "reload failed; keeping the running configuration:\n{}",
                        e.message()
                    ),
                }
                if let Some(r) = reply {
                    let _ = r.send(res);
                }
            }
            Command::Resolved(r) => self.discovered(r),
        }
    }

    /// Validates the file again; only a valid one replaces anything. Models, instances and
    /// schedulers are swapped in as a new topology (requests in flight finish on the
    /// instances they chose; instances that left are drained); timeouts, retries, circuit
    /// and health settings, keys, limits and the log level as a new policy. Settings the
    /// listeners, threads and pools were built with are reported as needing a restart.
    fn reload(&mut self) -> Reply {
        let Some(path) = self.at_start.source.clone() else {
            return Err(ControlError::Reload(
                "the configuration was not read from a file".into(),
            ));
        };
        let mut cfg = Config::load(&path)
            .map_err(|e| ControlError::Reload(format!("{} is invalid:\n{e}", path.display())))?
            .with_overrides(self.at_start.overrides.clone());
        let restart_needed = self.at_start.restart_needed(&cfg);
        let topo = self.shared.topology.load_full();
        // `dns://` names that stay keep their instances; new names are resolved right after.
        self.discovery.reload(&mut cfg, &topo);
        let (next, gone) = topo.reloaded(&cfg);
        let added: Vec<Arc<Instance>> = next
            .instances()
            .filter(|i| i.health() == Health::Unknown)
            .cloned()
            .collect();
        // The new breaker and probe settings first: the newcomers' probes use them.
        self.health = cfg.health.clone();
        self.circuit = cfg.circuit.clone();
        // Probe the newcomers first so they are usable the moment workers see them.
        std::thread::scope(|s| {
            for inst in &added {
                s.spawn(|| probe(inst, &self.health, &self.circuit));
            }
        });
        // Tokenizer files are read again (here, on the control thread): a model added or
        // a tokenizer replaced is used from the next request.
        if let Some(root) = &cfg.tokenizer_path {
            let names: Vec<String> = cfg.models.iter().map(|m| m.name.clone()).collect();
            crate::tokenize::load(root, &names);
        }
        crate::tokenize::set_max_queued_kib(cfg.tokenizer.max_queued_kib);
        self.shared.policy.store(Arc::new(cfg.policy()));
        crate::scheduler::prefix_sync::configure(&cfg.prefix_sync.peers);
        self.shared
            .admission
            .retain_keys(&self.shared.policy.load().api_keys);
        self.shared.topology.store(Arc::new(next));
        self.shared
            .discovery
            .store(Arc::new(self.discovery.stats()));
        self.update_readiness(&self.shared.topology.load_full());
        crate::log::set_level(cfg.log_level);
        for g in &gone {
            g.draining.store(true, Ordering::Relaxed);
            if g.in_flight() > 0 {
                self.draining.push(g.clone());
            }
        }
        if !restart_needed.is_empty() {
            crate::warn!(
                "reload: {} changed; the running values stay until a restart",
                restart_needed.join(", ")
            );
        }
        Ok(json!({
            "status": "reloaded",
            "added": added.iter().map(|i| i.address.clone()).collect::<Vec<_>>(),
            "removed": gone.iter().map(|i| i.address.clone()).collect::<Vec<_>>(),
            "restart_needed": restart_needed,
        }))
    }

    /// Adds an instance after the checks the config file's validation makes: the address,
    /// no duplicate, a configured model (unless its creation is asked for), and a role the
    /// model can take (see `role_problem`).
    fn add(&mut self, address: &str, role: Role, model: &str, create_model: bool) -> Reply {
        let sa = crate::config::parse_address(address)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let topo = self.shared.topology.load_full();
        if let Some(i) = topo.find(sa) {
            return Err(ControlError::Conflict(format!(
                "instance {} is already configured ({}, model {})",
                i.address,
                i.role.as_str(),
                i.model
            )));
        }
        match topo.models.iter().find(|m| m.name == model) {
            Some(m) => {
                if let Some(problem) = role_problem(m, role) {
                    return Err(ControlError::Invalid(problem));
                }
            }
            None if !create_model => {
                return Err(ControlError::NotFound(format!(
                    "model `{model}` is not configured: send \"create_model\": true to create it"
                )))
            }
            None => {}
        }
        let inst = Arc::new(Instance::new(
            address.trim().to_string(),
            sa,
            role,
            Arc::from(model),
        ));
        let next = topo
            .with_added(inst.clone())
            .map_err(ControlError::Conflict)?;
        // Probe before publishing so that it is usable the moment workers see it.
        probe(&inst, &self.health, &self.circuit);
        self.shared.topology.store(Arc::new(next));
        self.update_readiness(&self.shared.topology.load_full());
        crate::warn!(
            "instance {address} added ({}, model {model})",
            role.as_str()
        );
        Ok(json!({"status": "added", "instance": inst.status_json()}))
    }

    /// Removes an instance; its model stays configured even without instances (its
    /// requests then get 503).
    fn remove(&mut self, address: &str) -> Reply {
        let sa = crate::config::parse_address(address)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let (next, gone) = self
            .shared
            .topology
            .load()
            .with_removed(sa)
            .map_err(ControlError::NotFound)?;
        // Draining: no new picks from this moment, in-flight requests finish on their own
        // snapshot; workers close their idle connections when they see the new generation.
        gone.draining.store(true, Ordering::Relaxed);
        self.shared.topology.store(Arc::new(next));
        let in_flight = gone.in_flight();
        crate::warn!("instance {address} removed; draining {in_flight} request(s)");
        if in_flight > 0 {
            self.draining.push(gone.clone());
        }
        Ok(
            json!({"status": "removed", "draining_requests": in_flight, "instance": gone.status_json()}),
        )
    }
}

/// Opens the gate of every model that has a serving path now (of every model when
/// `skip`: `startup.wait_timeout_seconds: 0`), and the proxy's once a first model is open.
fn open_gates(shared: &Shared, topo: &Topology, skip: bool) {
    for m in topo.models.iter().filter(|m| !m.is_open()) {
        if skip || m.can_serve() {
            m.open.store(true, Ordering::Release);
            crate::info!("model {} is served", m.name);
        }
    }
    if !shared.is_ready() && (skip || topo.models.iter().any(|m| m.is_open())) {
        shared.ready.store(true, Ordering::Release);
        if skip {
            crate::info!("startup.wait_timeout_seconds is 0: serving without waiting");
        } else {
            crate::info!("start-up gating met: ready");
        }
    }
}

/// Why `model` cannot take an instance of `role`: the config file's role rule (`RoleGap`)
/// applied to the model after the change. A model without instances takes any first one:
/// it is being built up and answers 503 until it has a serving path.
fn role_problem(m: &crate::topology::ModelRoute, role: Role) -> Option<String> {
    m.instances().next()?;
    let has = |r: Role, set: &crate::topology::RoleSet| !set.instances.is_empty() || r == role;
    let gap = RoleGap::of(
        has(Role::Prefill, &m.prefill),
        has(Role::Decode, &m.decode),
        has(Role::Dual, &m.dual),
    )?;
    Some(format!(
        "adding this {role} instance would leave a model the config file refuses: {}",
        gap.message(&m.name)
    ))
}

fn probe(inst: &Instance, cfg: &HealthConfig, circuit: &CircuitConfig) {
    let addr = inst.address.as_str();
    let ok = match blocking::request(addr, "GET", "/health", None, cfg.timeout, |_| {}) {
        Ok(r) if r.status == 200 => true,
        Ok(r) => {
            crate::debug!("health probe of {addr}: status {}", r.status);
            false
        }
        Err(e) => {
            crate::debug!("health probe of {addr}: {e}");
            false
        }
    };
    inst.last_check
        .store(crate::ids::unix_seconds(), Ordering::Relaxed);
    let before = inst.health();
    inst.set_health(if ok {
        Health::Healthy
    } else {
        Health::Unhealthy
    });
    if ok {
        inst.record_success(circuit);
    } else {
        inst.record_failure(circuit);
    }
    if ok != (before == Health::Healthy) && before != Health::Unknown {
        if ok {
            crate::warn!("instance {addr} ({}) is healthy again", inst.role.as_str());
        } else {
            crate::warn!("instance {addr} ({}) is unhealthy", inst.role.as_str());
        }
    }
    let mismatch = inst
        .model_mismatch
        .lock()
        .map(|m| m.is_some())
        .unwrap_or(false);
    if ok && (inst.max_model_len.load(Ordering::Relaxed) == 0 || mismatch) {
        read_model_info(inst, cfg.timeout);
    }
}

fn read_model_info(inst: &Instance, timeout: Duration) {
    let Ok(r) = blocking::request(&inst.address, "GET", "/v1/models", None, timeout, |_| {}) else {
        return;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
        return;
    };
    let Some(data) = v["data"].as_array() else {
        return;
    };
    check_served_model(inst, data);
    let Some(entry) = data.first() else {
        return;
    };
    if let Some(n) = entry["max_model_len"].as_u64() {
        inst.max_model_len.store(n, Ordering::Relaxed);
    }
    if let Some(root) = entry["root"].as_str().or(entry["id"].as_str()) {
        let _ = inst.root.set(root.to_string());
    }
}

/// Records (and logs once) an instance whose /v1/models does not list the model it is
/// configured for: the proxy would relay its 404 `model_not_found` for every request,
/// indistinguishable from the proxy's own. Cleared when the instance lists it again.
fn check_served_model(inst: &Instance, data: &[Value]) {
    let ids: Vec<&str> = data.iter().filter_map(|e| e["id"].as_str()).collect();
    let Ok(mut slot) = inst.model_mismatch.lock() else {
        return;
    };
    if ids.is_empty() || ids.contains(&&*inst.model) {
        if slot.take().is_some() {
            crate::warn!(
                "instance {} now serves model `{}`",
                inst.address,
                inst.model
            );
        }
        return;
    }
    let reported = ids.join(", ");
    if slot.as_deref() != Some(reported.as_str()) {
        crate::warn!(
            "instance {} serves model `{reported}`, not the configured `{}`: requests for `{}` sent there fail with 404 model_not_found (fix the config's model name or the engine's --served-model-name)",
            inst.address,
            inst.model,
            inst.model
        );
        *slot = Some(reported);
    }
}
