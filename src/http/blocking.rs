//! A small blocking HTTP/1.1 client for the control plane (health probes, the demo): one
//! request per connection, timeouts on every socket operation. Never used by workers.

use super::chunked::ChunkedDecoder;
use super::head::{parse_response, Framing, HeadError};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {addr}")))
}

/// Sends one request and reads the whole response; `on_body` sees every decoded piece of the
/// body as it arrives (the demo prints a stream this way).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    mut on_body: impl FnMut(&[u8]),
) -> io::Result<Response> {
    let sock = resolve(addr)?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    stream.write_all(&out)?;

    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let head = loop {
        match parse_response(&buf, method == "HEAD") {
            Ok(h) => break h,
            Err(HeadError::Partial) => {}
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad response head",
                ))
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut rest = buf.split_off(head.len);
    let mut body_out = Vec::new();
    let mut sink = |d: &[u8]| {
        on_body(d);
        body_out.extend_from_slice(d);
    };
    match head.framing {
        Framing::None => {}
        Framing::Length(n) => {
            let n = n as usize;
            let mut got = rest.len().min(n);
            sink(&rest[..got]);
            while got < n {
                let r = stream.read(&mut chunk)?;
                if r == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let take = r.min(n - got);
                sink(&chunk[..take]);
                got += take;
            }
        }
        Framing::Chunked => {
            let mut dec = ChunkedDecoder::new();
            loop {
                dec.feed(&rest, &mut sink)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                if dec.is_done() {
                    break;
                }
                let r = stream.read(&mut chunk)?;
                if r == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                rest.clear();
                rest.extend_from_slice(&chunk[..r]);
            }
        }
        Framing::UntilClose => {
            sink(&rest);
            loop {
                let r = stream.read(&mut chunk)?;
                if r == 0 {
                    break;
                }
                sink(&chunk[..r]);
            }
        }
    }
    Ok(Response {
        status: head.status.as_u16(),
        content_type: head.content_type.map(std::borrow::Cow::into_owned),
        body: body_out,
    })
}
