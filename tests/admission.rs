//! Admission control (docs/resilience.md): a real proxy in front of real xpyd-dummy nodes,
//! driven by real HTTP clients — the concurrency limit, FIFO queue, queue timeout, a client
//! leaving while queued, the token bucket, per-key shares, engine-aware shedding.

mod common;

use common::raw::ScriptedNode;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// A dual node taking 10 ms per generated token: `max_tokens` decides how long a request
/// holds its slot.
fn slow_node() -> Proc {
    dummy("dual", &["--decode-delay-per-token", "0.01"])
}

/// The model's `admission` object in `/status`.
fn admission(proxy: &Proc) -> Value {
    get_json(&proxy.url("/status")).1["models"][0]["admission"].clone()
}

fn in_flight(proxy: &Proc) -> u64 {
    admission(proxy)["state"]["in_flight"].as_u64().unwrap_or(0)
}

fn queued(proxy: &Proc) -> u64 {
    admission(proxy)["state"]["queued"].as_u64().unwrap_or(0)
}

/// Sends a completion on a raw connection and leaves it waiting: the request holds its
/// slot (or its place in the queue) until the connection is dropped.
fn hold(proxy: &Proc, max_tokens: u64, key: Option<&str>) -> TcpStream {
    let body = json!({"model": MODEL, "prompt": "hold", "max_tokens": max_tokens}).to_string();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Reads the response of a `hold` connection (status line, then all until the body ends).
fn read_answer(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|l| body.len() >= l) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

fn complete(proxy: &Proc, prompt: &str, max_tokens: u64, key: Option<&str>) -> Answer {
    let mut req = agent()
        .post(&proxy.url("/v1/completions"))
        .set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp =
        match req.send_json(json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("request failed: {e}"),
        };
    Answer {
        status: resp.status(),
        retry_after: resp.header("retry-after").and_then(|v| v.parse().ok()),
        body: resp.into_json().unwrap_or(Value::Null),
    }
}

fn assert_429(a: &Answer, reason_words: &str) {
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(
        a.retry_after.is_some_and(|s| s >= 1),
        "Retry-After: {:?}",
        a.retry_after
    );
    let e = &a.body["error"];
    assert_eq!(e["code"], "rate_limit_exceeded", "{}", a.body);
    assert!(
        e["type"].is_string() && e.get("param").is_some(),
        "{}",
        a.body
    );
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(reason_words),
        "`{msg}` should say `{reason_words}`"
    );
}

