//! Strict parsing of HTTP/1.1 message heads with httparse, into the `http` crate's types.
//!
//! Only the headers the proxy acts on are kept; framing headers are validated hard because
//! a lenient proxy is a request-smuggling proxy (RFC 9112 §6.3).
//!
//! Heads of the usual shape are read by `usual`, without httparse (about half the cost);
//! httparse reads every other head. Both feed the same checks (`request_from`,
//! `response_from`), so the two paths give the same answer. `fields` tells the header
//! names apart and gathers the framing headers for both.

mod fields;
mod memo;
mod usual;

pub(crate) use fields::lower_is;
use fields::{note_connection, Field, FramingHeaders, Name};
use http::{Method, StatusCode};
pub use memo::{RequestMemo, ResponseMemo};
use std::borrow::Cow;
use usual::{usual_request, usual_status, Fields};

const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not enough bytes yet.
    Partial,
    Malformed(&'static str),
    TooManyHeaders,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Response body delimited by connection close.
    UntilClose,
}

#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    /// The request target; the API's paths without an allocation.
    pub path: Cow<'static, str>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub framing: Framing,
    pub keep_alive: bool,
    pub content_type: Option<Cow<'static, str>>,
    pub request_id: Option<String>,
    pub session_id: Option<String>,
    pub api_key: Option<String>,
    pub authorization: Option<String>,
    pub expect_continue: bool,
    /// The headers this layer does not act on (framing, Host, Content-Type, X-Request-Id
    /// and Expect excepted), as received: `Name: value\r\n` lines. The proxy decides which
    /// reach the backends (docs/api.md, forwarding).
    pub headers: Vec<u8>,
    /// `Connection` values naming other headers than close/keep-alive (those are
    /// hop-by-hop too); `None` in the usual case.
    pub connection: Option<String>,
    /// Bytes of the head including the blank line.
    pub len: usize,
}

impl RequestHead {
    /// Path without the query string.
    pub fn route(&self) -> &str {
        match self.path.as_bytes().iter().position(|&b| b == b'?') {
            Some(q) => &self.path[..q],
            None => &self.path,
        }
    }
}

/// A request target: one of the API's own paths is borrowed, any other copied.
fn target(path: &str) -> Cow<'static, str> {
    const API: &[&str] = &[
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
    ];
    match API.iter().find(|p| **p == path) {
        Some(p) => Cow::Borrowed(p),
        None => Cow::Owned(path.to_string()),
    }
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub framing: Framing,
    pub keep_alive: bool,
    pub content_type: Option<Cow<'static, str>>,
    /// A compressed body (the client's `Accept-Encoding` reached the backend): relayed
    /// with it.
    pub content_encoding: Option<String>,
    pub len: usize,
}

fn value_str<'a>(v: &'a [u8], what: &'static str) -> Result<&'a str, HeadError> {
    std::str::from_utf8(v)
        .map(str::trim)
        .map_err(|_| HeadError::Malformed(what))
}

/// A `Content-Type` value; the usual ones without an allocation.
fn content_type(v: &[u8]) -> Result<Cow<'static, str>, HeadError> {
    const COMMON: &[&str] = &[
        "application/json",
        "text/event-stream",
        "application/json; charset=utf-8",
        "text/event-stream; charset=utf-8",
    ];
    if let Some(c) = COMMON.iter().find(|c| c.as_bytes() == v) {
        return Ok(Cow::Borrowed(c));
    }
    Ok(Cow::Owned(
        value_str(v, "invalid Content-Type")?.to_string(),
    ))
}

pub fn parse_request(buf: &[u8]) -> Result<RequestHead, HeadError> {
    let mut fields = Fields::new();
    if let Some((line, len)) = usual_request(buf, &mut fields) {
        return request_from(line.method, line.target, line.minor, fields.iter(buf), len);
    }
    parse_request_general(buf)
}

/// Any request head httparse takes.
fn parse_request_general(buf: &[u8]) -> Result<RequestHead, HeadError> {
    // Uninitialised: filling 128 empty headers first cost more than parsing a typical head.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed("malformed request line or header")),
    };
    request_from(
        req.method.unwrap_or("").as_bytes(),
        req.path.unwrap_or(""),
        req.version.unwrap_or(1),
        req.headers.iter().map(Field::from),
        len,
    )
}

