//! What one request carries through its legs and relays: the worker, the client and how it
//! is answered, what the backends are sent, and when things happened.

use super::failure::RelayError;
use super::forward_headers::Forwarding;
use super::outcome::{self, Outcome};
use super::timeline::Timeline;
use super::Worker;
use crate::config::Policy;
use crate::http::conn::ClientWriter;
use crate::http::ApiError;
use crate::shared::Snapshot;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use std::borrow::Cow;

pub struct RequestCtx<'a> {
    pub w: &'a Worker,
    pub request_id: &'a str,
    /// The client's connection, written only by this request.
    pub client: &'a mut ClientWriter,
    /// The client's connection may serve another request after this one.
    pub keep_alive: bool,
    /// The client speaks HTTP/1.0: no chunked bodies, a close ends the body.
    pub http10: bool,
    /// The path the backends are sent (the client's).
    pub path: &'a str,
    /// `Authorization` for the backends.
    pub authorization: Option<Cow<'a, str>>,
    /// The client's headers and the trace context the legs carry.
    pub forward: Forwarding<'a>,
    pub tl: Timeline,
    /// The policy as the request found it, for all its legs and relays: one load per
    /// request instead of one per use (a reload applies to the next request).
    pub policy: Snapshot<Policy>,
}

impl RequestCtx<'_> {
    /// Answers with `err`; nothing was sent to the client yet.
    pub async fn answer_error(&mut self, err: &ApiError) -> Outcome {
        outcome::answer_error(self.client, err, Some(self.request_id), self.keep_alive).await
    }

    /// Writes `out` whole to the client and hands the buffer back (cleared).
    pub async fn write(&mut self, out: Vec<u8>) -> Result<Vec<u8>, RelayError> {
        write_client(self.client, out).await
    }
}

/// Writes `out` whole to the client and hands the buffer back, cleared; an error means the
/// client left. One send nearly always takes it: monoio's `write_all` future is larger than a
/// send's, and awaiting it copied it into the request's state at every write (-225
/// instructions per relayed token: docs/benchmarks.md, "Per relayed token"); a short write
/// goes on with `write_all`. One async fn, not a wrapper around another: each level is a state
/// machine resumed at the write's completion ("Fewer state machines per wake-up").
pub async fn write_client<W: AsyncWriteRent>(
    client: &mut W,
    out: Vec<u8>,
) -> Result<Vec<u8>, RelayError> {
    use std::io::ErrorKind;
    let len = out.len();
    if len == 0 {
        return Ok(out);
    }
    let (res, out) = client.write(out).await;
    let written = match res {
        Ok(0) => return Err(RelayError::ClientGone),
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::Interrupted => 0,
        Err(_) => return Err(RelayError::ClientGone),
    };
    let mut out = if written == len {
        out
    } else {
        let (res, rest) = client
            .write_all(monoio::buf::IoBuf::slice(out, written..))
            .await;
        res.map_err(|_| RelayError::ClientGone)?;
        rest.into_inner()
    };
    out.clear();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::write_client;
    use crate::runtime::{block_on, Driver};
    use std::io::Read;

    /// A write the socket takes in pieces (a send buffer of a few KiB against 1 MiB) arrives
    /// whole and in order: the short-write path.
    #[test]
    fn a_write_taken_in_pieces_arrives_whole() {
        let drivers = if monoio::utils::detect_uring() {
            vec![Driver::Epoll, Driver::IoUring]
        } else {
            vec![Driver::Epoll]
        };
        for driver in drivers {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
            let expect = data.clone();
            let reader = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                got
            });
            let res = block_on(driver, async move {
                let mut s = monoio::net::TcpStream::connect(addr).await.unwrap();
                // SAFETY: the descriptor is the stream's, open for the borrow's length.
                let fd = unsafe {
                    std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&s))
                };
                socket2::SockRef::from(&fd)
                    .set_send_buffer_size(4096)
                    .unwrap();
                write_client(&mut s, data).await
            })
            .unwrap();
            let back = res.unwrap();
            assert!(
                back.is_empty() && back.capacity() >= 1 << 20,
                "{driver:?}: the buffer comes back, cleared"
            );
            let got = reader.join().unwrap();
            assert!(got == expect, "{driver:?}: {} bytes arrived", got.len());
        }
    }
}
