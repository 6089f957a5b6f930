//! HTTP/1.1 on the wire: keep-alive, pipelining, chunked request bodies, HTTP/1.0, and the
//! strict rejections (smuggling, malformed heads, oversize heads and bodies).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn setup(extra_yaml: &str) -> (Proc, Proc, Proc) {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(&format!("{}{extra_yaml}", pd_yaml(&[&p], &[&d])), true);
    (p, d, proxy)
}

const BODY: &str = r#"{"model":"test-model","prompt":"hi","max_tokens":3}"#;

fn post_head(len: usize) -> String {
    format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
}

/// Status lines in order (a response may follow a body without a line break).
fn status_lines(resp: &str) -> Vec<&str> {
    resp.match_indices("HTTP/1.1 ")
        .map(|(i, _)| resp[i..].lines().next().unwrap())
        .collect()
}

#[test]
fn pipelined_requests_on_one_connection_are_answered_in_order() {
    let (_p, _d, proxy) = setup("");
    let mut req = String::new();
    for _ in 0..3 {
        req.push_str(&post_head(BODY.len()));
        req.push_str(BODY);
    }
    req.push_str("GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
    assert_eq!(status_lines(&resp), vec!["HTTP/1.1 200 OK"; 4], "{resp}");
    assert_eq!(resp.matches("\"text_completion\"").count(), 3);
    assert!(resp.trim_end().ends_with("pong\"}"), "{resp}");
}

/// Bodies longer than one read (a long prompt is read straight into the body, never past
/// it), pipelined: each request gets its own bytes, the one behind it is not lost.
#[test]
fn long_pipelined_bodies_reach_the_node_whole_and_in_order() {
    let (_p, d, proxy) = setup("");
    let mut req = String::new();
    let prompts = ["a".repeat(300_000), "b".repeat(200_001)];
    for prompt in &prompts {
        let body = format!(r#"{{"model":"test-model","prompt":"{prompt}","max_tokens":3}}"#);
        req.push_str(&post_head(body.len()));
        req.push_str(&body);
    }
    req.push_str("GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(10));
    assert_eq!(
        status_lines(&resp),
        vec!["HTTP/1.1 200 OK"; 3],
        "{}",
        &resp[..resp.len().min(2000)]
    );
    let got = received(&d);
    assert_eq!(got.len(), 2);
    for (r, want) in got.iter().zip(&prompts) {
        assert!(
            r["body"]["prompt"].as_str() == Some(want.as_str()),
            "a prompt arrived changed"
        );
    }
}

#[test]
fn chunked_request_body_is_accepted() {
    let (_p, d, proxy) = setup("");
    let (a, b) = BODY.split_at(10);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(received(&d)[0]["body"]["prompt"], "hi");
}

#[test]
fn http10_client_gets_a_complete_response() {
    let (_p, _d, proxy) = setup("");
    let body = r#"{"model":"test-model","prompt":"hi","max_tokens":3,"stream":true}"#;
    let req = format!(
        "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        !resp.to_ascii_lowercase().contains("transfer-encoding"),
        "{resp}"
    );
    assert!(resp.trim_end().ends_with("data: [DONE]"), "{resp}");
}

#[test]
fn smuggling_and_malformed_requests_are_rejected() {
    let (_p, d, proxy) = setup("limits:\n  max_body_bytes: 100000\n  max_header_bytes: 4096\n");
    let cases: Vec<(String, &str)> = vec![
        (
            format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{BODY}", BODY.len()),
            "400",
        ),
        ("GARBAGE\r\n\r\n".to_string(), "400"),
        ("GET /ping HTTP/1.1\r\nBad Header\r\n\r\n".to_string(), "400"),
        (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_string(),
            "400",
        ),
        (
            format!("GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(5000)),
            "431",
        ),
        (
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200000\r\n\r\n".to_string(),
            "413",
        ),
    ];
    for (req, want) in cases {
        let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {want}")),
            "request {:?} -> {resp}",
            &req[..req.len().min(80)]
        );
        assert!(resp.contains("\"error\""), "{resp}");
    }
    assert_eq!(dummy_stats(&d)["requests"], 0);
    // Still serving.
    assert_eq!(get_json(&proxy.url("/ping")).0, 200);
}

#[test]
fn keep_alive_connection_serves_many_requests() {
    let (_p, _d, proxy) = setup("");
    let mut s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..20 {
        s.write_all(format!("{}{BODY}", post_head(BODY.len())).as_bytes())
            .unwrap();
        // Read exactly one response using its Content-Length.
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("content-length");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "text_completion");
    }
}