/// What a parsed request head says, checked (the same for either parser).
fn request_from<'b>(
    method: &[u8],
    path: &str,
    minor_version: u8,
    fields: impl Iterator<Item = Field<'b>>,
    len: usize,
) -> Result<RequestHead, HeadError> {
    let method = Method::from_bytes(method).map_err(|_| HeadError::Malformed("invalid method"))?;
    if !path.starts_with('/') && path != "*" {
        return Err(HeadError::Malformed(
            "request target must be an absolute path",
        ));
    }
    let mut fh = FramingHeaders::default();
    let mut head = RequestHead {
        method,
        path: target(path),
        minor_version,
        framing: Framing::None,
        keep_alive: true,
        content_type: None,
        request_id: None,
        session_id: None,
        api_key: None,
        authorization: None,
        expect_continue: false,
        headers: Vec::new(),
        connection: None,
        len,
    };
    let mut host_seen = false;
    for h in fields {
        let name = Name::of(h.name);
        if fh.observe(name, h.value)? {
            if name == Name::Connection {
                note_connection(&mut head.connection, h.value);
            }
            continue;
        }
        // Host, Content-Type, X-Request-Id and Expect are acted on here and never passed
        // on as they are.
        let consumed = matches!(
            name,
            Name::Host | Name::ContentType | Name::XRequestId | Name::Expect
        );
        if !consumed {
            if head.headers.is_empty() {
                // One allocation, sized for the whole head.
                head.headers.reserve(len);
            }
            head.headers.extend_from_slice(h.name);
            head.headers.extend_from_slice(b": ");
            head.headers.extend_from_slice(h.value);
            head.headers.extend_from_slice(b"\r\n");
        }
        match name {
            Name::ContentType => head.content_type = Some(content_type(h.value)?),
            Name::XRequestId => {
                let v = value_str(h.value, "invalid X-Request-Id")?;
                if !v.is_empty() {
                    head.request_id = Some(v.to_string());
                }
            }
            Name::XSessionId => {
                let v = value_str(h.value, "invalid X-Session-ID")?;
                if !v.is_empty() {
                    head.session_id = Some(v.to_string());
                }
            }
            Name::XApiKey => {
                head.api_key = Some(value_str(h.value, "invalid X-API-Key")?.to_string());
            }
            Name::Authorization => {
                head.authorization = Some(value_str(h.value, "invalid Authorization")?.to_string());
            }
            Name::Expect => {
                head.expect_continue =
                    value_str(h.value, "invalid Expect")?.eq_ignore_ascii_case("100-continue");
            }
            Name::Host => {
                if host_seen {
                    return Err(HeadError::Malformed("duplicate Host header"));
                }
                host_seen = true;
            }
            _ => {}
        }
    }
    if minor_version == 1 && !host_seen {
        // RFC 9112 §3.2: an HTTP/1.1 request must carry Host.
        return Err(HeadError::Malformed("missing Host header"));
    }
    if fh.content_length.is_some() && (fh.chunked || fh.other_te) {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding are present",
        ));
    }
    if fh.other_te && !fh.chunked {
        return Err(HeadError::Malformed("unsupported Transfer-Encoding"));
    }
    if minor_version == 0 && fh.chunked {
        return Err(HeadError::Malformed(
            "chunked encoding in an HTTP/1.0 request",
        ));
    }
    head.framing = if fh.chunked {
        Framing::Chunked
    } else {
        match fh.content_length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    head.keep_alive = fh.keep_alive(minor_version);
    Ok(head)
}

/// Parses a response head. `head_request` marks the answer to a HEAD (no body).
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<ResponseHead, HeadError> {
    let mut fields = Fields::new();
    if let Some((line, len)) = usual_status(buf, &mut fields) {
        return response_from(line, fields.iter(buf), len, head_request);
    }
    parse_response_general(buf, head_request)
}

/// What of a head's bytes may change in the next head with the same answer (`memo`): nothing
/// (both `None`: the same bytes are the same head), the digits of its one `Content-Length`,
/// which frames the body, and (requests) the value of its one `X-Request-Id`. Offsets into the
/// head's bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    pub length: Option<(usize, usize)>,
    pub id: Option<(usize, usize)>,
}

