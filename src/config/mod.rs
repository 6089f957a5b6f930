//! Configuration: the three YAML shapes (legacy role lists with their topology form,
//! `instances:`, `models:`) resolved into one internal model — models, each with its
//! instances and their roles — that the rest of the proxy reads. `load.rs` reads and
//! validates (every problem at once, each a typed `Problem` with its path and line:column;
//! the pieces are listed in docs/architecture.md); `yaml.rs` is the only user of the YAML
//! library; `fix.rs` repairs common mistakes in the text.

mod address;
mod admission;
mod discovery;
pub mod fix;
mod formats;
mod load;
mod problem;
mod reader;
mod role;
mod roles;
mod schema;
mod sections;
mod suggest;
mod tracing;
mod yaml;

use crate::log::Level;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use address::{parse_address, AddressError};
pub use admission::AdmissionConfig;
pub use discovery::{DiscoveryConfig, DnsName, DNS_SCHEME};
pub use problem::{ConfigError, Kind as ProblemKind, Problem};
pub use role::{Role, RoleGap, UnknownRole};
pub use suggest::{did_you_mean, levenshtein};
pub use tracing::{OtlpEndpoint, TracingConfig, DEFAULT_DENY_HEADERS};
pub use yaml::YamlError;

#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// As written in the config (`host:port`); used in logs and the Host header.
    pub address: String,
    pub socket_addr: SocketAddr,
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    LoadBalanced,
    RoundRobin,
    ConsistentHash,
    PowerOfTwo,
    CacheAware,
    /// Precise prefix routing on the engines' KV-cache events.
    KvAware,
}

/// Every spelling of every scheduler: the one table that parsing, the "expected one of"
/// list and `fix-config` read.
const SCHEDULERS: &[(&str, SchedulerKind)] = &[
    ("loadbalanced", SchedulerKind::LoadBalanced),
    ("load_balanced", SchedulerKind::LoadBalanced),
    ("roundrobin", SchedulerKind::RoundRobin),
    ("round_robin", SchedulerKind::RoundRobin),
    ("consistent_hash", SchedulerKind::ConsistentHash),
    ("power_of_two", SchedulerKind::PowerOfTwo),
    ("cache_aware", SchedulerKind::CacheAware),
    ("kv_aware", SchedulerKind::KvAware),
];

impl SchedulerKind {
    /// Every accepted spelling.
    pub fn names() -> Vec<&'static str> {
        SCHEDULERS.iter().map(|(n, _)| *n).collect()
    }

    /// The canonical name (the first spelling in the table).
    pub fn as_str(self) -> &'static str {
        SCHEDULERS
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("", |(n, _)| n)
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        SCHEDULERS
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                format!(
                    "unknown scheduler `{s}` (expected one of: {})",
                    SchedulerKind::names().join(", ")
                )
            })
    }
}

/// `scheduling_config`: options of the policies (each ignored by the others).
#[derive(Debug, Clone)]
pub struct SchedulingOptions {
    /// cache_aware: minimum share of the prompt matched to follow the prefix.
    pub cache_threshold: f64,
    /// cache_aware: route by load when max - min load exceeds this ...
    pub balance_abs_threshold: u64,
    /// ... and max > min × this.
    pub balance_rel_threshold: f64,
    /// cache_aware: prefix blocks remembered per model, role and worker.
    pub max_tree_size: usize,
    /// consistent_hash: ring points per instance.
    pub virtual_nodes: usize,
    /// consistent_hash: ε of the bounded-load rule.
    pub hash_load_factor: f64,
}

impl Default for SchedulingOptions {
    fn default() -> Self {
        SchedulingOptions {
            cache_threshold: 0.5,
            balance_abs_threshold: 8,
            balance_rel_threshold: 1.5,
            max_tree_size: 1 << 16,
            virtual_nodes: 160,
            hash_load_factor: 0.25,
        }
    }
}

/// How the decode leg learns about the prefill leg's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisaggMode {
    /// The engines pair up on their own; the proxy sends no `kv_transfer_params`.
    Direct,
    /// NIXL: the prefill response's `kv_transfer_params` are handed to the decode leg.
    Nixl,
}

