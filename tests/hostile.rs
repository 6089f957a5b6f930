//! Hostile input over raw TCP: malformed, smuggling and oversized requests each get their
//! status (and the connection closed where framing cannot be trusted); the proxy keeps
//! serving normal traffic afterwards and the backend never sees any of them.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::Duration;

const B: &str = r#"{"model":"test-model","prompt":"hi","max_tokens":2}"#;

fn post_with(headers: &str, body: &str) -> String {
    format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}\r\n{body}")
}

fn cases() -> Vec<(&'static str, String, &'static str)> {
    let cl = B.len();
    vec![
        ("CL then TE", post_with(&format!("Content-Length: {cl}\r\nTransfer-Encoding: chunked\r\n"), B), "400"),
        ("TE then CL", post_with(&format!("Transfer-Encoding: chunked\r\nContent-Length: {cl}\r\n"), B), "400"),
        ("two different CL", post_with(&format!("Content-Length: {cl}\r\nContent-Length: {}\r\n", cl + 1), B), "400"),
        ("CL with plus sign", post_with(&format!("Content-Length: +{cl}\r\n"), B), "400"),
        ("negative CL", post_with("Content-Length: -1\r\n", B), "400"),
        ("non-numeric CL", post_with("Content-Length: abc\r\n", B), "400"),
        ("CL overflow", post_with("Content-Length: 99999999999999999999999\r\n", B), "400"),
        ("CL with inner space", post_with("Content-Length: 1 2\r\n", B), "400"),
        ("TE gzip", post_with("Transfer-Encoding: gzip\r\n", B), "400"),
        ("TE chunked not last", post_with("Transfer-Encoding: chunked, gzip\r\n", B), "400"),
        ("TE chunked twice", post_with("Transfer-Encoding: chunked, chunked\r\n", B), "400"),
        ("TE identity", post_with("Transfer-Encoding: identity\r\n", B), "400"),
        ("bad chunk size", post_with("Transfer-Encoding: chunked\r\n", "zz\r\nhello\r\n0\r\n\r\n"), "400"),
        ("chunk without CRLF", post_with("Transfer-Encoding: chunked\r\n", "5\r\nhelloXX0\r\n\r\n"), "400"),
        ("chunk size overflow", post_with("Transfer-Encoding: chunked\r\n", "fffffffffffffffffffff\r\n"), "400"),
        ("chunk size empty", post_with("Transfer-Encoding: chunked\r\n", "\r\nhello\r\n"), "400"),
        ("header without colon", "GET /ping HTTP/1.1\r\nHost x\r\n\r\n".into(), "400"),
        ("space before colon", "GET /ping HTTP/1.1\r\nHost : x\r\n\r\n".into(), "400"),
        ("garbage request line", "HELLO THERE\r\n\r\n".into(), "400"),
        ("binary junk", "\u{1}\u{2}\u{3}\u{4} / HTTP/1.1\r\n\r\n".into(), "400"),
        ("bad method token", "G@T /ping HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("HTTP/2.0 line", "GET /ping HTTP/2.0\r\nHost: x\r\n\r\n".into(), "400"),
        ("HTTP/1.2 line", "GET /ping HTTP/1.2\r\nHost: x\r\n\r\n".into(), "400"),
        ("missing version", "GET /ping\r\nHost: x\r\n\r\n".into(), "400"),
        ("absolute-form target", "GET http://evil/ping HTTP/1.1\r\nHost: x\r\n\r\n".into(), "400"),
        ("NUL in header value", "GET /ping HTTP/1.1\r\nHost: x\r\nX-A: a\u{0}b\r\n\r\n".into(), "400"),
        ("obsolete line folding", "GET /ping HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n".into(), "400"),
        ("duplicate Host", "GET /ping HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".into(), "400"),
        ("chunked in HTTP/1.0", "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), "400"),
        ("header too large", format!("GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000)), "431"),
        ("too many headers", format!("GET /ping HTTP/1.1\r\n{}\r\n", (0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()), "431"),
        ("body too large by CL", post_with("Content-Length: 40000000\r\n", ""), "413"),
        ("chunk announcing too much", post_with("Transfer-Encoding: chunked\r\n", &format!("{:x}\r\n{}", 40_000_000, "a".repeat(1000))), "413"),
        ("chunks adding up to too much", post_with("Transfer-Encoding: chunked\r\n", &format!("{:x}\r\n{}\r\n", 1 << 20, "a".repeat(1 << 20)).repeat(33)), "413"),
        ("empty JSON body", post_with("Content-Length: 0\r\n", ""), "400"),
        ("JSON array body", post_with("Content-Length: 5\r\n", "[1,2]"), "400"),
        ("JSON with trailing junk", post_with(&format!("Content-Length: {}\r\n", cl + 3), &format!("{B}xyz")), "400"),
        ("not JSON content type", format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {cl}\r\n\r\n{B}"), "415"),
        ("GET on completions", "GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), "405"),
        ("unknown path", "GET /v1/secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), "404"),
        ("path traversal", "GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), "404"),
    ]
}

#[test]
fn hostile_requests_get_their_status_and_never_reach_a_backend() {
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!(
            "{}limits:\n  header_timeout_seconds: 0.5\n",
            dual_yaml(&[&d])
        ),
        true,
    );
    let cases = cases();
    assert!(cases.len() >= 30);
    let mut wrong = Vec::new();
    for (name, req, want) in &cases {
        let resp = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(5));
        if !resp.starts_with(&format!("HTTP/1.1 {want}")) {
            wrong.push(format!(
                "{name}: want {want}, got {:?}",
                resp.lines().next()
            ));
        } else if !resp.contains("\"error\"") {
            wrong.push(format!("{name}: body is not an OpenAI error: {resp}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        dummy_stats(&d)["requests"],
        0,
        "a hostile request reached the backend"
    );
    // Still serving normal traffic.
    let (status, _, _) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &serde_json::from_str(B).unwrap(),
    );
    assert_eq!(status, 200);
}

#[test]
fn slow_header_sender_is_cut_with_408() {
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!(
            "{}limits:\n  header_timeout_seconds: 0.3\n",
            dual_yaml(&[&d])
        ),
        true,
    );
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"GET /ping HTTP/1.1\r\nHo").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"st: x\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
}

/// Reads one response with a Content-Length body off a kept-alive connection.
fn read_one_response(s: &mut std::net::TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed mid-head: {out:?}");
        out.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head
}

#[test]
fn a_kept_alive_connection_lives_while_used_and_closes_once_idle() {
    // One timer per connection is armed at the first wait and left there while the deadline
    // moves later (src/deadline.rs): requests 0.4 s apart under a 1 s keep-alive timeout keep
    // the connection past the first deadline, and once idle it still closes.
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!(
            "{}limits:\n  keepalive_timeout_seconds: 1\n",
            dual_yaml(&[&d])
        ),
        true,
    );
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..6 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(400)); // the client's pace, under test
        }
        s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap_or_else(|e| panic!("request {i}: the connection was closed: {e}"));
        let head = read_one_response(&mut s);
        assert!(head.starts_with("http/1.1 200"), "request {i}: {head}");
    }
    // Idle now: the proxy closes it after about a second (a read then sees the end, not the
    // 5 s read timeout).
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest);
    assert!(
        matches!(r, Ok(0)),
        "the idle connection was not closed: {r:?} {rest:?}"
    );
}

#[test]
fn connections_over_the_limit_are_refused_without_harm() {
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!("{}limits:\n  max_connections: 5\n", dual_yaml(&[&d])),
        true,
    );
    // 2 workers × 5: hold 30 connections open; the excess is closed by the proxy.
    let held: Vec<_> = (0..30)
        .map(|_| {
            let s = std::net::TcpStream::connect(proxy.addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    // A refused connection reads EOF; an accepted one has nothing to read yet.
    let mut closed = vec![false; held.len()];
    wait_for(
        "20 of 30 connections to be refused",
        Duration::from_secs(10),
        || {
            for (mut s, c) in held.iter().zip(closed.iter_mut()) {
                if !*c {
                    *c = match s.read(&mut [0u8; 1]) {
                        Ok(n) => n == 0,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    };
                }
            }
            closed.iter().filter(|c| **c).count() >= 20
        },
    );
    drop(held);
    // Once the held connections are gone, the proxy serves again.
    wait_for(
        "the proxy to serve again",
        Duration::from_secs(10),
        || matches!(agent().get(&proxy.url("/ping")).call(), Ok(r) if r.status() == 200),
    );
}

#[test]
fn oversized_body_sent_in_full_still_gets_its_413() {
    // The proxy rejects after the head; the client keeps sending the body it announced.
    // Closing on unread input would reset the connection and lose the answer.
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!("{}limits:\n  max_body_bytes: 65536\n", dual_yaml(&[&d])),
        true,
    );
    let body = "a".repeat(4 << 20);
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = post_with(&format!("Content-Length: {}\r\n", body.len()), &body);
        s.write_all(req.as_bytes())
            .expect("the proxy reads what it will not serve instead of resetting");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    }
    assert_eq!(dummy_stats(&d)["requests"], 0);
}
