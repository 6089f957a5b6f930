//! Trace context and header forwarding end to end (docs/tracing.md, docs/api.md): a real
//! OTLP/HTTP receiver (Python, decoding with the official `opentelemetry-proto` package),
//! real xpyd-dummy backends recording the headers they received, the real proxy.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Read;
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

/// Decodes every posted ExportTraceServiceRequest; `GET /spans` lists the spans as JSON.
const RECEIVER: &str = r#"
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

spans = []

def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces", self.path
        assert self.headers["Content-Type"] == "application/x-protobuf"
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({
                        "service": resource.get("service.name"),
                        "scope": ss.scope.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                        "events": [{"name": e.name, "attributes": {a.key: value(a.value) for a in e.attributes}} for e in s.events],
                        "status": s.status.code,
                    })
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        out = json.dumps(spans).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
srv.serve_forever()
"#;

/// The receiver process, on a port chosen here; killed when dropped.
struct Receiver {
    _child: KillOnDrop,
    addr: std::net::SocketAddr,
}

impl Receiver {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn receiver() -> Receiver {
    let venv = python_venv(&[("opentelemetry.proto", "opentelemetry-proto")]);
    let script = write_config(RECEIVER).with_extension("py");
    std::fs::write(&script, RECEIVER).unwrap();
    let addr = dead_address();
    let child = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(addr.port().to_string())
        .spawn()
        .expect("start the OTLP receiver");
    let rx = Receiver {
        _child: KillOnDrop(child),
        addr,
    };
    wait_for("the OTLP receiver", Duration::from_secs(30), || {
        ureq::get(&rx.url("/spans")).call().is_ok()
    });
    rx
}

fn spans_of(rx: &Receiver, trace_id: &str) -> Vec<Value> {
    let (_, v) = get_json(&rx.url("/spans"));
    v.as_array()
        .unwrap()
        .iter()
        .filter(|s| s["trace_id"] == trace_id)
        .cloned()
        .collect()
}

/// The headers a dummy recorded for request `rid`, names lower-cased.
fn headers_of(node: &Proc, rid: &str) -> Vec<(String, String)> {
    let r = received(node)
        .into_iter()
        .find(|r| r["request_id"] == rid)
        .unwrap_or_else(|| panic!("{rid} not received by {}", node.addr));
    r["headers"]
        .as_str()
        .unwrap()
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traced_proxy(rx: &Receiver, p: &Proc, d: &Proc, ratio: &str) -> Proc {
    proxy_with(
        &format!(
            "{}tracing:\n  otlp_endpoint: \"http://{}/v1/traces\"\n  sample_ratio: {ratio}\n  service_name: xpyd-test\n",
            pd_yaml(&[p], &[d]),
            rx.addr
        ),
        true,
    )
}

#[test]
fn a_pd_request_is_one_trace_with_a_span_per_leg() {
    let rx = receiver();
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    // Ratio 0: only the client's sampled flag starts recording here.
    let proxy = traced_proxy(&rx, &p, &d, "0.0");
    let r = agent()
        .post(&proxy.url("/v1/completions"))
        .set("X-Request-Id", "traced-1")
        .set(
            "traceparent",
            &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
        )
        .set("tracestate", "vendor=abc")
        .send_json(
            json!({"model": MODEL, "prompt": "hello there", "max_tokens": 3, "stream": true}),
        )
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.into_string().unwrap();

    wait_for(
        "the three spans of the request",
        Duration::from_secs(20),
        || spans_of(&rx, CLIENT_TRACE).len() >= 3,
    );
    let spans = spans_of(&rx, CLIENT_TRACE);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let by_kind = |k: i64| spans.iter().find(|s| s["kind"] == k).unwrap();
    let request = by_kind(2);
    assert_eq!(
        request["parent_span_id"], CLIENT_SPAN,
        "continues the client's span"
    );
    assert_eq!(request["service"], "xpyd-test");
    assert_eq!(request["name"], "POST /v1/completions");
    let a = &request["attributes"];
    assert_eq!(a["gen_ai.request.model"], MODEL);
    assert_eq!(a["xpyd.request_id"], "traced-1");
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["xpyd.prefill.instance"], p.addr.to_string());
    assert_eq!(a["xpyd.decode.instance"], d.addr.to_string());
    assert_eq!(a["gen_ai.request.max_tokens"], 3);
    assert!(a["xpyd.ttft_us"].as_i64().unwrap() > 0, "{a}");
    assert!(a["xpyd.policy"].is_string());
    let leg = |name: &str| spans.iter().find(|s| s["name"] == name).unwrap();
    let (prefill, decode) = (leg("prefill"), leg("decode"));
    for (span, node) in [(prefill, &p), (decode, &d)] {
        assert_eq!(span["parent_span_id"], request["span_id"]);
        assert_eq!(span["kind"], 3);
        assert_eq!(span["attributes"]["xpyd.instance"], node.addr.to_string());
        assert!(span["start"].as_u64() >= request["start"].as_u64());
        assert!(span["end"].as_u64() <= request["end"].as_u64());
    }
    assert!(prefill["end"].as_u64() <= decode["start"].as_u64());

    // Each backend's traceparent names its leg's span as the parent; tracestate goes along.
    for (node, span) in [(&p, prefill), (&d, decode)] {
        let h = headers_of(node, "traced-1");
        let tp = header(&h, "traceparent").expect("traceparent forwarded");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(
            parts,
            ["00", CLIENT_TRACE, span["span_id"].as_str().unwrap(), "01"]
        );
        assert_eq!(header(&h, "tracestate"), Some("vendor=abc"));
    }

    // The dummy joins the trace like an engine: the trace id comes back in X-Trace-Id.
    let r = agent()
        .post(&d.url("/v1/completions"))
        .set(
            "traceparent",
            &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
        )
        .send_json(json!({"model": MODEL, "prompt": "x", "max_tokens": 1}))
        .unwrap();
    assert_eq!(r.header("x-trace-id"), Some(CLIENT_TRACE));
}

#[test]
fn sampling_starts_new_traces_and_respects_an_unsampled_parent() {
    let rx = receiver();
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = traced_proxy(&rx, &p, &d, "1.0");
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2});
    // No client context: the proxy starts a trace (ratio 1.0); backends join it.
    let r = agent()
        .post(&proxy.url("/v1/completions"))
        .set("X-Request-Id", "fresh-1")
        .send_json(body.clone())
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = headers_of(&d, "fresh-1");
    let tp: Vec<String> = header(&h, "traceparent")
        .expect("a traceparent starts at the proxy")
        .split('-')
        .map(str::to_string)
        .collect();
    let trace = tp[1].clone();
    wait_for("the new trace's spans", Duration::from_secs(20), || {
        spans_of(&rx, &trace).len() >= 3
    });
    let spans = spans_of(&rx, &trace);
    let request = spans.iter().find(|s| s["kind"] == 2).unwrap();
    assert_eq!(request["parent_span_id"], "", "a root span");
    let decode = spans.iter().find(|s| s["name"] == "decode").unwrap();
    assert_eq!(decode["span_id"], tp[2]);

    // The client decided not to sample: its context passes through untouched, no spans.
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    let r = agent()
        .post(&proxy.url("/v1/completions"))
        .set("X-Request-Id", "unsampled-1")
        .set("traceparent", &unsampled)
        .send_json(body)
        .unwrap();
    assert_eq!(r.status(), 200);
    for node in [&p, &d] {
        assert_eq!(
            header(&headers_of(node, "unsampled-1"), "traceparent"),
            Some(unsampled.as_str())
        );
    }
    // Spans travel in order through one queue: once a later request's spans arrived,
    // none of the unsampled request's can follow.
    let r = agent()
        .post(&proxy.url("/v1/completions"))
        .set("X-Request-Id", "after-1")
        .set(
            "traceparent",
            &format!("00-{}-{CLIENT_SPAN}-01", "ab".repeat(16)),
        )
        .send_json(json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}))
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_for("the later request's spans", Duration::from_secs(20), || {
        spans_of(&rx, &"ab".repeat(16)).len() >= 3
    });
    assert!(spans_of(&rx, CLIENT_TRACE).is_empty());
}

