//! The settings sections (`startup`, `health_check`, `circuit_breaker`, `retry`,
//! `timeouts`, `limits`, `metrics`, `scheduling_config`): one function each, reading its
//! fields with their defaults and checking their ranges.

use super::problem::Kind;
use super::reader::{join, type_name, Reader, Section};
use super::schema;
use super::{
    CircuitConfig, EngineMetricsConfig, HealthConfig, KvEventsConfig, RetryConfig,
    SchedulingOptions, ServerLimits, StartupConfig, TimeoutConfig,
};
use serde_json::{Map, Value};
use std::time::Duration;

type Top = Map<String, Value>;

pub fn health_and_startup(r: &mut Reader<'_>, top: &Top) -> (HealthConfig, StartupConfig) {
    let st = r.section(top, "startup", schema::STARTUP);
    let hc = r.section(top, "health_check", schema::HEALTH_CHECK);
    if !r.boolean(hc, "health_check", "enabled", true) {
        r.warn(
            "health_check.enabled",
            Kind::Note(
                "health checks stay on in xpyd: they gate startup and take failing instances out of routing (docs/migration.md)".into(),
            ),
        );
    }
    let health = HealthConfig {
        interval: r.seconds(hc, "health_check", "interval_seconds", 10.0),
        timeout: r.seconds(hc, "health_check", "timeout_seconds", 3.0),
        startup_probe_interval: startup_seconds(r, st, top, "probe_interval_seconds", false)
            .unwrap_or(Duration::from_secs(10)),
    };
    let startup = StartupConfig {
        wait_timeout: startup_seconds(r, st, top, "wait_timeout_seconds", true)
            .unwrap_or(Duration::from_secs(600)),
        exit_on_timeout: r.boolean(st, "startup", "exit_on_timeout", false),
        heartbeat_interval: startup_seconds(r, st, top, "heartbeat_interval_seconds", false)
            .unwrap_or(Duration::from_secs(30)),
    };
    (health, startup)
}

/// A `startup` setting, also read at the top level where 1.2 and 1.8 wrote it (the
/// `startup` section wins, as in 1.2); zero allowed only where it means something.
fn startup_seconds(
    r: &mut Reader<'_>,
    st: Section<'_>,
    top: &Top,
    key: &str,
    zero_ok: bool,
) -> Option<Duration> {
    let written = |m: Section<'_>| m.and_then(|m| m.get(key)).is_some_and(|v| !v.is_null());
    let (m, path) = if written(st) {
        (st, "startup")
    } else if written(Some(top)) {
        r.warn(
            key,
            Kind::Renamed {
                old: key.to_string(),
                new: format!("startup.{key}"),
            },
        );
        (Some(top), "")
    } else {
        return None;
    };
    let d = r.seconds_or_zero(m, path, key)?;
    if d.is_zero() && !zero_ok {
        r.problem(
            &join(path, key),
            "must be a positive number of seconds, got 0",
        );
        return None;
    }
    Some(d)
}

pub fn circuit_breaker(r: &mut Reader<'_>, top: &Top) -> CircuitConfig {
    let p = "circuit_breaker";
    let cb = r.section(top, p, schema::CIRCUIT_BREAKER);
    CircuitConfig {
        enabled: r.boolean(cb, p, "enabled", true),
        failure_threshold: r.uint(cb, p, "failure_threshold", 5, 1) as u32,
        success_threshold: r.uint(cb, p, "success_threshold", 2, 1) as u32,
        timeout: r.seconds(cb, p, "timeout_duration_seconds", 30.0),
        window: r.seconds(cb, p, "window_duration_seconds", 60.0),
    }
}

