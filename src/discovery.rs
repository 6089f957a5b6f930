//! DNS discovery: a role-list entry written `dns://HOST:PORT` stands for one instance per
//! A/AAAA record of HOST (a Kubernetes headless Service answers one per ready pod). The
//! control thread re-resolves each name every `discovery.interval_seconds`, or sooner when
//! the records' TTL runs out, and reconciles the topology with the answer: new addresses are
//! probed and join, vanished ones are drained. A failed or empty answer keeps the last good
//! set (logged, and counted in the metrics).
//!
//! The control thread owns the names and the reconciliation; the lookups themselves run on
//! one helper thread (`xpyd-dns`: hickory, driven by its own current-thread tokio runtime),
//! whose answers come back as control commands. So neither a worker nor the control thread
//! (its probes, admin calls, reloads) ever waits on DNS.

use crate::config::{Config, DiscoveryConfig, DnsName, InstanceConfig, Role};
use crate::instance::Instance;
use crate::topology::Topology;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A TTL shorter than this does not make a name re-resolve more often (dnsmasq and CoreDNS
/// may answer TTL 0); the interval, when shorter, still applies.
const MIN_TTL_WAIT: Duration = Duration::from_secs(1);

/// One followed name: a `dns://` entry of one role of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub model: Arc<str>,
    pub name: DnsName,
}

impl Target {
    pub fn role(&self) -> Role {
        self.name.role
    }
}

/// What a followed name did, for the metrics endpoint (written by the control thread only).
pub struct TargetStats {
    pub target: Target,
    pub label: String,
    pub resolved: AtomicU64,
    pub empty: AtomicU64,
    pub failed: AtomicU64,
    /// Addresses currently taken from this name.
    pub addresses: AtomicU64,
    /// The last resolution failed or was empty: the set in use is an older one.
    pub stale: AtomicBool,
}

struct Followed {
    stats: Arc<TargetStats>,
    /// A lookup was sent and its answer has not come back yet.
    pending: bool,
    /// Addresses whose instances this name put in the topology.
    owned: BTreeSet<SocketAddr>,
    /// The last non-empty answer.
    last_good: Option<BTreeSet<SocketAddr>>,
    due: Instant,
}

/// The instances to add to and remove from the topology after a round of resolutions.
#[derive(Default)]
pub struct Changes {
    pub added: Vec<Arc<Instance>>,
    pub removed: Vec<Arc<Instance>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What one lookup found.
#[derive(Debug, Clone)]
pub enum Answer {
    /// Addresses, and how long the answer is valid.
    Found(Vec<IpAddr>, Duration),
    Empty,
    Failed(String),
}

/// The answers of one batch of lookups, for the names they were asked for.
pub struct Resolved {
    pub answers: Vec<(Target, Answer)>,
}

/// A batch of lookups for the resolver thread, with the settings to use.
struct Lookups {
    cfg: DiscoveryConfig,
    targets: Vec<Target>,
}

/// How answers reach the control thread.
pub type Deliver = Arc<dyn Fn(Resolved) + Send + Sync>;

pub struct Discovery {
    cfg: DiscoveryConfig,
    followed: Vec<Followed>,
    /// The resolver thread, started on the first lookup (and again if it went away).
    lookups: Option<Sender<Lookups>>,
    deliver: Deliver,
}

/// Every `dns://` entry of a config, in order.
pub fn targets(cfg: &Config) -> Vec<Target> {
    cfg.models
        .iter()
        .flat_map(|m| {
            let model: Arc<str> = Arc::from(m.name.as_str());
            m.discovered.iter().map(move |n| Target {
                model: model.clone(),
                name: n.clone(),
            })
        })
        .collect()
}

impl Discovery {
    /// `deliver` hands each batch of answers back to the control thread (which then calls
    /// `apply`).
    pub fn new(cfg: &Config, deliver: Deliver) -> Self {
        let now = Instant::now();
        Discovery {
            cfg: cfg.discovery.clone(),
            followed: targets(cfg)
                .into_iter()
                .map(|t| Followed::new(t, now))
                .collect(),
            lookups: None,
            deliver,
        }
    }