/// Sends one request with the given extra header lines over a raw socket; the proxy's
/// status line.
fn raw_post(proxy: &Proc, rid: &str, headers: &str) -> String {
    raw_post_body(
        proxy,
        rid,
        headers,
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    )
}

fn raw_post_body(proxy: &Proc, rid: &str, headers: &str, body: Value) -> String {
    let body = serde_json::to_vec(&body).unwrap();
    let mut req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {rid}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let out = raw_exchange(proxy.addr, &req, Duration::from_secs(20));
    out.lines().next().unwrap_or("").to_string()
}

const CLIENT_HEADERS: &str = "Connection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Authorization: Basic x\r\nUser-Agent: forward-test/1.0\r\nX-Custom: kept\r\nbaggage: user=alice\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: v=1\r\nAccept-Encoding: gzip\r\nCookie: session=secret\r\nX-API-Key: proxy-key\r\nAuthorization: Bearer proxy-key\r\n";

#[test]
fn end_to_end_headers_reach_both_legs_and_hop_by_hop_ones_do_not() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    // Tracing off: the client's trace context is end to end like any other header.
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let status = raw_post(&proxy, "fwd-1", CLIENT_HEADERS);
    assert!(status.contains(" 200 "), "{status}");
    for node in [&p, &d] {
        let h = headers_of(node, "fwd-1");
        for (name, value) in [
            ("user-agent", "forward-test/1.0"),
            ("x-custom", "kept"),
            ("baggage", "user=alice"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "v=1"),
        ] {
            assert_eq!(
                header(&h, name),
                Some(value),
                "{name} on {}: {h:?}",
                node.addr
            );
        }
        for name in [
            "connection",
            "x-hop",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-authorization",
            "cookie",
            "x-api-key",
        ] {
            assert_eq!(header(&h, name), None, "{name} on {}: {h:?}", node.addr);
        }
        // The client's key to the proxy does not leave it (no openai_api_key here).
        let r = received(node)
            .into_iter()
            .find(|r| r["request_id"] == "fwd-1")
            .unwrap();
        assert_eq!(r["authorization"], Value::Null);
    }
    // The proxy parses the prefill response: it is never asked to compress it.
    assert_eq!(header(&headers_of(&p, "fwd-1"), "accept-encoding"), None);
    assert_eq!(
        header(&headers_of(&d, "fwd-1"), "accept-encoding"),
        Some("gzip")
    );

    // The deny list is the operator's: here cookies and keys may pass, X-Custom may not.
    let proxy2 = proxy_with(
        &format!(
            "{}forward_headers:\n  deny: [X-Custom]\n",
            pd_yaml(&[&p], &[&d])
        ),
        true,
    );
    let status = raw_post(&proxy2, "fwd-2", CLIENT_HEADERS);
    assert!(status.contains(" 200 "), "{status}");
    for node in [&p, &d] {
        let h = headers_of(node, "fwd-2");
        assert_eq!(header(&h, "x-custom"), None);
        assert_eq!(header(&h, "cookie"), Some("session=secret"));
        assert_eq!(header(&h, "x-api-key"), Some("proxy-key"));
        assert_eq!(header(&h, "x-hop"), None, "hop-by-hop whatever the list");
    }

    // A stream whose first token comes from prefill is rewritten here: identity on decode.
    let proxy3 = proxy_with(
        &format!("{}generator_on_p_node: true\n", pd_yaml(&[&p], &[&d])),
        true,
    );
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": true});
    let status = raw_post_body(&proxy3, "fwd-3", CLIENT_HEADERS, body);
    assert!(status.contains(" 200 "), "{status}");
    for node in [&p, &d] {
        let h = headers_of(node, "fwd-3");
        assert_eq!(header(&h, "accept-encoding"), None, "{}: {h:?}", node.addr);
        assert_eq!(header(&h, "x-custom"), Some("kept"));
    }
}

