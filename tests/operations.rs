//! What operators rely on: readiness per model, probes that stay open, admin changes
//! validated like the config file, a backend serving another model than configured, and
//! request ids on every answer of a business endpoint.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn completion(model: &str) -> Value {
    json!({"model": model, "prompt": "a b c", "max_tokens": 3})
}

fn model_entry(v: &Value, name: &str) -> Value {
    v["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no model {name} in {v}"))
}

#[test]
fn one_model_without_nodes_never_holds_back_another() {
    let a = dummy_of("a", "dual", &[]);
    let b = dummy_of("b", "dual", &[]);
    let dead = dead_address();
    let yaml = format!(
        "models:\n  - name: a\n    dual: [\"{}\"]\n  - name: b\n    dual: [\"{}\"]\n  - name: c\n    dual: [\"{dead}\"]\n",
        a.addr, b.addr
    );
    // Ready (/health 200) although model c has no node at all.
    let proxy = proxy_with(&yaml, false);
    wait_for("/health to answer 200", Duration::from_secs(15), || {
        get_json(&proxy.url("/health")).0 == 200
    });
    let http = agent();
    let url = proxy.url("/v1/completions");
    // Each model's gate opens with the first probe round its node passes: a and b may open
    // in different rounds, so wait for both.
    wait_for("models a and b to open", Duration::from_secs(10), || {
        post(&http, &url, &completion("b")).0 == 200 && post(&http, &url, &completion("a")).0 == 200
    });
    let (status, _, v) = post(&http, &url, &completion("c"));
    assert_eq!(status, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("model `c` is waiting for backend nodes"),
        "{msg}"
    );
    let (status, h) = get_json(&proxy.url("/health"));
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["status"], "ready");
    assert_eq!(model_entry(&h, "a")["ready"], true);
    assert_eq!(model_entry(&h, "c")["ready"], false);

    // After start-up: model b loses its only node. The proxy stays ready, b's requests get
    // 503, a keeps serving.
    drop(b);
    wait_for(
        "b to be reported unable to serve",
        Duration::from_secs(10),
        || model_entry(&get_json(&proxy.url("/status")).1, "b")["can_serve"] == false,
    );
    let (status, h) = get_json(&proxy.url("/health"));
    assert_eq!(
        status, 200,
        "a model without nodes does not make the proxy unready: {h}"
    );
    assert_eq!(model_entry(&h, "b")["can_serve"], false);
    assert_eq!(post(&http, &url, &completion("b")).0, 503);
    assert_eq!(post(&http, &url, &completion("a")).0, 200);
}

#[test]
fn protect_status_leaves_the_probes_open() {
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!(
            "{}api_keys: [\"k\"]\nprotect_status: true\n",
            dual_yaml(&[&d])
        ),
        true, // waits on /health without a key
    );
    assert_eq!(get_json(&proxy.url("/ping")).0, 200);
    assert_eq!(get_json(&proxy.url("/health")).0, 200);
    for path in [
        "/status",
        "/status/instances",
        "/metrics",
        "/version",
        "/v1/models",
    ] {
        assert_eq!(get_json(&proxy.url(path)).0, 401, "{path}");
    }
}