    /// The counters of every followed name (published for the metrics endpoint).
    pub fn stats(&self) -> Vec<Arc<TargetStats>> {
        self.followed.iter().map(|f| f.stats.clone()).collect()
    }

    /// When the next name is due (None: nothing to follow, or every lookup is out).
    pub fn next_due(&self) -> Option<Instant> {
        self.followed
            .iter()
            .filter(|f| !f.pending)
            .map(|f| f.due)
            .min()
    }

    /// Sends the names that are due to the resolver thread.
    pub fn start_due(&mut self) {
        let now = Instant::now();
        let mut targets = Vec::new();
        for f in self
            .followed
            .iter_mut()
            .filter(|f| !f.pending && f.due <= now)
        {
            f.pending = true;
            targets.push(f.stats.target.clone());
        }
        if targets.is_empty() {
            return;
        }
        let batch = Lookups {
            cfg: self.cfg.clone(),
            targets,
        };
        let batch = match &self.lookups {
            Some(tx) => match tx.send(batch) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => batch,
        };
        match self.spawn_resolver() {
            Ok(tx) => {
                let _ = tx.send(batch);
                self.lookups = Some(tx);
            }
            Err(e) => {
                crate::error!("discovery: cannot start the resolver thread: {e}");
                let answers = batch
                    .targets
                    .into_iter()
                    .map(|t| (t, Answer::Failed(format!("no resolver thread: {e}"))))
                    .collect();
                (self.deliver)(Resolved { answers });
            }
        }
    }

    fn spawn_resolver(&self) -> std::io::Result<Sender<Lookups>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let deliver = self.deliver.clone();
        std::thread::Builder::new()
            .name("xpyd-dns".into())
            .spawn(move || resolver_thread(rx, deliver))?;
        Ok(tx)
    }

    /// Applies a batch of answers: works out what changes in `topo`. The returned instances
    /// are new (to probe, then publish) or to remove (and drain). Answers for names that a
    /// reload dropped meanwhile are ignored.
    pub fn apply(&mut self, resolved: Resolved, topo: &Topology) -> Changes {
        let mut changes = Changes::default();
        let now = Instant::now();
        let interval = self.cfg.interval;
        for (target, answer) in resolved.answers {
            let Some(f) = self
                .followed
                .iter_mut()
                .find(|f| f.pending && f.stats.target == target)
            else {
                continue;
            };
            f.pending = false;
            f.due = now + interval;
            let label = &f.stats.label;
            let port = target.name.port;
            let desired = match answer {
                Answer::Found(ips, ttl) => {
                    f.stats.resolved.fetch_add(1, Ordering::Relaxed);
                    f.stats.stale.store(false, Ordering::Relaxed);
                    f.due = now + interval.min(ttl.max(MIN_TTL_WAIT));
                    let set: BTreeSet<SocketAddr> = ips
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, port))
                        .collect();
                    f.last_good = Some(set.clone());
                    set
                }
                Answer::Empty | Answer::Failed(_) => {
                    let (what, counter) = match &answer {
                        Answer::Failed(e) => (format!("failed: {e}"), &f.stats.failed),
                        _ => ("found no address".to_string(), &f.stats.empty),
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    f.stats.stale.store(true, Ordering::Relaxed);
                    match &f.last_good {
                        Some(set) => {
                            crate::warn!(
                                "discovery: resolving {label} {what}; keeping its last {} address(es)",
                                set.len()
                            );
                            set.clone()
                        }
                        None => {
                            crate::warn!("discovery: resolving {label} {what}; no address yet");
                            BTreeSet::new()
                        }
                    }
                }
            };
            f.reconcile(&desired, topo, &mut changes);
        }
        changes
    }

    /// A reloaded config: names that stay keep their state and their instances (written into
    /// `cfg` so that the reload keeps them), names that left are forgotten (their instances
    /// are then gone from `cfg` and drained by the reload), new names are resolved at once.
    pub fn reload(&mut self, cfg: &mut Config, topo: &Topology) {
        self.cfg = cfg.discovery.clone();
        let now = Instant::now();
        let mut old = std::mem::take(&mut self.followed);
        for t in targets(cfg) {
            let f = match old.iter().position(|f| f.stats.target == t) {
                Some(pos) => {
                    let mut f = old.swap_remove(pos);
                    f.due = f.due.min(now + self.cfg.interval);
                    f.carry_into(cfg, topo);
                    f
                }
                None => Followed::new(t, now),
            };
            self.followed.push(f);
        }
    }
}

