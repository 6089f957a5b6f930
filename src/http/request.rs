//! Reading one complete request (head and body) from a server-side connection.

use super::buf::ReadBuf;
use super::chunked::ChunkedDecoder;
use super::error::ApiError;
use super::head::{parse_request, Framing, HeadError, RequestHead, RequestMemo};
use crate::clock::{after, recent};
use crate::deadline::Deadline;
use bytes::Bytes;
use http::StatusCode;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use std::borrow::Cow;
use std::io;
use std::pin::pin;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request-target (path and query); longer: 414.
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    /// From the first byte of a request to its last (slow senders are cut: 408).
    pub header_timeout: Duration,
    /// Waiting for the first byte of the next request on a kept-alive connection.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
            header_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
        }
    }
}

/// One read, bounded by the deadline in force.
async fn fill_by<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut ReadBuf,
    want: usize,
    deadline: &mut Deadline,
) -> Result<usize, ReadError> {
    match deadline.bound(pin!(buf.fill_at_least(stream, want))).await {
        Some(r) => Ok(r?),
        None => Err(ReadError::TimedOut),
    }
}

/// A request read whole. Its head is borrowed from the connection's `RequestMemo` when the
/// memo recalled or kept it (no copy), else owned.
pub struct Request<'m> {
    pub head: Cow<'m, RequestHead>,
    pub body: Bytes,
}

#[derive(Debug)]
pub enum ReadError {
    /// The peer closed cleanly between requests.
    Closed,
    Io(io::Error),
    /// The request cannot be served; answer this and close.
    Reject(ApiError),
    /// Idle too long between requests (close quietly) or mid-request (answer 408).
    TimedOut,
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn reject(status: StatusCode, msg: impl Into<String>) -> ReadError {
    ReadError::Reject(ApiError::new(status, "invalid_request_error", msg).closing())
}

/// Reads the next request. Bytes after it stay in `buf` (pipelining). `deadline`: the
/// connection's, kept from one request to the next (one timer per connection). `heads`: the
/// connection's last request head, to recognise the next (`head::memo`).
pub async fn read_request<'m, S: AsyncReadRent + AsyncWriteRent>(
    stream: &mut S,
    buf: &mut ReadBuf,
    limits: &Limits,
    deadline: &mut Deadline,
    mut heads: Option<&'m mut RequestMemo>,
) -> Result<Request<'m>, ReadError> {
    // Idle wait for the first byte, then the whole request within the header timeout.
    let mut started = !buf.is_empty();
    deadline.set(after(
        recent(),
        if started {
            limits.header_timeout
        } else {
            limits.keepalive_timeout
        },
    ));
    // `None`: the memo holds the head (`last`).
    let owned = loop {
        let parsed = match heads.as_deref_mut() {
            Some(m) => m.parse_in_place(buf.data()),
            None => parse_request(buf.data()).map(Some),
        };
        match parsed {
            Ok(h) => break h,
            Err(HeadError::Partial) => {
                if request_line_too_long(buf.data(), limits.max_uri_bytes) {
                    return Err(uri_too_long(limits));
                }
                if buf.len() >= limits.max_header_bytes {
                    return Err(reject(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request headers too large",
                    ));
                }
                let n = match fill_by(stream, buf, 8 * 1024, deadline).await {
                    Err(ReadError::TimedOut) if !started => return Err(ReadError::Closed),
                    Err(ReadError::TimedOut) => return Err(timed_out()),
                    r => r?,
                };
                if n == 0 {
                    return Err(if buf.is_empty() {
                        ReadError::Closed
                    } else {
                        ReadError::Io(io::ErrorKind::UnexpectedEof.into())
                    });
                }
                if !started {
                    started = true;
                    deadline.set(after(recent(), limits.header_timeout));
                }
            }
            Err(HeadError::TooManyHeaders) => {
                return Err(reject(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too many request headers",
                ))
            }
            Err(HeadError::Malformed(m)) => return Err(reject(StatusCode::BAD_REQUEST, m)),
        }
    };
    let head = match (owned, heads) {
        (Some(h), _) => Cow::Owned(h),
        (None, Some(m)) => Cow::Borrowed(m.last()),
        (None, None) => unreachable!("a head is owned unless a memo holds it"),
    };
    if head.path.len() > limits.max_uri_bytes {
        return Err(uri_too_long(limits));
    }
    if head.len > limits.max_header_bytes {
        return Err(reject(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request headers too large",
        ));
    }
    buf.consume(head.len);
    if let Framing::Length(n) = head.framing {
        if n > limits.max_body_bytes as u64 {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body of {n} bytes exceeds the limit of {} bytes",
                    limits.max_body_bytes
                ),
            ));
        }
    }
    if head.expect_continue && head.framing != Framing::None && buf.is_empty() {
        let (res, _) = stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
            .await;
        res?;
    }
    let body = match head.framing {
        Framing::None | Framing::UntilClose => Bytes::new(),
        Framing::Length(n) if buf.len() >= n as usize => {
            let body = Bytes::copy_from_slice(&buf.data()[..n as usize]);
            buf.consume(n as usize);
            body
        }
        Framing::Length(n) => read_rest(stream, buf, n as usize, deadline).await?,
        Framing::Chunked => read_chunked(stream, buf, limits.max_body_bytes, deadline).await?,
    };
    Ok(Request { head, body })
}

