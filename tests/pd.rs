//! The P/D data path end to end: real xpyd-dummy nodes, a real proxy, a real HTTP client.

mod common;

use common::raw::ScriptedNode;
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn completion_body(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 7,
        "temperature": 0.2,
        "stream": stream,
        "stream_options": {"include_usage": true},
        "min_tokens": 2,
        "some_unknown_field": {"kept": [1, 2]},
    })
}

fn request_for(node: &Proc, rid: &str) -> Value {
    received(node)
        .into_iter()
        .find(|r| r["request_id"] == rid)
        .unwrap_or_else(|| panic!("node {} never saw request {rid}", node.addr))
}

#[test]
fn non_streaming_completions_and_chat_through_1p1d() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();

    // Completions, stream false but with stream_options present: the prefill leg must not
    // carry it; the decode leg gets the original body untouched.
    let mut body = completion_body(false);
    body.as_object_mut().unwrap().remove("stream_options");
    body["stream_options"] = json!(null);
    let (status, rid, v) = post(&a, &proxy.url("/v1/completions"), &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 7
    );
    let rid = rid.expect("X-Request-Id on the response");
    let pre = request_for(&p, &rid);
    assert_eq!(pre["body"]["max_tokens"], 1);
    assert_eq!(pre["body"]["stream"], false);
    assert!(pre["body"].get("stream_options").is_none());
    assert!(pre["body"].get("min_tokens").is_none());
    assert_eq!(
        pre["body"]["some_unknown_field"],
        body["some_unknown_field"]
    );
    assert_eq!(pre["body"]["prompt"], body["prompt"]);
    let dec = request_for(&d, &rid);
    assert_eq!(dec["body"], body, "decode leg must carry the original body");

    // Chat with the client's own request id and max_completion_tokens.
    let chat = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 5,
        "stream": false,
    });
    let resp = a
        .post(&proxy.url("/v1/chat/completions"))
        .set("X-Request-Id", "client-chosen-id-1")
        .send_json(chat.clone())
        .unwrap();
    assert_eq!(resp.header("x-request-id"), Some("client-chosen-id-1"));
    let v: Value = resp.into_json().unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 3
    );
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let pre = request_for(&p, "client-chosen-id-1");
    assert_eq!(pre["path"], "/v1/chat/completions");
    assert_eq!(pre["body"]["max_completion_tokens"], 1);
    assert_eq!(pre["body"]["max_tokens"], 1);
    assert_eq!(request_for(&d, "client-chosen-id-1")["body"], chat);

    // /v1/models lists the model with what the backends reported.
    let (s, models) = get_json(&proxy.url("/v1/models"));
    assert_eq!(s, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 131072);
}