/// The resolver thread: one batch at a time, the batch's lookups concurrently.
fn resolver_thread(rx: Receiver<Lookups>, deliver: Deliver) {
    let mut dns: Option<(DiscoveryConfig, Dns)> = None;
    for batch in rx {
        let mut answers = None;
        // A bug's panic in a lookup fails that batch and keeps the thread: the control
        // thread waits for every batch's answers before it asks for those names again.
        crate::proxy::contain::step("discovery: a lookup", || {
            if dns.as_ref().is_none_or(|(c, _)| *c != batch.cfg) {
                dns = match Dns::new(&batch.cfg) {
                    Ok(d) => Some((batch.cfg.clone(), d)),
                    Err(e) => {
                        crate::error!("discovery: {e}");
                        None
                    }
                };
            }
            answers = Some(match &dns {
                Some((_, d)) => d.lookup_all(&batch.targets),
                None => batch
                    .targets
                    .iter()
                    .map(|_| Answer::Failed("no resolver (see the error above)".into()))
                    .collect(),
            });
        });
        let answers = answers.unwrap_or_else(|| {
            dns = None; // made anew for the next batch
            batch
                .targets
                .iter()
                .map(|_| Answer::Failed("the lookup panicked".into()))
                .collect()
        });
        deliver(Resolved {
            answers: batch.targets.into_iter().zip(answers).collect(),
        });
    }
}

impl Followed {
    fn new(target: Target, due: Instant) -> Self {
        Followed {
            stats: Arc::new(TargetStats {
                label: target.name.label(),
                target,
                resolved: AtomicU64::new(0),
                empty: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                addresses: AtomicU64::new(0),
                stale: AtomicBool::new(false),
            }),
            pending: false,
            owned: BTreeSet::new(),
            last_good: None,
            due,
        }
    }

    fn is_ours(&self, inst: &Instance) -> bool {
        inst.role == self.stats.target.role()
            && *inst.model == *self.stats.target.model
            && self.owned.contains(&inst.socket_addr)
    }

    /// Brings the topology's instances of this name to `desired`. Compares with the
    /// topology itself, not with the previous answer, so an instance removed through the
    /// admin API comes back while the name still lists it.
    fn reconcile(&mut self, desired: &BTreeSet<SocketAddr>, topo: &Topology, out: &mut Changes) {
        let label = &self.stats.label;
        let t = &self.stats.target;
        for sa in self.owned.clone() {
            if desired.contains(&sa) {
                continue;
            }
            if let Some(inst) = topo.find(sa).filter(|i| self.is_ours(i)) {
                crate::warn!(
                    "discovery: {sa} left {label}; draining {} request(s)",
                    inst.in_flight()
                );
                out.removed.push(inst.clone());
            }
            self.owned.remove(&sa);
        }
        for &sa in desired {
            let taken = out.added.iter().any(|i| i.socket_addr == sa);
            match topo.find(sa) {
                Some(inst) if self.is_ours(inst) => {}
                Some(inst) => {
                    // A fixed entry, an admin addition or another name has it.
                    if self.owned.remove(&sa) || !taken {
                        crate::debug!(
                            "discovery: {sa} from {label} is already configured ({} of {}); left as it is",
                            inst.role.as_str(),
                            inst.model
                        );
                    }
                }
                None if taken => {
                    self.owned.remove(&sa);
                }
                None => {
                    crate::warn!(
                        "discovery: {sa} joins {label} ({} of model {})",
                        t.role().as_str(),
                        t.model
                    );
                    out.added.push(Arc::new(Instance::new(
                        sa.to_string(),
                        sa,
                        t.role(),
                        t.model.clone(),
                    )));
                    self.owned.insert(sa);
                }
            }
        }
        self.stats
            .addresses
            .store(self.owned.len() as u64, Ordering::Relaxed);
    }

