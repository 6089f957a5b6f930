//! xpyd as a drop-in for the Python `xpyd-proxy`: its config files load, its dashboard's
//! queries find their metrics, its admin bodies and status shapes work — and, with the real
//! package installed (ignored tests, run by .ci/run), the two proxies answer the same
//! requests in front of the same xpyd-dummy nodes with the same status codes, JSON shapes
//! and metric names, except for the differences docs/migration.md lists with their reason.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Config files, tokenizer and dashboard of xpyd-proxy 1.2's repository (Apache-2.0).
fn py12() -> PathBuf {
    root().join("tests/configs/python-1.2")
}

/// The model name both proxies serve: the path of 1.2's test tokenizer, which the Python
/// proxy loads (offline) for the model it is configured with.
fn tokenizer_model() -> String {
    py12().join("dummy_tokenizer").display().to_string()
}

#[test]
fn every_config_file_of_the_python_proxy_loads() {
    // 1.2's repository (examples, test configs, docs, --init-config's template) and 1.8's
    // --init-config template.
    let mut files: Vec<PathBuf> = [py12(), root().join("tests/configs/python-1.8")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "only {} files", files.len());
    let mut failures = Vec::new();
    for f in &files {
        let out = Command::new(env!("CARGO_BIN_EXE_xpyd"))
            .args(["proxy", "--validate-config"])
            .arg(f)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // 1.2's success line, which scripts grep.
        let line = format!("Config is valid: {}", f.display());
        if !out.status.success() || !stdout.lines().any(|l| l == line) {
            failures.push(format!(
                "{}:\n{}{}",
                f.display(),
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Metric names in a Prometheus exposition (`# TYPE` lines), histograms also under their
/// `_bucket` / `_sum` / `_count` series names.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in text.lines() {
        let mut w = l.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            names.insert(name.to_string());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            // prometheus_client names a counter `x` and exposes `x_total` / `x_created`.
            if kind == "counter" && !name.ends_with("_total") {
                names.insert(format!("{name}_total"));
            }
        }
    }
    names
}

/// The `proxy_*` metric names a Grafana dashboard's queries read.
fn dashboard_metrics(dashboard: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(expr)) = m.get("expr") {
                    let mut rest = expr.as_str();
                    while let Some(i) = rest.find("proxy_") {
                        let name: String = rest[i..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        rest = &rest[i + name.len()..];
                        out.insert(name);
                    }
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(dashboard, &mut out);
    out
}

fn get_text(url: &str) -> (u16, String) {
    let resp = match agent().get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url} failed: {e}"),
    };
    let status = resp.status();
    let mut s = String::new();
    resp.into_reader().read_to_string(&mut s).unwrap();
    (status, s)
}

#[test]
fn python_1_2_dashboard_reads_only_metrics_xpyd_exports() {
    let text = std::fs::read_to_string(py12().join("grafana/xpyd-pd-metrics.json")).unwrap();
    let wanted = dashboard_metrics(&serde_json::from_str(&text).unwrap());
    assert!(wanted.len() >= 8, "{wanted:?}");
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();
    for stream in [false, true] {
        let body =
            json!({"model": MODEL, "prompt": "hello there", "max_tokens": 3, "stream": stream});
        let (status, _, _) = post(&a, &proxy.url("/v1/completions"), &body);
        assert_eq!(status, 200);
    }
    let (_, exposition) = get_text(&proxy.url("/metrics"));
    let have = metric_names(&exposition);
    let missing: Vec<_> = wanted.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "the dashboard reads {missing:?}, not exported"
    );
    // The panels group by these labels: every series of the 1.2 names carries them.
    for l in exposition.lines().filter(|l| {
        l.starts_with("proxy_prefill_requests_total{")
            || l.starts_with("proxy_decode_active_requests{")
    }) {
        for label in ["prefill_instance=", "decode_instance=", "model="] {
            assert!(l.contains(label), "{l}");
        }
    }
    assert!(exposition.contains(&format!(
        "proxy_prefill_requests_total{{prefill_instance=\"{}\"",
        p.addr
    )));
}

