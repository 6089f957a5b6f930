//! Reading and validating a config document. A `Reader` walks the JSON view of the YAML,
//! takes every field with its type and default, and collects *every* problem — unknown keys
//! with a "did you mean", wrong types, bad values, topology arithmetic, format mixing — each
//! with its field path and line:column, instead of stopping at the first.

use super::yaml::{self, Locator};
use super::*;
use serde_json::{Map, Value};
use std::collections::HashSet;

const TOP: &[&str] = &[
    "model",
    "prefill",
    "decode",
    "dual",
    "instances",
    "models",
    "host",
    "port",
    "workers",
    "log_level",
    "log_format",
    "scheduling",
    "scheduling_config",
    "generator_on_p_node",
    "disaggregated_mode",
    "admin_api_key",
    "openai_api_key",
    "api_keys",
    "protect_status",
    "startup",
    "health_check",
    "circuit_breaker",
    "retry",
    "timeouts",
    "limits",
    "metrics",
    "shutdown_grace_seconds",
];
const MODEL_KEYS: &[&str] = &[
    "name",
    "prefill",
    "decode",
    "dual",
    "scheduler",
    "disaggregated_mode",
];
const INSTANCE_KEYS: &[&str] = &["address", "role", "model"];
const TOPOLOGY_KEYS: &[&str] = &["nodes", "tp_size", "dp_size", "world_size_per_node"];

/// Every key the file may contain, at any level (for `fix-config`).
pub fn all_keys() -> Vec<&'static str> {
    let mut v: Vec<&str> = TOP.to_vec();
    v.extend_from_slice(MODEL_KEYS);
    v.extend_from_slice(INSTANCE_KEYS);
    v.extend_from_slice(TOPOLOGY_KEYS);
    for (_, keys) in SECTIONS {
        v.extend_from_slice(keys);
    }
    v.sort_unstable();
    v.dedup();
    v
}

const SECTIONS: &[(&str, &[&str])] = &[
    (
        "startup",
        &[
            "probe_interval_seconds",
            "wait_timeout_seconds",
            "exit_on_timeout",
        ],
    ),
    (
        "health_check",
        &["enabled", "interval_seconds", "timeout_seconds"],
    ),
    (
        "circuit_breaker",
        &[
            "enabled",
            "failure_threshold",
            "success_threshold",
            "timeout_duration_seconds",
            "window_duration_seconds",
        ],
    ),
    (
        "retry",
        &[
            "enabled",
            "max_retries",
            "initial_backoff_ms",
            "max_backoff_ms",
            "backoff_multiplier",
            "jitter_factor",
            "retryable_status_codes",
        ],
    ),
    (
        "timeouts",
        &[
            "connect_ms",
            "first_byte_seconds",
            "idle_seconds",
            "pool_idle_seconds",
        ],
    ),
    (
        "limits",
        &[
            "max_body_bytes",
            "max_header_bytes",
            "max_connections",
            "header_timeout_seconds",
            "keepalive_timeout_seconds",
        ],
    ),
    ("metrics", &["enabled"]),
    (
        "scheduling_config",
        &[
            "cache_threshold",
            "balance_abs_threshold",
            "balance_rel_threshold",
            "max_tree_size",
            "virtual_nodes",
            "hash_load_factor",
        ],
    ),
];

fn section_keys(name: &str) -> &'static [&'static str] {
    SECTIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
        .unwrap_or(&[])
}

/// Edit distance, for "did you mean".
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a third of the word's length (at least 2 edits allowed).
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.len() / 3).max(2);
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
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
        .map_err(|_| format!("address `{s}`: host `{host}` does not resolve"))?
        .next()
        .ok_or_else(|| format!("address `{s}` does not resolve"))
}

struct Reader<'a> {
    loc: &'a Locator,
    problems: Vec<String>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

