//! The scheduling settings (docs/scheduling.md): the policies and their spellings, the
//! per-role choice and `scheduling_config`, and what the policies read — `engine_metrics`,
//! `kv_events`, `prefix_sync` and `tokenizer` — each type beside the function reading it.

use super::problem::Kind;
use super::reader::{join, Reader, Section};
use super::role::Role;
use super::schema;
use super::suggest::hint;
use serde_json::{Map, Value};
use std::time::Duration;

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

impl Reader<'_> {
    /// A scheduler name (absent: the default policy).
    pub fn scheduler(&mut self, name: Option<String>, path: &str) -> SchedulerKind {
        let Some(s) = name else {
            return SchedulerKind::LoadBalanced;
        };
        s.parse().unwrap_or_else(|e| {
            let names = SchedulerKind::names();
            self.problem(path, format!("{e}{}", hint(&s, &names)));
            SchedulerKind::LoadBalanced
        })
    }
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

/// `scheduling_config`, flat (xpyd) or per policy (1.2: `scheduling_config:
/// {consistent_hash: {virtual_nodes: 100}}`), and the per-policy sections at the top level
/// (1.2: `consistent_hash: {...}`). Each policy reads its own options.
pub fn scheduling_options(r: &mut Reader<'_>, top: &Map<String, Value>) -> SchedulingOptions {
    let p = "scheduling_config";
    let c = r.section(top, p, schema::SCHEDULING_CONFIG);
    let mut o = SchedulingOptions::default();
    read_options(r, c, p, &mut o);
    for (policy, keys) in schema::POLICY_OPTIONS {
        if let Some(v) = c.and_then(|c| c.get(*policy)).filter(|v| !v.is_null()) {
            let path = join(p, policy);
            let m = r.mapping(v, &path, keys);
            read_options(r, m, &path, &mut o);
        }
        // At the top level `roundrobin` is 1.2's boolean switch, not a section.
        if *policy != "roundrobin" {
            let m = r.section(top, policy, keys);
            read_options(r, m, policy, &mut o);
        }
    }
    if !(0.0..=1.0).contains(&o.cache_threshold) {
        r.problem(
            "scheduling_config.cache_threshold",
            "must be between 0 and 1",
        );
    }
    if o.balance_rel_threshold < 1.0 {
        r.problem(
            "scheduling_config.balance_rel_threshold",
            "must be at least 1.0",
        );
    }
    if !(o.hash_load_factor > 0.0 && o.hash_load_factor.is_finite()) {
        r.problem("scheduling_config.hash_load_factor", "must be positive");
    }
    o
}

