//! The three shapes of the model list (docs/config.md), mutually exclusive:
//! Format 1, legacy top-level `model` + `prefill`/`decode`/`dual`; Format 2, `instances:
//! [{address, role, model}]`; Format 3, `models: [{name, prefill, decode, dual, ...}]`.

use super::admission::{self, AdmissionConfig};
use super::problem::Kind;
use super::reader::{join, Reader};
use super::role::{Role, RoleGap};
use super::roles::listed;
use super::schema::{INSTANCE_KEYS, MODEL_KEYS};
use super::suggest::hint;
use super::yaml;
use super::{
    DisaggMode, InstanceConfig, ModelConfig, RoleSchedulers, SchedulerKind, SchedulingOptions,
};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// What a model takes from the top level unless it says otherwise.
pub struct ModelDefaults {
    pub scheduler: SchedulerKind,
    pub role_schedulers: RoleSchedulers,
    pub scheduling: SchedulingOptions,
    pub mode: DisaggMode,
    pub admission: AdmissionConfig,
}

impl ModelDefaults {
    fn model(&self, name: String, instances: Vec<InstanceConfig>) -> ModelConfig {
        ModelConfig {
            name,
            instances,
            discovered: Vec::new(),
            scheduler: self.scheduler,
            role_schedulers: self.role_schedulers,
            scheduling: self.scheduling.clone(),
            mode: self.mode,
            admission: self.admission.clone(),
        }
    }
}

/// The models of the document, in whichever format it is written, with addresses unique
/// across models and roles.
pub fn models(
    r: &mut Reader<'_>,
    doc: &Value,
    top: &Map<String, Value>,
    defaults: &ModelDefaults,
) -> Vec<ModelConfig> {
    let has = |k: &str| top.get(k).is_some_and(|v| !v.is_null());
    // `model` beside `instances` names the model of entries without one (as in 1.2).
    let legacy: Vec<&str> = ["prefill", "decode", "dual"]
        .into_iter()
        .filter(|k| has(k))
        .collect();
    if has("model") && has("models") {
        r.warn(
            "model",
            Kind::Note("not used: with `models`, each model is named by its `name`".into()),
        );
    }
    let models = if has("instances") && has("models") {
        r.problem(
            "models",
            "`instances` and `models` cannot be combined: use one format",
        );
        Vec::new()
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
        Vec::new()
    } else if has("models") {
        format3(r, &top["models"], defaults)
    } else if has("instances") {
        let model = r.string(Some(top), "", "model");
        format2(r, &top["instances"], defaults, model.as_deref())
    } else {
        format1(r, top, defaults)
    };
    check_unique_addresses(r, doc, &models);
    r.check_unique_names();
    models
}

/// Format 1: one model, named by `model` (else `default`).
fn format1(
    r: &mut Reader<'_>,
    top: &Map<String, Value>,
    defaults: &ModelDefaults,
) -> Vec<ModelConfig> {
    let name = r
        .string(Some(top), "", "model")
        .unwrap_or_else(|| "default".to_string());
    let decode_only = listed(top, "decode") && !listed(top, "prefill") && !listed(top, "dual");
    if !decode_only {
        r.check_roles(top, "", &name);
        let instances = r.model_roles(top, "");
        let mut model = defaults.model(name, instances);
        model.discovered = r.take_discovered();
        return vec![model];
    }
    // xpyd-proxy 1.2 loads this file (it then waits for a prefill node forever): here the
    // decode nodes serve requests whole, which is what such a file can mean.
    r.warn(
        "decode",
        Kind::Note(format!(
            "model `{name}` has no prefill instances: its decode instances serve requests whole, as `dual` (list them under `dual` to say so)"
        )),
    );
    let mut instances = r.model_roles(top, "");
    for i in &mut instances {
        i.role = Role::Dual;
    }
    let mut model = defaults.model(name, instances);
    model.discovered = r.take_discovered();
    for n in &mut model.discovered {
        n.role = Role::Dual;
    }
    vec![model]
}

