//! Engine protocols: NIXL kv_transfer_params hand-off, first token from the prefill node,
//! backend and client auth, forwarded endpoints, and real clients (the `openai` SDK and the
//! vllm-bench-compatible `xpyd-bench`) against the proxy.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::Command;

fn last_body(node: &Proc, rid: &str) -> Value {
    received(node)
        .into_iter()
        .find(|r| r["request_id"] == rid)
        .unwrap_or_else(|| panic!("{rid} not received"))
}

#[test]
fn nixl_hands_the_prefill_kv_params_to_decode_streaming_and_not() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &["--require-kv-params"]);
    let proxy = proxy_with(
        &format!("{}disaggregated_mode: nixl\n", pd_yaml(&[&p], &[&d])),
        true,
    );
    let a = agent();
    for stream_it in [false, true] {
        let rid = format!("nixl-{stream_it}");
        let body = json!({"model": MODEL, "prompt": "one two three four", "max_tokens": 4, "stream": stream_it,
                          "max_completion_tokens": 4});
        let resp = a
            .post(&proxy.url("/v1/completions"))
            .set("X-Request-Id", &rid)
            .send_json(body)
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.into_string();
        let pre = last_body(&p, &rid)["body"].clone();
        assert_eq!(
            pre["kv_transfer_params"],
            json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null})
        );
        assert_eq!(pre["max_completion_tokens"], 1);
        let dec = last_body(&d, &rid)["body"].clone();
        let kv = &dec["kv_transfer_params"];
        assert_eq!(
            kv["remote_engine_id"],
            format!("dummy-{}", p.addr.port()),
            "exact prefill params: {kv}"
        );
        assert_eq!(kv["remote_port"], p.addr.port());
        assert_eq!(kv["remote_host"], "127.0.0.1");
        assert_eq!(kv["do_remote_prefill"], true);
        assert!(kv["remote_block_ids"]
            .as_array()
            .is_some_and(|b| !b.is_empty()));
        assert_eq!(dec["stream"], stream_it);
        assert_eq!(dec["max_tokens"], 4);
    }
    // Direct mode sends none (and a decode node that requires them refuses).
    let d2 = dummy("decode", &[]);
    let proxy2 = proxy_with(&pd_yaml(&[&p], &[&d2]), true);
    let resp = a
        .post(&proxy2.url("/v1/completions"))
        .set("X-Request-Id", "direct-1")
        .send_json(json!({"model": MODEL, "prompt": "x", "max_tokens": 2}))
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(last_body(&p, "direct-1")["body"]
        .get("kv_transfer_params")
        .is_none());
    assert!(last_body(&d2, "direct-1")["body"]
        .get("kv_transfer_params")
        .is_none());
}

#[test]
fn first_token_comes_from_the_prefill_node() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &["--decode-delay-per-token", "0.01"]);
    let proxy = proxy_with(
        &format!("{}generator_on_p_node: true\n", pd_yaml(&[&p], &[&d])),
        true,
    );
    let a = agent();
    for chat in [false, true] {
        let (path, body) = if chat {
            (
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}),
            )
        } else {
            (
                "/v1/completions",
                json!({"model": MODEL, "prompt": "hi", "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}),
            )
        };
        let s = stream(&a, &proxy.url(path), &body);
        assert_eq!(s.status, 200);
        assert_eq!(s.events.iter().filter(|(_, e)| e == "[DONE]").count(), 1);
        assert_eq!(s.events.last().unwrap().1, "[DONE]");
        let ev = s.json_events();
        let text = |e: &Value| -> String {
            let c = &e["choices"][0];
            if chat {
                c["delta"]["content"].as_str().unwrap_or("").to_string()
            } else {
                c["text"].as_str().unwrap_or("").to_string()
            }
        };
        assert_eq!(
            text(&ev[0]),
            " [prefill]",
            "first chunk is the prefill node's token: {:?}",
            ev[0]
        );
        let content: Vec<&Value> = ev
            .iter()
            .filter(|e| !e["choices"].as_array().unwrap().is_empty() && !text(e).is_empty())
            .collect();
        assert_eq!(content.len(), 6, "total content tokens == max_tokens");
        assert!(content[1..].iter().all(|e| !text(e).contains("[prefill]")));
        let ids: HashSet<String> = ev.iter().map(|e| e["id"].to_string()).collect();
        let created: HashSet<String> = ev.iter().map(|e| e["created"].to_string()).collect();
        assert_eq!(
            (ids.len(), created.len()),
            (1, 1),
            "one id and created across the stream"
        );
        let usage = ev.iter().find(|e| e["usage"].is_object()).expect("usage");
        assert_eq!(
            usage["usage"]["completion_tokens"], 6,
            "usage is the decode node's"
        );
        assert_eq!(
            ev.last().unwrap()["choices"].as_array().map(|c| c.len()),
            Some(0)
        );
        let finish = ev
            .iter()
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
            .collect::<Vec<_>>();
        assert_eq!(finish, vec!["length"]);
    }
    // Non-streaming is unchanged.
    let (st, _, v) = post(
        &a,
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "hi", "max_tokens": 3}),
    );
    assert_eq!(st, 200);
    assert!(!v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .contains("[prefill]"));
}