impl<'a> Reader<'a> {
    fn problem(&mut self, path: &str, msg: impl std::fmt::Display) {
        let at = match self.loc.get(path) {
            Some((l, c)) => format!(" (line {l}, column {c})"),
            None => String::new(),
        };
        let p = if path.is_empty() { "<document>" } else { path };
        self.problems.push(format!("{p}{at}: {msg}"));
    }

    /// A mapping whose keys must be among `known`.
    fn mapping<'v>(
        &mut self,
        v: &'v Value,
        path: &str,
        known: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let Value::Object(m) = v else {
            self.problem(path, format!("expected a mapping, found {}", type_name(v)));
            return None;
        };
        for k in m.keys() {
            if !known.contains(&k.as_str()) {
                let hint = did_you_mean(k, known)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                self.problem(&join(path, k), format!("unknown key `{k}`{hint}"));
            }
        }
        Some(m)
    }

    fn section<'v>(
        &mut self,
        top: &'v Map<String, Value>,
        name: &str,
    ) -> Option<&'v Map<String, Value>> {
        let v = top.get(name)?;
        if v.is_null() {
            return None;
        }
        self.mapping(v, name, section_keys(name))
    }

    /// The value at `key`: None when absent or null; `convert` decides the type, and a
    /// value it rejects is reported as "expected {expected}" (and also gives None).
    fn field<T>(
        &mut self,
        m: Option<&Map<String, Value>>,
        path: &str,
        key: &str,
        expected: &str,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Option<T> {
        let v = m.and_then(|m| m.get(key)).filter(|v| !v.is_null())?;
        let out = convert(v);
        if out.is_none() {
            self.problem(
                &join(path, key),
                format!("expected {expected}, found {}", type_name(v)),
            );
        }
        out
    }

    fn f64(&mut self, m: Option<&Map<String, Value>>, path: &str, key: &str, default: f64) -> f64 {
        self.field(m, path, key, "a number", Value::as_f64)
            .unwrap_or(default)
    }

    fn seconds(
        &mut self,
        m: Option<&Map<String, Value>>,
        path: &str,
        key: &str,
        default: f64,
    ) -> Duration {
        let v = self.f64(m, path, key, default);
        if !(v.is_finite() && v > 0.0) {
            self.problem(
                &join(path, key),
                format!("must be a positive number of seconds, got {v}"),
            );
            return Duration::from_secs_f64(default);
        }
        Duration::from_secs_f64(v)
    }

    fn uint(
        &mut self,
        m: Option<&Map<String, Value>>,
        path: &str,
        key: &str,
        default: u64,
        min: u64,
    ) -> u64 {
        match self.field(m, path, key, "an integer", Value::as_i64) {
            None => default,
            Some(x) if x >= min as i64 => x as u64,
            Some(x) => {
                self.problem(&join(path, key), format!("must be at least {min}, got {x}"));
                default
            }
        }
    }

    fn boolean(
        &mut self,
        m: Option<&Map<String, Value>>,
        path: &str,
        key: &str,
        default: bool,
    ) -> bool {
        self.field(m, path, key, "true or false", Value::as_bool)
            .unwrap_or(default)
    }

    /// A string (numbers are taken as their text, e.g. a model named 7).
    fn string(&mut self, m: Option<&Map<String, Value>>, path: &str, key: &str) -> Option<String> {
        self.field(m, path, key, "a string", |v| match v {
            Value::String(s) => Some(s.trim().to_string()),
            Value::Number(_) => Some(v.to_string()),
            _ => None,
        })
    }

    fn scheduler(&mut self, name: Option<String>, path: &str) -> SchedulerKind {
        match name {
            None => SchedulerKind::LoadBalanced,
            Some(s) => SchedulerKind::parse(&s).unwrap_or_else(|_| {
                let hint = did_you_mean(&s, SCHEDULER_NAMES)
                    .map(|h| format!("; did you mean `{h}`?"))
                    .unwrap_or_default();
                self.problem(
                    path,
                    format!(
                        "unknown scheduler `{s}` (expected one of: {}){hint}",
                        SCHEDULER_NAMES.join(", ")
                    ),
                );
                SchedulerKind::LoadBalanced
            }),
        }
    }

    fn mode(&mut self, name: Option<String>, path: &str, default: DisaggMode) -> DisaggMode {
        match name.as_deref() {
            None => default,
            Some("direct") => DisaggMode::Direct,
            Some("nixl") => DisaggMode::Nixl,
            Some(other) => {
                self.problem(
                    path,
                    format!("unknown disaggregated_mode `{other}` (expected direct or nixl)"),
                );
                default
            }
        }
    }

    /// A role list: addresses, or the topology form.
    fn role_list(&mut self, v: &Value, path: &str, role: Role, out: &mut Vec<InstanceConfig>) {
        match v {
            Value::Null => {}
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    match item {
                        Value::String(s) => self.address(s, &p, role, out),
                        other => self.problem(
                            &p,
                            format!(
                                "expected an address string host:port, found {}",
                                type_name(other)
                            ),
                        ),
                    }
                }
            }
            Value::Object(_) => self.topology(v, path, role, out),
            Value::String(s) => self.problem(
                path,
                format!("expected a list of addresses; write [\"{s}\"]"),
            ),
            other => self.problem(
                path,
                format!(
                    "expected a list of addresses or a topology mapping, found {}",
                    type_name(other)
                ),
            ),
        }
    }

    fn address(&mut self, s: &str, path: &str, role: Role, out: &mut Vec<InstanceConfig>) {
        match parse_address(s) {
            Ok(sa) => out.push(InstanceConfig {
                address: s.trim().to_string(),
                socket_addr: sa,
                role,
            }),
            Err(e) => self.problem(path, e),
        }
    }

    /// Topology form: one instance per TP group, `dp_size` in total (SPEC 3).
    fn topology(&mut self, v: &Value, path: &str, role: Role, out: &mut Vec<InstanceConfig>) {
        let Some(m) = self.mapping(v, path, TOPOLOGY_KEYS) else {
            return;
        };
        let nodes: Vec<String> = match m.get("nodes") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .filter_map(|(i, n)| match n {
                    Value::String(s) => Some(s.trim().to_string()),
                    other => {
                        self.problem(
                            &format!("{path}.nodes[{i}]"),
                            format!("expected an address string, found {}", type_name(other)),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.problem(
                    &join(path, "nodes"),
                    format!(
                        "expected a list of host:base_port, found {}",
                        type_name(other)
                    ),
                );
                return;
            }
            None => {
                self.problem(
                    path,
                    "topology form needs `nodes` (a list of host:base_port)",
                );
                return;
            }
        };
        let size = |key: &str, r: &mut Self| -> Option<u64> {
            match m.get(key) {
                None => {
                    r.problem(path, format!("topology form needs `{key}`"));
                    None
                }
                Some(v) => match v.as_i64() {
                    Some(x) if x > 0 => Some(x as u64),
                    Some(x) => {
                        r.problem(
                            &join(path, key),
                            format!("must be a positive integer, got {x}"),
                        );
                        None
                    }
                    None => {
                        r.problem(
                            &join(path, key),
                            format!("expected a positive integer, found {}", type_name(v)),
                        );
                        None
                    }
                },
            }
        };
        let (tp, dp, wspn) = (
            size("tp_size", self),
            size("dp_size", self),
            size("world_size_per_node", self),
        );
        let (Some(tp), Some(dp), Some(wspn)) = (tp, dp, wspn) else {
            return;
        };
        if nodes.is_empty() {
            self.problem(&join(path, "nodes"), "no nodes listed");
            return;
        }
        let gpus = tp * dp;
        if gpus % wspn != 0 {
            self.problem(path, format!("tp_size × dp_size = {gpus} GPUs is not a whole number of nodes of world_size_per_node = {wspn}"));
            return;
        }
        let used = (gpus / wspn) as usize;
        if used > nodes.len() {
            self.problem(path, format!("tp_size × dp_size = {gpus} GPUs needs {used} nodes of {wspn} GPUs, but only {} are listed", nodes.len()));
            return;
        }
        let mut bases = Vec::new();
        for (i, n) in nodes.iter().enumerate().take(used) {
            match parse_address(n) {
                Ok(sa) => bases.push((
                    n.rsplit_once(':')
                        .map(|x| x.0.to_string())
                        .unwrap_or_default(),
                    sa,
                )),
                Err(e) => self.problem(&format!("{path}.nodes[{i}]"), e),
            }
        }
        if bases.len() < used {
            return;
        }
        if tp <= wspn {
            if wspn % tp != 0 {
                self.problem(
                    path,
                    format!("world_size_per_node = {wspn} is not a multiple of tp_size = {tp}"),
                );
                return;
            }
            for (host, base) in &bases {
                for k in 0..(wspn / tp) as u16 {
                    let port = base.port().checked_add(k);
                    let Some(port) = port else {
                        self.problem(path, format!("port range from {} overflows", base.port()));
                        return;
                    };
                    let mut sa = *base;
                    sa.set_port(port);
                    out.push(InstanceConfig {
                        address: format!("{host}:{port}"),
                        socket_addr: sa,
                        role,
                    });
                }
            }
        } else {
            if tp % wspn != 0 {
                self.problem(
                    path,
                    format!("tp_size = {tp} is not a multiple of world_size_per_node = {wspn}"),
                );
                return;
            }
            let span = (tp / wspn) as usize;
            for i in 0..dp as usize {
                let (host, sa) = &bases[i * span];
                out.push(InstanceConfig {
                    address: format!("{host}:{}", sa.port()),
                    socket_addr: *sa,
                    role,
                });
            }
        }
    }

    fn model_roles(&mut self, m: &Map<String, Value>, path: &str) -> Vec<InstanceConfig> {
        let mut out = Vec::new();
        for (key, role) in [
            ("prefill", Role::Prefill),
            ("decode", Role::Decode),
            ("dual", Role::Dual),
        ] {
            if let Some(v) = m.get(key) {
                self.role_list(v, &join(path, key), role, &mut out);
            }
        }
        out
    }

    /// A model needs prefill + decode, or dual; judged by what was written so that a bad
    /// address is not also reported as a missing role.
    fn check_roles(&mut self, m: &Map<String, Value>, path: &str, name: &str) {
        // Anything written counts (a wrong type is reported on its own).
        let listed = |k: &str| match m.get(k) {
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Null) | None => false,
            Some(_) => true,
        };
        let (p, d, du) = (listed("prefill"), listed("decode"), listed("dual"));
        let at = if path.is_empty() {
            String::new()
        } else {
            path.to_string()
        };
        if !p && !d && !du {
            self.problem(
                &at,
                format!("model `{name}` has no instances: list `prefill` and `decode`, or `dual`"),
            );
        } else if p && !d {
            self.problem(
                &join(path, "prefill"),
                format!("model `{name}` has prefill instances but no decode instances"),
            );
        } else if d && !p && !du {
            self.problem(&join(path, "decode"), format!("model `{name}` has decode instances but no prefill instances (list `dual` instances for single-pass serving)"));
        }
    }
}

