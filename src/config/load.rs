//! Reading a config document into a `Config`: the top-level keys here, the model list in
//! `formats.rs`, the settings sections in `resilience.rs` and `scheduling.rs` (with
//! `admission.rs`, `discovery.rs` and `tracing.rs`). Every problem is collected (see
//! `reader.rs`) and returned together.

use super::formats::{self, ModelDefaults};
use super::problem::{ConfigError, Kind};
use super::reader::{Reader, Section};
use super::schema::{self, TOP};
use super::yaml::{self, Locator};
use super::{resilience, scheduling};
use super::{Config, DisaggMode, Overrides, RoleSchedulers};
use crate::log::Level;
use serde_json::{Map, Value};
use std::path::PathBuf;

pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
    let (doc, loc) = if text.trim().is_empty() {
        (Value::Object(Map::new()), Locator::default())
    } else {
        yaml::parse(text).map_err(|e| ConfigError {
            problems: vec![super::Problem {
                path: String::new(),
                location: e.location,
                kind: Kind::InvalidYaml(e.message),
            }],
        })?
    };
    let mut r = Reader::new(&loc);
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
    let t = Some(top);

    let defaults = model_defaults(&mut r, top);
    let models = formats::models(&mut r, &doc, top, &defaults);
    let log_level = r.parsed(t, "", "log_level", Level::Warning);
    let log_format = r.parsed(t, "", "log_format", crate::log::Format::Text);
    let port = r.uint(t, "", "port", 8000, 0);
    if port > 65535 {
        r.problem("port", format!("{port} is not a TCP port"));
    }
    let workers = top
        .get("workers")
        .filter(|v| !v.is_null())
        .map(|_| r.uint(t, "", "workers", 1, 1) as usize);
    let (health, startup) = resilience::health_and_startup(&mut r, top);
    let engine_metrics = scheduling::engine_metrics(&mut r, top);
    let kv_events = scheduling::kv_events(&mut r, top);
    let prefix_sync = scheduling::prefix_sync(&mut r, top);
    let circuit = resilience::circuit_breaker(&mut r, top);
    let retry = resilience::retry(&mut r, top);
    let timeouts = resilience::timeouts(&mut r, top);
    let limits = resilience::limits(&mut r, top);
    let metrics_enabled = metrics_enabled(&mut r, top);
    let discovery = r.discovery_section(top);
    let shutdown_grace = r.seconds(t, "", "shutdown_grace_seconds", 30.0);
    let generator_on_p_node = first_token_source(&mut r, t);
    let tokenizer_path = r.string(t, "", "tokenizer_path").map(PathBuf::from);
    let tokenizer = scheduling::tokenizer(&mut r, top);
    let auth = auth(&mut r, t);
    let tracing = super::tracing::tracing(&mut r, top);
    let deny_headers = super::tracing::deny_list(&mut r, top);
    unknown_weighted_keys(&mut r, &models, &auth.api_keys);
    if !prefix_sync.peers.is_empty() && auth.admin_api_key.is_none() {
        r.problem(
            "prefix_sync.peers",
            "needs admin_api_key: replicas authenticate each other's placements with it \
             (the same key on every replica)",
        );
    }
    let host = r
        .string(t, "", "host")
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
        engine_metrics,
        kv_events,
        prefix_sync,
        admission: defaults.admission,
        startup,
        circuit,
        retry,
        timeouts,
        limits,
        discovery,
        admin_api_key: auth.admin_api_key,
        shutdown_grace,
        metrics_enabled,
        log_format,
        generator_on_p_node,
        openai_api_key: auth.openai_api_key,
        api_keys: auth.api_keys,
        protect_status: auth.protect_status,
        tokenizer_path,
        tokenizer,
        tracing,
        deny_headers,
        source: None,
        warnings: r.warnings,
        overrides: Overrides::default(),
    })
}

/// `scheduling`, `scheduling_config` and `disaggregated_mode` at the top level.
fn model_defaults(r: &mut Reader<'_>, top: &Map<String, Value>) -> ModelDefaults {
    let t = Some(top);
    let mut scheduler_name = r.string(t, "", "scheduling");
    // 1.2's switch, read when `scheduling` does not say.
    if r.boolean(t, "", "roundrobin", false) {
        r.warn(
            "roundrobin",
            Kind::Renamed {
                old: "roundrobin: true".into(),
                new: "scheduling: roundrobin".into(),
            },
        );
        scheduler_name.get_or_insert_with(|| "roundrobin".into());
    }
    let mode_name = r.string(t, "", "disaggregated_mode");
    if top.get("zmq").is_some_and(|v| !v.is_null()) && mode_name.as_deref() != Some("zmq") {
        r.mapping(&top["zmq"], "zmq", schema::ZMQ);
        r.report("zmq", zmq_unsupported());
    }
    let mut role_schedulers = RoleSchedulers::default();
    for (key, slot) in [
        ("prefill_scheduling", &mut role_schedulers.prefill),
        ("decode_scheduling", &mut role_schedulers.decode),
    ] {
        if let Some(s) = r.string(t, "", key) {
            *slot = Some(r.scheduler(Some(s), key));
        }
    }
    ModelDefaults {
        role_schedulers,
        scheduler: r.scheduler(scheduler_name, "scheduling"),
        scheduling: scheduling::scheduling_options(r, top),
        mode: r.mode(mode_name, "disaggregated_mode", DisaggMode::Direct),
        admission: super::admission::top(r, top),
    }
}

