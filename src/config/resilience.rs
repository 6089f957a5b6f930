//! The resilience settings (docs/resilience.md): `health_check` and `startup` (startup
//! gating), `circuit_breaker`, `retry`, `timeouts` and `limits` (hostile input), each type
//! beside the function reading it.

use super::problem::Kind;
use super::reader::{join, type_name, Reader, Section};
use super::schema;
use serde_json::{Map, Value};
use std::time::Duration;

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

pub fn health_and_startup(
    r: &mut Reader<'_>,
    top: &Map<String, Value>,
) -> (HealthConfig, StartupConfig) {
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
    top: &Map<String, Value>,
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

#[derive(Debug, Clone)]
pub struct CircuitConfig {
    pub enabled: bool,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub timeout: Duration,
    pub window: Duration,
}

pub fn circuit_breaker(r: &mut Reader<'_>, top: &Map<String, Value>) -> CircuitConfig {
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

pub fn retry(r: &mut Reader<'_>, top: &Map<String, Value>) -> RetryConfig {
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

pub fn timeouts(r: &mut Reader<'_>, top: &Map<String, Value>) -> TimeoutConfig {
    let p = "timeouts";
    let to = r.section(top, p, schema::TIMEOUTS);
    TimeoutConfig {
        connect: Duration::from_millis(r.uint(to, p, "connect_ms", 3000, 1)),
        first_byte: r.seconds(to, p, "first_byte_seconds", 600.0),
        idle: r.seconds(to, p, "idle_seconds", 600.0),
        pool_idle: r.seconds(to, p, "pool_idle_seconds", 4.0),
    }
}

/// Limits on what clients may send and how long they may take.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Sizes and timeouts of reading one request.
    pub http: crate::http::Limits,
    /// Per worker; connections beyond it are refused (closed at once).
    pub max_connections: usize,
}

pub fn limits(r: &mut Reader<'_>, top: &Map<String, Value>) -> ServerLimits {
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