#[test]
fn over_the_limit_without_a_queue_is_answered_429_at_once() {
    let node = slow_node();
    let proxy = proxy_with(
        &format!(
            "{}admission:\n  max_concurrent_requests: 2\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    let held: Vec<_> = (0..2).map(|_| hold(&proxy, 3000, None)).collect();
    wait_for("two requests in flight", WAIT, || in_flight(&proxy) == 2);
    let a = complete(&proxy, "third", 1, None);
    assert_429(&a, "max_concurrent_requests");
    assert_eq!(
        metric(
            &proxy,
            "proxy_admission_rejected_total{model=\"test-model\",reason=\"concurrency\"}"
        ),
        1.0
    );
    // Slots come back when the holders leave; the next request goes through.
    drop(held);
    wait_for("the slots to be released", WAIT, || in_flight(&proxy) == 0);
    assert_eq!(complete(&proxy, "fourth", 1, None).status, 200);
}

#[test]
fn queued_requests_are_admitted_in_arrival_order() {
    let node = slow_node();
    // Two workers: the kernel spreads the connections, the order holds across them.
    let proxy = proxy_with_workers(
        &format!(
            "{}admission:\n  max_concurrent_requests: 1\n  queue_size: 10\n  queue_timeout_seconds: 60\n",
            dual_yaml(&[&node])
        ),
        2,
    );
    let first = hold(&proxy, 3000, None);
    wait_for("the slot to be taken", WAIT, || in_flight(&proxy) == 1);
    let mut waiting = Vec::new();
    for i in 0..4 {
        let p = format!("{{\"model\":\"{MODEL}\",\"prompt\":\"queued {i}\",\"max_tokens\":1}}");
        let mut s = TcpStream::connect(proxy.addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{p}",
            p.len()
        )
        .unwrap();
        waiting.push(s);
        wait_for("the request to queue", WAIT, || queued(&proxy) == i + 1);
    }
    drop(first);
    for s in waiting {
        assert!(read_answer(s).starts_with("HTTP/1.1 200"));
    }
    let order: Vec<String> = received(&node)
        .iter()
        .filter_map(|r| r["body"]["prompt"].as_str().map(str::to_string))
        .filter(|p| p.starts_with("queued"))
        .collect();
    assert_eq!(order, ["queued 0", "queued 1", "queued 2", "queued 3"]);
    let hist = metric(
        &proxy,
        "proxy_admission_queue_seconds_count{model=\"test-model\"}",
    );
    assert_eq!(hist, 4.0);
}

#[test]
fn a_request_waiting_past_the_queue_timeout_gets_429_not_a_late_504() {
    let node = slow_node();
    let proxy = proxy_with(
        &format!(
            "{}admission:\n  max_concurrent_requests: 1\n  queue_size: 4\n  queue_timeout_seconds: 0.5\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    let _held = hold(&proxy, 3000, None);
    wait_for("the slot to be taken", WAIT, || in_flight(&proxy) == 1);
    let t = Instant::now();
    let a = complete(&proxy, "waits", 1, None);
    // The configured timeout fired, not before it; that it fired rather than the held
    // request's end (3 s) admitting this one is the 429 below.
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    assert_429(&a, "queue_timeout_seconds");
    assert_eq!(queued(&proxy), 0);
    assert_eq!(admission(&proxy)["state"]["rejected"]["queue_timeout"], 1);
}

#[test]
fn a_client_leaving_while_queued_is_taken_out_of_the_queue() {
    let node = slow_node();
    let proxy = proxy_with(
        &format!(
            "{}admission:\n  max_concurrent_requests: 1\n  queue_size: 1\n  queue_timeout_seconds: 60\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    let held = hold(&proxy, 3000, None);
    wait_for("the slot to be taken", WAIT, || in_flight(&proxy) == 1);
    let leaver = hold(&proxy, 1, None);
    wait_for("the request to queue", WAIT, || queued(&proxy) == 1);
    // The queue is full now: another request is refused at once.
    assert_429(&complete(&proxy, "no room", 1, None), "queue is full");
    drop(leaver);
    wait_for("the leaver to leave the queue", WAIT, || {
        queued(&proxy) == 0
    });
    // Its place is free again, and it was never sent to the node.
    let waiter = hold(&proxy, 1, None);
    wait_for("the next request to queue", WAIT, || queued(&proxy) == 1);
    drop(held);
    assert!(read_answer(waiter).starts_with("HTTP/1.1 200"));
    let prompts: Vec<Value> = received(&node)
        .iter()
        .map(|r| r["body"]["prompt"].clone())
        .collect();
    assert_eq!(prompts.len(), 2, "{prompts:?}");
}

#[test]
fn the_token_bucket_answers_429_with_the_time_to_wait() {
    let node = dummy("dual", &[]);
    // 10 tokens/s, bucket of 100: a request of ~90 tokens passes, the next one needs ~8 s.
    let proxy = proxy_with(
        &format!(
            "{}admission:\n  tokens_per_second: 10\n  token_burst: 100\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    assert_eq!(complete(&proxy, "hi", 90, None).status, 200);
    let a = complete(&proxy, "hi", 90, None);
    assert_429(&a, "token rate");
    assert!(a.retry_after.is_some_and(|s| s >= 2), "{:?}", a.retry_after);
    let state = admission(&proxy)["state"].clone();
    assert_eq!(state["rejected"]["token_rate"], 1);
    // Token usage as the engine reported it, for the admitted request only.
    assert_eq!(state["completion_tokens"], 90, "{state}");
    assert!(
        state["prompt_tokens"].as_u64().is_some_and(|n| n > 0),
        "{state}"
    );
    assert_eq!(
        metric(
            &proxy,
            "proxy_tokens_total{model=\"test-model\",key=\"\",kind=\"completion\"}"
        ),
        90.0
    );
}

#[test]
fn one_api_key_cannot_take_another_keys_share() {
    let node = slow_node();
    // Two keys, equal shares: one slot and two queue places each.
    let proxy = proxy_with(
        &format!(
            "{}api_keys: [key-a, key-b]\nadmission:\n  max_concurrent_requests: 2\n  queue_size: 4\n  queue_timeout_seconds: 60\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    let _a0 = hold(&proxy, 3000, Some("key-a"));
    wait_for("key-a's slot to be taken", WAIT, || in_flight(&proxy) == 1);
    // key-a's next requests wait although a model slot is free: it is at its share.
    let _a1 = hold(&proxy, 1, Some("key-a"));
    let _a2 = hold(&proxy, 1, Some("key-a"));
    wait_for("key-a's requests to queue", WAIT, || queued(&proxy) == 2);
    assert_eq!(in_flight(&proxy), 1);
    // Its share of the queue is full too, though the model's queue has room.
    assert_429(&complete(&proxy, "a3", 1, Some("key-a")), "share");
    // key-b is not held back by key-a's backlog.
    let b = complete(&proxy, "b0", 1, Some("key-b"));
    assert_eq!(b.status, 200, "{}", b.body);
    let keys = admission(&proxy)["keys"].clone();
    let a = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "api_keys[0]")
        .unwrap();
    assert_eq!(a["queued"], 2, "{keys}");
    assert_eq!(a["rejected"]["queue_full"], 1, "{keys}");
    let b = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "api_keys[1]")
        .unwrap();
    assert_eq!(b["completion_tokens"], 1, "{keys}");
}

/// A node whose /metrics say it has `waiting` requests queued.
fn busy_node(waiting: u32) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/engine/busy_node.py"
    ))
    .args([MODEL, "4", &waiting.to_string(), "0.9"]);
    spawn_listening(cmd)
}

#[test]
fn requests_wait_in_the_proxy_while_every_engine_has_a_long_queue() {
    let busy = busy_node(50);
    let proxy = proxy_with(
        &format!(
            "{}engine_metrics:\n  interval_seconds: 0.1\nadmission:\n  engine_waiting_threshold: 10\n  queue_size: 4\n  queue_timeout_seconds: 0.5\n",
            dual_yaml(&[&busy])
        ),
        true,
    );
    wait_for("the node's queue to be scraped", WAIT, || {
        get_json(&proxy.url("/status/instances")).1["instances"][0]["engine"]["scraped"] == true
    });
    // Every engine is saturated: the request waits here, then gets the 429.
    let a = complete(&proxy, "shed", 1, None);
    assert_429(&a, "queue_timeout_seconds");
    let served = get_json(&busy.url("/stats")).1["requests"]
        .as_u64()
        .unwrap();
    assert_eq!(served, 0, "the request reached the saturated engine");

    // With one engine below the threshold, requests go straight through.
    let idle = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!(
            "{}engine_metrics:\n  interval_seconds: 0.1\nadmission:\n  engine_waiting_threshold: 10\n  queue_size: 4\n  queue_timeout_seconds: 0.5\n",
            dual_yaml(&[&busy, &idle])
        ),
        true,
    );
    wait_for("both nodes to be scraped", WAIT, || {
        let v = get_json(&proxy.url("/status/instances")).1;
        v["instances"]
            .as_array()
            .is_some_and(|a| a.iter().all(|i| i["engine"]["scraped"] == true))
    });
    for i in 0..5 {
        let a = complete(&proxy, &format!("go {i}"), 1, None);
        assert_eq!(a.status, 200, "{}", a.body);
    }
}

/// The two halves of a response: the node writes the first, waits, writes the second, so
/// the proxy reads the `usage` object in two pieces.
fn split_node(first: String, second: String) -> ScriptedNode {
    ScriptedNode::start(move |_, s| {
        let ok = s.write_all(first.as_bytes()).is_ok() && s.flush().is_ok();
        // Not a synchronisation: only makes two upstream reads likely (one read of both
        // halves would pass without testing the split).
        std::thread::sleep(Duration::from_millis(150));
        ok && s.write_all(second.as_bytes()).is_ok()
    })
}

/// Streams a completion of `max_tokens` that asks for its usage (`include_usage`); answered 200.
fn stream_with_usage(proxy: &Proc, max_tokens: u64) {
    let req = json!({"model": MODEL, "prompt": "hi", "max_tokens": max_tokens, "stream": true,
        "stream_options": {"include_usage": true}});
    let st = stream(&agent(), &proxy.url("/v1/completions"), &req);
    assert_eq!(st.status, 200);
}

fn tokens_counted(proxy: &Proc, kind: &str) -> f64 {
    metric(
        proxy,
        &format!("proxy_tokens_total{{model=\"{MODEL}\",key=\"\",kind=\"{kind}\"}}"),
    )
}

#[test]
fn usage_split_across_upstream_reads_is_counted_streamed_and_not() {
    // Not streamed: a Content-Length body cut inside the usage object.
    let body = json!({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
        "choices": [{"index": 0, "text": "hi", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 12, "total_tokens": 15, "completion_tokens": 3}})
    .to_string();
    let cut = body.find("completion_tokens").unwrap() - 4;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let node = split_node(format!("{head}{}", &body[..cut]), body[cut..].to_string());
    let proxy = proxy_with(
        &format!("model: {MODEL}\ndual: [\"{}\"]\n", node.addr),
        true,
    );
    let a = complete(&proxy, "hi", 3, None);
    assert_eq!(a.status, 200, "{}", a.body);
    wait_for("the split usage to be counted", WAIT, || {
        tokens_counted(&proxy, "prompt") == 12.0 && tokens_counted(&proxy, "completion") == 3.0
    });

    // Streamed: chunked SSE, the usage event cut across two chunks.
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let event = format!(
        "data: {}\n\n",
        json!({"id": "cmpl-2", "object": "text_completion", "model": MODEL, "choices": [],
            "usage": {"prompt_tokens": 7, "total_tokens": 47, "completion_tokens": 40}})
    );
    let cut = event.find("prompt_tokens").unwrap() + 5;
    let text = format!(
        "data: {}\n\n",
        json!({"id": "cmpl-2", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": "a", "finish_reason": null}], "usage": null})
    );
    let node = split_node(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{}{}",
            chunk(&text),
            chunk(&event[..cut])
        ),
        format!("{}{}0\r\n\r\n", chunk(&event[cut..]), chunk("data: [DONE]\n\n")),
    );
    let proxy = proxy_with(
        &format!("model: {MODEL}\ndual: [\"{}\"]\n", node.addr),
        true,
    );
    stream_with_usage(&proxy, 40);
    wait_for("the split streamed usage to be counted", WAIT, || {
        tokens_counted(&proxy, "prompt") == 7.0 && tokens_counted(&proxy, "completion") == 40.0
    });
}

/// With the first token from the prefill node (`generator_on_p_node`) the decode stream is
/// rewritten event by event; its usage event is still counted.
#[test]
fn a_first_token_streams_usage_is_counted() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(
        &format!("{}generator_on_p_node: true\n", pd_yaml(&[&p], &[&d])),
        true,
    );
    stream_with_usage(&proxy, 5);
    wait_for("the first-token stream's usage to be counted", WAIT, || {
        tokens_counted(&proxy, "completion") == 5.0 && tokens_counted(&proxy, "prompt") > 0.0
    });
}

#[test]
fn a_request_refused_by_its_keys_token_share_spends_none_of_the_models_tokens() {
    let node = dummy("dual", &[]);
    // A bucket of 200 tokens refilled at 1 token/s; each key's share: 100.
    let proxy = proxy_with(
        &format!(
            "{}api_keys: [key-a, key-b]\nadmission:\n  tokens_per_second: 1\n  token_burst: 200\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    // ~91 tokens each (prompt + max_tokens): key-a's first passes, its second is over its
    // share.
    assert_eq!(complete(&proxy, "hi", 90, Some("key-a")).status, 200);
    assert_429(&complete(&proxy, "hi", 90, Some("key-a")), "share");
    // Had the refused one spent the model's tokens, ~18 would be left; ~109 are.
    let b = complete(&proxy, "hi", 90, Some("key-b"));
    assert_eq!(b.status, 200, "{}", b.body);
    let state = admission(&proxy)["state"].clone();
    assert_eq!(state["rejected"]["token_rate"], 1, "{state}");
}

#[test]
fn keys_dropped_by_a_reload_lose_their_counters_and_the_others_are_renumbered() {
    let node = dummy("dual", &[]);
    let base = format!(
        "{}{FAST_PROBES}admin_api_key: adm\nadmission:\n  max_concurrent_requests: 4\n",
        dual_yaml(&[&node])
    );
    let path = write_config(&format!("{base}api_keys: [key-a, key-b]\n"));
    let proxy = proxy_on(&path, true);
    assert_eq!(complete(&proxy, "a", 2, Some("key-a")).status, 200);
    assert_eq!(complete(&proxy, "b", 3, Some("key-b")).status, 200);
    let labels = |proxy: &Proc| -> Vec<(String, u64)> {
        admission(proxy)["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["key"].as_str().unwrap().to_string(),
                    k["completion_tokens"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    wait_for("both keys' usage to be counted", WAIT, || {
        labels(&proxy) == [("api_keys[0]".into(), 2), ("api_keys[1]".into(), 3)]
    });
    std::fs::write(&path, format!("{base}api_keys: [key-b]\n")).unwrap();
    let reloaded = agent()
        .post(&proxy.url("/admin/reload"))
        .set("X-API-Key", "adm")
        .call()
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    // key-a is gone from /status and /metrics; key-b keeps its counters under its new name.
    assert_eq!(labels(&proxy), [("api_keys[0]".to_string(), 3)]);
    let text = agent()
        .get(&proxy.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(!text.contains("api_keys[1]"), "{text}");
    assert!(
        text.contains(
            "proxy_tokens_total{model=\"test-model\",key=\"api_keys[0]\",kind=\"completion\"} 3"
        ),
        "{text}"
    );
}