pub fn retry(r: &mut Reader<'_>, top: &Top) -> RetryConfig {
    let p = "retry";
    let rt = r.section(top, p, schema::RETRY);
    let mut retry = RetryConfig {
        enabled: r.boolean(rt, p, "enabled", true),
        max_retries: r.uint(rt, p, "max_retries", 2, 0) as u32,
        initial_backoff: Duration::from_millis(r.uint(rt, p, "initial_backoff_ms", 100, 0)),
        max_backoff: Duration::from_millis(r.uint(rt, p, "max_backoff_ms", 10_000, 0)),
        multiplier: r.f64(rt, p, "backoff_multiplier", 2.0),
        jitter: r.f64(rt, p, "jitter_factor", 0.1),
        retryable_status: vec![408, 429, 500, 502, 503, 504],
    };
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        r.problem("retry.backoff_multiplier", "must be at least 1.0");
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        r.problem("retry.jitter_factor", "must be between 0 and 1");
    }
    match rt.and_then(|m| m.get("retryable_status_codes")) {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            retry.retryable_status = Vec::new();
            for (i, c) in a.iter().enumerate() {
                match c.as_u64() {
                    Some(c) if (100..=599).contains(&c) => retry.retryable_status.push(c as u16),
                    _ => r.problem(
                        &format!("retry.retryable_status_codes[{i}]"),
                        format!("{c} is not an HTTP status"),
                    ),
                }
            }
        }
        Some(other) => r.problem(
            "retry.retryable_status_codes",
            format!(
                "expected a list of status codes, found {}",
                type_name(other)
            ),
        ),
    }
    retry
}

pub fn timeouts(r: &mut Reader<'_>, top: &Top) -> TimeoutConfig {
    let p = "timeouts";
    let to = r.section(top, p, schema::TIMEOUTS);
    TimeoutConfig {
        connect: Duration::from_millis(r.uint(to, p, "connect_ms", 3000, 1)),
        first_byte: r.seconds(to, p, "first_byte_seconds", 600.0),
        idle: r.seconds(to, p, "idle_seconds", 600.0),
        pool_idle: r.seconds(to, p, "pool_idle_seconds", 4.0),
    }
}

pub fn limits(r: &mut Reader<'_>, top: &Top) -> ServerLimits {
    let p = "limits";
    let lim = r.section(top, p, schema::LIMITS);
    let d = crate::http::Limits::default();
    ServerLimits {
        http: crate::http::Limits {
            max_uri_bytes: r.uint(lim, p, "max_uri_bytes", d.max_uri_bytes as u64, 256) as usize,
            max_body_bytes: r.uint(lim, p, "max_body_bytes", d.max_body_bytes as u64, 1) as usize,
            max_header_bytes: r.uint(lim, p, "max_header_bytes", d.max_header_bytes as u64, 1024)
                as usize,
            header_timeout: r.seconds(lim, p, "header_timeout_seconds", 30.0),
            keepalive_timeout: r.seconds(lim, p, "keepalive_timeout_seconds", 75.0),
        },
        max_connections: r.uint(lim, p, "max_connections", 10_000, 1) as usize,
    }
}

/// `engine_metrics`: how often and how patiently the instances' `/metrics` are scraped.
pub fn engine_metrics(r: &mut Reader<'_>, top: &Top) -> EngineMetricsConfig {
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

/// `tokenizer`: the tokenizer threads and how far behind they may fall.
pub fn tokenizer(r: &mut Reader<'_>, top: &Top) -> super::TokenizerConfig {
    let p = "tokenizer";
    let t = r.section(top, p, schema::TOKENIZER);
    let d = super::TokenizerConfig::default();
    super::TokenizerConfig {
        threads: r.uint(t, p, "threads", d.threads as u64, 1) as usize,
        max_queued_kib: r.uint(t, p, "max_queued_kib", d.max_queued_kib, 0),
    }
}

/// `kv_events`: the instances' KV-event publishers.
pub fn kv_events(r: &mut Reader<'_>, top: &Top) -> KvEventsConfig {
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

/// `prefix_sync`: the peer replicas (`host:port`, an `http://` prefix allowed).
pub fn prefix_sync(r: &mut Reader<'_>, top: &Top) -> super::PrefixSyncConfig {
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
    super::PrefixSyncConfig { peers }
}

pub fn metrics_enabled(r: &mut Reader<'_>, top: &Top) -> bool {
    let mt = r.section(top, "metrics", schema::METRICS);
    r.boolean(mt, "metrics", "enabled", true)
}

/// `scheduling_config`, flat (xpyd) or per policy (1.2: `scheduling_config:
/// {consistent_hash: {virtual_nodes: 100}}`), and the per-policy sections at the top level
/// (1.2: `consistent_hash: {...}`). Each policy reads its own options.
pub fn scheduling_options(r: &mut Reader<'_>, top: &Top) -> SchedulingOptions {
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