#[test]
fn streaming_events_arrive_one_by_one() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &["--decode-delay-per-token", "0.05"]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();
    let mut body = completion_body(true);
    body["max_tokens"] = json!(20);
    let start = Instant::now();
    let s = stream(&a, &proxy.url("/v1/completions"), &body);
    assert_eq!(s.status, 200);
    let last = s.events.last().expect("events");
    assert_eq!(last.1, "[DONE]");
    assert_eq!(
        s.events.iter().filter(|(_, e)| e == "[DONE]").count(),
        1,
        "exactly one [DONE]"
    );
    let events = s.json_events();
    let content: Vec<&Value> = events
        .iter()
        .filter(|e| !e["choices"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(content.len(), 20, "one event per token");
    // Every event comes from the decode node's single response: one id throughout.
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        1,
        "a prefill event leaked into the stream: {ids:?}"
    );
    let usage = events
        .iter()
        .find(|e| e["choices"].as_array().unwrap().is_empty())
        .expect("usage event with include_usage");
    assert_eq!(usage["usage"]["completion_tokens"], 20);
    // Tokens are paced 50 ms apart by the decode node; the proxy must pass each on as it
    // comes: the first content event arrives long before the last one.
    let first_at = s.events[0].0;
    let last_content_at = s.events[19].0;
    assert!(
        last_content_at.duration_since(first_at) >= Duration::from_millis(600),
        "events were buffered: first {:?}, last {:?} after start",
        first_at - start,
        last_content_at - start
    );

    // Chat streaming: role first, finish_reason on the last content event.
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                      "max_tokens": 3, "stream": true});
    let s = stream(&a, &proxy.url("/v1/chat/completions"), &chat);
    let ev = s.json_events();
    assert_eq!(ev[0]["object"], "chat.completion.chunk");
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(ev.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[test]
fn concurrent_streams_and_requests_all_succeed_with_unique_ids() {
    let p = dummy("prefill", &[]);
    let d1 = dummy("decode", &["--decode-delay-per-token", "0.002"]);
    let d2 = dummy("decode", &["--decode-delay-per-token", "0.002"]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d1, &d2]), true);
    let url_c = proxy.url("/v1/completions");
    let mut handles = Vec::new();
    for i in 0..250 {
        let url = url_c.clone();
        handles.push(std::thread::spawn(move || {
            let a = agent();
            if i < 50 {
                let mut b = completion_body(true);
                b["max_tokens"] = json!(16);
                let s = stream(&a, &url, &b);
                assert_eq!(s.status, 200);
                assert_eq!(s.events.last().unwrap().1, "[DONE]");
                {
                    let id = s.json_events()[0]["id"].as_str().unwrap().to_string();
                    (s.request_id.unwrap(), id)
                }
            } else {
                let (status, rid, v) = post(&a, &url, &completion_body(false));
                assert_eq!(status, 200, "{v}");
                (rid.unwrap(), v["id"].as_str().unwrap().to_string())
            }
        }));
    }
    let results: Vec<(String, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let rids: HashSet<&String> = results.iter().map(|r| &r.0).collect();
    let ids: HashSet<&String> = results.iter().map(|r| &r.1).collect();
    assert_eq!(rids.len(), 250, "request ids must be unique");
    assert_eq!(ids.len(), 250, "completion ids must be unique");
    // The default (load balanced) policy spread the decode legs over both nodes. It follows
    // load, not turns: a node starved of CPU on a busy machine rightly gets fewer, so the
    // bound only rules out one node taking (nearly) everything.
    let n1 = dummy_stats(&d1)["requests"].as_u64().unwrap();
    let n2 = dummy_stats(&d2)["requests"].as_u64().unwrap();
    assert_eq!(n1 + n2, 250);
    assert!(n1 >= 50 && n2 >= 50, "uneven spread: {n1} / {n2}");
}

