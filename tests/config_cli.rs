//! Configuration and CLI: the table of config files under tests/configs (each with its
//! exact expected problems), --init-config, resolution order, fix-config, multi-model
//! routing and reload without restart — all through the real `xpyd` binary.

mod common;

use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn xpyd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xpyd"))
}

/// Runs `xpyd ARGS PATH`; true when it exits 0.
fn succeeds(args: &[&str], path: &Path) -> bool {
    xpyd().args(args).arg(path).status().unwrap().success()
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs")
}

#[test]
fn every_config_file_gives_exactly_its_expected_report() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(configs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "only {} config cases", files.len());
    let mut failures = Vec::new();
    for f in &files {
        let expected = std::fs::read_to_string(f.with_extension("expected")).unwrap();
        let mut lines = expected.lines();
        let out = xpyd()
            .args(["proxy", "--validate-config"])
            .arg(f)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = f.file_name().unwrap().to_string_lossy();
        if expected.starts_with("OK") {
            lines.next();
            if !out.status.success() {
                failures.push(format!("{name}: expected valid, got:\n{stderr}"));
            }
            for l in lines {
                if !stdout.lines().any(|s| s == l) {
                    failures.push(format!("{name}: summary lacks `{l}`:\n{stdout}"));
                }
            }
        } else {
            let got: Vec<&str> = stderr
                .lines()
                .filter_map(|l| l.strip_prefix("  - "))
                .collect();
            let want: Vec<&str> = lines.collect();
            if out.status.success() || got != want {
                failures.push(format!("{name}:\n  want {want:#?}\n  got  {got:#?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn init_config_writes_a_valid_template_and_will_not_overwrite() {
    let dir = std::env::temp_dir().join(format!("xpyd-init-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("xpyd.yaml");
    let _ = std::fs::remove_file(&path);
    assert!(succeeds(&["proxy", "--init-config"], &path));
    let template = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        template,
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proxy.yaml"))
            .unwrap()
    );
    assert!(succeeds(&["proxy", "--validate-config"], &path));
    let out = xpyd()
        .args(["proxy", "--init-config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(succeeds(&["proxy", "--force", "--init-config"], &path));
    // Without a path it writes ./xpyd.yaml.
    let _ = std::fs::remove_file(dir.join("xpyd.yaml"));
    assert!(xpyd()
        .current_dir(&dir)
        .args(["proxy", "--init-config"])
        .status()
        .unwrap()
        .success());
    assert!(dir.join("xpyd.yaml").exists());
}

#[test]
fn config_resolution_order_and_the_missing_config_error() {
    let dir = std::env::temp_dir().join(format!("xpyd-resolve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("xpyd.yaml"));
    let out = xpyd()
        .current_dir(&dir)
        .env_remove("XPYD_CONFIG")
        .arg("proxy")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for place in ["-c/--config", "XPYD_CONFIG", "./xpyd.yaml"] {
        assert!(err.contains(place), "{err}");
    }
    // XPYD_CONFIG is used when -c is absent: an invalid file there is what gets reported.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "prefil: x\n").unwrap();
    let out = xpyd()
        .current_dir(&dir)
        .env("XPYD_CONFIG", &bad)
        .arg("proxy")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml"));
    // ./xpyd.yaml is used last.
    std::fs::write(dir.join("xpyd.yaml"), "flux: 1\n").unwrap();
    let out = xpyd()
        .current_dir(&dir)
        .env_remove("XPYD_CONFIG")
        .arg("proxy")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("xpyd.yaml is invalid"));
    // -c wins over both.
    let out = xpyd()
        .current_dir(&dir)
        .env("XPYD_CONFIG", &bad)
        .args(["proxy", "-c", "/nonexistent/x.yaml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.yaml"));
}

/// `xpyd fix-config --write --interactive PATH` with `answers` on stdin; must succeed.
fn fix_interactively(path: &Path, answers: &str) {
    use std::io::Write;
    let mut child = xpyd()
        .args(["fix-config", "--write", "--interactive"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(answers.as_bytes()).unwrap();
    drop(stdin);
    assert!(child.wait_with_output().unwrap().status.success());
}

#[test]
fn fix_config_repairs_typos_with_a_backup() {
    let dir = std::env::temp_dir().join(format!("xpyd-fix-{}", std::process::id()));
    // Fresh: a directory left by an earlier run under a reused pid holds its backups.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("typos.yaml");
    let original = "model: m\nprefil: [\"127.0.0.1:8100\"]\ndecodes:\n  - \"127.0.0.1 :8200\"  \nschedulling: round-robin\n";
    std::fs::write(&path, original).unwrap();
    assert!(!xpyd()
        .args(["proxy", "--validate-config"])
        .arg(&path)
        .status()
        .unwrap()
        .success());
    let out = xpyd().args(["fix-config"]).arg(&path).output().unwrap();
    let diff = String::from_utf8_lossy(&out.stdout);
    assert!(
        diff.contains("- prefil:") && diff.contains("+ prefill:"),
        "{diff}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        original,
        "no --write: file untouched"
    );
    assert!(succeeds(&["fix-config", "--write"], &path));
    assert!(succeeds(&["proxy", "--validate-config"], &path));
    let backups: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.to_string_lossy().contains("typos.yaml.") && p.to_string_lossy().ends_with(".bak")
        })
        .collect();
    assert_eq!(backups.len(), 1);
    assert_eq!(std::fs::read_to_string(&backups[0]).unwrap(), original);
    // Interactive: the ambiguous missing port is asked for on stdin.
    let path2 = dir.join("noport.yaml");
    std::fs::write(&path2, "model: m\ndual: [\"127.0.0.1\"]\n").unwrap();
    fix_interactively(&path2, "8300\n");
    assert_eq!(
        std::fs::read_to_string(&path2).unwrap(),
        "model: m\ndual: [\"127.0.0.1:8300\"]\n"
    );
    // Legacy lists mixed with `models:` are refused by the loader; fix-config moves them in.
    let path3 = dir.join("mixed.yaml");
    std::fs::write(&path3, "model: legacy-m\nprefill: [\"127.0.0.1:8100\"]\ndecode: [\"127.0.0.1:8200\"]\nmodels:\n  - name: other\n    dual: [\"127.0.0.1:8300\"]\n").unwrap();
    let validate = |p: &PathBuf| {
        xpyd()
            .args(["proxy", "--validate-config"])
            .arg(p)
            .output()
            .unwrap()
    };
    assert!(!validate(&path3).status.success());
    assert!(xpyd()
        .args(["fix-config", "--write"])
        .arg(&path3)
        .status()
        .unwrap()
        .success());
    let out = validate(&path3);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{summary}");
    assert!(
        summary.contains("legacy-m") && summary.contains("127.0.0.1:8100"),
        "{summary}"
    );
    // Without a `model:` the merge is ambiguous: --interactive asks for the name.
    let path4 = dir.join("mixed-unnamed.yaml");
    std::fs::write(&path4, "dual: [\"127.0.0.1:8400\"]\ninstances:\n  - {address: \"127.0.0.1:8500\", role: dual, model: b}\n").unwrap();
    fix_interactively(&path4, "a\n");
    let out = validate(&path4);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{summary}");
    assert!(
        summary.contains("model a") && summary.contains("127.0.0.1:8400"),
        "{summary}"
    );
}

#[test]
fn two_models_routed_by_name() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let dual = dummy_of("other-model", "dual", &["--max-model-len", "4096"]);
    let yaml = format!(
        "scheduling: loadbalanced\nmodels:\n  - name: {MODEL}\n    prefill: [\"{}\"]\n    decode: [\"{}\"]\n    scheduler: roundrobin\n  - name: other-model\n    dual: [\"{}\"]\n",
        p.addr, d.addr, dual.addr
    );
    let proxy = proxy_with(&yaml, true);
    let a = agent();
    let url = proxy.url("/v1/completions");
    assert_eq!(
        post(
            &a,
            &url,
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 2})
        )
        .0,
        200
    );
    assert_eq!(
        post(
            &a,
            &url,
            &json!({"model": "other-model", "prompt": "x", "max_tokens": 2})
        )
        .0,
        200
    );
    let (st, _, v) = post(&a, &url, &json!({"model": "third", "prompt": "x"}));
    assert_eq!(st, 404, "{v}");
    let (st, _, v) = post(&a, &url, &json!({"prompt": "x"}));
    assert_eq!(st, 400, "several models: `model` is required: {v}");
    assert_eq!(dummy_stats(&d)["requests"], 1);
    assert_eq!(dummy_stats(&dual)["requests"], 1);
    let (_, models) = get_json(&proxy.url("/v1/models"));
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["id"], "other-model");
    assert_eq!(data[1]["max_model_len"], 4096);
    let (_, status) = get_json(&proxy.url("/status"));
    assert_eq!(
        status["models"][0]["scheduler"], "roundrobin",
        "per-model scheduler honoured"
    );
    assert_eq!(status["models"][1]["scheduler"], "loadbalanced");
}

#[test]
fn reload_swaps_the_decode_list_under_load_without_failures() {
    let p = dummy("prefill", &[]);
    let d1 = dummy("decode", &["--decode-delay-per-token", "0.002"]);
    let d2 = dummy("decode", &["--decode-delay-per-token", "0.002"]);
    let path = write_config(&format!(
        "{}{FAST_PROBES}admin_api_key: k\n",
        pd_yaml(&[&p], &[&d1])
    ));
    let proxy = proxy_on(&path, true);
    let url = proxy.url("/v1/completions");
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (url, done, failed) = (url.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let a = agent();
                for _ in 0..25 {
                    let (st, _, _) = post(
                        &a,
                        &url,
                        &json!({"model": MODEL, "prompt": "x", "max_tokens": 8}),
                    );
                    if st != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    wait_for(
        "20 requests before the reload",
        Duration::from_secs(30),
        || done.load(Ordering::Relaxed) >= 20,
    );
    // Swap d1 for d2 in the file, then SIGHUP.
    std::fs::write(
        &path,
        format!("{}{FAST_PROBES}admin_api_key: k\n", pd_yaml(&[&p], &[&d2])),
    )
    .unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(proxy.child.id() as i32, libc::SIGHUP) };
    for h in load {
        h.join().unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 100);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request fails across a reload"
    );
    let before = dummy_stats(&d1)["requests"].as_u64().unwrap();
    let small_request = || {
        post(
            &agent(),
            &url,
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 2}),
        )
        .0
    };
    for _ in 0..5 {
        assert_eq!(small_request(), 200);
    }
    assert_eq!(
        dummy_stats(&d1)["requests"].as_u64().unwrap(),
        before,
        "the removed node gets nothing new"
    );
    assert!(
        dummy_stats(&d2)["requests"].as_u64().unwrap() >= 5,
        "new requests reach the new node"
    );
    // An invalid file is reported and the running config stays.
    std::fs::write(&path, "prefil: nope\n").unwrap();
    let r = agent()
        .post(&proxy.url("/admin/reload"))
        .set("X-API-Key", "k")
        .call();
    match r {
        Err(ureq::Error::Status(400, resp)) => {
            assert!(resp.into_string().unwrap().contains("prefil"))
        }
        other => panic!("expected 400, got {other:?}"),
    }
    assert_eq!(small_request(), 200, "the running config stays");
}

#[test]
fn reload_applies_keys_and_timeouts_and_reports_what_needs_a_restart() {
    let d = dummy("dual", &["--decode-delay-per-token", "0.3"]);
    let base = format!("{}{FAST_PROBES}", dual_yaml(&[&d]));
    let path = write_config(&format!("{base}admin_api_key: k\n"));
    let proxy = proxy_on(&path, true);
    let url = proxy.url("/v1/completions");
    let slow = json!({"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": true});
    assert_eq!(
        stream(&agent(), &url, &slow).status,
        200,
        "no idle timeout yet"
    );
    // New client keys, a new admin key, a short idle timeout; a new host and metrics switch
    // (listener and worker settings) only take effect on restart. --port and --workers on
    // the command line still win over the file.
    std::fs::write(
        &path,
        format!("{base}admin_api_key: k2\napi_keys: [secret]\ntimeouts:\n  idle_seconds: 0.1\nhost: 127.0.0.2\nport: 1\nworkers: 1\nmetrics:\n  enabled: false\n"),
    )
    .unwrap();
    let reloaded: serde_json::Value = agent()
        .post(&proxy.url("/admin/reload"))
        .set("X-API-Key", "k")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(reloaded["status"], "reloaded");
    assert_eq!(
        reloaded["restart_needed"],
        json!(["host", "metrics.enabled"]),
        "{reloaded}"
    );
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 1});
    assert_eq!(post(&agent(), &url, &body).0, 401, "the new api_keys apply");
    let keyed = |b: &serde_json::Value| {
        agent()
            .post(&url)
            .set("Authorization", "Bearer secret")
            .send_json(b.clone())
            .unwrap()
    };
    assert_eq!(keyed(&body).status(), 200);
    // 0.3 s between tokens now exceeds the 0.1 s idle timeout: the stream is cut.
    // (The cut stream ends without a last chunk, so the reader errs at the end.)
    let mut cut = Vec::new();
    let _ = std::io::Read::read_to_end(&mut keyed(&slow).into_reader(), &mut cut);
    let cut = String::from_utf8_lossy(&cut);
    assert!(cut.contains("stalled mid-stream"), "{cut}");
    // The old admin key no longer works; the new one does.
    let old = agent()
        .post(&proxy.url("/admin/reload"))
        .set("X-API-Key", "k")
        .call();
    assert!(
        matches!(old, Err(ureq::Error::Status(401 | 403, _))),
        "{old:?}"
    );
    let again = agent()
        .post(&proxy.url("/admin/reload"))
        .set("X-API-Key", "k2")
        .call()
        .unwrap();
    assert_eq!(again.status(), 200);
}