#[test]
fn python_1_2_admin_body_and_status_shapes() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let extra = dummy("decode", &[]);
    let yaml = format!("{}admin_api_key: k\n", pd_yaml(&[&p], &[&d]));
    let proxy = proxy_with(&yaml, true);
    let admin = |path: &str, body: Value| {
        let resp = match agent()
            .post(&proxy.url(path))
            .set("X-API-Key", "k")
            .send_json(body)
        {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        (
            resp.status(),
            resp.into_json::<Value>().unwrap_or(Value::Null),
        )
    };
    let instance = extra.addr.to_string();
    let (status, v) = admin(
        "/instances/add",
        json!({"type": "decode", "instance": instance}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["message"],
        format!("Added {instance} to decode_instances.")
    );
    let (status, v) = admin(
        "/instances/add",
        json!({"type": "decoder", "instance": "127.0.0.1:9"}),
    );
    assert_eq!(status, 400, "{v}");

    let (status, s) = get_json(&proxy.url("/status"));
    assert_eq!(status, 200);
    assert_eq!(s["prefill_node_count"], 1, "{s}");
    assert_eq!(s["decode_node_count"], 2, "{s}");
    assert_eq!(s["prefill_nodes"], json!([p.addr.to_string()]));
    assert!(s["decode_nodes"]
        .as_array()
        .unwrap()
        .contains(&json!(instance)));
    assert!(s["models"].is_array(), "ours stay: {s}");

    let (status, s) = get_json(&proxy.url("/status/instances"));
    assert_eq!(status, 200);
    assert_eq!(s["prefill_instances"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["decode_instances"].as_array().unwrap().len(), 2, "{s}");
    assert_eq!(s["dual_instances"], json!([]));
    for key in [
        "address",
        "status",
        "circuit",
        "active_requests",
        "last_check",
    ] {
        assert!(s["decode_instances"][0].get(key).is_some(), "{key}: {s}");
    }
    assert_eq!(s["instances"].as_array().unwrap().len(), 3);

    let (status, v) = admin(
        "/instances/remove",
        json!({"type": "decode", "instance": instance}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["message"],
        format!("Removed {instance} from decode_instances.")
    );
}

#[test]
fn startup_keys_of_the_python_proxy_keep_their_meaning() {
    // 1.8's heartbeat while waiting, written at the top level as 1.8 does; 1.2's top-level
    // probe interval.
    let p = dummy("prefill", &[]);
    let dead = dead_address();
    let yaml = format!(
        "model: {MODEL}\nprefill: [\"{}\"]\ndecode: [\"{dead}\"]\nprobe_interval_seconds: 0.1\nheartbeat_interval_seconds: 0.2\nlog_level: info\n",
        p.addr
    );
    let path = write_config(&yaml);
    let log = path.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpyd"))
        .args(["proxy", "--port", "0", "--workers", "1", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let heartbeats = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("waiting for instances: prefill 1/1, decode 0/1 up")
            .count()
    };
    let waited = poll_until(Duration::from_secs(20), || heartbeats() >= 2);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        waited,
        "no repeated heartbeat:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------------------
// The differential suite: the real Python package beside xpyd.

/// The virtualenv of `xpyd-proxy==version` (outside the sources, under target/, or
/// `$XPYD_COMPAT_VENVS`), installed on first use (needs the network).
fn python_proxy(version: &str) -> PathBuf {
    let base = std::env::var("XPYD_COMPAT_VENVS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join("target/compat-venvs"));
    let venv = base.join(version);
    if !venv.join("bin/xpyd").exists() {
        std::fs::create_dir_all(&base).unwrap();
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status();
        assert!(
            matches!(ok, Ok(s) if s.success()),
            "cannot create {}",
            venv.display()
        );
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", &format!("xpyd-proxy=={version}")])
            .status();
        assert!(
            matches!(ok, Ok(s) if s.success()),
            "cannot install xpyd-proxy=={version}"
        );
    }
    venv
}

/// The Python proxy, killed when dropped.
struct PythonProxy {
    _child: KillOnDrop,
    port: u16,
    log: PathBuf,
}

impl PythonProxy {
    fn start(venv: &Path, config: &Path, port: u16) -> PythonProxy {
        let log = config.with_extension("python.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(venv.join("bin/xpyd"))
            .args(["proxy", "-c"])
            .arg(config)
            // A local tokenizer and no model hub.
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            // 1.2 reads the admin key from the environment only.
            .env("ADMIN_API_KEY", "k")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start the Python proxy");
        let p = PythonProxy {
            _child: KillOnDrop(child),
            port,
            log,
        };
        // Ready when business endpoints stop answering 503.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = ureq::get(&p.url("/v1/models"))
                .timeout(Duration::from_secs(2))
                .call()
            {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the Python proxy never became ready:\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// One request of the suite.
struct Case {
    name: String,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Option<Vec<u8>>,
}

struct Answer {
    status: u16,
    body: String,
}

fn send(base: &str, c: &Case) -> Answer {
    let mut req = agent().request(c.method, &format!("{base}{}", c.path));
    for (k, v) in &c.headers {
        req = req.set(k, v);
    }
    let resp = match &c.body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match resp {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => {
            return Answer {
                status: 0,
                body: format!("transport error: {e}"),
            }
        }
    };
    let status = resp.status();
    let mut body = String::new();
    let _ = resp.into_reader().read_to_string(&mut body);
    Answer { status, body }
}

/// Keys and value types, not values.
fn shape_diffs(path: &str, py: &Value, ours: &Value, out: &mut Vec<String>) {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    match (py, ours) {
        // A null in one is compatible with any value in the other (`"code": null`).
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                // Keys that are instance addresses (the Python /health and /ping) name no
                // field.
                let field = if k.parse::<std::net::SocketAddr>().is_ok() {
                    "<instance>"
                } else {
                    k.as_str()
                };
                let p = if path.is_empty() {
                    field.to_string()
                } else {
                    format!("{path}.{field}")
                };
                match b.get(k) {
                    None => out.push(format!("missing `{p}`")),
                    Some(w) => shape_diffs(&p, v, w, out),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if let (Some(x), Some(y)) = (a.first(), b.first()) {
                shape_diffs(&format!("{path}[]"), x, y, out);
            }
        }
        (a, b) if kind(a) != kind(b) => {
            let p = if path.is_empty() { "body" } else { path };
            out.push(format!("type `{p}`"))
        }
        _ => {}
    }
}

/// The JSON of each SSE `data:` event (not `[DONE]`).
fn sse_events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// Where the two answers differ: `(aspect, what)`; aspect is what docs/migration.md lists.
fn compare(c: &Case, py: &Answer, ours: &Answer) -> Vec<(String, String)> {
    let mut diffs = Vec::new();
    if py.status != ours.status {
        diffs.push((
            "status".to_string(),
            format!("{} vs {}", py.status, ours.status),
        ));
    }
    if c.path == "/metrics" {
        let (a, b) = (metric_names(&py.body), metric_names(&ours.body));
        for m in a.difference(&b).filter(|m| !m.ends_with("_created")) {
            diffs.push((format!("metric `{m}`"), "not exported by xpyd".into()));
        }
        return diffs;
    }
    let mut shapes = Vec::new();
    let (pe, oe) = (sse_events(&py.body), sse_events(&ours.body));
    if !pe.is_empty() || !oe.is_empty() {
        for (which, a, b) in [
            ("first event", pe.first(), oe.first()),
            ("last event", pe.last(), oe.last()),
        ] {
            match (a, b) {
                (Some(a), Some(b)) => shape_diffs(which, a, b, &mut shapes),
                (Some(_), None) => shapes.push(format!("missing {which}")),
                _ => {}
            }
        }
        if py.body.contains("data: [DONE]") && !ours.body.contains("data: [DONE]") {
            shapes.push("missing `[DONE]`".into());
        }
    } else if py.status == ours.status {
        if let (Ok(a), Ok(b)) = (
            serde_json::from_str::<Value>(&py.body),
            serde_json::from_str::<Value>(&ours.body),
        ) {
            shape_diffs("", &a, &b, &mut shapes);
        }
    }
    shapes.sort();
    shapes.dedup();
    diffs.extend(shapes.into_iter().map(|s| ("shape".to_string(), s)));
    diffs
}

/// The differences docs/migration.md allows: the rows `| `case` | aspect | what | why |` of
/// its table under "Differences the differential suite allows".
fn allowed() -> BTreeSet<(String, String, String)> {
    let text = std::fs::read_to_string(root().join("docs/migration.md")).unwrap();
    let section = text
        .split("## Differences the differential suite allows")
        .nth(1)
        .expect("docs/migration.md has the differences section");
    let section = section.split("\n## ").next().unwrap_or("");
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let case = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((
                case.to_string(),
                cells.get(2)?.to_string(),
                cells.get(3)?.to_string(),
            ))
        })
        .collect()
}

fn json_body(v: Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(&v).unwrap())
}

fn cases(model: &str, extra: &str) -> Vec<Case> {
    let ct = vec![("Content-Type", "application/json")];
    let admin = vec![("Content-Type", "application/json"), ("X-API-Key", "k")];
    let extra: &'static str = Box::leak(extra.to_string().into_boxed_str());
    let completion = |stream: bool| json!({"model": model, "prompt": "hello world", "max_tokens": 4, "stream": stream});
    let chat = |stream: bool| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream});
    let post = |name: &str, path, headers: &Vec<(&'static str, &'static str)>, body| Case {
        name: name.to_string(),
        method: "POST",
        path,
        headers: headers.clone(),
        body,
    };
    let get = |name: &str, path| Case {
        name: name.to_string(),
        method: "GET",
        path,
        headers: Vec::new(),
        body: None,
    };
    vec![
        post(
            "completion",
            "/v1/completions",
            &ct,
            json_body(completion(false)),
        ),
        post(
            "completion-stream",
            "/v1/completions",
            &ct,
            json_body(completion(true)),
        ),
        post("chat", "/v1/chat/completions", &ct, json_body(chat(false))),
        post(
            "chat-stream",
            "/v1/chat/completions",
            &ct,
            json_body(chat(true)),
        ),
        post("bad-json", "/v1/completions", &ct, Some(b"{bad".to_vec())),
        post(
            "no-content-type",
            "/v1/completions",
            &Vec::new(),
            json_body(completion(false)),
        ),
        post(
            "unknown-model",
            "/v1/completions",
            &ct,
            json_body(json!({"model": "nope", "prompt": "x"})),
        ),
        post(
            "missing-prompt",
            "/v1/completions",
            &ct,
            json_body(json!({"model": model})),
        ),
        post(
            "missing-messages",
            "/v1/chat/completions",
            &ct,
            json_body(json!({"model": model})),
        ),
        get("unknown-path", "/v1/nope"),
        get("wrong-method", "/v1/completions"),
        post(
            "admin-add",
            "/instances/add",
            &admin,
            json_body(json!({"type": "decode", "instance": extra})),
        ),
        post(
            "admin-add-again",
            "/instances/add",
            &admin,
            json_body(json!({"type": "decode", "instance": extra})),
        ),
        post(
            "admin-add-bad-type",
            "/instances/add",
            &admin,
            json_body(json!({"type": "decoder", "instance": "127.0.0.1:9"})),
        ),
        post(
            "admin-add-bad-address",
            "/instances/add",
            &admin,
            json_body(json!({"type": "decode", "instance": "nohost"})),
        ),
        post(
            "admin-wrong-key",
            "/instances/add",
            &vec![("Content-Type", "application/json"), ("X-API-Key", "wrong")],
            json_body(json!({"type": "decode", "instance": extra})),
        ),
        post(
            "admin-no-key",
            "/instances/add",
            &ct,
            json_body(json!({"type": "decode", "instance": extra})),
        ),
        get("status", "/status"),
        get("status-instances", "/status/instances"),
        get("models", "/v1/models"),
        get("ping", "/ping"),
        get("health", "/health"),
        post(
            "admin-remove",
            "/instances/remove",
            &admin,
            json_body(json!({"type": "decode", "instance": extra})),
        ),
        get("metrics", "/metrics"),
    ]
}

/// Inference requests when a backend answers 500 to every inference request.
fn failing_cases(model: &str, prefix: &str) -> Vec<Case> {
    let ct = vec![("Content-Type", "application/json")];
    [
        ("completion", "/v1/completions", false),
        ("completion-stream", "/v1/completions", true),
        ("chat", "/v1/chat/completions", false),
        ("chat-stream", "/v1/chat/completions", true),
    ]
    .into_iter()
    .map(|(name, path, stream)| {
        let body = if path == "/v1/completions" {
            json!({"model": model, "prompt": "hello", "max_tokens": 4, "stream": stream})
        } else {
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream})
        };
        Case {
            name: format!("{prefix}-{name}"),
            method: "POST",
            path,
            headers: ct.clone(),
            body: json_body(body),
        }
    })
    .collect()
}

/// Differences seen, and those docs/migration.md does not list.
#[derive(Default)]
struct Report {
    seen: Vec<String>,
    unexpected: Vec<String>,
}

/// Both proxies in front of the same prefill and decode nodes (started with the given
/// extra `xpyd-dummy` flags), the same requests to each.
fn scenario(
    venv: &Path,
    prefill_args: &[&str],
    decode_args: &[&str],
    extra_yaml: &str,
    cases: impl FnOnce(&str, &str) -> Vec<Case>,
    report: &mut Report,
) {
    let model = tokenizer_model();
    let p = dummy_of(&model, "prefill", prefill_args);
    let d = dummy_of(&model, "decode", decode_args);
    let extra = dummy_of(&model, "decode", &[]);
    let port = free_port();
    let yaml = format!(
        "model: {model}\nprefill: [\"{}\"]\ndecode: [\"{}\"]\nport: {port}\nadmin_api_key: k\nstartup:\n  probe_interval_seconds: 1\n{extra_yaml}",
        p.addr, d.addr
    );
    let config = write_config(&yaml);
    let python = PythonProxy::start(venv, &config, port);
    let ours = proxy_on(&config, true);
    let allowed = allowed();
    for c in cases(&model, &extra.addr.to_string()) {
        let a = send(&python.url(""), &c);
        let b = send(&ours.url(""), &c);
        for (aspect, what) in compare(&c, &a, &b) {
            let row = format!("| `{}` | {aspect} | {what} |", c.name);
            report.seen.push(row.clone());
            if !allowed.contains(&(c.name.clone(), aspect.clone(), what.clone())) {
                report.unexpected.push(format!(
                    "{row}\n    python {}: {}\n    xpyd   {}: {}",
                    a.status,
                    a.body.chars().take(300).collect::<String>(),
                    b.status,
                    b.body.chars().take(300).collect::<String>()
                ));
            }
        }
    }
}

fn differential(version: &str) {
    let venv = python_proxy(version);
    let mut report = Report::default();
    scenario(&venv, &[], &[], "", cases, &mut report);
    // A node answering 500: each request on its own, as the Python proxy's defaults have
    // it (xpyd's would retry and then open the circuit).
    let fail = ["--fail-rate", "1"];
    let python_defaults = "retry:\n  enabled: false\ncircuit_breaker:\n  enabled: false\n";
    let decode_fails = |m: &str, _: &str| failing_cases(m, "decode-500");
    let prefill_fails = |m: &str, _: &str| failing_cases(m, "prefill-500");
    scenario(
        &venv,
        &[],
        &fail,
        python_defaults,
        decode_fails,
        &mut report,
    );
    scenario(
        &venv,
        &fail,
        &[],
        python_defaults,
        prefill_fails,
        &mut report,
    );
    eprintln!(
        "differences with xpyd-proxy {version}:\n{}",
        report.seen.join("\n")
    );
    assert!(
        report.unexpected.is_empty(),
        "differences with xpyd-proxy {version} not listed in docs/migration.md:\n{}",
        report.unexpected.join("\n")
    );
}

#[test]
#[ignore = "installs xpyd-proxy 1.2.0 from PyPI; run by .ci/run"]
fn differential_against_python_1_2() {
    differential("1.2.0");
}

#[test]
#[ignore = "installs the latest xpyd-proxy from PyPI; run by .ci/run"]
fn differential_against_python_latest() {
    let version = std::env::var("XPYD_COMPAT_LATEST").unwrap_or_else(|_| "1.8.0".into());
    differential(&version);
}