/// What a memo may keep of a head of the usual shape (`None`: nothing, e.g. several
/// `Content-Length` lines, or a length that does not frame the body, as a zero or a 204's).
/// `ids`: a request's `X-Request-Id` value may differ (a client naming each request); with
/// several such lines, or an empty one, it is compared as bytes like any other.
fn shape_of(buf: &[u8], fields: &Fields, framing: Framing, ids: bool) -> Option<Shape> {
    let (mut lengths, mut id_lines) = (0, 0);
    let mut shape = Shape::default();
    for &[ns, ne, vs, ve] in fields.spans() {
        match Name::of(&buf[ns as usize..ne as usize]) {
            Name::ContentLength => {
                lengths += 1;
                shape.length = Some((vs as usize, ve as usize));
            }
            Name::XRequestId if ids => {
                id_lines += 1;
                shape.id = Some((vs as usize, ve as usize)).filter(|_| ve > vs);
            }
            _ => {}
        }
    }
    if id_lines > 1 {
        shape.id = None;
    }
    match (lengths, framing) {
        (0, _) => Some(shape),
        (1, Framing::Length(_)) => Some(shape),
        _ => None,
    }
}

/// `parse_response(buf, false)`, and what `ResponseMemo` may keep of the head.
fn parse_response_noting(buf: &[u8]) -> Result<(ResponseHead, Option<Shape>), HeadError> {
    let mut fields = Fields::new();
    let Some((line, len)) = usual_status(buf, &mut fields) else {
        return parse_response_general(buf, false).map(|h| (h, None));
    };
    let head = response_from(line, fields.iter(buf), len, false)?;
    if head.status.is_informational() {
        return Ok((head, None));
    }
    let shape = shape_of(buf, &fields, head.framing, false);
    Ok((head, shape))
}

/// `parse_request(buf)`, and what `RequestMemo` may keep of the head.
fn parse_request_noting(buf: &[u8]) -> Result<(RequestHead, Option<Shape>), HeadError> {
    let mut fields = Fields::new();
    let Some((line, len)) = usual_request(buf, &mut fields) else {
        return parse_request_general(buf).map(|h| (h, None));
    };
    let head = request_from(line.method, line.target, line.minor, fields.iter(buf), len)?;
    let shape = shape_of(buf, &fields, head.framing, true);
    Ok((head, shape))
}

/// Any response head httparse takes.
fn parse_response_general(buf: &[u8], head_request: bool) -> Result<ResponseHead, HeadError> {
    // httparse has no uninitialised-headers parse for responses: a short array first (an
    // engine's answer has a handful of headers), the full one only when that is too short.
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    match response_with(buf, head_request, &mut few) {
        Err(HeadError::TooManyHeaders) => {
            let mut all = [httparse::EMPTY_HEADER; MAX_HEADERS];
            response_with(buf, head_request, &mut all)
        }
        r => r,
    }
}

/// Response headers tried before `MAX_HEADERS`.
const FEW_HEADERS: usize = 24;

fn response_with<'b>(
    buf: &'b [u8],
    head_request: bool,
    headers: &mut [httparse::Header<'b>],
) -> Result<ResponseHead, HeadError> {
    let mut resp = httparse::Response::new(headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Malformed("malformed status line or header")),
    };
    let line = StatusLine {
        code: resp.code.unwrap_or(0),
        minor: resp.version.unwrap_or(1),
    };
    response_from(
        line,
        resp.headers.iter().map(Field::from),
        len,
        head_request,
    )
}

/// What a status line says (either parser makes one).
struct StatusLine {
    code: u16,
    minor: u8,
}

