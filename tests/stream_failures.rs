//! A response that fails after it started never looks like success, on every relay path:
//! an SSE stream ends with an OpenAI-shaped error event and no `[DONE]`, a chunked body
//! without its last chunk, then the connection closes; a failure before anything reached
//! the client is a 502. Each failure counts in `proxy_instance_errors_total`, against the
//! instance's circuit, and in the request metrics with its error status, not 200.
//!
//! The failing backends are raw-TCP scripts in the test process (`common::raw`).

mod common;

use common::raw::{RawRequest, ScriptedNode};
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const SSE_CHUNKED: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";

fn chunk(s: &str) -> String {
    format!("{:x}\r\n{s}\r\n", s.len())
}

fn completion_event(text: &str) -> String {
    let v = json!({"id": "cmpl-d", "object": "text_completion", "created": 1, "model": MODEL,
                   "choices": [{"index": 0, "text": text, "finish_reason": null}]});
    format!("data: {v}\n\n")
}

fn chat_event(content: &str) -> String {
    let v = json!({"id": "chatcmpl-d", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                   "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    format!("data: {v}\n\n")
}

/// Writes `bytes`, then closes the connection (a FIN) — a backend dying mid-response.
fn write_then_die(bytes: String) -> impl Fn(&RawRequest, &mut TcpStream) -> bool {
    move |_, s| {
        let _ = s.write_all(bytes.as_bytes());
        false
    }
}

/// Writes `bytes`, then says nothing more until the proxy gives up on the connection.
fn write_then_stall(bytes: String) -> impl Fn(&RawRequest, &mut TcpStream) -> bool {
    move |_, s| {
        let _ = s.write_all(bytes.as_bytes());
        let mut sink = [0u8; 1024];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        false
    }
}

/// One failure opens the circuit, which then stays open long enough to be seen.
const COUNTING: &str = "circuit_breaker:\n  failure_threshold: 1\n  timeout_duration_seconds: 120\ntimeouts:\n  idle_seconds: 0.5\n";

fn dual_proxy(node: &ScriptedNode) -> Proc {
    proxy_with(
        &format!("model: {MODEL}\ndual: [\"{}\"]\n{COUNTING}", node.addr),
        true,
    )
}

/// A 1P+1D proxy with the first token from `prefill` (`generator_on_p_node`) and the decode
/// stream from the script; `more`: more lines of its configuration.
fn first_token_proxy(prefill: &Proc, decode: &ScriptedNode, more: &str) -> Proc {
    proxy_with(
        &format!(
            "model: {MODEL}\nprefill: [\"{}\"]\ndecode: [\"{}\"]\ngenerator_on_p_node: true\n{more}",
            prefill.addr, decode.addr
        ),
        true,
    )
}

/// Sends one raw request; returns what came back and whether the proxy closed the
/// connection (rather than the read timing out).
fn exchange(proxy: &Proc, request: &str) -> (String, bool) {
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn post_request(path: &str, body: &Value, version: &str) -> String {
    let b = body.to_string();
    format!(
        "POST {path} {version}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
}

fn stream_request(path: &str, version: &str) -> String {
    let body = if path.contains("chat") {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": true})
    } else {
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 8, "stream": true})
    };
    post_request(path, &body, version)
}

/// The JSON of the SSE error event that ends `text`, which must be its last event.
fn final_error_event(text: &str) -> Value {
    let body = text.trim_end();
    let start = body
        .rfind("data: ")
        .unwrap_or_else(|| panic!("no event: {text}"));
    let line = body[start + 6..].lines().next().unwrap();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("bad event: {line}"));
    assert!(
        v["error"]["message"].is_string() && v["error"]["type"].is_string(),
        "the last event is not an OpenAI-shaped error: {v}"
    );
    assert!(v["error"].get("param").is_some(), "param missing: {v}");
    v
}

fn metrics_text(proxy: &Proc) -> String {
    ureq::get(&proxy.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The failure was counted once against `node` (as `error_type`), opened its circuit, and
/// the request is recorded with `status`, never as 200.
fn assert_counted(proxy: &Proc, node: SocketAddr, error_type: &str, endpoint: &str, status: u16) {
    let instance = format!("instance=\"{node}\"");
    let et = format!("error_type=\"{error_type}\"");
    let ep = format!("endpoint=\"{endpoint}\"");
    let st = format!("status=\"{status}\"");
    wait_for(
        "the failure in the instance errors and the request metrics",
        Duration::from_secs(10),
        || {
            let m = metrics_text(proxy);
            metric_sum(&m, "proxy_instance_errors_total{", &[&instance, &et]) == 1.0
                && metric_sum(&m, "proxy_requests_total{", &[&ep, &st]) == 1.0
        },
    );
    let m = metrics_text(proxy);
    assert_eq!(
        metric_sum(&m, "proxy_requests_total{", &[&ep, "status=\"200\""]),
        0.0,
        "a failed response was recorded as 200:\n{m}"
    );
    let (_, v) = get_json(&proxy.url("/status/instances"));
    let inst = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["address"] == node.to_string())
        .unwrap_or_else(|| panic!("{node} not in {v}"))
        .clone();
    assert_eq!(
        inst["circuit"], "open",
        "the failure did not count against the circuit: {inst}"
    );
}

#[test]
fn plain_relay_sse_stream_ends_with_an_error_event_when_the_backend_dies() {
    let script = format!(
        "{SSE_CHUNKED}{}{}",
        chunk(&completion_event(" a")),
        chunk(&completion_event(" b"))
    );
    let node = ScriptedNode::start(write_then_die(script));
    let proxy = dual_proxy(&node);
    let (text, closed) = exchange(&proxy, &stream_request("/v1/completions", "HTTP/1.1"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\" a\"") && text.contains("\" b\""),
        "events relayed: {text}"
    );
    let err = final_error_event(&text);
    assert_eq!(err["error"]["type"], "upstream_error", "{err}");
    assert_eq!(err["error"]["code"], 502, "{err}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a last chunk says the body is complete: {text}"
    );
    assert!(closed, "the proxy must close the connection: {text}");
    assert_counted(&proxy, node.addr, "closed", "/v1/completions", 502);
}

#[test]
fn first_token_path_ends_with_an_error_event_when_the_decode_node_dies() {
    let prefill = dummy("prefill", &[]);
    let script = format!(
        "{SSE_CHUNKED}{}{}{}",
        chunk(&chat_event("")),
        chunk(&chat_event(" one")),
        chunk(&chat_event(" two"))
    );
    let decode = ScriptedNode::start(write_then_die(script));
    let proxy = first_token_proxy(&prefill, &decode, COUNTING);
    let (text, closed) = exchange(&proxy, &stream_request("/v1/chat/completions", "HTTP/1.1"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains(" two"),
        "the decode stream was relayed: {text}"
    );
    let err = final_error_event(&text);
    assert_eq!(err["error"]["code"], 502, "{err}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "{text}");
    assert!(closed, "{text}");
    assert_counted(&proxy, decode.addr, "closed", "/v1/chat/completions", 502);
}

/// A decode node whose stream holds events that are not JSON objects: they are dropped,
/// before the decode node's own first token and after it, and the rest of the stream goes
/// through rewritten.
#[test]
fn first_token_path_drops_decode_events_that_are_not_json_objects() {
    let prefill = dummy("prefill", &[]);
    let script = format!(
        "{SSE_CHUNKED}{}{}{}{}{}{}0\r\n\r\n",
        chunk(&chat_event("")),
        chunk("data: 5\n\n"),
        chunk(&chat_event(" one")),
        chunk("data: [1, 2]\n\n"),
        chunk(&chat_event(" two")),
        chunk("data: [DONE]\n\n"),
    );
    let decode = ScriptedNode::start(write_then_die(script));
    let proxy = first_token_proxy(&prefill, &decode, "");
    let request = stream_request("/v1/chat/completions", "HTTP/1.1").replacen(
        "Host: x\r\n",
        "Host: x\r\nConnection: close\r\n",
        1,
    );
    let (text, _) = exchange(&proxy, &request);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        events.len(),
        3,
        "the prefill's token, \" two\", [DONE]: {text}"
    );
    let two: Value = serde_json::from_str(events[1]).unwrap();
    assert_eq!(two["choices"][0]["delta"]["content"], " two", "{text}");
    let first: Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(two["id"], first["id"], "one stream identity: {text}");
    assert_eq!(events[2], "[DONE]");
    assert!(text.ends_with("0\r\n\r\n"), "{text}");
}

#[test]
fn http10_stream_ends_with_an_error_event_then_close() {
    let script = format!("{SSE_CHUNKED}{}", chunk(&completion_event(" a")));
    let node = ScriptedNode::start(write_then_die(script));
    let proxy = dual_proxy(&node);
    let (text, closed) = exchange(&proxy, &stream_request("/v1/completions", "HTTP/1.0"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert!(
        body.starts_with("data: "),
        "HTTP/1.0 gets the events unframed: {body}"
    );
    let err = final_error_event(body);
    assert_eq!(err["error"]["code"], 502, "{err}");
    assert!(body.ends_with("\n\n"), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    assert!(closed, "{text}");
    assert_counted(&proxy, node.addr, "closed", "/v1/completions", 502);
}

#[test]
fn chunked_json_body_ends_without_its_last_chunk_when_the_backend_dies() {
    let script = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        chunk("{\"id\":\"cmpl-d\",\"choices\":")
    );
    let node = ScriptedNode::start(write_then_die(script));
    let proxy = dual_proxy(&node);
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 8});
    let (text, closed) = exchange(&proxy, &post_request("/v1/completions", &body, "HTTP/1.1"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"choices\":"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a last chunk says the body is complete: {text}"
    );
    assert!(
        !text.contains("data: "),
        "no SSE event in a JSON body: {text}"
    );
    assert!(closed, "{text}");
    assert_counted(&proxy, node.addr, "closed", "/v1/completions", 502);
}

#[test]
fn close_delimited_stream_that_stalls_ends_with_a_timeout_event() {
    let script = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{}",
        completion_event(" a")
    );
    let node = ScriptedNode::start(write_then_stall(script));
    let proxy = dual_proxy(&node);
    let start = Instant::now();
    let (text, closed) = exchange(&proxy, &stream_request("/v1/completions", "HTTP/1.1"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "a close-delimited body is re-framed as chunks: {text}"
    );
    assert!(text.contains("\" a\""), "{text}");
    let err = final_error_event(&text);
    assert_eq!(err["error"]["type"], "timeout_error", "{err}");
    assert_eq!(err["error"]["code"], 504, "{err}");
    assert!(
        !text.contains("[DONE]") && !text.ends_with("0\r\n\r\n"),
        "{text}"
    );
    assert!(closed, "{text}");
    // The configured idle timeout (0.5 s) is what ended it.
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "{:?}",
        start.elapsed()
    );
    assert_counted(&proxy, node.addr, "timeout", "/v1/completions", 504);
}

#[test]
fn invalid_framing_before_any_byte_reached_the_client_is_a_502() {
    let script = format!("{SSE_CHUNKED}zz-not-a-chunk-size\r\n");
    let node = ScriptedNode::start(write_then_stall(script));
    let proxy = dual_proxy(&node);
    let (status, _, v) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "hi", "max_tokens": 8, "stream": true}),
    );
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("chunked"),
        "{v}"
    );
    assert_counted(&proxy, node.addr, "bad_response", "/v1/completions", 502);
}