/// The options written in one mapping, over those read so far.
fn read_options(r: &mut Reader<'_>, c: Section<'_>, p: &str, o: &mut SchedulingOptions) {
    if c.is_none() {
        return;
    }
    o.cache_threshold = r.f64(c, p, "cache_threshold", o.cache_threshold);
    o.balance_abs_threshold = r.uint(c, p, "balance_abs_threshold", o.balance_abs_threshold, 0);
    o.balance_rel_threshold = r.f64(c, p, "balance_rel_threshold", o.balance_rel_threshold);
    o.max_tree_size = r.uint(c, p, "max_tree_size", o.max_tree_size as u64, 1) as usize;
    o.virtual_nodes = r.uint(c, p, "virtual_nodes", o.virtual_nodes as u64, 1) as usize;
    o.hash_load_factor = r.f64(c, p, "hash_load_factor", o.hash_load_factor);
    if c.is_some_and(|c| c.contains_key("prefix_length")) {
        r.uint(c, p, "prefix_length", 256, 1);
        r.warn(
            &join(p, "prefix_length"),
            Kind::Note(
                "has no effect in xpyd: cache_aware matches the longest prefix routed before, block by block; tune scheduling_config.cache_threshold instead".into(),
            ),
        );
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

/// `engine_metrics`: how often and how patiently the instances' `/metrics` are scraped.
pub fn engine_metrics(r: &mut Reader<'_>, top: &Map<String, Value>) -> EngineMetricsConfig {
    let p = "engine_metrics";
    let em = r.section(top, p, schema::ENGINE_METRICS);
    let d = EngineMetricsConfig::default();
    let cfg = EngineMetricsConfig {
        enabled: r.boolean(em, p, "enabled", d.enabled),
        interval: r.seconds(em, p, "interval_seconds", d.interval.as_secs_f64()),
        timeout: r.seconds(em, p, "timeout_seconds", d.timeout.as_secs_f64()),
    };
    if cfg.interval < Duration::from_millis(50) {
        r.problem(
            "engine_metrics.interval_seconds",
            "must be at least 0.05 (every instance is scraped each interval)",
        );
    }
    cfg
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

/// `kv_events`: the instances' KV-event publishers.
pub fn kv_events(r: &mut Reader<'_>, top: &Map<String, Value>) -> KvEventsConfig {
    let p = "kv_events";
    let kv = r.section(top, p, schema::KV_EVENTS);
    let port = |r: &mut Reader<'_>, key: &str| {
        kv.and_then(|m| m.get(key))
            .filter(|v| !v.is_null())
            .map(|_| r.uint(kv, p, key, 0, 1))
            .and_then(|v| match u16::try_from(v) {
                Ok(v) => Some(v),
                Err(_) => {
                    r.problem(&format!("{p}.{key}"), format!("{v} is not a TCP port"));
                    None
                }
            })
    };
    let (publ, replay) = (port(r, "port"), port(r, "replay_port"));
    let map = |r: &mut Reader<'_>, key: &str| -> Vec<(String, String)> {
        let Some(v) = kv.and_then(|m| m.get(key)).filter(|v| !v.is_null()) else {
            return Vec::new();
        };
        let path = format!("{p}.{key}");
        let Value::Object(m) = v else {
            r.wrong_type(&path, "a mapping of instance address to endpoint", v);
            return Vec::new();
        };
        let mut out = Vec::new();
        for (addr, e) in m {
            match e.as_str() {
                Some(e) if e.starts_with("tcp://") || e.starts_with("ipc://") => {
                    out.push((addr.clone(), e.to_string()))
                }
                _ => r.problem(
                    &format!("{path}.{addr}"),
                    format!("expected a ZeroMQ endpoint like \"tcp://host:5557\", got {e}"),
                ),
            }
        }
        out
    };
    KvEventsConfig {
        port: publ,
        replay_port: replay,
        endpoints: map(r, "endpoints"),
        replay_endpoints: map(r, "replay_endpoints"),
        topic: r.string(kv, p, "topic").unwrap_or_default(),
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

/// `prefix_sync`: the peer replicas (`host:port`, an `http://` prefix allowed).
pub fn prefix_sync(r: &mut Reader<'_>, top: &Map<String, Value>) -> PrefixSyncConfig {
    let p = "prefix_sync";
    let ps = r.section(top, p, schema::PREFIX_SYNC);
    let path = "prefix_sync.peers";
    let peers = match ps.and_then(|m| m.get("peers")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let s = v
                    .as_str()
                    .map(|s| s.trim().trim_start_matches("http://").trim_end_matches('/'));
                match s.map(|s| (s, s.rsplit_once(':'))) {
                    Some((s, Some((host, port))))
                        if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) =>
                    {
                        Some(s.to_string())
                    }
                    _ => {
                        r.problem(
                            &format!("{path}[{i}]"),
                            format!("expected \"host:port\" of a proxy replica, got {v}"),
                        );
                        None
                    }
                }
            })
            .collect(),
        Some(v) => {
            r.wrong_type(path, "a list of \"host:port\"", v);
            Vec::new()
        }
    };
    PrefixSyncConfig { peers }
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

/// `tokenizer`: the tokenizer threads and how far behind they may fall.
pub fn tokenizer(r: &mut Reader<'_>, top: &Map<String, Value>) -> TokenizerConfig {
    let p = "tokenizer";
    let t = r.section(top, p, schema::TOKENIZER);
    let d = TokenizerConfig::default();
    TokenizerConfig {
        threads: r.uint(t, p, "threads", d.threads as u64, 1) as usize,
        max_queued_kib: r.uint(t, p, "max_queued_kib", d.max_queued_kib, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ModelConfig};

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
}
