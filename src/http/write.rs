//! Building response and request heads. Heads are assembled into one buffer, together with
//! small bodies, so that a typical message costs one write.

use super::error::ApiError;
use http::StatusCode;
use std::io::Write;

/// How the body of a message we write is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Length(usize),
    Chunked,
    /// Delimited by closing the connection (HTTP/1.0 peers).
    Close,
}

/// Bodies up to this size are copied behind the head and sent in one write.
pub const COALESCE_LIMIT: usize = 64 * 1024;

pub fn response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &[(&str, &str)],
    body: BodyLen,
    keep_alive: bool,
) {
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (k, v) in headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    match body {
        BodyLen::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        BodyLen::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        BodyLen::Close => {}
    }
    // Said in both cases: HTTP/1.0 clients (ApacheBench -k, old balancers) keep a
    // connection open only when the answer says keep-alive.
    if !keep_alive || body == BodyLen::Close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A complete response with a fixed body: one buffer, one write.
pub fn full_response(
    status: StatusCode,
    headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    response_head(
        &mut out,
        status,
        headers,
        BodyLen::Length(body.len()),
        keep_alive,
    );
    out.extend_from_slice(body);
    out
}

pub fn error_response(err: &ApiError, extra: &[(&str, &str)], keep_alive: bool) -> Vec<u8> {
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra.len() + 1);
    headers.push(("Content-Type", "application/json"));
    headers.extend_from_slice(extra);
    full_response(err.status, &headers, &err.body(), keep_alive && !err.close)
}

pub const JSON: (&str, &str) = ("Content-Type", "application/json");