/// A policy for one leg of P/D over the model's `scheduling`: the prefill pick may follow
/// the cache while the decode pick follows the load (docs/scheduling.md, "Per-role policies").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleSchedulers {
    pub prefill: Option<SchedulerKind>,
    pub decode: Option<SchedulerKind>,
}

impl RoleSchedulers {
    /// The policy of `role`'s instances when `all` is the model's `scheduling`.
    pub fn for_role(&self, role: Role, all: SchedulerKind) -> SchedulerKind {
        match role {
            Role::Prefill => self.prefill.unwrap_or(all),
            Role::Decode => self.decode.unwrap_or(all),
            Role::Dual => all,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub instances: Vec<InstanceConfig>,
    /// `dns://` entries: their instances come and go with the name's records.
    pub discovered: Vec<DnsName>,
    pub scheduler: SchedulerKind,
    pub role_schedulers: RoleSchedulers,
    pub scheduling: SchedulingOptions,
    pub mode: DisaggMode,
    /// Limits on the model's requests (the top level's `admission` unless it says).
    pub admission: AdmissionConfig,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub startup_probe_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct StartupConfig {
    /// How long to wait for a serving path before saying so (zero: ready at once, 1.2's
    /// "skip discovery").
    pub wait_timeout: Duration,
    pub exit_on_timeout: bool,
    /// While not ready, how often to log which instances are up (1.8's
    /// `heartbeat_interval_seconds`).
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct CircuitConfig {
    pub enabled: bool,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub timeout: Duration,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub enabled: bool,
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub jitter: f64,
    pub retryable_status: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct TimeoutConfig {
    pub connect: Duration,
    /// Request sent → response head received.
    pub first_byte: Duration,
    /// Between two reads of a response body.
    pub idle: Duration,
    /// A pooled upstream connection idle longer than this is closed instead of reused.
    pub pool_idle: Duration,
}

/// Limits on what clients may send and how long they may take.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Sizes and timeouts of reading one request.
    pub http: crate::http::Limits,
    /// Per worker; connections beyond it are refused (closed at once).
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub workers: Option<usize>,
    pub log_level: Level,
    pub models: Vec<ModelConfig>,
    pub health: HealthConfig,
    pub engine_metrics: EngineMetricsConfig,
    pub kv_events: KvEventsConfig,
    pub prefix_sync: PrefixSyncConfig,
    /// The top level's `admission` (each model's own is in its `ModelConfig`).
    pub admission: AdmissionConfig,
    pub startup: StartupConfig,
    pub circuit: CircuitConfig,
    pub retry: RetryConfig,
    pub timeouts: TimeoutConfig,
    pub limits: ServerLimits,
    pub discovery: DiscoveryConfig,
    pub admin_api_key: Option<String>,
    pub shutdown_grace: Duration,
    /// Record Prometheus metrics (`metrics.enabled`); off only to measure their cost.
    pub metrics_enabled: bool,
    pub log_format: crate::log::Format,
    /// Streaming requests take their first token from the prefill node (docs/api.md).
    pub generator_on_p_node: bool,
    /// Sent to backends as `Authorization: Bearer` (env `OPENAI_API_KEY` overrides).
    pub openai_api_key: Option<String>,
    /// When not empty, business endpoints need `Authorization: Bearer <one of these>`.
    pub api_keys: Vec<String>,
    /// Operational endpoints need a client key too.
    pub protect_status: bool,
    /// Root of local tokenizers, one directory per model name (1.8's `tokenizer_path`:
    /// model `org/name` is read from `<tokenizer_path>/org/name/`).
    pub tokenizer_path: Option<PathBuf>,
    pub tokenizer: TokenizerConfig,
    /// OTLP span export (`tracing`); off by default.
    pub tracing: TracingConfig,
    /// Client headers never forwarded to backends (`forward_headers.deny`), lower case.
    pub deny_headers: Vec<String>,
    pub source: Option<PathBuf>,
    /// Accepted but worth saying (an older spelling, a key with no effect in xpyd): printed
    /// by `--validate-config` and logged at start.
    pub warnings: Vec<Problem>,
    /// Command-line values over the file's; kept so that a reload keeps them too.
    pub overrides: Overrides,
}

/// `tokenizer`: the threads that tokenize prompts off the workers (docs/scheduling.md,
/// "Tokenizers").
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerConfig {
    /// Tokenizer threads, started once (a reload does not change them).
    pub threads: usize,
    /// Prompt text (KiB) waiting for or in tokenization beyond which a prompt keeps the
    /// byte estimate instead of queueing (a reload applies it).
    pub max_queued_kib: u64,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            threads: 1,
            max_queued_kib: 4096,
        }
    }
}

/// `engine_metrics`: scraping each instance's `/metrics` for vLLM's queue and KV-cache
/// numbers (docs/scheduling.md, "Engine load").
#[derive(Debug, Clone, PartialEq)]
pub struct EngineMetricsConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for EngineMetricsConfig {
    fn default() -> Self {
        EngineMetricsConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
        }
    }
}

/// `prefix_sync`: the other proxy replicas in front of the same instances, to which
/// `cache_aware` sends where it placed each new prefix (and from which it takes theirs), so
/// that replicas deal new prefix groups out over the nodes the same way
/// (docs/scheduling.md, "Replicas").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefixSyncConfig {
    /// `host:port` of each peer's HTTP listener.
    pub peers: Vec<String>,
}

