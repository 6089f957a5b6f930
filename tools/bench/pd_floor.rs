//! The floor under a 1P+1D request on this bench: a proxy that makes the six socket operations
//! xpyd makes per request — read the client's request, write the prefill node and read its
//! answer, write the decode node and read its answer, write the client — on xpyd's own runtime
//! (`xpyd::runtime`: monoio, the same ring set-up and receive flags, one `SO_REUSEPORT`
//! listener per worker, kept-alive upstream connections per worker) and nothing else: no
//! inspection, scheduling, metrics, timers, retries or checks. The prefill node gets a fixed
//! request (body: `PD_FLOOR_PREFILL_BODY`, default tools/bench/post.lua's with `max_tokens` 1); the
//! decode node gets the client's request bytes as they came; the client gets the decode node's
//! answer bytes read by read, each written at once (a stream's tokens as they come). Requests
//! and the prefill answer are delimited by `Content-Length`, the decode answer by it or by its
//! chunked body's last chunk: it is a measuring stick for `wrk` and `xpyd-streamload`, not a
//! proxy. It awaits each write before it reads the answer; xpyd submits the two together.
//! What it reaches is about the most a proxy on this runtime can reach on this bench
//! (docs/benchmarks.md, "The floor under a request").
//!
//! PREFILL_ADDR `none`: the dual floor — the four operations of a dual request (read the client,
//! write the node and read its answer, write the client); DECODE_ADDR is then the dual node.
//!
//! DRIVER `raw`: the same six operations with no runtime at all — each worker a bare io_uring
//! (the io-uring crate, `COOP_TASKRUN` + `SINGLE_ISSUER`, receives with
//! `IORING_RECVSEND_POLL_FIRST`, as xpyd's ring) and a state machine per client connection,
//! which owns one prefill and one decode connection (connected when the client's is accepted).
//! It reads `Content-Length` answers only (`wrk`'s load) and shows what the runtime itself
//! costs.
//!
//!   cargo run --release --example pd-floor -- PORT PREFILL_ADDR|none DECODE_ADDR [WORKERS] [DRIVER|raw]
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use xpyd::runtime::{self, Driver};

const PREFILL_BODY: &str = r#"{"model":"bench-model","prompt":"The quick brown fox jumps over the lazy dog","max_tokens":1}"#;

/// How a message's body ends.
#[derive(Clone, Copy)]
enum Framing {
    /// The whole message's length, head included.
    Length(usize),
    /// At the last chunk: a stream's bytes end with `CHUNKED_END`.
    Chunked,
}

/// The end of the last chunk of a chunked body (with no trailer).
const CHUNKED_END: &[u8] = b"\r\n0\r\n\r\n";

/// The framing of the message whose head `buf` starts with, once the head is whole.
fn framing(buf: &[u8]) -> io::Result<Option<Framing>> {
    let Some(head_end) = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        return Ok(None);
    };
    for line in buf[..head_end].split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = std::str::from_utf8(&line[colon + 1..]).unwrap_or("").trim();
        if line[..colon].eq_ignore_ascii_case(b"content-length") {
            let len = value.parse::<usize>().map_err(io::Error::other)?;
            return Ok(Some(Framing::Length(head_end + len)));
        }
        if line[..colon].eq_ignore_ascii_case(b"transfer-encoding") && value == "chunked" {
            return Ok(Some(Framing::Chunked));
        }
    }
    Err(io::Error::other(
        "pd-floor reads Content-Length or chunked messages only",
    ))
}

/// Where the request `req` asks to close its connection after the answer (`xpyd-streamload`
/// does, and reads its answer to the end of the connection): that `Connection` line's range.
fn close_line(req: &[u8]) -> Option<std::ops::Range<usize>> {
    let head_end = memchr::memmem::find(req, b"\r\n\r\n")?;
    let mut at = 0;
    for line in req[..head_end + 2].split_inclusive(|&b| b == b'\n') {
        let close = line.len() > 11
            && line[..11].eq_ignore_ascii_case(b"connection:")
            && std::str::from_utf8(&line[11..])
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("close"));
        if close {
            return Some(at..at + line.len());
        }
        at += line.len();
    }
    None
}

/// Where the first whole `Content-Length` message in `buf` ends.
fn message_end(buf: &[u8]) -> io::Result<Option<usize>> {
    match framing(buf)? {
        None => Ok(None),
        Some(Framing::Length(end)) => Ok((buf.len() >= end).then_some(end)),
        Some(Framing::Chunked) => Err(io::Error::other(
            "a chunked message where a whole one is read",
        )),
    }
}