#[test]
fn backend_and_client_auth() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let yaml = format!(
        "{}openai_api_key: backend-secret\napi_keys: [\"client-a\", \"client-b\"]\n",
        pd_yaml(&[&p], &[&d])
    );
    let proxy = proxy_with(&yaml, true);
    let a = agent();
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 2});
    let r = a
        .post(&proxy.url("/v1/completions"))
        .send_json(body.clone());
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));
    let r = a
        .post(&proxy.url("/v1/completions"))
        .set("Authorization", "Bearer wrong")
        .send_json(body.clone());
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));
    let r = a
        .post(&proxy.url("/v1/completions"))
        .set("Authorization", "Bearer client-b")
        .set("X-Request-Id", "auth-1")
        .send_json(body.clone())
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        last_body(&d, "auth-1")["authorization"],
        "Bearer backend-secret"
    );
    assert_eq!(
        last_body(&p, "auth-1")["authorization"],
        "Bearer backend-secret"
    );
    assert_eq!(
        get_json(&proxy.url("/status")).0,
        200,
        "operational endpoints stay open"
    );
    // protect_status closes them too. Without openai_api_key the client's key to the proxy
    // stays here by default; taken off the deny list, it passes through.
    let proxy2 = proxy_with(
        &format!(
            "{}api_keys: [\"k\"]\nprotect_status: true\nforward_headers: {{deny: [cookie]}}\n",
            pd_yaml(&[&p], &[&d])
        ),
        false,
    );
    assert!(matches!(
        a.get(&proxy2.url("/status")).call(),
        Err(ureq::Error::Status(401, _))
    ));
    assert_eq!(
        a.get(&proxy2.url("/ping"))
            .set("Authorization", "Bearer k")
            .call()
            .unwrap()
            .status(),
        200
    );
    wait_for(
        "the proxy to be ready",
        std::time::Duration::from_secs(10),
        || {
            a.get(&proxy2.url("/health"))
                .set("Authorization", "Bearer k")
                .call()
                .is_ok()
        },
    );
    let r = a
        .post(&proxy2.url("/v1/completions"))
        .set("Authorization", "Bearer k")
        .set("X-Request-Id", "auth-2")
        .send_json(body)
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(last_body(&d, "auth-2")["authorization"], "Bearer k");
}

