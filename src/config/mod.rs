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
mod resilience;
mod role;
mod roles;
mod scheduling;
mod schema;
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
pub use resilience::{
    CircuitConfig, HealthConfig, RetryConfig, ServerLimits, StartupConfig, TimeoutConfig,
};
pub use role::{Role, RoleGap, UnknownRole};
pub use scheduling::{
    EngineMetricsConfig, KvEventsConfig, PrefixSyncConfig, RoleSchedulers, SchedulerKind,
    SchedulingOptions, TokenizerConfig,
};
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

/// How the decode leg learns about the prefill leg's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisaggMode {
    /// The engines pair up on their own; the proxy sends no `kv_transfer_params`.
    Direct,
    /// NIXL: the prefill response's `kv_transfer_params` are handed to the decode leg.
    Nixl,
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
    /// The admission limits of each configured model that has its own, by name ...
    pub admission: std::collections::HashMap<String, AdmissionConfig>,
    /// ... and those of every other model (the top level's): a configured model without
    /// limits of its own, or one added by the admin API.
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
            // Only the models whose limits differ from the top level's: with none (the
            // usual case) a request's lookup hashes no name.
            admission: self
                .models
                .iter()
                .filter(|m| m.admission != self.admission)
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

    /// A model with limits of its own gets them; one without, the top level's, through the
    /// default (the policy keeps no entry for it).
    #[test]
    fn each_model_gets_its_admission_limits() {
        let c = Config::from_yaml(concat!(
            "admission: {max_concurrent_requests: 4}\n",
            "models:\n",
            "  - name: own\n",
            "    dual: [\"127.0.0.1:8100\"]\n",
            "    admission: {max_concurrent_requests: 9}\n",
            "  - name: plain\n",
            "    dual: [\"127.0.0.1:8101\"]\n",
        ))
        .unwrap();
        let p = c.policy();
        let limit = |m: &str| p.admission(m).map(|a| a.max_concurrent_requests);
        assert_eq!(limit("own"), Some(9));
        assert_eq!(limit("plain"), Some(4));
        assert_eq!(limit("added-later"), Some(4));
        assert_eq!(
            p.admission.len(),
            1,
            "only the model with limits of its own"
        );
        let off = Config::from_yaml("model: m\ndual: [\"127.0.0.1:8100\"]\n").unwrap();
        assert!(off.policy().admission("m").is_none());
    }
}