fn metric(proxy: &Proc, line_start: &str) -> u64 {
    let mut text = String::new();
    ureq::get(&proxy.url("/metrics"))
        .call()
        .unwrap()
        .into_reader()
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_dead_or_silent_collector_changes_nothing_for_clients() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    // Dead: nothing listens. Silent: accepts, never reads or answers.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < end {
            match silent.accept() {
                Ok((c, _)) => conns.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    for collector in [dead, silent_addr] {
        let proxy = proxy_with(
            &format!(
                "{}tracing:\n  otlp_endpoint: \"http://{collector}\"\n  sample_ratio: 1.0\n",
                pd_yaml(&[&p], &[&d])
            ),
            true,
        );
        let a = agent();
        for i in 0..20 {
            let (status, _, v) = post(
                &a,
                &proxy.url("/v1/completions"),
                &json!({"model": MODEL, "prompt": format!("n{i}"), "max_tokens": 2}),
            );
            assert_eq!(status, 200, "{v}");
            assert!(v["choices"][0]["text"].is_string(), "{v}");
        }
        if collector == dead {
            wait_for("spans counted as dropped", Duration::from_secs(20), || {
                metric(
                    &proxy,
                    "proxy_trace_spans_dropped_total{reason=\"export_failed\"}",
                ) > 0
            });
        }
        assert_eq!(metric(&proxy, "proxy_trace_spans_exported_total"), 0);
    }
    drop(held);
}