    /// Writes this name's live instances into the reloaded config's model (unless the file
    /// now lists the address itself).
    fn carry_into(&mut self, cfg: &mut Config, topo: &Topology) {
        let t = self.stats.target.clone();
        let taken: Vec<SocketAddr> = cfg
            .models
            .iter()
            .flat_map(|m| m.instances.iter().map(|i| i.socket_addr))
            .collect();
        let Some(model) = cfg.models.iter_mut().find(|m| *m.name == *t.model) else {
            return;
        };
        for sa in self.owned.clone() {
            let live = topo.find(sa).filter(|i| self.is_ours(i));
            match live {
                Some(inst) if !taken.contains(&sa) => model.instances.push(InstanceConfig {
                    address: inst.address.clone(),
                    socket_addr: sa,
                    role: t.role(),
                }),
                _ => {
                    self.owned.remove(&sa);
                }
            }
        }
    }
}

/// The resolver and the runtime that drives it.
struct Dns {
    rt: tokio::runtime::Runtime,
    resolver: hickory_resolver::Resolver<TokioRuntimeProvider>,
    timeout: Duration,
}

impl Dns {
    fn new(cfg: &DiscoveryConfig) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the resolver's runtime: {e}"))?;
        let provider = TokioRuntimeProvider::default();
        let mut builder = if cfg.nameservers.is_empty() {
            hickory_resolver::Resolver::builder(provider)
                .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|sa| {
                    let mut ns = NameServerConfig::udp_and_tcp(sa.ip());
                    for c in &mut ns.connections {
                        c.port = sa.port();
                    }
                    ns
                })
                .collect();
            hickory_resolver::Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                provider,
            )
        };
        let opts = builder.options_mut();
        opts.timeout = cfg.timeout;
        opts.attempts = 1;
        // Both families: a name may have only AAAA records.
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot build the resolver: {e}"))?;
        Ok(Dns {
            rt,
            resolver,
            timeout: cfg.timeout,
        })
    }

    /// Looks the names up concurrently, each within the configured timeout.
    fn lookup_all(&self, targets: &[Target]) -> Vec<Answer> {
        let limit = self.timeout;
        let tasks: Vec<_> = targets
            .iter()
            .map(|t| {
                let resolver = self.resolver.clone();
                let host = t.name.host.clone();
                self.rt.spawn(async move {
                    tokio::time::timeout(limit, resolver.lookup_ip(host.as_str())).await
                })
            })
            .collect();
        self.rt.block_on(async move {
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(match t.await {
                    Ok(Ok(Ok(lookup))) => {
                        let ips: Vec<IpAddr> = lookup.iter().collect();
                        if ips.is_empty() {
                            Answer::Empty
                        } else {
                            let ttl = lookup
                                .valid_until()
                                .saturating_duration_since(Instant::now());
                            Answer::Found(ips, ttl)
                        }
                    }
                    Ok(Ok(Err(e))) if e.is_no_records_found() || e.is_nx_domain() => Answer::Empty,
                    Ok(Ok(Err(e))) => Answer::Failed(e.to_string()),
                    Ok(Err(_)) => Answer::Failed(format!("no answer within {limit:?}")),
                    Err(e) => Answer::Failed(format!("lookup task failed: {e}")),
                });
            }
            out
        })
    }
}

#[cfg(test)]
mod tests;