/// One read appended to `buf`: how many bytes it brought (0 at the end of the stream).
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let len = buf.len();
    let (r, slice) = s.read(std::mem::take(buf).slice_mut(len..)).await;
    *buf = slice.into_inner();
    r
}

/// Reads until `buf` holds a whole message; its length, or `None` at a clean end of stream.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    loop {
        if let Some(end) = message_end(buf)? {
            return Ok(Some(end));
        }
        if read_more(s, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// One node's kept-alive connections on this worker.
struct Pool {
    addr: SocketAddr,
    idle: RefCell<Vec<TcpStream>>,
}

impl Pool {
    /// A kept-alive connection, or a new one.
    async fn take(&self) -> io::Result<TcpStream> {
        let popped = self.idle.borrow_mut().pop();
        match popped {
            Some(c) => Ok(c),
            None => {
                let c = TcpStream::connect(self.addr).await?;
                c.set_nodelay(true)?;
                Ok(c)
            }
        }
    }

    /// Sends `req` on a kept-alive (or new) connection and reads the whole answer into `out`.
    async fn exchange(&self, req: Vec<u8>, out: &mut Vec<u8>) -> io::Result<Vec<u8>> {
        let mut c = self.take().await?;
        let (r, req) = c.write_all(req).await;
        r?;
        out.clear();
        let end = read_message(&mut c, out)
            .await?
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end == out.len() {
            self.idle.borrow_mut().push(c);
        }
        Ok(req)
    }

    /// Sends `req` and relays the answer to `client` read by read, each read written at once
    /// (a stream's tokens as they come), until its framing says it ended. `buf` is scratch.
    async fn relay(
        &self,
        req: Vec<u8>,
        client: &mut TcpStream,
        buf: &mut Vec<u8>,
    ) -> io::Result<Vec<u8>> {
        let mut c = self.take().await?;
        let (r, req) = c.write_all(req).await;
        r?;
        buf.clear();
        // The stream's last bytes, to see the last chunk's end across reads.
        let (mut frame, mut seen, mut tail) = (None, 0usize, [0u8; CHUNKED_END.len()]);
        loop {
            if read_more(&mut c, buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if frame.is_none() {
                frame = framing(buf)?;
                if frame.is_none() {
                    continue; // the head is not whole yet
                }
            }
            seen += buf.len();
            let n = buf.len().min(tail.len());
            tail.copy_within(n.., 0);
            let keep = tail.len() - n;
            tail[keep..].copy_from_slice(&buf[buf.len() - n..]);
            let (r, b) = client.write_all(std::mem::take(buf)).await;
            *buf = b;
            r?;
            buf.clear();
            let done = match frame {
                Some(Framing::Length(end)) => seen >= end,
                _ => tail == *CHUNKED_END,
            };
            if done {
                break;
            }
        }
        self.idle.borrow_mut().push(c);
        Ok(req)
    }
}

async fn serve(
    mut client: TcpStream,
    prefill: Option<Rc<Pool>>,
    decode: Rc<Pool>,
    prefill_req: Rc<[u8]>,
) {
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut answer = Vec::with_capacity(16 * 1024);
    let mut preq = prefill_req.to_vec();
    loop {
        let end = match read_message(&mut client, &mut buf).await {
            Ok(Some(end)) => end,
            _ => return,
        };
        // The upstream connection stays pooled: a `Connection: close` is the client's alone
        // (hop-by-hop), and the request goes on without it.
        let close = close_line(&buf[..end]);
        let end = match &close {
            Some(line) => {
                buf.drain(line.clone());
                end - line.len()
            }
            None => end,
        };
        let r = async {
            if let Some(prefill) = &prefill {
                preq = prefill
                    .exchange(std::mem::take(&mut preq), &mut answer)
                    .await?;
            }
            // The client's request goes on as it came; its buffer comes back for the next.
            let req = if end == buf.len() {
                std::mem::take(&mut buf)
            } else {
                let rest = buf.split_off(end);
                std::mem::replace(&mut buf, rest)
            };
            let mut sent = decode.relay(req, &mut client, &mut answer).await?;
            if buf.is_empty() {
                sent.clear();
                buf = sent;
            }
            io::Result::Ok(())
        }
        .await;
        if r.is_err() || close.is_some() {
            return;
        }
    }
}

/// The fixed prefill request: `PD_FLOOR_PREFILL_BODY`, else `PREFILL_BODY`.
fn prefill_request(paddr: Option<SocketAddr>) -> Vec<u8> {
    let Some(paddr) = paddr else {
        return Vec::new();
    };
    let body = std::env::var("PD_FLOOR_PREFILL_BODY").unwrap_or_else(|_| PREFILL_BODY.into());
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {paddr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The floor without a runtime: one bare ring per worker.
mod raw {
    use super::message_end;
    use io_uring::{opcode, squeue, types, IoUring};
    use std::io;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

    /// A connection's step, in the low byte of an operation's user data (its index above).
    const ACCEPT: u64 = 0;
    const READ_CLIENT: u64 = 1;
    const READ_PREFILL: u64 = 2;
    const READ_DECODE: u64 = 3;
    const SEND: u64 = 4;
    const BUF: usize = 16 * 1024;

    struct Conn {
        client: RawFd,
        /// -1 for the dual floor.
        prefill: RawFd,
        decode: RawFd,
        /// The client's request; it goes on to the decode node as it came.
        req: Vec<u8>,
        /// The prefill answer (read whole, then dropped).
        pre: Vec<u8>,
        /// The decode answer, sent to the client as it came.
        ans: Vec<u8>,
        /// How much of the buffer being read holds data.
        filled: usize,
        /// The client's request's length in `req` (a pipelined rest is not served).
        req_len: usize,
        open: bool,
    }

    /// `IORING_RECVSEND_POLL_FIRST` in the SQE's `ioprio` (byte offset 2), as vendor/monoio does.
    fn poll_first(mut e: squeue::Entry) -> squeue::Entry {
        // SAFETY: `Entry` is `#[repr(C)]` around the 64-byte `io_uring_sqe`.
        unsafe {
            ((&mut e as *mut squeue::Entry as *mut u8).add(2) as *mut u16).write_unaligned(1)
        };
        e
    }

    fn push(ring: &mut IoUring, e: squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points at is a connection's, kept until the process
        // exits (connections are never freed; see `worker`).
        while unsafe { ring.submission().push(&e) }.is_err() {
            ring.submit()?;
        }
        Ok(())
    }

    fn recv(ring: &mut IoUring, fd: RawFd, buf: &mut [u8], ud: u64) -> io::Result<()> {
        let e = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).build();
        push(ring, poll_first(e).user_data(ud))
    }

    fn send(ring: &mut IoUring, fd: RawFd, buf: &[u8], ud: u64) -> io::Result<()> {
        let e = opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32).build();
        push(ring, e.user_data(ud))
    }

    fn connect(addr: SocketAddr) -> io::Result<RawFd> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(s.into_raw_fd())
    }

    /// Each buffer is sent from while the next step reads into another one; a buffer is read
    /// into again only after the peer it was sent to has answered, so the kernel is done with it.
    pub fn worker(
        l: TcpListener,
        paddr: Option<SocketAddr>,
        daddr: SocketAddr,
        preq: Vec<u8>,
    ) -> io::Result<()> {
        let mut ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(4096)?;
        let lfd = l.as_raw_fd();
        let accept = || {
            opcode::Accept::new(types::Fd(lfd), std::ptr::null_mut(), std::ptr::null_mut()).build()
        };
        push(&mut ring, accept().user_data(ACCEPT))?;
        // Boxed so that a buffer's address stays put while the vector grows; never freed,
        // so a late completion of a closed connection finds its entry (a bench tool: wrk
        // opens a few hundred connections per run).
        let mut conns: Vec<Box<Conn>> = Vec::new();
        let mut done = Vec::new();
        loop {
            ring.submit_and_wait(1)?;
            done.clear();
            done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &done {
                let (i, step) = ((ud >> 8) as usize, ud & 0xff);
                if step == ACCEPT {
                    push(&mut ring, accept().user_data(ACCEPT))?;
                    if res < 0 {
                        continue;
                    }
                    let prefill = paddr.map_or(Ok(-1), connect)?;
                    let decode = connect(daddr)?;
                    conns.push(Box::new(Conn {
                        client: res,
                        prefill,
                        decode,
                        req: vec![0; BUF],
                        pre: vec![0; BUF],
                        ans: vec![0; BUF],
                        filled: 0,
                        req_len: 0,
                        open: true,
                    }));
                    let i = conns.len() - 1;
                    let c = &mut conns[i];
                    recv(
                        &mut ring,
                        c.client,
                        &mut c.req,
                        (i as u64) << 8 | READ_CLIENT,
                    )?;
                    continue;
                }
                let c = &mut conns[i];
                if !c.open {
                    continue;
                }
                if step == SEND {
                    if res < 0 {
                        close(c);
                    }
                    continue;
                }
                if res <= 0 {
                    close(c);
                    continue;
                }
                c.filled += res as usize;
                let buf = match step {
                    READ_CLIENT => &mut c.req,
                    READ_PREFILL => &mut c.pre,
                    _ => &mut c.ans,
                };
                let Ok(complete) = message_end(&buf[..c.filled]) else {
                    close(c);
                    continue;
                };
                let Some(end) = complete else {
                    if c.filled == buf.len() {
                        close(c);
                        continue;
                    }
                    let (fd, f) = (
                        match step {
                            READ_CLIENT => c.client,
                            READ_PREFILL => c.prefill,
                            _ => c.decode,
                        },
                        c.filled,
                    );
                    recv(&mut ring, fd, &mut buf[f..], ud)?;
                    continue;
                };
                c.filled = 0;
                let at = (i as u64) << 8;
                // The write and the read of its answer go out in the same turn, as in xpyd.
                if step == READ_CLIENT {
                    c.req_len = end;
                }
                match step {
                    READ_CLIENT if c.prefill >= 0 => {
                        send(&mut ring, c.prefill, &preq, at | SEND)?;
                        recv(&mut ring, c.prefill, &mut c.pre, at | READ_PREFILL)?;
                    }
                    READ_CLIENT | READ_PREFILL => {
                        send(&mut ring, c.decode, &c.req[..c.req_len], at | SEND)?;
                        recv(&mut ring, c.decode, &mut c.ans, at | READ_DECODE)?;
                    }
                    _ => {
                        send(&mut ring, c.client, &c.ans[..end], at | SEND)?;
                        recv(&mut ring, c.client, &mut c.req, at | READ_CLIENT)?;
                    }
                }
            }
        }
    }

    fn close(c: &mut Conn) {
        c.open = false;
        for fd in [c.client, c.prefill, c.decode]
            .into_iter()
            .filter(|&fd| fd >= 0)
        {
            // SAFETY: the connection's own descriptors, closed once.
            unsafe { libc::close(fd) };
        }
    }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: pd-floor PORT PREFILL_ADDR|none DECODE_ADDR [WORKERS] [DRIVER|raw]");
        std::process::exit(2);
    }
    let port: u16 = args[1].parse().map_err(io::Error::other)?;
    let paddr: Option<SocketAddr> = match args[2].as_str() {
        "none" => None,
        a => Some(a.parse().map_err(io::Error::other)?),
    };
    let daddr: SocketAddr = args[3].parse().map_err(io::Error::other)?;
    let workers = args
        .get(4)
        .map_or(Ok(2), |w| w.parse())
        .map_err(io::Error::other)?;
    let listeners = runtime::bind_listeners("127.0.0.1", port, workers)?;
    if args.get(5).map(String::as_str) == Some("raw") {
        println!("listening on http://{}", listeners[0].local_addr()?);
        let prefill_req = prefill_request(paddr);
        let handles: Vec<_> = listeners
            .into_iter()
            .map(|l| {
                let req = prefill_req.clone();
                std::thread::spawn(move || raw::worker(l, paddr, daddr, req))
            })
            .collect();
        for h in handles {
            if let Ok(Err(e)) = h.join() {
                eprintln!("pd-floor: {e}");
            }
        }
        return Ok(());
    }
    // DRIVER, else XPYD_DRIVER, else auto: as xpyd's `--driver`.
    let driver = args
        .get(5)
        .map(|d| d.parse())
        .transpose()
        .map_err(io::Error::other)?;
    let driver = Driver::resolve(driver).map_err(io::Error::other)?;
    let prefill_req = prefill_request(paddr);
    println!("listening on http://{}", listeners[0].local_addr()?);
    let handles = runtime::spawn_workers("floor", driver, listeners, false, move |_, l| {
        let prefill_req: Rc<[u8]> = prefill_req.clone().into();
        async move {
            let pool = |addr| {
                Rc::new(Pool {
                    addr,
                    idle: RefCell::new(Vec::new()),
                })
            };
            let (prefill, decode) = (paddr.map(pool), pool(daddr));
            let Ok(l) = monoio::net::TcpListener::from_std(l) else {
                return;
            };
            while let Ok((c, _)) = l.accept().await {
                monoio::spawn(serve(
                    c,
                    prefill.clone(),
                    decode.clone(),
                    prefill_req.clone(),
                ));
            }
        }
    })?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