#[test]
fn long_prompt_and_large_body_go_through() {
    let p = dummy("prefill", &["--max-model-len", "4000000"]);
    let d = dummy("decode", &["--max-model-len", "4000000"]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();
    // 12,000 tokens by the dummy's count (one token per short word).
    let prompt = vec!["tok"; 12_000].join(" ");
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
    let (status, _, v) = post(&a, &proxy.url("/v1/completions"), &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 12_000);
    // A 4 MiB body (long-context chat).
    let big = "x".repeat(4 * 1024 * 1024);
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": big}], "max_tokens": 2});
    let (status, rid, v) = post(&a, &proxy.url("/v1/chat/completions"), &body);
    assert_eq!(status, 200, "{v}");
    let dec = received(&d)
        .into_iter()
        .find(|r| r["request_id"] == rid.clone().unwrap())
        .unwrap();
    assert_eq!(
        dec["body"]["messages"][0]["content"]
            .as_str()
            .unwrap()
            .len(),
        4 * 1024 * 1024
    );
}

#[test]
fn client_disconnect_cancels_the_decode_leg() {
    hang_up_after_events(3, &[], "");
}

/// Late in a stream the stream's relay runs in a task of its own and the request only watches
/// the client's read (`proxy::relay_task`, `NextRead::unless_closed`). The stream then goes
/// quiet, so no write to the client can fail: the watch alone must notice the hang-up, and
/// the relay's task must be ended for the legs to be cancelled.
#[test]
fn client_disconnect_in_a_quiet_stretch_late_in_a_stream_cancels_the_decode_leg() {
    hang_up_after_events(20, &["--pause-mid-stream", "20"], "");
}

/// The same with the first token from the prefill node (`generator_on_p_node`): the rewritten
/// decode stream is relayed by a task of its own too, and the hang-up must end it.
#[test]
fn client_disconnect_cancels_the_decode_leg_of_a_first_token_stream() {
    hang_up_after_events(3, &[], "generator_on_p_node: true\n");
}

#[test]
fn client_disconnect_in_a_quiet_stretch_of_a_first_token_stream_cancels_the_decode_leg() {
    hang_up_after_events(
        20,
        &["--pause-mid-stream", "20"],
        "generator_on_p_node: true\n",
    );
}

/// Streams a long P/D completion, hangs up after `events` token events, and waits for the
/// decode node to see the cancel. `decode_args`: more options of the decode node;
/// `more_yaml`: more lines of the proxy's configuration.
fn hang_up_after_events(events: usize, decode_args: &[&str], more_yaml: &str) {
    let p = dummy("prefill", &[]);
    let d = dummy(
        "decode",
        &[&["--decode-delay-per-token", "0.02"], decode_args].concat(),
    );
    let proxy = proxy_with(&format!("{}{more_yaml}", pd_yaml(&[&p], &[&d])), true);
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    let body = serde_json::to_vec(
        &json!({"model": MODEL, "prompt": "hi", "max_tokens": 500, "stream": true}),
    )
    .unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    // Wait for the token events, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(6).filter(|w| w == b"data: ").count() < events {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(dummy_stats(&d)["running"], 1);
    drop(s);
    // 500 tokens 20 ms apart: the stream would run 10 s by itself; the node sees the cancel
    // long before.
    wait_for(
        "the decode node to see the cancel",
        Duration::from_secs(8),
        || dummy_stats(&d)["aborted"] == 1,
    );
    assert_eq!(dummy_stats(&d)["running"], 0);
    // The proxy no longer counts the request on the decode node: not as a request, and none
    // of its 500 decode tokens (the relay that held them ended with the stream).
    wait_for(
        "the cancelled request to leave the decode node's counts",
        Duration::from_secs(8),
        || {
            let (_, v) = get_json(&proxy.url("/status/instances"));
            let Some(i) = v["instances"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["address"] == d.addr.to_string()))
            else {
                return false;
            };
            i["active_requests"] == 0 && i["in_flight_decode_tokens"] == 0
        },
    );
    // The proxy keeps serving.
    let (status, _, _) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &completion_body(false),
    );
    assert_eq!(status, 200);
}

#[test]
fn client_disconnect_during_prefill_cancels_the_prefill_leg() {
    // Prefill would take 30 s (1000 prompt words × 30 ms); the client leaves while it runs.
    let p = dummy("prefill", &["--prefill-delay-per-token", "0.03"]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    let prompt = vec!["w"; 1000].join(" ");
    let body =
        serde_json::to_vec(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 5})).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(&body).unwrap();
    wait_for("the prefill to start", Duration::from_secs(10), || {
        dummy_stats(&p)["running"] == 1
    });
    drop(s);
    wait_for(
        "the prefill leg to be abandoned",
        Duration::from_secs(15),
        || dummy_stats(&p)["aborted"] == 1,
    );
    // The request is over once the proxy counted it (499: the client left).
    wait_for(
        "the proxy to count the request",
        Duration::from_secs(10),
        || {
            metric(
                &proxy,
                "proxy_requests_total{endpoint=\"/v1/completions\",status=\"499\"}",
            ) == 1.0
        },
    );
    assert_eq!(
        dummy_stats(&d)["requests"],
        0,
        "decode leg must never start"
    );
}

