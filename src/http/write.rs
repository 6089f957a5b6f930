//! Building response and request heads. Heads are assembled into one buffer, together with
//! small bodies, so that a typical message costs one write.

use super::error::ApiError;
use http::StatusCode;

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

/// Appends `n` in decimal (what `write!` does, without the formatting machinery: heads are
/// written on every request).
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `Name: value\r\n`.
pub fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &[(&str, &str)],
    body: BodyLen,
    keep_alive: bool,
) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (k, v) in headers {
        push_header(out, k, v.as_bytes());
    }
    match body {
        BodyLen::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n as u64);
            out.extend_from_slice(b"\r\n");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_what_write_would_make() {
        for n in [0u64, 7, 10, 386, 65_536, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        let mut out = Vec::new();
        response_head(
            &mut out,
            StatusCode::OK,
            &[("Content-Type", "application/json"), ("X-Request-Id", "r")],
            BodyLen::Length(12),
            true,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: r\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        response_head(
            &mut out,
            StatusCode::BAD_GATEWAY,
            &[],
            BodyLen::Chunked,
            false,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
    }
}
