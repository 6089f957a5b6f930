//! Configuration: the YAML file shapes (`raw`) resolved into one internal model — models,
//! each with its instances and their roles — that the rest of the proxy reads.
//!
//! Format 1 (legacy `model` + `prefill`/`decode`/`dual` lists) is implemented; the
//! `instances:` and `models:` formats resolve into the same `Config`.

mod yaml;

use crate::log::Level;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use yaml::YamlError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Prefill,
    Decode,
    Dual,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Dual => "dual",
        }
    }
}

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
}

pub const SCHEDULER_NAMES: &[&str] = &[
    "loadbalanced",
    "load_balanced",
    "roundrobin",
    "round_robin",
    "consistent_hash",
    "power_of_two",
    "cache_aware",
];

impl SchedulerKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "loadbalanced" | "load_balanced" => Ok(SchedulerKind::LoadBalanced),
            "roundrobin" | "round_robin" => Ok(SchedulerKind::RoundRobin),
            "consistent_hash" => Ok(SchedulerKind::ConsistentHash),
            "power_of_two" => Ok(SchedulerKind::PowerOfTwo),
            "cache_aware" => Ok(SchedulerKind::CacheAware),
            other => Err(format!(
                "unknown scheduler `{other}` (expected one of: {})",
                SCHEDULER_NAMES.join(", ")
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::LoadBalanced => "loadbalanced",
            SchedulerKind::RoundRobin => "roundrobin",
            SchedulerKind::ConsistentHash => "consistent_hash",
            SchedulerKind::PowerOfTwo => "power_of_two",
            SchedulerKind::CacheAware => "cache_aware",
        }
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
            balance_abs_threshold: 32,
            balance_rel_threshold: 1.1,
            max_tree_size: 1 << 16,
            virtual_nodes: 160,
            hash_load_factor: 0.25,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub instances: Vec<InstanceConfig>,
    pub scheduler: SchedulerKind,
    pub scheduling: SchedulingOptions,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub startup_probe_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct StartupConfig {
    pub wait_timeout: Duration,
    pub exit_on_timeout: bool,
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
    pub startup: StartupConfig,
    pub circuit: CircuitConfig,
    pub retry: RetryConfig,
    pub timeouts: TimeoutConfig,
    pub limits: ServerLimits,
    pub admin_api_key: Option<String>,
    pub shutdown_grace: Duration,
    /// Record Prometheus metrics (`metrics.enabled`); off only to measure their cost.
    pub metrics_enabled: bool,
    pub log_format: crate::log::Format,
    pub source: Option<PathBuf>,
}

#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

mod raw {
    use serde::Deserialize;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub model: Option<String>,
        pub prefill: Option<Vec<String>>,
        pub decode: Option<Vec<String>>,
        pub dual: Option<Vec<String>>,
        pub host: Option<String>,
        pub port: Option<u16>,
        pub workers: Option<usize>,
        pub log_level: Option<String>,
        pub scheduling: Option<String>,
        pub scheduling_config: Option<SchedulingConfig>,
        pub health_check: Option<HealthCheck>,
        pub startup: Option<Startup>,
        pub circuit_breaker: Option<CircuitBreaker>,
        pub retry: Option<Retry>,
        pub timeouts: Option<Timeouts>,
        pub limits: Option<Limits>,
        pub admin_api_key: Option<String>,
        pub shutdown_grace_seconds: Option<f64>,
        pub metrics: Option<Metrics>,
        pub log_format: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Metrics {
        pub enabled: Option<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct CircuitBreaker {
        pub enabled: Option<bool>,
        pub failure_threshold: Option<u32>,
        pub success_threshold: Option<u32>,
        pub timeout_duration_seconds: Option<f64>,
        pub window_duration_seconds: Option<f64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Retry {
        pub enabled: Option<bool>,
        pub max_retries: Option<u32>,
        pub initial_backoff_ms: Option<u64>,
        pub max_backoff_ms: Option<u64>,
        pub backoff_multiplier: Option<f64>,
        pub jitter_factor: Option<f64>,
        pub retryable_status_codes: Option<Vec<u16>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct SchedulingConfig {
        pub cache_threshold: Option<f64>,
        pub balance_abs_threshold: Option<u64>,
        pub balance_rel_threshold: Option<f64>,
        pub max_tree_size: Option<usize>,
        pub virtual_nodes: Option<usize>,
        pub hash_load_factor: Option<f64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct HealthCheck {
        pub enabled: Option<bool>,
        pub interval_seconds: Option<f64>,
        pub timeout_seconds: Option<f64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Startup {
        pub probe_interval_seconds: Option<f64>,
        pub wait_timeout_seconds: Option<f64>,
        pub exit_on_timeout: Option<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Timeouts {
        pub connect_ms: Option<u64>,
        pub first_byte_seconds: Option<f64>,
        pub idle_seconds: Option<f64>,
        pub pool_idle_seconds: Option<f64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Limits {
        pub max_body_bytes: Option<usize>,
        pub max_header_bytes: Option<usize>,
        pub max_connections: Option<usize>,
        pub header_timeout_seconds: Option<f64>,
        pub keepalive_timeout_seconds: Option<f64>,
    }
}

fn scheduling_options(c: raw::SchedulingConfig, problems: &mut Vec<String>) -> SchedulingOptions {
    let d = SchedulingOptions::default();
    let o = SchedulingOptions {
        cache_threshold: c.cache_threshold.unwrap_or(d.cache_threshold),
        balance_abs_threshold: c.balance_abs_threshold.unwrap_or(d.balance_abs_threshold),
        balance_rel_threshold: c.balance_rel_threshold.unwrap_or(d.balance_rel_threshold),
        max_tree_size: c.max_tree_size.unwrap_or(d.max_tree_size),
        virtual_nodes: c.virtual_nodes.unwrap_or(d.virtual_nodes),
        hash_load_factor: c.hash_load_factor.unwrap_or(d.hash_load_factor),
    };
    if !(0.0..=1.0).contains(&o.cache_threshold) {
        problems.push("scheduling_config.cache_threshold: must be between 0 and 1".into());
    }
    if o.balance_rel_threshold < 1.0 {
        problems.push("scheduling_config.balance_rel_threshold: must be at least 1.0".into());
    }
    if o.max_tree_size == 0 || o.virtual_nodes == 0 {
        problems.push("scheduling_config: max_tree_size and virtual_nodes must be positive".into());
    }
    if !(o.hash_load_factor > 0.0 && o.hash_load_factor.is_finite()) {
        problems.push("scheduling_config.hash_load_factor: must be positive".into());
    }
    o
}

fn positive(field: &str, v: Option<u32>, default: u32, problems: &mut Vec<String>) -> u32 {
    match v {
        Some(0) => {
            problems.push(format!("{field}: must be at least 1"));
            default
        }
        Some(n) => n,
        None => default,
    }
}

fn seconds(field: &str, v: Option<f64>, default: f64, problems: &mut Vec<String>) -> Duration {
    let v = v.unwrap_or(default);
    if !(v.is_finite() && v > 0.0) {
        problems.push(format!(
            "{field}: must be a positive number of seconds, got {v}"
        ));
        return Duration::from_secs_f64(default);
    }
    Duration::from_secs_f64(v)
}

/// Parses `host:port`, resolving names (`localhost`) once at load time.
pub fn parse_address(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("address `{s}` has no port (expected host:port)"));
    };
    if host.is_empty() {
        return Err(format!("address `{s}` has no host (expected host:port)"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("address `{s}` has an invalid port `{port}`"))?;
    if port == 0 {
        return Err(format!("address `{s}`: port 0 is not a reachable port"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("address `{s}` does not resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("address `{s}` does not resolve"))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("cannot read {}: {e}", path.display())],
        })?;
        let mut cfg = Self::from_yaml(&text)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let file: raw::File = if text.trim().is_empty() {
            raw::File::default()
        } else {
            yaml::from_str(text).map_err(|e| ConfigError {
                problems: vec![e.to_string()],
            })?
        };
        Self::resolve(file)
    }

    fn resolve(f: raw::File) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut instances = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (field, role, list) in [
            ("prefill", Role::Prefill, &f.prefill),
            ("decode", Role::Decode, &f.decode),
            ("dual", Role::Dual, &f.dual),
        ] {
            for (i, addr) in list.iter().flatten().enumerate() {
                match parse_address(addr) {
                    Ok(sa) => {
                        if !seen.insert(sa) {
                            problems.push(format!("{field}[{i}]: duplicate address `{addr}`"));
                        }
                        instances.push(InstanceConfig {
                            address: addr.trim().to_string(),
                            socket_addr: sa,
                            role,
                        });
                    }
                    Err(e) => problems.push(format!("{field}[{i}]: {e}")),
                }
            }
        }
        // Judge the roles by what was written, so a bad address is not also reported as a
        // missing role.
        let listed = |l: &Option<Vec<String>>| l.as_ref().is_some_and(|v| !v.is_empty());
        let has = |r: Role| match r {
            Role::Prefill => listed(&f.prefill),
            Role::Decode => listed(&f.decode),
            Role::Dual => listed(&f.dual),
        };
        if !has(Role::Prefill) && !has(Role::Decode) && !has(Role::Dual) {
            problems
                .push("no backend instances: set `decode` (with `prefill`) or `dual`".to_string());
        } else if has(Role::Prefill) && !has(Role::Decode) {
            problems.push("prefill: instances are listed but `decode` is empty".to_string());
        } else if has(Role::Decode) && !has(Role::Prefill) && !has(Role::Dual) {
            problems.push(
                "decode: instances are listed but `prefill` is empty (list `dual` instances for single-pass serving)"
                    .to_string(),
            );
        }
        let scheduler = match f.scheduling.as_deref() {
            None => SchedulerKind::LoadBalanced,
            Some(s) => SchedulerKind::parse(s).unwrap_or_else(|e| {
                problems.push(format!("scheduling: {e}"));
                SchedulerKind::LoadBalanced
            }),
        };
        let scheduling = scheduling_options(f.scheduling_config.unwrap_or_default(), &mut problems);
        let log_level = match f.log_level.as_deref() {
            None => Level::Warning,
            Some(s) => s.parse().unwrap_or_else(|e: String| {
                problems.push(format!("log_level: {e}"));
                Level::Warning
            }),
        };
        if f.workers == Some(0) {
            problems.push("workers: must be at least 1".to_string());
        }
        let hc = f.health_check.unwrap_or_default();
        if hc.enabled == Some(false) {
            problems.push(
                "health_check.enabled: health checks gate startup and cannot be disabled".into(),
            );
        }
        let st = f.startup.unwrap_or_default();
        let p = &mut problems;
        let health = HealthConfig {
            interval: seconds(
                "health_check.interval_seconds",
                hc.interval_seconds,
                10.0,
                p,
            ),
            timeout: seconds("health_check.timeout_seconds", hc.timeout_seconds, 3.0, p),
            startup_probe_interval: seconds(
                "startup.probe_interval_seconds",
                st.probe_interval_seconds,
                10.0,
                p,
            ),
        };
        let startup = StartupConfig {
            wait_timeout: seconds(
                "startup.wait_timeout_seconds",
                st.wait_timeout_seconds,
                600.0,
                p,
            ),
            exit_on_timeout: st.exit_on_timeout.unwrap_or(false),
        };
        let cb = f.circuit_breaker.unwrap_or_default();
        let circuit = CircuitConfig {
            enabled: cb.enabled.unwrap_or(true),
            failure_threshold: positive(
                "circuit_breaker.failure_threshold",
                cb.failure_threshold,
                5,
                p,
            ),
            success_threshold: positive(
                "circuit_breaker.success_threshold",
                cb.success_threshold,
                2,
                p,
            ),
            timeout: seconds(
                "circuit_breaker.timeout_duration_seconds",
                cb.timeout_duration_seconds,
                30.0,
                p,
            ),
            window: seconds(
                "circuit_breaker.window_duration_seconds",
                cb.window_duration_seconds,
                60.0,
                p,
            ),
        };
        let rt = f.retry.unwrap_or_default();
        let retry = RetryConfig {
            enabled: rt.enabled.unwrap_or(true),
            max_retries: rt.max_retries.unwrap_or(2),
            initial_backoff: Duration::from_millis(rt.initial_backoff_ms.unwrap_or(100)),
            max_backoff: Duration::from_millis(rt.max_backoff_ms.unwrap_or(10_000)),
            multiplier: rt.backoff_multiplier.unwrap_or(2.0),
            jitter: rt.jitter_factor.unwrap_or(0.1),
            retryable_status: rt
                .retryable_status_codes
                .unwrap_or_else(|| vec![408, 429, 500, 502, 503, 504]),
        };
        if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
            p.push("retry.backoff_multiplier: must be at least 1.0".into());
        }
        if !(0.0..=1.0).contains(&retry.jitter) {
            p.push("retry.jitter_factor: must be between 0 and 1".into());
        }
        for code in &retry.retryable_status {
            if !(100..=599).contains(code) {
                p.push(format!(
                    "retry.retryable_status_codes: {code} is not an HTTP status"
                ));
            }
        }
        let to = f.timeouts.unwrap_or_default();
        let connect_ms = to.connect_ms.unwrap_or(3000);
        if connect_ms == 0 {
            p.push("timeouts.connect_ms: must be positive".into());
        }
        let timeouts = TimeoutConfig {
            connect: Duration::from_millis(connect_ms.max(1)),
            first_byte: seconds(
                "timeouts.first_byte_seconds",
                to.first_byte_seconds,
                600.0,
                p,
            ),
            idle: seconds("timeouts.idle_seconds", to.idle_seconds, 600.0, p),
            pool_idle: seconds("timeouts.pool_idle_seconds", to.pool_idle_seconds, 4.0, p),
        };
        let lim = f.limits.unwrap_or_default();
        let defaults = crate::http::Limits::default();
        let limits = ServerLimits {
            http: crate::http::Limits {
                max_body_bytes: lim.max_body_bytes.unwrap_or(defaults.max_body_bytes),
                max_header_bytes: lim.max_header_bytes.unwrap_or(defaults.max_header_bytes),
                header_timeout: seconds(
                    "limits.header_timeout_seconds",
                    lim.header_timeout_seconds,
                    30.0,
                    p,
                ),
                keepalive_timeout: seconds(
                    "limits.keepalive_timeout_seconds",
                    lim.keepalive_timeout_seconds,
                    75.0,
                    p,
                ),
            },
            max_connections: lim.max_connections.unwrap_or(10_000),
        };
        if limits.http.max_body_bytes == 0 {
            p.push("limits.max_body_bytes: must be positive".into());
        }
        if limits.http.max_header_bytes < 1024 {
            p.push("limits.max_header_bytes: must be at least 1024".into());
        }
        if limits.max_connections == 0 {
            p.push("limits.max_connections: must be positive".into());
        }
        let shutdown_grace = seconds("shutdown_grace_seconds", f.shutdown_grace_seconds, 30.0, p);
        let metrics_enabled = f.metrics.and_then(|m| m.enabled).unwrap_or(true);
        let log_format = match f.log_format.as_deref() {
            None => crate::log::Format::Text,
            Some(s) => s.parse().unwrap_or_else(|e: String| {
                p.push(format!("log_format: {e}"));
                crate::log::Format::Text
            }),
        };
        // The environment wins over the file, so secrets can stay out of it.
        let admin_api_key = std::env::var("ADMIN_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
            .or(f.admin_api_key)
            .filter(|k| !k.is_empty());
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let name = f.model.unwrap_or_else(|| "default".to_string());
        Ok(Config {
            host: f.host.unwrap_or_else(|| "0.0.0.0".to_string()),
            port: f.port.unwrap_or(8000),
            workers: f.workers,
            log_level,
            models: vec![ModelConfig {
                name,
                instances,
                scheduler,
                scheduling,
            }],
            health,
            startup,
            circuit,
            retry,
            timeouts,
            limits,
            admin_api_key,
            shutdown_grace,
            metrics_enabled,
            log_format,
            source: None,
        })
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
        assert!(e.problems[0].contains("line 2"), "{e}");
        assert!(e.problems[0].contains("prefil"), "{e}");
        let e = Config::from_yaml(
            "prefill: [\"nohost\"]\ndecode: [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        let e = Config::from_yaml("prefill: [\"127.0.0.1:5\"]\n").unwrap_err();
        assert!(e.problems[0].contains("decode"), "{e}");
    }
}
