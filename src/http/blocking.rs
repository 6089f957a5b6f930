//! A small blocking HTTP/1.1 client for the control plane (health probes, the demo): one
//! request per connection, timeouts on every socket operation; and `KeptAlive`, one
//! connection reused for a background thread's stream of POSTs (the span exporter, the
//! replicas' prefix sync). Never used by workers.

use super::chunked::ChunkedDecoder;
use super::head::{parse_response, Framing, HeadError, ResponseHead};
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
    let head = read_head(&mut stream, &mut buf, method == "HEAD")?;
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

/// Reads into `buf` until it holds a whole response head (at most 64 KiB) and parses it.
fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> io::Result<ResponseHead> {
    let mut chunk = [0u8; 4096];
    loop {
        match parse_response(buf, head_request) {
            Ok(h) => return Ok(h),
            Err(HeadError::Partial) if buf.len() < 64 * 1024 => {}
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad response head",
                ))
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One connection kept for repeated POSTs to one peer. A background thread that posts a
/// batch every few milliseconds on a fresh connection each would leave tens of thousands
/// of sockets in TIME_WAIT.
#[derive(Default)]
pub struct KeptAlive {
    conn: Option<TcpStream>,
}

impl KeptAlive {
    /// Posts `body` and reads the answer's head (and its body, when it has a length, so
    /// that the connection can carry the next one); the answer's status. A kept connection
    /// that fails before an answer (closed by the peer while idle) is replaced once.
    pub fn post(
        &mut self,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> io::Result<http::StatusCode> {
        if self.conn.is_some() {
            match self.exchange(addr, path, headers, body) {
                Ok(status) => return Ok(status),
                Err(_) => self.conn = None,
            }
        }
        let s = TcpStream::connect_timeout(&resolve(addr)?, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        self.conn = Some(s);
        let r = self.exchange(addr, path, headers, body);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn exchange(
        &mut self,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<http::StatusCode> {
        let Some(s) = self.conn.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let mut head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let h = read_head(s, &mut buf, false)?;
        let reusable = match h.framing {
            Framing::None => h.keep_alive,
            Framing::Length(n) => {
                let want = h.len + n as usize;
                while buf.len() < want {
                    let k = s.read(&mut chunk)?;
                    if k == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    buf.extend_from_slice(&chunk[..k]);
                }
                h.keep_alive
            }
            // Not worth decoding here: the next batch takes a new connection.
            Framing::Chunked | Framing::UntilClose => false,
        };
        if !reusable {
            self.conn = None;
        }
        Ok(h.status)
    }
}