/// What a parsed response head says, checked (the same for either parser).
fn response_from<'b>(
    line: StatusLine,
    fields: impl Iterator<Item = Field<'b>>,
    len: usize,
    head_request: bool,
) -> Result<ResponseHead, HeadError> {
    let status =
        StatusCode::from_u16(line.code).map_err(|_| HeadError::Malformed("invalid status code"))?;
    let minor_version = line.minor;
    let mut fh = FramingHeaders::default();
    let mut content_type = None;
    let mut content_encoding = None;
    for h in fields {
        let name = Name::of(h.name);
        if fh.observe(name, h.value)? {
            continue;
        }
        if name == Name::ContentType {
            content_type = Some(self::content_type(h.value)?);
        } else if name == Name::ContentEncoding {
            let v = value_str(h.value, "invalid Content-Encoding")?;
            if !v.eq_ignore_ascii_case("identity") {
                content_encoding = Some(v.to_string());
            }
        }
    }
    if fh.content_length.is_some() && fh.chunked {
        return Err(HeadError::Malformed(
            "both Content-Length and Transfer-Encoding are present",
        ));
    }
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::None
    } else if fh.chunked {
        Framing::Chunked
    } else if let Some(n) = fh.content_length {
        if n == 0 {
            Framing::None
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::UntilClose
    };
    let keep_alive = fh.keep_alive(minor_version) && framing != Framing::UntilClose;
    Ok(ResponseHead {
        status,
        framing,
        keep_alive,
        content_type,
        content_encoding,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_headers_it_does_not_act_on() {
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nUser-Agent: u\r\nConnection: keep-alive, X-Hop\r\nContent-Length: 0\r\nX-Hop: 1\r\nAuthorization: Bearer k\r\n\r\n";
        let h = parse_request(raw).unwrap();
        assert_eq!(
            std::str::from_utf8(&h.headers).unwrap(),
            "User-Agent: u\r\nX-Hop: 1\r\nAuthorization: Bearer k\r\n"
        );
        assert_eq!(h.connection.as_deref(), Some("X-Hop"));
        assert_eq!(h.authorization.as_deref(), Some("Bearer k"));
        let h = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
        assert!(h.headers.is_empty() && h.connection.is_none());
    }

    #[test]
    fn parses_request() {
        let raw = b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 5\r\nX-Request-Id: abc\r\n\r\nhello";
        let h = parse_request(raw).unwrap();
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.route(), "/v1/completions");
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.request_id.as_deref(), Some("abc"));
        assert!(h.keep_alive);
        assert_eq!(h.len, raw.len() - 5);
    }

    #[test]
    fn rejects_smuggling() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_request(raw), Err(HeadError::Malformed(_))));
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(matches!(parse_request(raw), Err(HeadError::Malformed(_))));
        let raw = b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n";
        assert!(matches!(parse_request(raw), Err(HeadError::Malformed(_))));
        for bad in [
            &b"5 5"[..],
            b"",
            b"-1",
            b"0x5",
            b"18446744073709551616",
            b"\xff5",
        ] {
            let mut raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ".to_vec();
            raw.extend_from_slice(bad);
            raw.extend_from_slice(b"\r\n\r\n");
            assert!(
                matches!(parse_request(&raw), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
        // 19 digits and fewer are read unchecked, longer ones step by step: both ends agree.
        for (value, want) in [
            ("18446744073709551615", u64::MAX),
            ("9999999999999999999", 9_999_999_999_999_999_999),
            ("0000000000000000000000000007", 7),
            ("007", 7),
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(
                parse_request(raw.as_bytes()).unwrap().framing,
                Framing::Length(want),
                "{value}"
            );
        }
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_request(raw), Err(HeadError::Malformed(_))));
        let raw = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        assert!(parse_request(raw).unwrap().keep_alive);
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection:  CLOSE \r\n\r\n";
        let h = parse_request(raw).unwrap();
        assert!(!h.keep_alive && h.connection.is_none());
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert!(matches!(parse_request(raw), Err(HeadError::Malformed(_))));
    }

    #[test]
    fn host_is_required_in_http11_only() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\r\n").unwrap_err(),
            HeadError::Malformed("missing Host header")
        );
        assert!(parse_request(b"GET / HTTP/1.0\r\n\r\n").is_ok());
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").unwrap_err(),
            HeadError::Malformed("duplicate Host header")
        );
    }

    #[test]
    fn partial_and_garbage() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost").unwrap_err(),
            HeadError::Partial
        );
        assert!(matches!(
            parse_request(b"\x00\x01 garbage\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn response_framing() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.keep_alive);
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!(r.framing, Framing::UntilClose);
        assert!(!r.keep_alive);
        // More headers than the first try holds, up to the limit; beyond it, refused.
        let many = |n: usize| {
            let mut h = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
            for i in 0..n {
                h.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            h.extend_from_slice(b"\r\nok");
            h
        };
        let r = parse_response(&many(100), false).unwrap();
        assert_eq!(r.framing, Framing::Length(2));
        assert_eq!(
            parse_response(&many(200), false).unwrap_err(),
            HeadError::TooManyHeaders
        );
        let r = parse_response(b"HTTP/1.0 204 No Content\r\n\r\n", false).unwrap();
        assert_eq!(r.framing, Framing::None);
        assert!(!r.keep_alive);
    }
}
