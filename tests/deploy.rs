//! The Kubernetes manifests in deploy/kubernetes/: valid against the Kubernetes schemas
//! (`kubernetes-validate`, offline, strict: unknown fields rejected), their embedded proxy
//! config valid, and their timings consistent with the graceful drain.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "manifests missing: {files:?}");
    files
}

fn venv() -> PathBuf {
    common::python_venv(&[("kubernetes_validate", "kubernetes-validate")])
}

/// Runs kubernetes-validate --strict on `files`; (success, output).
fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(venv().join("bin/kubernetes-validate"))
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every document of every manifest, as JSON (read by Python's YAML parser, the one
/// kubectl-compatible tools share).
fn documents() -> Vec<Value> {
    let script = "import json, sys, yaml\nprint(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))";
    let out = Command::new(venv().join("bin/python"))
        .args(["-c", script])
        .args(manifests())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn manifests_pass_the_kubernetes_schemas() {
    let files = manifests();
    let (ok, text) = validate(&files);
    assert!(ok, "kubernetes-validate failed:\n{text}");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            text.contains(&format!("{name} passed")),
            "{name} not validated:\n{text}"
        );
    }
}

#[test]
fn the_validator_rejects_a_broken_manifest() {
    // The check can fail: a misspelled probe field is refused in strict mode.
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/30-deployment.yaml"),
    )
    .unwrap();
    let broken = src.replacen("readinessProbe:", "readinesProbe:", 1);
    assert_ne!(src, broken);
    let dir = std::env::temp_dir().join(format!("xpyd-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("deployment.yaml");
    std::fs::write(&path, broken).unwrap();
    let (ok, text) = validate(&[path]);
    assert!(!ok, "a broken manifest passed:\n{text}");
}

#[test]
fn manifests_fit_the_proxy() {
    let docs = documents();
    // The ConfigMap carries a valid proxy config that follows the headless Services.
    let cm = find(&docs, "ConfigMap", "xpyd");
    let text = cm["data"]["xpyd.yaml"]
        .as_str()
        .expect("xpyd.yaml in the ConfigMap");
    let cfg = xpyd::config::Config::from_yaml(text).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = cfg.models[0]
        .discovered
        .iter()
        .map(|n| n.host.clone())
        .collect();
    for svc in ["vllm-prefill", "vllm-decode"] {
        let s = find(&docs, "Service", svc);
        assert_eq!(s["spec"]["clusterIP"], "None", "{svc} must be headless");
        assert!(
            names.iter().any(|n| n.starts_with(&format!("{svc}."))),
            "the config does not follow {svc}: {names:?}"
        );
    }

    let dep = find(&docs, "Deployment", "xpyd");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/ping");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    // The config is read from where the ConfigMap is mounted, as a directory (a subPath
    // mount would never see an update).
    let args: Vec<&str> = c["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let path = args[args.iter().position(|a| *a == "-c").unwrap() + 1];
    let mount = &c["volumeMounts"][0];
    assert!(mount["subPath"].is_null());
    assert!(path.starts_with(mount["mountPath"].as_str().unwrap()));
    // The grace period covers the preStop pause plus the proxy's drain.
    let pre_stop: u64 = c["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let drain = cfg.shutdown_grace.as_secs();
    assert!(
        grace > pre_stop + drain,
        "terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + shutdown_grace_seconds {drain}"
    );
    // The PDB and the Service select the Deployment's pods.
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    for (kind, sel) in [
        (
            "PodDisruptionBudget",
            &find(&docs, "PodDisruptionBudget", "xpyd")["spec"]["selector"]["matchLabels"],
        ),
        (
            "Service",
            &find(&docs, "Service", "xpyd")["spec"]["selector"],
        ),
    ] {
        for (k, v) in sel.as_object().unwrap() {
            assert_eq!(&labels[k], v, "{kind} selects {k}={v}");
        }
    }
    assert_eq!(
        find(&docs, "HorizontalPodAutoscaler", "xpyd")["spec"]["scaleTargetRef"]["name"],
        "xpyd"
    );
}