/// The README's first command. `xpyd demo` starts its own simulated nodes and proxy, streams a
/// completion and answers a chat completion through them, keeps serving at the address it
/// printed, and ends cleanly on Ctrl-C.
#[test]
fn demo_serves_its_requests_keeps_serving_and_stops_on_ctrl_c() {
    use serde_json::Value;
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::Instant;
    let mut demo = KillOnDrop(
        xpyd()
            .args(["demo", "--port", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out
        .last()
        .is_some_and(|l| l.starts_with("Serving until Ctrl-C"))
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => out.push(line),
            Err(_) => panic!(
                "the demo did not reach \"Serving until Ctrl-C\" within 60 s; it printed:\n{}",
                out.join("\n")
            ),
        }
    }
    let printed = out.join("\n");
    if std::env::var("XPYD_DRIVER").as_deref() == Ok("epoll") {
        assert!(out[0].ends_with(", epoll)"), "not on epoll: {}", out[0]);
    }
    let tokens: Vec<Value> = out
        .iter()
        .filter_map(|l| l.strip_prefix("data: {"))
        .map(|rest| serde_json::from_str(&format!("{{{rest}")).unwrap())
        .collect();
    assert_eq!(tokens.len(), 12, "12 streamed tokens:\n{printed}");
    assert!(
        tokens.iter().all(|t| t["choices"][0]["text"].is_string()),
        "{printed}"
    );
    assert!(out.iter().any(|l| l == "data: [DONE]"), "{printed}");
    let chat = out
        .iter()
        .find_map(|l| l.strip_prefix("200 "))
        .unwrap_or_else(|| panic!("no 200 answer to the chat completion:\n{printed}"));
    let chat: Value = serde_json::from_str(chat).unwrap();
    assert_eq!(chat["object"], "chat.completion", "{printed}");
    // Still serving, at the address of its first line.
    let addr = out[0]
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in `{}`", out[0]));
    let (status, _, answer) = post(
        &agent(),
        &format!("http://{addr}/v1/completions"),
        &json!({"model": "xpyd-demo", "prompt": "hello", "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer["choices"][0]["text"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(demo.id() as i32, libc::SIGINT) };
    let mut exit = None;
    wait_for(
        "the demo to exit on Ctrl-C",
        Duration::from_secs(20),
        || {
            exit = demo.try_wait().unwrap();
            exit.is_some()
        },
    );
    assert!(exit.unwrap().success(), "exit status {exit:?}");
}
