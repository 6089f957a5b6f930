//! The P/D suite against `xpyd-sim` nodes (PyPI), a simulator written independently of this
//! proxy: the proxy must work with a node it was not written with.
//!
//! The simulator is installed into a virtualenv outside the sources (`target/pyenv`, or
//! `$XPYD_TEST_VENV`) on first use; `.ci/run` installs it up front.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn sim_bin() -> PathBuf {
    python_venv(&[("xpyd_sim", "xpyd-sim")]).join("bin/xpyd-sim")
}

struct Sim {
    _child: KillOnDrop,
    addr: String,
}

fn sim(mode: &str, decode_ms: &str) -> Sim {
    let port = free_port();
    let child = Command::new(sim_bin())
        .args([
            "serve",
            "--mode",
            mode,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args([
            "--model",
            MODEL,
            "--prefill-delay-ms",
            "0",
            "--kv-transfer-delay-ms",
            "0",
        ])
        .args([
            "--decode-delay-per-token-ms",
            decode_ms,
            "--eos-min-ratio",
            "1.0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start xpyd-sim");
    let s = Sim {
        _child: KillOnDrop(child),
        addr: format!("127.0.0.1:{port}"),
    };
    wait_for("xpyd-sim to start", Duration::from_secs(30), || {
        ureq::get(&format!("http://{}/health", s.addr))
            .call()
            .is_ok()
    });
    s
}

fn yaml(role_lists: &[(&str, &[&Sim])]) -> String {
    let mut y = format!("model: {MODEL}\n");
    for (role, sims) in role_lists {
        let l: Vec<String> = sims.iter().map(|s| format!("\"{}\"", s.addr)).collect();
        y.push_str(&format!("{role}: [{}]\n", l.join(", ")));
    }
    y
}

fn check_pd_suite(proxy: &Proc) {
    let a = agent();
    // Non-streaming completions and chat.
    let body = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 6});
    let (status, rid, v) = post(&a, &proxy.url("/v1/completions"), &body);
    assert_eq!(status, 200, "{v}");
    assert!(rid.is_some());
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].as_str().unwrap().len() > 1);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let chat =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (status, _, v) = post(&a, &proxy.url("/v1/chat/completions"), &chat);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");

    // Streaming with usage: paced events, one id, one [DONE].
    let body = json!({"model": MODEL, "prompt": "hello", "max_tokens": 10, "stream": true,
                      "stream_options": {"include_usage": true}});
    let s = stream(&a, &proxy.url("/v1/completions"), &body);
    assert_eq!(s.status, 200);
    assert_eq!(s.events.last().unwrap().1, "[DONE]");
    assert_eq!(s.events.iter().filter(|(_, e)| e == "[DONE]").count(), 1);
    let ev = s.json_events();
    let ids: HashSet<&str> = ev.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let usage = ev
        .iter()
        .find(|e| e["usage"].is_object())
        .expect("usage event");
    assert_eq!(usage["usage"]["completion_tokens"], 10);
    let spread = s.events[s.events.len() - 2].0 - s.events[0].0;
    assert!(
        spread >= Duration::from_millis(100),
        "stream was buffered ({spread:?})"
    );

    // Concurrency.
    let url = proxy.url("/v1/completions");
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let a = agent();
                let b = json!({"model": MODEL, "prompt": "x y z", "max_tokens": 4, "stream": i % 2 == 0});
                if i % 2 == 0 {
                    let s = stream(&a, &url, &b);
                    assert_eq!(s.events.last().unwrap().1, "[DONE]");
                    s.request_id.unwrap()
                } else {
                    let (st, rid, v) = post(&a, &url, &b);
                    assert_eq!(st, 200, "{v}");
                    rid.unwrap()
                }
            })
        })
        .collect();
    let rids: HashSet<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(rids.len(), 40);

    // Errors stay the proxy's.
    let (st, _, v) = post(&a, &url, &json!({"model": "nope", "prompt": "x"}));
    assert_eq!(st, 404, "{v}");
    let (st, _, v) = post(&a, &url, &json!({"model": MODEL}));
    assert_eq!(st, 400, "{v}");
    let (st, m) = get_json(&proxy.url("/v1/models"));
    assert_eq!(st, 200);
    assert_eq!(m["data"][0]["id"], MODEL);
    assert!(m["data"][0]["max_model_len"].as_u64().unwrap() > 0);
}

#[test]
fn proxy_works_with_xpyd_sim_nodes() {
    let p = sim("prefill", "0");
    let d = sim("decode", "20");
    let proxy = proxy_with(&yaml(&[("prefill", &[&p]), ("decode", &[&d])]), true);
    check_pd_suite(&proxy);
    drop(proxy);

    let dual = sim("dual", "20");
    let proxy = proxy_with(&yaml(&[("dual", &[&dual])]), true);
    check_pd_suite(&proxy);
}
