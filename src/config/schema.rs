//! The keys a config file may contain, level by level: the one list that validation
//! ("unknown key", "did you mean") and `fix-config` both read.

pub const TOP: &[&str] = &[
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
    "prefill_scheduling",
    "decode_scheduling",
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
    "engine_metrics",
    "kv_events",
    "prefix_sync",
    "tokenizer",
    "admission",
    "shutdown_grace_seconds",
    "discovery",
    "tracing",
    "forward_headers",
    // Spellings of xpyd-proxy (Python) 1.2 and 1.8, read with their meaning (docs/migration.md).
    "wait_timeout_seconds",
    "probe_interval_seconds",
    "heartbeat_interval_seconds",
    "roundrobin",
    "first_token_source",
    "tokenizer_path",
    "zmq",
    "consistent_hash",
    "power_of_two",
    "cache_aware",
    "loadbalanced",
    "load_balanced",
    "round_robin",
];
pub const MODEL_KEYS: &[&str] = &[
    "name",
    "prefill",
    "decode",
    "dual",
    "scheduler",
    "prefill_scheduler",
    "decode_scheduler",
    "disaggregated_mode",
    "admission",
    // 1.8's name for `dual`.
    "aggregated",
];
pub const INSTANCE_KEYS: &[&str] = &["address", "role", "model"];
pub const TOPOLOGY_KEYS: &[&str] = &["nodes", "tp_size", "dp_size", "world_size_per_node"];

pub const STARTUP: &[&str] = &[
    "probe_interval_seconds",
    "wait_timeout_seconds",
    "exit_on_timeout",
    "heartbeat_interval_seconds",
];
pub const HEALTH_CHECK: &[&str] = &["enabled", "interval_seconds", "timeout_seconds"];
pub const CIRCUIT_BREAKER: &[&str] = &[
    "enabled",
    "failure_threshold",
    "success_threshold",
    "timeout_duration_seconds",
    "window_duration_seconds",
];
pub const RETRY: &[&str] = &[
    "enabled",
    "max_retries",
    "initial_backoff_ms",
    "max_backoff_ms",
    "backoff_multiplier",
    "jitter_factor",
    "retryable_status_codes",
];
pub const TIMEOUTS: &[&str] = &[
    "connect_ms",
    "first_byte_seconds",
    "idle_seconds",
    "pool_idle_seconds",
];
pub const LIMITS: &[&str] = &[
    "max_uri_bytes",
    "max_body_bytes",
    "max_header_bytes",
    "max_connections",
    "header_timeout_seconds",
    "keepalive_timeout_seconds",
];
pub const METRICS: &[&str] = &["enabled"];
pub const ADMISSION: &[&str] = &[
    "max_concurrent_requests",
    "queue_size",
    "queue_timeout_seconds",
    "tokens_per_second",
    "token_burst",
    "engine_waiting_threshold",
    "key_weights",
];
pub const ENGINE_METRICS: &[&str] = &["enabled", "interval_seconds", "timeout_seconds"];
pub const TOKENIZER: &[&str] = &["threads", "max_queued_kib"];
pub const DISCOVERY: &[&str] = &["interval_seconds", "timeout_seconds", "nameservers"];
pub const KV_EVENTS: &[&str] = &[
    "port",
    "replay_port",
    "endpoints",
    "replay_endpoints",
    "topic",
];
pub const PREFIX_SYNC: &[&str] = &["peers"];
pub const SCHEDULING_CONFIG: &[&str] = &[
    "cache_threshold",
    "balance_abs_threshold",
    "balance_rel_threshold",
    "max_tree_size",
    "virtual_nodes",
    "hash_load_factor",
    "prefix_length",
    // The per-policy form (1.2): `scheduling_config: {consistent_hash: {...}}`.
    "consistent_hash",
    "power_of_two",
    "cache_aware",
    "loadbalanced",
    "load_balanced",
    "roundrobin",
    "round_robin",
];

/// The options each policy reads, in its own section (`consistent_hash:` at the top level
/// or under `scheduling_config`, as 1.2 wrote them).
pub const POLICY_OPTIONS: &[(&str, &[&str])] = &[
    ("consistent_hash", &["virtual_nodes", "hash_load_factor"]),
    (
        "cache_aware",
        &[
            "prefix_length",
            "cache_threshold",
            "balance_abs_threshold",
            "balance_rel_threshold",
            "max_tree_size",
        ],
    ),
    ("power_of_two", &[]),
    ("loadbalanced", &[]),
    ("load_balanced", &[]),
    ("roundrobin", &[]),
    ("round_robin", &[]),
];

pub const TRACING: &[&str] = &["otlp_endpoint", "sample_ratio", "service_name"];
pub const FORWARD_HEADERS: &[&str] = &["deny"];

/// 1.2's `zmq:` section (LMCache notifications; refused with a reason, never "unknown").
pub const ZMQ: &[&str] = &["host", "port", "notification_timeout_seconds", "receivers"];

/// Every key list, for `all_keys`.
const LEVELS: &[&[&str]] = &[
    TOP,
    MODEL_KEYS,
    INSTANCE_KEYS,
    TOPOLOGY_KEYS,
    STARTUP,
    HEALTH_CHECK,
    CIRCUIT_BREAKER,
    RETRY,
    TIMEOUTS,
    LIMITS,
    METRICS,
    DISCOVERY,
    ENGINE_METRICS,
    KV_EVENTS,
    PREFIX_SYNC,
    ADMISSION,
    SCHEDULING_CONFIG,
    TRACING,
    FORWARD_HEADERS,
    ZMQ,
];

/// Every key the file may contain, at any level (for `fix-config`).
pub fn all_keys() -> Vec<&'static str> {
    let mut v: Vec<&str> = LEVELS.iter().flat_map(|l| l.iter().copied()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_shows_every_field() {
        let example = include_str!("../../examples/proxy.yaml");
        // Other formats' keys and the Python proxy's spellings (docs/migration.md).
        let elsewhere = [
            "instances",
            "models",
            "address",
            "role",
            "name",
            "scheduler",
            "aggregated",
            "roundrobin",
            "round_robin",
            "loadbalanced",
            "load_balanced",
            "consistent_hash",
            "power_of_two",
            "cache_aware",
            "prefix_length",
            "zmq",
            "receivers",
            "notification_timeout_seconds",
        ];
        let missing: Vec<_> = all_keys()
            .into_iter()
            .filter(|k| !elsewhere.contains(k) && !example.contains(&format!("{k}:")))
            .collect();
        assert!(missing.is_empty(), "examples/proxy.yaml lacks {missing:?}");
    }

    #[test]
    fn all_keys_is_sorted_unique_and_complete() {
        let k = all_keys();
        assert!(k.windows(2).all(|w| w[0] < w[1]));
        for key in [
            "prefill",
            "tp_size",
            "jitter_factor",
            "virtual_nodes",
            "exit_on_timeout",
        ] {
            assert!(k.contains(&key), "{key}");
        }
    }
}