#[test]
fn dual_instances_serve_in_one_pass() {
    let d1 = dummy("dual", &[]);
    let d2 = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!("{}scheduling: roundrobin\n", dual_yaml(&[&d1, &d2])),
        true,
    );
    let a = agent();
    for _ in 0..4 {
        let (status, _, v) = post(&a, &proxy.url("/v1/completions"), &completion_body(false));
        assert_eq!(status, 200, "{v}");
    }
    let s = stream(&a, &proxy.url("/v1/completions"), &completion_body(true));
    assert_eq!(s.events.last().unwrap().1, "[DONE]");
    // One pass: every request reached a dual node exactly once, with its body unchanged.
    let all: Vec<Value> = received(&d1).into_iter().chain(received(&d2)).collect();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|r| r["body"]["max_tokens"] == 7));
    // Round robin alternates: 5 requests split 3/2.
    let (n1, n2) = (received(&d1).len(), received(&d2).len());
    assert_eq!(n1.max(n2), 3, "{n1} / {n2}");
    assert_eq!(n1.min(n2), 2, "{n1} / {n2}");
}

#[test]
fn errors_are_openai_shaped() {
    let p = dummy("prefill", &["--max-model-len", "100"]);
    let d = dummy("decode", &["--max-model-len", "100"]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();
    let url = proxy.url("/v1/completions");
    let check = |(status, _, v): (u16, Option<String>, Value), want: u16| {
        assert_eq!(status, want, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5, "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        assert!(
            v["error"].get("param").is_some() && v["error"].get("code").is_some(),
            "{v}"
        );
        v
    };
    check(post_raw(&a, &url, "text/plain", b"{\"prompt\":\"x\"}"), 415);
    check(
        post_raw(&a, &url, "application/json", b"{\"prompt\": "),
        400,
    );
    let v = check(post(&a, &url, &json!({"model": MODEL})), 400);
    assert_eq!(v["error"]["param"], "prompt");
    assert!(v["error"]["message"].as_str().unwrap().contains("prompt"));
    let v = check(
        post(
            &a,
            &proxy.url("/v1/chat/completions"),
            &json!({"model": MODEL}),
        ),
        400,
    );
    assert_eq!(v["error"]["param"], "messages");
    let v = check(
        post(&a, &url, &json!({"model": "nope", "prompt": "x"})),
        404,
    );
    assert_eq!(v["error"]["code"], "model_not_found");
    check(post(&a, &proxy.url("/v1/nothing"), &json!({})), 404);
    // A backend's own 4xx is relayed: a prompt over the prefill node's context length
    // (the decode leg never starts) ...
    let prompt = vec!["w"; 150].join(" ");
    let v = check(
        post(
            &a,
            &url,
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 5}),
        ),
        400,
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length"));
    assert_eq!(dummy_stats(&d)["requests"], 0);
    // ... and a completion too long for the decode node (prefill only makes one token).
    let v = check(
        post(
            &a,
            &url,
            &json!({"model": MODEL, "prompt": "w w", "max_tokens": 500}),
        ),
        400,
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("500 in the completion"));
    assert_eq!(dummy_stats(&d)["requests"], 1);
}

#[test]
fn gated_until_every_instance_answered() {
    let dead_addr = dead_address();
    let d = dummy("decode", &[]);
    let yaml = format!(
        "model: {MODEL}\nprefill: [\"{dead_addr}\"]\ndecode: [\"{}\"]\n",
        d.addr
    );
    let proxy = proxy_with(&yaml, false);
    let a = agent();
    wait_for(
        "the dead node's probe to fail",
        Duration::from_secs(10),
        || {
            get_json(&proxy.url("/status/instances")).1["instances"]
                .as_array()
                .is_some_and(|l| l.iter().any(|i| i["status"] == "unhealthy"))
        },
    );
    let (status, body) = get_json(&proxy.url("/health"));
    assert_eq!(status, 503);
    let inst = body["instances"].as_array().unwrap();
    assert!(inst.iter().any(|i| i["status"] == "unhealthy"));
    let (status, _, v) = post(&a, &proxy.url("/v1/completions"), &completion_body(false));
    assert_eq!(status, 503);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("waiting for backend nodes"));
    assert_eq!(get_json(&proxy.url("/ping")).0, 200);
    // The prefill node comes up on that port: the proxy opens.
    let _p = dummy_at(dead_addr.port(), "prefill", &[]);
    wait_for(
        "the proxy to open after the node came up",
        Duration::from_secs(10),
        || get_json(&proxy.url("/health")).0 == 200,
    );
    let (status, _, _) = post(&a, &proxy.url("/v1/completions"), &completion_body(false));
    assert_eq!(status, 200);
}

