//! HTTP/1.1 conformance over raw TCP (RFC 9110, RFC 9112): HEAD, 405 with `Allow`, Host
//! required, 414 for long targets (431 stays for large header fields), and HTTP/1.0
//! keep-alive announced in the answer.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One response read off a connection that may stay open: the head's lines, then exactly
/// the body its `Content-Length` announces (none for the answer to a HEAD).
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_response(r: &mut BufReader<TcpStream>, head_request: bool) -> Response {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("header line");
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l
            .split_once(':')
            .unwrap_or_else(|| panic!("bad header {l:?}"));
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        headers,
        body: String::new(),
    };
    if !head_request {
        let n: usize = resp
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("Content-Length");
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).expect("body");
        resp.body = String::from_utf8_lossy(&body).into_owned();
    }
    resp
}

fn connect(proxy: &Proc) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

/// After the answer, the proxy closed the connection (EOF, not a timeout).
fn assert_closed(r: &mut BufReader<TcpStream>) {
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)
        .expect("the connection is closed, not left open");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

fn proxy() -> (Proc, Proc) {
    let d = dummy("dual", &[]);
    let p = proxy_with(&dual_yaml(&[&d]), true);
    (d, p)
}

#[test]
fn head_is_answered_like_get_without_a_body() {
    let (_d, proxy) = proxy();
    let (mut s, mut r) = connect(&proxy);
    for path in [
        "/health",
        "/ping",
        "/v1/models",
        "/status",
        "/version",
        "/metrics",
    ] {
        // The GET for reference, then the HEAD, then a GET again on the same connection: a
        // body after the HEAD's head would be read here as the next status line.
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let get = read_response(&mut r, false);
        write!(s, "HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let head = read_response(&mut r, true);
        assert_eq!(head.status, get.status, "{path}");
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "{path}"
        );
        let len: usize = head.header("content-length").unwrap().parse().unwrap();
        assert!(len > 0, "{path}: HEAD announces the GET's length");
        write!(s, "GET /ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let next = read_response(&mut r, false);
        assert_eq!(next.status, 200, "{path}: the connection is still in step");
        assert!(next.body.contains("pong"), "{path}: {}", next.body);
    }
}

#[test]
fn method_not_allowed_says_what_is() {
    let (d, proxy) = proxy();
    let (mut s, mut r) = connect(&proxy);
    for (req, allow) in [
        ("HEAD /v1/completions", "POST"),
        ("GET /v1/chat/completions", "POST"),
        ("PUT /tokenize", "POST"),
        ("GET /instances/add", "POST"),
        ("DELETE /instances/remove", "POST"),
        ("POST /health", "GET, HEAD"),
        ("POST /metrics", "GET, HEAD"),
        ("DELETE /v1/models", "GET, HEAD"),
        ("PUT /ping", "GET, HEAD, POST"),
    ] {
        write!(s, "{req} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").unwrap();
        let resp = read_response(&mut r, false);
        assert_eq!(resp.status, 405, "{req}: {}", resp.body);
        assert_eq!(resp.header("allow"), Some(allow), "{req}");
        assert!(resp.body.contains("\"error\""), "{req}: {}", resp.body);
    }
    // Unknown paths stay 404 whatever the method, HEAD included (head only).
    write!(s, "HEAD /v1/secret HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut r, false).status, 404);
    assert_eq!(dummy_stats(&d)["requests"], 0);
}

#[test]
fn an_http11_request_without_host_is_400() {
    let (d, proxy) = proxy();
    let resp = raw_exchange(
        proxy.addr,
        b"GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("missing Host"), "{resp}");
    let body = r#"{"model":"test-model","prompt":"hi","max_tokens":2}"#;
    let resp = raw_exchange(
        proxy.addr,
        format!("POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        Duration::from_secs(5),
    );
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(dummy_stats(&d)["requests"], 0);
    // HTTP/1.0 has no Host requirement.
    let resp = raw_exchange(
        proxy.addr,
        b"GET /ping HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[test]
fn a_long_request_target_is_414_and_large_header_fields_stay_431() {
    let (_d, proxy) = proxy();
    let long = |n: usize| format!("/ping?{}", "a".repeat(n));
    // Over the default 8 KiB: whole, and so long that the request line never ends within
    // the header limit.
    for n in [9 * 1024, 100 * 1024] {
        let req = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", long(n));
        let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
        assert!(resp.starts_with("HTTP/1.1 414"), "{n}: {resp}");
        assert!(resp.contains("max_uri_bytes"), "{resp}");
    }
    // Just under the limit is served.
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        long(8000)
    );
    let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // A large header field is not a long target.
    let req = format!(
        "GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70 * 1024)
    );
    let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

#[test]
fn max_uri_bytes_is_configurable() {
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!("{}limits:\n  max_uri_bytes: 1024\n", dual_yaml(&[&d])),
        true,
    );
    let req = format!("GET /ping?{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(2000));
    let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
    assert!(resp.starts_with("HTTP/1.1 414"), "{resp}");
}

#[test]
fn http10_keep_alive_is_announced_and_honoured() {
    let (_d, proxy) = proxy();
    let (mut s, mut r) = connect(&proxy);
    let body = r#"{"model":"test-model","prompt":"hi","max_tokens":2}"#;
    for _ in 0..3 {
        write!(s, "POST /v1/completions HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let resp = read_response(&mut r, false);
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.header("connection"), Some("keep-alive"));
        write!(s, "GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        let resp = read_response(&mut r, false);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("connection"), Some("keep-alive"));
    }
    // Without keep-alive, HTTP/1.0 gets one answer and the connection is closed.
    let (mut s, mut r) = connect(&proxy);
    write!(s, "GET /ping HTTP/1.0\r\n\r\n").unwrap();
    let resp = read_response(&mut r, false);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert_closed(&mut r);
}
