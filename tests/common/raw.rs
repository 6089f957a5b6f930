//! A raw-TCP HTTP/1.1 backend in the test process, for faults xpyd-dummy cannot make: it
//! answers the proxy's probes (`/health`, `/v1/models`) itself and hands every other
//! request to a script that writes whatever bytes it wants.

use super::MODEL;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

pub struct RawRequest {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// The request asked for `Connection: close`.
    pub close: bool,
}

/// A complete request at the start of `buf`, and its length.
pub fn parse_request(buf: &[u8]) -> Option<(usize, RawRequest)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let mut len = 0usize;
    let mut close = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse().ok()?;
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    if buf.len() < end + len {
        return None;
    }
    let req = RawRequest {
        method,
        path,
        body: buf[end..end + len].to_vec(),
        close,
    };
    Some((end + len, req))
}

/// A complete response with a `Content-Length` body.
pub fn response(status: &str, content_type: &str, body: &str, close: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// The answer to the proxy's health and model probes, if `req` is one.
pub fn probe_answer(req: &RawRequest) -> Option<Vec<u8>> {
    let body = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/health") => "{}".to_string(),
        ("GET", "/v1/models") => json!({"object": "list", "data": [{"id": MODEL, "object": "model", "max_model_len": 4096}]}).to_string(),
        _ => return None,
    };
    Some(response("200 OK", "application/json", &body, req.close))
}

/// Closing the socket then sends an RST instead of a FIN.
pub fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized, initialised option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

type Script = dyn Fn(&RawRequest, &mut TcpStream) -> bool + Send + Sync;

/// A node whose answers to everything but the probes are written by `script`, which returns
/// whether the connection stays open for another request.
pub struct ScriptedNode {
    pub addr: SocketAddr,
}

impl ScriptedNode {
    pub fn start(
        script: impl Fn(&RawRequest, &mut TcpStream) -> bool + Send + Sync + 'static,
    ) -> ScriptedNode {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let script: Arc<Script> = Arc::new(script);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let script = script.clone();
                std::thread::spawn(move || serve(conn, &*script));
            }
        });
        ScriptedNode { addr }
    }
}

fn serve(mut s: TcpStream, script: &Script) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some((len, req)) = parse_request(&buf) {
            buf.drain(..len);
            let keep = match probe_answer(&req) {
                Some(answer) => s.write_all(&answer).is_ok() && !req.close,
                None => script(&req, &mut s),
            };
            if !keep {
                return;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