/// `kv_events`: where each instance's engine publishes its KV-cache events (vLLM's
/// `--kv-events-config`), for the `kv_aware` policy (docs/scheduling.md, "KV events").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KvEventsConfig {
    /// `tcp://<instance host>:<port>` for every instance without an explicit endpoint.
    pub port: Option<u16>,
    pub replay_port: Option<u16>,
    /// Instance address → endpoint, over `port`.
    pub endpoints: Vec<(String, String)>,
    pub replay_endpoints: Vec<(String, String)>,
    /// Subscription prefix (vLLM's `topic`; empty: everything).
    pub topic: String,
}

impl KvEventsConfig {
    /// The publisher and replay endpoints of the instance at `address` (`host:port`).
    pub fn endpoints_of(&self, address: &str) -> Option<(String, Option<String>)> {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let explicit = |list: &[(String, String)]| {
            list.iter()
                .find(|(a, _)| a == address)
                .map(|(_, e)| e.clone())
        };
        let publ =
            explicit(&self.endpoints).or_else(|| self.port.map(|p| format!("tcp://{host}:{p}")))?;
        let replay = explicit(&self.replay_endpoints)
            .or_else(|| self.replay_port.map(|p| format!("tcp://{host}:{p}")));
        Some((publ, replay))
    }
}

/// Command-line flags that take precedence over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub port: Option<u16>,
    pub log_level: Option<Level>,
    pub log_format: Option<crate::log::Format>,
    pub workers: Option<usize>,
}

/// The settings requests read while they run. Published whole (like the topology) so that
/// a reload changes them for the next request without a lock; a request in flight may see
/// the new values from its next step on.
#[derive(Debug, Clone)]
pub struct Policy {
    pub engine_metrics: EngineMetricsConfig,
    pub kv_events: KvEventsConfig,
    pub prefix_sync: PrefixSyncConfig,
    pub timeouts: TimeoutConfig,
    pub retry: RetryConfig,
    pub circuit: CircuitConfig,
    pub limits: ServerLimits,
    pub admin_api_key: Option<String>,
    pub openai_api_key: Option<String>,
    pub api_keys: Vec<String>,
    pub protect_status: bool,
    pub generator_on_p_node: bool,
    pub shutdown_grace: Duration,
    pub deny_headers: Vec<String>,
    /// `tracing.sample_ratio` (the exporter itself is set up at start).
    pub trace_sample_ratio: f64,
    /// Each configured model's admission limits, by name ...
    pub admission: std::collections::HashMap<String, AdmissionConfig>,
    /// ... and those of a model added by the admin API (the top level's).
    pub admission_default: AdmissionConfig,
}