/// What `fix-config` needs to move legacy lists into a newer format: the top-level `model`
/// and the instances of the top-level `prefill`/`decode`/`dual` lists (topology forms
/// expanded), plus the names under `models:`. None when the text does not parse or a list
/// does not load.
pub(super) struct LegacyPart {
    pub model: Option<String>,
    pub instances: Vec<InstanceConfig>,
    pub listed_models: Vec<String>,
}

pub(super) fn legacy_part(text: &str) -> Option<LegacyPart> {
    let (doc, loc) = yaml::parse(text).ok()?;
    let Value::Object(top) = &doc else {
        return None;
    };
    let mut r = Reader {
        loc: &loc,
        problems: Vec::new(),
    };
    let instances = r.model_roles(top, "");
    let listed_models = match top.get("models") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|m| m.get("name")?.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let model = match top.get("model") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    r.problems.is_empty().then_some(LegacyPart {
        model,
        instances,
        listed_models,
    })
}

pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
    let (doc, loc) = if text.trim().is_empty() {
        (Value::Object(Map::new()), Locator::default())
    } else {
        yaml::parse(text).map_err(|e| ConfigError {
            problems: vec![match e.location {
                Some((l, c)) => format!(
                    "<document> (line {l}, column {c}): invalid YAML: {}",
                    e.message
                ),
                None => format!("<document>: invalid YAML: {}", e.message),
            }],
        })?
    };
    let mut r = Reader {
        loc: &loc,
        problems: Vec::new(),
    };
    let empty = Map::new();
    let top = match &doc {
        Value::Null => &empty,
        v => match r.mapping(v, "", TOP) {
            Some(m) => m,
            None => {
                return Err(ConfigError {
                    problems: r.problems,
                })
            }
        },
    };

    let scheduler_name = r.string(Some(top), "", "scheduling");
    let mode_name = r.string(Some(top), "", "disaggregated_mode");
    let defaults = ModelDefaults {
        scheduler: r.scheduler(scheduler_name, "scheduling"),
        scheduling: scheduling_options(&mut r, top),
        mode: r.mode(mode_name, "disaggregated_mode", DisaggMode::Direct),
    };

    // The three shapes are mutually exclusive.
    let has = |k: &str| top.get(k).is_some_and(|v| !v.is_null());
    let legacy: Vec<&str> = ["model", "prefill", "decode", "dual"]
        .into_iter()
        .filter(|k| has(k))
        .collect();
    let mut models: Vec<ModelConfig> = Vec::new();
    if has("instances") && has("models") {
        r.problem(
            "models",
            "`instances` and `models` cannot be combined: use one format",
        );
    } else if !legacy.is_empty() && (has("instances") || has("models")) {
        let other = if has("instances") {
            "instances"
        } else {
            "models"
        };
        r.problem(
            legacy[0],
            format!(
                "the legacy `{}` keys cannot be combined with `{other}`: use one format (`xpyd fix-config` moves them)",
                legacy.join("`/`")
            ),
        );
    } else if has("models") {
        models = format3(&mut r, &top["models"], &defaults);
    } else if has("instances") {
        models = format2(&mut r, &top["instances"], &defaults);
    } else {
        let name = r
            .string(Some(top), "", "model")
            .unwrap_or_else(|| "default".to_string());
        r.check_roles(top, "", &name);
        let instances = r.model_roles(top, "");
        models.push(defaults.model(name, instances));
    }
    // Addresses are unique across models and roles.
    let mut seen = HashSet::new();
    let dups: Vec<String> = models
        .iter()
        .flat_map(|m| m.instances.iter())
        .filter(|i| !seen.insert(i.socket_addr))
        .map(|i| i.address.clone())
        .collect();
    for d in dups {
        let path = find_path(&doc, &d).unwrap_or_default();
        r.problem(
            &path,
            format!("duplicate address `{d}` (an instance can serve one role of one model)"),
        );
    }

    let log_level = match r.string(Some(top), "", "log_level") {
        None => Level::Warning,
        Some(s) => s.parse().unwrap_or_else(|e: String| {
            r.problem("log_level", e);
            Level::Warning
        }),
    };
    let log_format = match r.string(Some(top), "", "log_format") {
        None => crate::log::Format::Text,
        Some(s) => s.parse().unwrap_or_else(|e: String| {
            r.problem("log_format", e);
            crate::log::Format::Text
        }),
    };
    let port = r.uint(Some(top), "", "port", 8000, 0);
    if port > 65535 {
        r.problem("port", format!("{port} is not a TCP port"));
    }
    let workers = top
        .get("workers")
        .filter(|v| !v.is_null())
        .map(|_| r.uint(Some(top), "", "workers", 1, 1) as usize);

    let st = r.section(top, "startup");
    let hc = r.section(top, "health_check");
    if !r.boolean(hc, "health_check", "enabled", true) {
        r.problem(
            "health_check.enabled",
            "health checks gate startup and cannot be disabled",
        );
    }
    let health = HealthConfig {
        interval: r.seconds(hc, "health_check", "interval_seconds", 10.0),
        timeout: r.seconds(hc, "health_check", "timeout_seconds", 3.0),
        startup_probe_interval: r.seconds(st, "startup", "probe_interval_seconds", 10.0),
    };
    let startup = StartupConfig {
        wait_timeout: r.seconds(st, "startup", "wait_timeout_seconds", 600.0),
        exit_on_timeout: r.boolean(st, "startup", "exit_on_timeout", false),
    };
    let cb = r.section(top, "circuit_breaker");
    let circuit = CircuitConfig {
        enabled: r.boolean(cb, "circuit_breaker", "enabled", true),
        failure_threshold: r.uint(cb, "circuit_breaker", "failure_threshold", 5, 1) as u32,
        success_threshold: r.uint(cb, "circuit_breaker", "success_threshold", 2, 1) as u32,
        timeout: r.seconds(cb, "circuit_breaker", "timeout_duration_seconds", 30.0),
        window: r.seconds(cb, "circuit_breaker", "window_duration_seconds", 60.0),
    };
    let rt = r.section(top, "retry");
    let mut retry = RetryConfig {
        enabled: r.boolean(rt, "retry", "enabled", true),
        max_retries: r.uint(rt, "retry", "max_retries", 2, 0) as u32,
        initial_backoff: Duration::from_millis(r.uint(rt, "retry", "initial_backoff_ms", 100, 0)),
        max_backoff: Duration::from_millis(r.uint(rt, "retry", "max_backoff_ms", 10_000, 0)),
        multiplier: r.f64(rt, "retry", "backoff_multiplier", 2.0),
        jitter: r.f64(rt, "retry", "jitter_factor", 0.1),
        retryable_status: vec![408, 429, 500, 502, 503, 504],
    };
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        r.problem("retry.backoff_multiplier", "must be at least 1.0");
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        r.problem("retry.jitter_factor", "must be between 0 and 1");
    }
    if let Some(v) = rt.and_then(|m| m.get("retryable_status_codes")) {
        match v {
            Value::Array(a) => {
                retry.retryable_status = Vec::new();
                for (i, c) in a.iter().enumerate() {
                    match c.as_u64() {
                        Some(c) if (100..=599).contains(&c) => {
                            retry.retryable_status.push(c as u16)
                        }
                        _ => r.problem(
                            &format!("retry.retryable_status_codes[{i}]"),
                            format!("{c} is not an HTTP status"),
                        ),
                    }
                }
            }
            other => r.problem(
                "retry.retryable_status_codes",
                format!(
                    "expected a list of status codes, found {}",
                    type_name(other)
                ),
            ),
        }
    }
    let to = r.section(top, "timeouts");
    let timeouts = TimeoutConfig {
        connect: Duration::from_millis(r.uint(to, "timeouts", "connect_ms", 3000, 1)),
        first_byte: r.seconds(to, "timeouts", "first_byte_seconds", 600.0),
        idle: r.seconds(to, "timeouts", "idle_seconds", 600.0),
        pool_idle: r.seconds(to, "timeouts", "pool_idle_seconds", 4.0),
    };
    let lim = r.section(top, "limits");
    let d = crate::http::Limits::default();
    let limits = ServerLimits {
        http: crate::http::Limits {
            max_body_bytes: r.uint(lim, "limits", "max_body_bytes", d.max_body_bytes as u64, 1)
                as usize,
            max_header_bytes: r.uint(
                lim,
                "limits",
                "max_header_bytes",
                d.max_header_bytes as u64,
                1024,
            ) as usize,
            header_timeout: r.seconds(lim, "limits", "header_timeout_seconds", 30.0),
            keepalive_timeout: r.seconds(lim, "limits", "keepalive_timeout_seconds", 75.0),
        },
        max_connections: r.uint(lim, "limits", "max_connections", 10_000, 1) as usize,
    };
    let mt = r.section(top, "metrics");
    let metrics_enabled = r.boolean(mt, "metrics", "enabled", true);
    let shutdown_grace = r.seconds(Some(top), "", "shutdown_grace_seconds", 30.0);
    let generator_on_p_node = r.boolean(Some(top), "", "generator_on_p_node", false);
    let protect_status = r.boolean(Some(top), "", "protect_status", false);
    let api_keys: Vec<String> = match top.get("api_keys") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .filter_map(|(i, k)| match k {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                _ => {
                    r.problem(&format!("api_keys[{i}]"), "expected a non-empty string");
                    None
                }
            })
            .collect(),
        Some(other) => {
            r.problem(
                "api_keys",
                format!("expected a list of keys, found {}", type_name(other)),
            );
            Vec::new()
        }
    };
    // The environment wins over the file, so secrets can stay out of it.
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let admin_api_key = env("ADMIN_API_KEY")
        .or(r.string(Some(top), "", "admin_api_key"))
        .filter(|k| !k.is_empty());
    let openai_api_key = env("OPENAI_API_KEY")
        .or(r.string(Some(top), "", "openai_api_key"))
        .filter(|k| !k.is_empty());
    let host = r
        .string(Some(top), "", "host")
        .unwrap_or_else(|| "0.0.0.0".to_string());

    if !r.problems.is_empty() {
        return Err(ConfigError {
            problems: r.problems,
        });
    }
    Ok(Config {
        host,
        port: port as u16,
        workers,
        log_level,
        models,
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
        generator_on_p_node,
        openai_api_key,
        api_keys,
        protect_status,
        source: None,
        overrides: Overrides::default(),
    })
}