/// Writes `head`, waits `pause` (an engine prefilling), then writes `rest` and closes.
fn head_then(
    head: &'static str,
    pause: Duration,
    rest: String,
) -> impl Fn(&RawRequest, &mut TcpStream) -> bool {
    move |_, s| {
        let _ = s.write_all(head.as_bytes());
        std::thread::sleep(pause);
        let _ = s.write_all(rest.as_bytes());
        false
    }
}

#[test]
fn a_backend_dying_after_its_head_but_before_any_body_is_a_502() {
    // The head is held until the body's first bytes, so nothing had reached the client yet.
    let node = ScriptedNode::start(head_then(
        SSE_CHUNKED,
        Duration::from_millis(300),
        String::new(),
    ));
    let proxy = dual_proxy(&node);
    // `Connection: close`: the 502 is a complete answer, so the exchange ends with it.
    let request = stream_request("/v1/completions", "HTTP/1.1").replacen(
        "Host: x\r\n",
        "Host: x\r\nConnection: close\r\n",
        1,
    );
    let (text, closed) = exchange(&proxy, &request);
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(text.contains("\"upstream_error\""), "{text}");
    assert!(!text.contains("data: "), "{text}");
    assert!(closed, "{text}");
    assert_counted(&proxy, node.addr, "closed", "/v1/completions", 502);
}

#[test]
fn a_stream_head_goes_out_with_the_first_event_in_one_write() {
    let events = format!(
        "{}{}{}",
        chunk(&completion_event(" a")),
        chunk("data: [DONE]\n\n"),
        "0\r\n\r\n"
    );
    let node = ScriptedNode::start(head_then(SSE_CHUNKED, Duration::from_millis(300), events));
    let proxy = dual_proxy(&node);
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(stream_request("/v1/completions", "HTTP/1.1").as_bytes())
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    let n = s.read(&mut buf).expect("the response");
    let first = String::from_utf8_lossy(&buf[..n]);
    // The node sent its head 300 ms before the event: relayed on its own, the head would
    // be all of this first read.
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        first.contains("data: {"),
        "the head came without the first event: {first}"
    );
}