/// `metrics`: one switch, read once at start.
fn metrics_enabled(r: &mut Reader<'_>, top: &Map<String, Value>) -> bool {
    let mt = r.section(top, "metrics", schema::METRICS);
    r.boolean(mt, "metrics", "enabled", true)
}

fn zmq_unsupported() -> Kind {
    Kind::Unsupported {
        feature: "the LMCache ZeroMQ notification protocol (`disaggregated_mode: zmq`, `zmq:`)"
            .into(),
        instead: "use `disaggregated_mode: nixl` (the prefill response's kv_transfer_params go to the decode leg) or `direct` (the engines pair up on their own)".into(),
    }
}

/// Where a streamed request's first token comes from: 1.8's `first_token_source`
/// (`prefill` | `decode`), or xpyd's and 1.2's `generator_on_p_node`.
fn first_token_source(r: &mut Reader<'_>, t: Section<'_>) -> bool {
    let legacy = r.field(
        t,
        "",
        "generator_on_p_node",
        "true or false",
        Value::as_bool,
    );
    let source = match r.string(t, "", "first_token_source").as_deref() {
        None => None,
        Some("prefill") => Some(true),
        Some("decode") => Some(false),
        Some(other) => {
            r.problem(
                "first_token_source",
                format!("unknown first_token_source `{other}` (expected prefill or decode)"),
            );
            None
        }
    };
    match (source, legacy) {
        (Some(a), Some(b)) if a != b => {
            r.problem(
                "first_token_source",
                "disagrees with generator_on_p_node (they name one setting: keep first_token_source)",
            );
            a
        }
        (Some(a), _) => a,
        (None, b) => b.unwrap_or(false),
    }
}

/// A `key_weights` entry for a key not in `api_keys` weighs nothing: said, since the
/// key's owner would otherwise get only the default share.
fn unknown_weighted_keys(r: &mut Reader<'_>, models: &[super::ModelConfig], keys: &[String]) {
    let mut said = false;
    for m in models {
        if said {
            return;
        }
        if m.admission.key_weights.keys().any(|k| !keys.contains(k)) {
            r.problem(
                "admission.key_weights",
                format!("model `{}` weighs a key that is not in api_keys", m.name),
            );
            said = true;
        }
    }
}

struct Auth {
    admin_api_key: Option<String>,
    openai_api_key: Option<String>,
    api_keys: Vec<String>,
    protect_status: bool,
}

/// The keys: clients', the admin API's, the backends'.
fn auth(r: &mut Reader<'_>, t: Section<'_>) -> Auth {
    let protect_status = r.boolean(t, "", "protect_status", false);
    let api_keys: Vec<String> = match t.and_then(|t| t.get("api_keys")) {
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
            r.wrong_type("api_keys", "a list of keys", other);
            Vec::new()
        }
    };
    // The environment wins over the file, so secrets can stay out of it.
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let admin_api_key = env("ADMIN_API_KEY")
        .or(r.string(t, "", "admin_api_key"))
        .filter(|k| !k.is_empty());
    let openai_api_key = env("OPENAI_API_KEY")
        .or(r.string(t, "", "openai_api_key"))
        .filter(|k| !k.is_empty());
    Auth {
        admin_api_key,
        openai_api_key,
        api_keys,
        protect_status,
    }
}

impl Reader<'_> {
    pub fn mode(&mut self, name: Option<String>, path: &str, default: DisaggMode) -> DisaggMode {
        match name.as_deref() {
            None => default,
            Some("direct") => DisaggMode::Direct,
            Some("nixl") => DisaggMode::Nixl,
            Some("zmq") => {
                self.report(path, zmq_unsupported());
                default
            }
            Some(other) => {
                self.problem(
                    path,
                    format!("unknown disaggregated_mode `{other}` (expected direct or nixl)"),
                );
                default
            }
        }
    }
}