/// A prefill answer as an engine sends it (one token, not streamed).
fn prefill_answer() -> String {
    json!({"id": "cmpl-p", "object": "text_completion", "created": 1, "model": MODEL,
           "choices": [{"index": 0, "text": " P", "finish_reason": "length"}],
           "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    .to_string()
}

fn raw_pd_proxy(prefill: &ScriptedNode, decode: &Proc, extra: &str) -> Proc {
    proxy_with(
        &format!(
            "model: {MODEL}\nprefill: [\"{}\"]\ndecode: [\"{}\"]\n{extra}",
            prefill.addr, decode.addr
        ),
        true,
    )
}

#[test]
fn a_prefill_answer_that_arrives_in_pieces_is_read_whole() {
    // The head first, then the body in two chunks with pauses: the body is not in the head's
    // read, so the proxy waits for the rest and reads it to its end (the connection is pooled
    // and serves the next request). A refusal is passed to the client whole.
    let refusal = json!({"error": {"message": "prompt refused by the prefill node", "type": "BadRequestError", "code": 400}});
    let refused = refusal.to_string();
    let prefill = ScriptedNode::start(move |req, s| {
        let refuse = String::from_utf8_lossy(&req.body).contains("refuse me");
        let (status, body) = if refuse {
            ("400 Bad Request", refused.clone())
        } else {
            ("200 OK", prefill_answer())
        };
        let (a, b) = body.split_at(body.len() / 2);
        let _ = s.write_all(
            format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
        );
        std::thread::sleep(Duration::from_millis(150));
        let _ = s.write_all(format!("{:x}\r\n{a}\r\n", a.len()).as_bytes());
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(format!("{:x}\r\n{b}\r\n0\r\n\r\n", b.len()).as_bytes())
            .is_ok()
    });
    let d = dummy("decode", &[]);
    let proxy = raw_pd_proxy(&prefill, &d, "");
    let a = agent();
    for _ in 0..2 {
        let (status, rid, v) = post(&a, &proxy.url("/v1/completions"), &completion_body(false));
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["usage"]["completion_tokens"], 7,
            "the decode node's answer: {v}"
        );
        request_for(&d, &rid.expect("X-Request-Id"));
    }
    let mut body = completion_body(false);
    body["prompt"] = json!("refuse me");
    let (status, _, v) = post(&a, &proxy.url("/v1/completions"), &body);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v, refusal, "the prefill node's answer, whole");
}

#[test]
fn a_prefill_node_that_stalls_mid_answer_is_a_504_after_the_idle_timeout() {
    // A head and part of its body, then nothing: the rest is waited for `idle_seconds`.
    let prefill = ScriptedNode::start(|_, s| {
        let body = prefill_answer();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(format!("{head}{}", &body[..10]).as_bytes());
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        false
    });
    let d = dummy("decode", &[]);
    let proxy = raw_pd_proxy(&prefill, &d, "timeouts:\n  idle_seconds: 0.5\n");
    let start = Instant::now();
    let (status, _, v) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &completion_body(false),
    );
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout_error", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("stalled mid-response"), "{v}");
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "{:?}",
        start.elapsed()
    );
    assert!(
        received(&d).is_empty(),
        "no decode leg after a failed prefill"
    );
}

#[test]
fn each_request_on_a_kept_alive_connection_keeps_its_own_id() {
    // A client naming each request (as `vllm bench serve` does) sends heads that differ only
    // in the id and the body's length: the proxy recognises the head from the one before,
    // and must still carry each request's own id to both nodes and back.
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();
    for (i, prompt) in ["one two", "one six", "one two three"].iter().enumerate() {
        let rid = format!("bench-{i}");
        let resp = a
            .post(&proxy.url("/v1/completions"))
            .set("X-Request-Id", &rid)
            .send_json(json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}))
            .unwrap();
        assert_eq!(resp.header("x-request-id"), Some(rid.as_str()));
        let _ = resp.into_string();
        for node in [&p, &d] {
            request_for(node, &rid);
        }
    }
}