impl Policy {
    /// The admission limits of `model`, None when it has none.
    pub fn admission(&self, model: &str) -> Option<&AdmissionConfig> {
        // No per-model section (the usual case): no hash of the name per request.
        let per_model = if self.admission.is_empty() {
            None
        } else {
            self.admission.get(model)
        };
        per_model.unwrap_or(&self.admission_default).is_on()
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::one(ProblemKind::Unreadable(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        })?;
        let mut cfg = Self::from_yaml(&text)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        load::from_yaml(text)
    }

    pub fn with_overrides(mut self, o: Overrides) -> Config {
        if let Some(p) = o.port {
            self.port = p;
        }
        if let Some(l) = o.log_level {
            self.log_level = l;
        }
        if let Some(f) = o.log_format {
            self.log_format = f;
        }
        if o.workers.is_some() {
            self.workers = o.workers;
        }
        self.overrides = o;
        self
    }

    pub fn policy(&self) -> Policy {
        Policy {
            engine_metrics: self.engine_metrics.clone(),
            kv_events: self.kv_events.clone(),
            prefix_sync: self.prefix_sync.clone(),
            timeouts: self.timeouts.clone(),
            retry: self.retry.clone(),
            circuit: self.circuit.clone(),
            limits: self.limits.clone(),
            admin_api_key: self.admin_api_key.clone(),
            openai_api_key: self.openai_api_key.clone(),
            api_keys: self.api_keys.clone(),
            protect_status: self.protect_status,
            generator_on_p_node: self.generator_on_p_node,
            shutdown_grace: self.shutdown_grace,
            deny_headers: self.deny_headers.clone(),
            trace_sample_ratio: self.tracing.sample_ratio,
            admission: self
                .models
                .iter()
                .map(|m| (m.name.clone(), m.admission.clone()))
                .collect(),
            admission_default: self.admission.clone(),
        }
    }

