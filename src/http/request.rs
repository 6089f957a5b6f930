//! Reading one complete request (head and body) from a server-side connection.

use super::buf::ReadBuf;
use super::chunked::ChunkedDecoder;
use super::error::ApiError;
use super::head::{parse_request, Framing, HeadError, RequestHead};
use bytes::Bytes;
use http::StatusCode;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use std::io;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}

pub struct Request {
    pub head: RequestHead,
    pub body: Bytes,
}

#[derive(Debug)]
pub enum ReadError {
    /// The peer closed cleanly between requests.
    Closed,
    Io(io::Error),
    /// The request cannot be served; answer this and close.
    Reject(ApiError),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn reject(status: StatusCode, msg: impl Into<String>) -> ReadError {
    ReadError::Reject(ApiError::new(status, "invalid_request_error", msg).closing())
}

/// Reads the next request. Bytes after it stay in `buf` (pipelining).
pub async fn read_request<S: AsyncReadRent + AsyncWriteRent>(
    stream: &mut S,
    buf: &mut ReadBuf,
    limits: &Limits,
) -> Result<Request, ReadError> {
    let head = loop {
        match parse_request(buf.data()) {
            Ok(h) => break h,
            Err(HeadError::Partial) => {
                if buf.len() >= limits.max_header_bytes {
                    return Err(reject(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "request headers too large",
                    ));
                }
                let n = buf.fill(stream).await?;
                if n == 0 {
                    return Err(if buf.is_empty() {
                        ReadError::Closed
                    } else {
                        ReadError::Io(io::ErrorKind::UnexpectedEof.into())
                    });
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
        Framing::Length(n) => {
            let n = n as usize;
            while buf.len() < n {
                let want = n - buf.len();
                if buf.fill_at_least(stream, want).await? == 0 {
                    return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
            let body = Bytes::copy_from_slice(&buf.data()[..n]);
            buf.consume(n);
            body
        }
        Framing::Chunked => read_chunked(stream, buf, limits.max_body_bytes).await?,
    };
    Ok(Request { head, body })
}

async fn read_chunked<S: AsyncReadRent>(
    stream: &mut S,
    buf: &mut ReadBuf,
    max: usize,
) -> Result<Bytes, ReadError> {
    let mut dec = ChunkedDecoder::new();
    let mut body = Vec::new();
    loop {
        let used = dec
            .feed(buf.data(), |d| body.extend_from_slice(d))
            .map_err(|e| reject(StatusCode::BAD_REQUEST, format!("bad chunked body: {e}")))?;
        buf.consume(used);
        if body.len() > max {
            return Err(reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {max} bytes"),
            ));
        }
        if dec.is_done() {
            return Ok(Bytes::from(body));
        }
        if buf.fill(stream).await? == 0 {
            return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}