/// Format 2: `instances: [{address, role, model}]`, grouped into models in order of first
/// appearance.
fn format2(
    r: &mut Reader<'_>,
    v: &Value,
    defaults: &ModelDefaults,
    top_model: Option<&str>,
) -> Vec<ModelConfig> {
    let Value::Array(items) = v else {
        r.wrong_type("instances", "a list of {address, role, model}", v);
        return Vec::new();
    };
    let mut models: Vec<ModelConfig> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("instances[{i}]");
        let Some(m) = r.mapping(item, &path, INSTANCE_KEYS) else {
            continue;
        };
        let role = match r.string(Some(m), &path, "role") {
            Some(s) => match s.parse::<Role>() {
                Ok(role) => role,
                Err(e) => {
                    let hint = hint(&s, &Role::NAMES);
                    r.problem(&join(&path, "role"), format!("{e}{hint}"));
                    continue;
                }
            },
            None => {
                r.problem(&path, "missing `role` (prefill, decode or dual)");
                continue;
            }
        };
        let Some(model) = r
            .string(Some(m), &path, "model")
            .or_else(|| top_model.map(str::to_string))
        else {
            r.report(
                &path,
                Kind::Unsupported {
                    feature: "an instance without `model` (the Python proxy asked the node)".into(),
                    instead: "write its `model`, or a top-level `model:` for every entry".into(),
                },
            );
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
        let names = r.take_discovered();
        models[idx].discovered.extend(names);
    }
    for m in &models {
        // Judged by what was written, so that a bad address is not also a missing role.
        let text = |v: &Value| match v {
            Value::String(s) => s.trim().to_string(),
            other => other.to_string(),
        };
        let has = |role: Role| {
            items.iter().any(|it| {
                let model = match &it["model"] {
                    Value::Null => top_model.unwrap_or_default().to_string(),
                    v => text(v),
                };
                model == m.name && it["role"].as_str().and_then(|r| r.parse().ok()) == Some(role)
            })
        };
        if let Some(gap) = RoleGap::of(has(Role::Prefill), has(Role::Decode), has(Role::Dual)) {
            r.problem("instances", gap.message(&m.name));
        }
    }
    if items.is_empty() {
        r.problem("instances", "no instances listed");
    }
    models
}

/// Format 3: `models: [{name, prefill, decode, dual, scheduler, prefill_scheduler,
/// decode_scheduler, disaggregated_mode}]`.
fn format3(r: &mut Reader<'_>, v: &Value, defaults: &ModelDefaults) -> Vec<ModelConfig> {
    let Value::Array(items) = v else {
        r.wrong_type("models", "a list of models", v);
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
            // As in xpyd-proxy 1.2, an unknown per-model scheduler falls back to the
            // top-level one; said, with the closest name.
            match s.parse() {
                Ok(kind) => model.scheduler = kind,
                Err(e) => r.warn(
                    &join(&path, "scheduler"),
                    Kind::Note(format!(
                        "{e}{}; using `{}`",
                        hint(&s, &SchedulerKind::names()),
                        model.scheduler.as_str()
                    )),
                ),
            }
        }
        for (key, slot) in [
            ("prefill_scheduler", &mut model.role_schedulers.prefill),
            ("decode_scheduler", &mut model.role_schedulers.decode),
        ] {
            if let Some(s) = r.string(Some(m), &path, key) {
                *slot = Some(r.scheduler(Some(s), &join(&path, key)));
            }
        }
        let mode_name = r.string(Some(m), &path, "disaggregated_mode");
        model.mode = r.mode(mode_name, &join(&path, "disaggregated_mode"), model.mode);
        model.admission = admission::model(r, m, &path, &defaults.admission);
        r.check_roles(m, &path, &model.name);
        model.instances = r.model_roles(m, &path);
        model.discovered = r.take_discovered();
        models.push(model);
    }
    if items.is_empty() {
        r.problem("models", "no models listed");
    }
    models
}

/// An instance serves one role of one model. The same engine listed for two models (one
/// vLLM serving several names) is accepted, as 1.2 did, and said: each model tracks its
/// load and health on its own.
fn check_unique_addresses(r: &mut Reader<'_>, doc: &Value, models: &[ModelConfig]) {
    let mut seen = HashSet::new();
    let mut across = HashSet::new();
    for (k, m) in models.iter().enumerate() {
        for i in &m.instances {
            if !seen.insert((k, i.socket_addr)) {
                let path = find_path(doc, &i.address).unwrap_or_default();
                r.problem(
                    &path,
                    format!(
                        "duplicate address `{}` (an instance can serve one role of one model)",
                        i.address
                    ),
                );
            } else if !across.insert(i.socket_addr) {
                let path = find_path(doc, &i.address).unwrap_or_default();
                r.warn(
                    &path,
                    Kind::Note(format!(
                        "`{}` also serves another model: each model counts its load and health separately",
                        i.address
                    )),
                );
            }
        }
    }
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
    let mut r = Reader::new(&loc);
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
    // fix-config moves addresses, not `dns://` names: it leaves such files alone.
    (r.problems.is_empty() && r.take_discovered().is_empty()).then_some(LegacyPart {
        model,
        instances,
        listed_models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_last_occurrence() {
        let doc = json!({"prefill": ["a:1"], "decode": ["b:2", " a:1 "]});
        assert_eq!(find_path(&doc, "a:1").as_deref(), Some("decode[1]"));
        assert_eq!(find_path(&doc, "b:2").as_deref(), Some("decode[0]"));
        assert_eq!(find_path(&doc, "c:3"), None);
    }
}