/// The request line is still incomplete although it already holds more than a target of
/// `max_uri` bytes plus the longest method and version could take.
fn request_line_too_long(data: &[u8], max_uri: usize) -> bool {
    const METHOD_AND_VERSION: usize = 32;
    data.len() > max_uri + METHOD_AND_VERSION && !data.contains(&b'\n')
}

fn uri_too_long(limits: &Limits) -> ReadError {
    reject(
        StatusCode::URI_TOO_LONG,
        format!(
            "request target longer than {} bytes (limits.max_uri_bytes)",
            limits.max_uri_bytes
        ),
    )
}

fn timed_out() -> ReadError {
    reject(
        StatusCode::REQUEST_TIMEOUT,
        "the request was not received in time",
    )
}

/// A body of `n` bytes not all read yet (a long prompt): what the connection's buffer holds
/// is moved out, and the rest is read straight into the body, never more than it lacks (the
/// bytes after it belong to the next request). The body is not copied again, and the
/// connection's buffer does not grow to the largest body it carried.
async fn read_rest<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut ReadBuf,
    n: usize,
    deadline: &mut Deadline,
) -> Result<Bytes, ReadError> {
    let mut body = Vec::with_capacity(n);
    body.extend_from_slice(buf.data());
    buf.consume(buf.len());
    while body.len() < n {
        let len = body.len();
        // Dropped by the deadline mid-read, the body goes with the read: the connection is
        // answered 408 and closed.
        let (res, slice) = match deadline
            .bound(pin!(stream.read(body.slice_mut(len..n))))
            .await
        {
            Some(r) => r,
            None => return Err(timed_out()),
        };
        body = slice.into_inner();
        if res? == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Bytes::from(body))
}

async fn read_chunked<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut ReadBuf,
    max: usize,
    deadline: &mut Deadline,
) -> Result<Bytes, ReadError> {
    let mut dec = ChunkedDecoder::new();
    let mut body = Vec::new();
    loop {
        let used = dec
            .feed(buf.data(), |d| body.extend_from_slice(d))
            .map_err(|e| reject(StatusCode::BAD_REQUEST, format!("bad chunked body: {e}")))?;
        buf.consume(used);
        if body.len() as u64 + dec.announced() > max as u64 {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {max} bytes"),
            ));
        }
        if dec.is_done() {
            return Ok(Bytes::from(body));
        }
        match fill_by(stream, buf, 64 * 1024, deadline).await {
            Err(ReadError::TimedOut) => return Err(timed_out()),
            Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
            r => r?,
        };
    }
}

/// How long and how much a rejected connection is drained before it is closed.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// Ends a connection whose request was rejected before it was read to its end (an oversized
/// body, a malformed head). Closing a socket with unread input makes the kernel send a
/// reset, which can destroy the error response before the client has read it; so the write
/// side is shut down first and what the client still sends is read and discarded, bounded
/// in time and bytes, before the socket closes.
pub async fn lingering_close<S: AsyncReadRent + AsyncWriteRent>(mut stream: S, mut buf: ReadBuf) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut deadline = Deadline::new();
    deadline.set(Instant::now() + LINGER_TIME);
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        buf.clear();
        match fill_by(&mut stream, &mut buf, 64 * 1024, &mut deadline).await {
            Ok(n) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::request_line_too_long as too_long;

    #[test]
    fn a_request_line_is_too_long_only_while_it_has_not_ended() {
        let line = |n: usize| format!("GET /{} HTTP/1.1", "a".repeat(n));
        assert!(!too_long(line(60).as_bytes(), 64));
        assert!(too_long(line(100).as_bytes(), 32));
        // Ended: the parsed target's length decides, not this.
        assert!(!too_long(
            format!("{}\r\nHost: x", line(100)).as_bytes(),
            32
        ));
        assert!(!too_long(b"", 0));
    }
}