    /// The settings read once at start that differ in `next`: a reload reports them and
    /// keeps the running values (the listeners, threads and pools were built with them).
    pub fn restart_needed(&self, next: &Config) -> Vec<&'static str> {
        [
            ("host", self.host != next.host),
            ("port", self.port != next.port),
            ("workers", self.workers != next.workers),
            (
                "tokenizer.threads",
                self.tokenizer.threads != next.tokenizer.threads,
            ),
            ("log_format", self.log_format != next.log_format),
            (
                "metrics.enabled",
                self.metrics_enabled != next.metrics_enabled,
            ),
            (
                "timeouts.connect_ms",
                self.timeouts.connect != next.timeouts.connect,
            ),
            (
                "timeouts.pool_idle_seconds",
                self.timeouts.pool_idle != next.timeouts.pool_idle,
            ),
            (
                "tracing.otlp_endpoint",
                self.tracing.otlp_endpoint != next.tracing.otlp_endpoint,
            ),
            (
                "tracing.service_name",
                self.tracing.service_name != next.tracing.service_name,
            ),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name)
        .collect()
    }

    /// A one-screen summary of the resolved topology (`--validate-config`).
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "listen {}:{}, log level {:?}",
            self.host, self.port, self.log_level
        );
        for m in &self.models {
            let _ = writeln!(
                s,
                "model {} (scheduler {}{}, {} mode)",
                m.name,
                m.scheduler.as_str(),
                match (m.role_schedulers.prefill, m.role_schedulers.decode) {
                    (None, None) => String::new(),
                    _ => format!(
                        "; prefill {}, decode {}",
                        m.role_schedulers
                            .for_role(Role::Prefill, m.scheduler)
                            .as_str(),
                        m.role_schedulers
                            .for_role(Role::Decode, m.scheduler)
                            .as_str()
                    ),
                },
                if m.mode == DisaggMode::Nixl {
                    "nixl"
                } else {
                    "direct"
                }
            );
            for role in Role::ALL {
                let list: Vec<String> = m
                    .instances
                    .iter()
                    .filter(|i| i.role == role)
                    .map(|i| i.address.clone())
                    .chain(
                        m.discovered
                            .iter()
                            .filter(|n| n.role == role)
                            .map(|n| format!("{} (DNS discovery)", n.label())),
                    )
                    .collect();
                if !list.is_empty() {
                    let _ = writeln!(s, "  {:<8} {}", role.as_str(), list.join(", "));
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_role_policies_global_and_per_model() {
        let c = Config::from_yaml(
            "scheduling: roundrobin\nprefill_scheduling: cache_aware\ndecode_scheduling: power_of_two\nmodels:\n  - name: a\n    prefill: [\"127.0.0.1:8100\"]\n    decode: [\"127.0.0.1:8200\"]\n  - name: b\n    decode_scheduler: loadbalanced\n    prefill: [\"127.0.0.1:8101\"]\n    decode: [\"127.0.0.1:8201\"]\n    dual: [\"127.0.0.1:8301\"]\n",
        )
        .unwrap();
        let (a, b) = (&c.models[0], &c.models[1]);
        let of = |m: &ModelConfig, r| m.role_schedulers.for_role(r, m.scheduler);
        assert_eq!(of(a, Role::Prefill), SchedulerKind::CacheAware);
        assert_eq!(of(a, Role::Decode), SchedulerKind::PowerOfTwo);
        assert_eq!(of(a, Role::Dual), SchedulerKind::RoundRobin);
        assert_eq!(of(b, Role::Prefill), SchedulerKind::CacheAware);
        assert_eq!(of(b, Role::Decode), SchedulerKind::LoadBalanced);
        assert_eq!(of(b, Role::Dual), SchedulerKind::RoundRobin);
        // Without them every role follows `scheduling`.
        let c = Config::from_yaml("model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode: [\"127.0.0.1:8200\"]\nscheduling: cache_aware\n").unwrap();
        assert_eq!(c.models[0].role_schedulers, RoleSchedulers::default());
    }

    #[test]
    fn prefix_sync_peers_are_read_and_validated() {
        let base = "model: m\ndual: [\"127.0.0.1:8100\"]\n";
        let c = Config::from_yaml(&format!(
            "{base}admin_api_key: k\nprefix_sync:\n  peers: [\"10.0.0.2:8000\", \"http://h:9/\"]\n"
        ))
        .unwrap();
        assert_eq!(c.prefix_sync.peers, ["10.0.0.2:8000", "h:9"]);
        let e = Config::from_yaml(&format!(
            "{base}prefix_sync:\n  peers: [\"10.0.0.2:8000\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("prefix_sync.peers") && e.contains("admin_api_key"),
            "{e}"
        );
        let e = Config::from_yaml(&format!(
            "{base}admin_api_key: k\nprefix_sync:\n  peers: [\"nohost\", 5]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("prefix_sync.peers[0]") && e.contains("prefix_sync.peers[1]"),
            "{e}"
        );
    }

    #[test]
    fn per_role_policies_are_validated() {
        let e = Config::from_yaml(
            "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode: [\"127.0.0.1:8200\"]\nprefill_scheduling: cache_awre\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("prefill_scheduling") && e.contains("cache_aware"),
            "{e}"
        );
        let e = Config::from_yaml(
            "models:\n  - name: m\n    decode_scheduler: fastest\n    prefill: [\"127.0.0.1:8100\"]\n    decode: [\"127.0.0.1:8200\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("models[0].decode_scheduler"), "{e}");
    }

    #[test]
    fn format1_loads() {
        let c = Config::from_yaml(
            "model: m\nprefill: [\"127.0.0.1:8100\"]\ndecode: [\"127.0.0.1:8200\", \"localhost:8201\"]\nport: 9000\n",
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.models[0].name, "m");
        assert_eq!(c.models[0].instances.len(), 3);
        assert_eq!(c.models[0].instances[2].role, Role::Decode);
    }

    #[test]
    fn reports_problems_with_location() {
        let e = Config::from_yaml("model: m\nprefil: [\"a:1\"]\n").unwrap_err();
        assert_eq!(e.problems[0].location, Some((2, 1)), "{e}");
        assert!(e.problems[0].to_string().contains("prefil"), "{e}");
        let e = Config::from_yaml(
            "prefill: [\"nohost\"]\ndecode: [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        let e = Config::from_yaml("prefill: [\"127.0.0.1:5\"]\n").unwrap_err();
        assert!(e.problems[0].to_string().contains("decode"), "{e}");
    }
}