#[test]
fn admin_changes_are_validated_like_the_config_file() {
    let d = dummy("dual", &[]);
    let other = dummy_of("other", "dual", &[]);
    let proxy = proxy_with(&format!("{}admin_api_key: k\n", dual_yaml(&[&d])), true);
    let http = agent();
    let admin = |path: &str, body: Value| -> (u16, Value) {
        match http
            .post(&proxy.url(path))
            .set("X-API-Key", "k")
            .send_json(body)
        {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let spare = dead_address().to_string();
    // An unknown model is not created by accident.
    let (s, v) = admin(
        "/instances/add",
        json!({"address": other.addr.to_string(), "role": "dual", "model": "other"}),
    );
    assert_eq!(s, 404, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("create_model"));
    // A prefill instance in a dual-only model would never be paired: refused.
    let (s, v) = admin(
        "/instances/add",
        json!({"address": spare, "role": "prefill", "model": MODEL}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no decode instances"));
    // The same address twice: a conflict.
    let (s, v) = admin(
        "/instances/add",
        json!({"address": d.addr.to_string(), "role": "dual", "model": MODEL}),
    );
    assert_eq!(s, 409, "{v}");
    // An address with a scheme: the config file's message.
    let (s, v) = admin(
        "/instances/add",
        json!({"address": format!("http://{spare}"), "role": "dual", "model": MODEL}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("drop `http://`"));
    // Creation asked for: the new model serves at once.
    let (s, v) = admin(
        "/instances/add",
        json!({"address": other.addr.to_string(), "role": "dual", "model": "other", "create_model": true}),
    );
    assert_eq!(s, 200, "{v}");
    let url = proxy.url("/v1/completions");
    assert_eq!(post(&http, &url, &completion("other")).0, 200);
    // Removing an unknown instance: 404, not 400.
    let (s, v) = admin("/instances/remove", json!({"address": spare}));
    assert_eq!(s, 404, "{v}");
    // The model's last instance removed: the model stays configured and answers 503 on its
    // own requests; the proxy and the other model are unaffected.
    let (s, v) = admin("/instances/remove", json!({"address": d.addr.to_string()}));
    assert_eq!(s, 200, "{v}");
    let (_, models) = get_json(&proxy.url("/v1/models"));
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL),
        "{models}"
    );
    assert_eq!(post(&http, &url, &completion(MODEL)).0, 503);
    assert_eq!(get_json(&proxy.url("/health")).0, 200);
    assert_eq!(post(&http, &url, &completion("other")).0, 200);
}

#[test]
fn a_backend_serving_another_model_is_reported() {
    let d = dummy_of("not-the-configured-name", "dual", &[]);
    let proxy = proxy_with(&dual_yaml(&[&d]), true);
    wait_for("the mismatch in /status", Duration::from_secs(10), || {
        let (_, v) = get_json(&proxy.url("/status"));
        v["models"][0]["warnings"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    });
    let (_, v) = get_json(&proxy.url("/status"));
    let w = v["models"][0]["warnings"][0].as_str().unwrap();
    assert!(w.contains("not-the-configured-name"), "{w}");
    assert!(w.contains(&d.addr.to_string()), "{w}");
}

#[test]
fn refused_business_requests_carry_a_request_id() {
    let d = dummy("dual", &[]);
    let proxy = proxy_with(&dual_yaml(&[&d]), true);
    let http = agent();
    let url = proxy.url("/v1/completions");
    let (s, rid, _) = post_raw(&http, &url, "text/plain", b"{}");
    assert_eq!(s, 415);
    assert!(rid.is_some(), "415 without X-Request-Id");
    let (s, rid, _) = post_raw(&http, &url, "application/json", b"[1, 2]");
    assert_eq!(s, 400);
    assert!(rid.is_some(), "400 without X-Request-Id");
    let r = http
        .get(&url)
        .set("X-Request-Id", "mine")
        .call()
        .unwrap_err();
    let ureq::Error::Status(405, r) = r else {
        panic!("expected 405: {r}")
    };
    assert_eq!(r.header("x-request-id"), Some("mine"));
}

fn xpyd(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_xpyd"))
        .args(args)
        .current_dir(dir)
        .env_remove("XPYD_CONFIG")
        .output()
        .expect("run xpyd")
}

#[test]
fn command_line_mistakes_get_errors_that_say_what_to_do() {
    let dir = std::env::temp_dir().join(format!("xpyd-ops-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // No configuration anywhere: the error points at --init-config.
    let out = xpyd(&["proxy"], &dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no configuration found") && err.contains("--init-config"),
        "{err}"
    );
    // --workers 0 is refused on the command line as in the file.
    let path = write_config(&format!("model: {MODEL}\ndual: [\"127.0.0.1:8100\"]\n"));
    let p = path.to_str().unwrap();
    let out = xpyd(&["proxy", "-c", p, "--workers", "0"], &dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at least 1"), "{err}");
    // --validate-config reports what the overrides make of the file.
    let out = xpyd(&["proxy", "--validate-config", p, "--port", "9123"], &dir);
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("listen 0.0.0.0:9123"), "{summary}");
    // A URL where an address belongs: drop the scheme.
    let bad = write_config(&format!(
        "model: {MODEL}\ndual: [\"http://127.0.0.1:8100\"]\n"
    ));
    let out = xpyd(&["proxy", "--validate-config", bad.to_str().unwrap()], &dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drop `http://`"), "{err}");
}

#[test]
fn the_start_up_line_follows_the_json_log_format() {
    use std::io::BufRead;
    let d = dummy("dual", &[]);
    let path = write_config(&dual_yaml(&[&d]));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xpyd"))
        .args(["proxy", "-c"])
        .arg(&path)
        .args(["--port", "0", "--workers", "1", "--log-format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("xpyd");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("no start-up line");
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert!(
        v["msg"].as_str().unwrap().contains("listening on http://"),
        "{v}"
    );
}