fn scheduling_options(r: &mut Reader<'_>, top: &Map<String, Value>) -> SchedulingOptions {
    let c = r.section(top, "scheduling_config");
    let d = SchedulingOptions::default();
    let p = "scheduling_config";
    let o = SchedulingOptions {
        cache_threshold: r.f64(c, p, "cache_threshold", d.cache_threshold),
        balance_abs_threshold: r.uint(c, p, "balance_abs_threshold", d.balance_abs_threshold, 0),
        balance_rel_threshold: r.f64(c, p, "balance_rel_threshold", d.balance_rel_threshold),
        max_tree_size: r.uint(c, p, "max_tree_size", d.max_tree_size as u64, 1) as usize,
        virtual_nodes: r.uint(c, p, "virtual_nodes", d.virtual_nodes as u64, 1) as usize,
        hash_load_factor: r.f64(c, p, "hash_load_factor", d.hash_load_factor),
    };
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

/// What a model takes from the top level unless it says otherwise.
struct ModelDefaults {
    scheduler: SchedulerKind,
    scheduling: SchedulingOptions,
    mode: DisaggMode,
}

impl ModelDefaults {
    fn model(&self, name: String, instances: Vec<InstanceConfig>) -> ModelConfig {
        ModelConfig {
            name,
            instances,
            scheduler: self.scheduler,
            scheduling: self.scheduling.clone(),
            mode: self.mode,
        }
    }
}

/// Format 2: `instances: [{address, role, model}]`, grouped into models in order of first
/// appearance.
fn format2(r: &mut Reader<'_>, v: &Value, defaults: &ModelDefaults) -> Vec<ModelConfig> {
    let Value::Array(items) = v else {
        r.problem(
            "instances",
            format!(
                "expected a list of {{address, role, model}}, found {}",
                type_name(v)
            ),
        );
        return Vec::new();
    };
    let mut models: Vec<ModelConfig> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("instances[{i}]");
        let Some(m) = r.mapping(item, &path, INSTANCE_KEYS) else {
            continue;
        };
        let role = match r.string(Some(m), &path, "role").as_deref() {
            Some("prefill") => Role::Prefill,
            Some("decode") => Role::Decode,
            Some("dual") => Role::Dual,
            Some(other) => {
                let hint = did_you_mean(other, &["prefill", "decode", "dual"])
                    .map(|h| format!("; did you mean `{h}`?"))
                    .unwrap_or_default();
                r.problem(
                    &join(&path, "role"),
                    format!("unknown role `{other}` (expected prefill, decode or dual){hint}"),
                );
                continue;
            }
            None => {
                r.problem(&path, "missing `role` (prefill, decode or dual)");
                continue;
            }
        };
        let Some(model) = r.string(Some(m), &path, "model") else {
            r.problem(&path, "missing `model`");
            continue;
        };
        let Some(addr) = r.string(Some(m), &path, "address") else {
            r.problem(&path, "missing `address` (host:port)");
            continue;
        };
        let idx = match models.iter().position(|x| x.name == model) {
            Some(k) => k,
            None => {
                models.push(defaults.model(model.clone(), Vec::new()));
                models.len() - 1
            }
        };
        let mut out = Vec::new();
        r.address(&addr, &join(&path, "address"), role, &mut out);
        models[idx].instances.extend(out);
    }
    for m in &models {
        let has = |role: Role| {
            items
                .iter()
                .any(|it| it["model"] == m.name.as_str() && it["role"] == role.as_str())
        };
        let (p, d, du) = (has(Role::Prefill), has(Role::Decode), has(Role::Dual));
        if p && !d {
            r.problem(
                "instances",
                format!(
                    "model `{}` has prefill instances but no decode instances",
                    m.name
                ),
            );
        } else if d && !p && !du {
            r.problem("instances", format!("model `{}` has decode instances but no prefill instances (add `dual` instances for single-pass serving)", m.name));
        }
    }
    if items.is_empty() {
        r.problem("instances", "no instances listed");
    }
    models
}