#[test]
fn tokenize_detokenize_embeddings_are_forwarded() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();
    let (st, _, v) = post(
        &a,
        &proxy.url("/tokenize"),
        &json!({"model": MODEL, "prompt": "hello big world"}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["count"], 5, "hello = 2 pieces, big = 1, world = 2");
    let (st, _, v) = post(
        &a,
        &proxy.url("/detokenize"),
        &json!({"model": MODEL, "tokens": [1, 2, 3]}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(v["prompt"].is_string());
    let (st, _, v) = post(
        &a,
        &proxy.url("/v1/embeddings"),
        &json!({"model": MODEL, "input": ["a b", "c"]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let (st, _, v) = post(
        &a,
        &proxy.url("/v1/embeddings"),
        &json!({"model": "nope", "input": "x"}),
    );
    assert_eq!(st, 404, "{v}");
    let (st, _, v) = post(&a, &proxy.url("/v1/rerank"), &json!({"model": MODEL}));
    assert_eq!(st, 404, "{v}");
    assert!(v["error"]["message"].is_string());
}

#[test]
fn the_official_openai_client_works_unchanged() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &["--decode-delay-per-token", "0.002"]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let venv = python_venv(&[("openai", "openai")]);
    let script = r#"
import sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
m = sys.argv[2]
r = c.completions.create(model=m, prompt="Hello there", max_tokens=5)
assert r.object == "text_completion" and r.usage.completion_tokens == 5, r
r = c.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
assert r.choices[0].message.role == "assistant" and r.choices[0].message.content, r
n, usage = 0, None
for ch in c.completions.create(model=m, prompt="Hello", max_tokens=7, stream=True, stream_options={"include_usage": True}):
    if ch.choices:
        n += 1
    if ch.usage:
        usage = ch.usage
assert n == 7 and usage.completion_tokens == 7, (n, usage)
text, usage = "", None
for ch in c.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True, stream_options={"include_usage": True}):
    if ch.choices and ch.choices[0].delta.content:
        text += ch.choices[0].delta.content
    if ch.usage:
        usage = ch.usage
assert text and usage.completion_tokens == 6, (text, usage)
print("ok")
"#;
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script, &format!("http://{}", proxy.addr), MODEL])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn xpyd_bench_sonnet_like_run_matches_the_dummy_delays() {
    // Realistic delays: 0.1 ms per prompt token of prefill, 10 ms per generated token.
    let (pre_delay, dec_delay) = (0.0001, 0.01);
    let p = dummy("prefill", &["--prefill-delay-per-token", "0.0001"]);
    let d = dummy("decode", &["--decode-delay-per-token", "0.01"]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let venv = python_venv(&[("xpyd_bench", "xpyd-bench")]);
    let report = std::env::temp_dir().join(format!("xpyd-bench-{}.json", std::process::id()));
    let out = Command::new(venv.join("bin/xpyd-bench"))
        .args([
            "--base-url",
            &format!("http://{}", proxy.addr),
            "--model",
            MODEL,
        ])
        .args([
            "--num-prompts",
            "100",
            "--request-rate",
            "10",
            "--input-len",
            "1024",
            "--output-len",
            "128",
        ])
        .args([
            "--stream",
            "--ignore-eos",
            "--disable-tqdm",
            "--no-live",
            "--seed",
            "1",
            "--json-report",
        ])
        .arg(&report)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let s = &r["summary"];
    assert_eq!(s["completed"], 100);
    assert_eq!(s["failed"], 0);
    // Expected from what the nodes computed: prefill time of the mean prompt + one decode
    // step (the KV hand-off), then one token per decode delay.
    let st = dummy_stats(&p);
    let mean_prompt = st["prompt_tokens"].as_f64().unwrap() / st["requests"].as_f64().unwrap();
    let want_ttft = (mean_prompt * pre_delay + dec_delay) * 1000.0;
    let want_tpot = dec_delay * 1000.0;
    let (ttft, tpot) = (
        s["mean_ttft_ms"].as_f64().unwrap(),
        s["mean_tpot_ms"].as_f64().unwrap(),
    );
    eprintln!("xpyd-bench: TTFT {ttft:.1} ms (dummy {want_ttft:.1}), TPOT {tpot:.2} ms (dummy {want_tpot:.2})");
    // The delays are honoured (not shortcut); how much a loaded machine adds on top is
    // speed, which docs/benchmarks.md measures and no test asserts.
    assert!(ttft >= want_ttft * 0.9, "TTFT {ttft} vs {want_ttft}");
    assert!(tpot >= want_tpot * 0.9, "TPOT {tpot} vs {want_tpot}");
}

/// A streaming completion request over raw TCP in HTTP/1.`minor`; everything until close.
fn raw_stream(proxy: &Proc, minor: u8, max_tokens: u32) -> String {
    let b = json!({"model": MODEL, "prompt": "hi", "max_tokens": max_tokens, "stream": true})
        .to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.{minor}\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    );
    raw_exchange(
        proxy.addr,
        req.as_bytes(),
        std::time::Duration::from_secs(10),
    )
}

#[test]
fn first_token_path_frames_http10_and_reports_a_stalled_decode() {
    // HTTP/1.0 cannot take chunked framing: the stream comes delimited by close.
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(
        &format!("{}generator_on_p_node: true\n", pd_yaml(&[&p], &[&d])),
        true,
    );
    let resp = raw_stream(&proxy, 0, 4);
    let (head, body) = resp.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    assert!(body.starts_with("data: "), "unframed SSE: {body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");

    // A decode node that goes silent after the first token was sent: the client gets an
    // SSE error event within the idle timeout, as on the plain relay.
    let slow = dummy("decode", &["--decode-delay-per-token", "3"]);
    let proxy = proxy_with(
        &format!(
            "{}generator_on_p_node: true\ntimeouts:\n  idle_seconds: 0.5\n",
            pd_yaml(&[&p], &[&slow])
        ),
        true,
    );
    let resp = raw_stream(&proxy, 1, 4);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("[prefill]"),
        "the first token went out: {resp}"
    );
    assert!(resp.contains("stalled mid-stream"), "{resp}");
}