/// Format 3: `models: [{name, prefill, decode, dual, scheduler, disaggregated_mode}]`.
fn format3(r: &mut Reader<'_>, v: &Value, defaults: &ModelDefaults) -> Vec<ModelConfig> {
    let Value::Array(items) = v else {
        r.problem(
            "models",
            format!("expected a list of models, found {}", type_name(v)),
        );
        return Vec::new();
    };
    let mut models = Vec::new();
    let mut names = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("models[{i}]");
        let Some(m) = r.mapping(item, &path, MODEL_KEYS) else {
            continue;
        };
        let Some(name) = r.string(Some(m), &path, "name") else {
            r.problem(&path, "missing `name`");
            continue;
        };
        if !names.insert(name.clone()) {
            r.problem(
                &join(&path, "name"),
                format!("model `{name}` is listed twice"),
            );
        }
        let mut model = defaults.model(name, Vec::new());
        if let Some(s) = r.string(Some(m), &path, "scheduler") {
            model.scheduler = r.scheduler(Some(s), &join(&path, "scheduler"));
        }
        let mode_name = r.string(Some(m), &path, "disaggregated_mode");
        model.mode = r.mode(mode_name, &join(&path, "disaggregated_mode"), model.mode);
        r.check_roles(m, &path, &model.name);
        model.instances = r.model_roles(m, &path);
        models.push(model);
    }
    if items.is_empty() {
        r.problem("models", "no models listed");
    }
    models
}

/// The path of the last string equal to `needle` in the document (to locate duplicates).
fn find_path(v: &Value, needle: &str) -> Option<String> {
    fn walk(v: &Value, path: &str, needle: &str, found: &mut Option<String>) {
        match v {
            Value::String(s) if s.trim() == needle => *found = Some(path.to_string()),
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), needle, found);
                }
            }
            Value::Object(m) => {
                for (k, x) in m {
                    walk(x, &join(path, k), needle, found);
                }
            }
            _ => {}
        }
    }
    let mut found = None;
    walk(v, "", needle, &mut found);
    found
}
