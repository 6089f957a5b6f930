//! Connections to backend instances: a per-worker keep-alive pool (no locks, no sharing) and
//! sending one request and reading its response head.
//!
//! A connection goes back to the pool only after its response was read to the exact end and
//! nothing is left over; any error, or a leg abandoned mid-way, drops (closes) it.
//!
//! While a connection is idle in the pool its next read is already in flight (`Armed`): taken
//! from the pool, a connection whose read has completed received something while idle and is
//! closed; one whose read is still pending sends its request, and that same read is the
//! response's first read. nginx keeps a read event armed on its idle upstream connections for
//! the same reason; docs/resilience.md ("Pooled upstream connections") says what it guarantees.

use crate::clock::after;
use crate::deadline::Deadline;
use crate::hash::FastHash;
use crate::http::buf::{OwnedFill, ReadBuf};
use crate::http::chunked::ChunkedDecoder;
use crate::http::conn::{ReadHalf, SplitStream, WriteHalf};
use crate::http::head::{Framing, HeadError, ResponseHead, ResponseMemo};
use crate::instance::Instance;
use crate::topology::Topology;
use bytes::Bytes;
use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::tcp::ReadOwned;
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

const MAX_IDLE_PER_BACKEND: usize = 1024;
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// A leg's request body.
#[derive(Clone, Copy)]
pub enum Body<'a> {
    /// The client's bytes: behind the head in one write when small, else written as they are
    /// (shared, never copied).
    Shared(&'a Bytes),
    /// Bytes the proxy wrote for this leg (the prefill body, at most `COALESCE_LIMIT`, in a
    /// worker's free buffer): always behind the head in one write.
    Written(&'a [u8]),
}

impl Body<'_> {
    pub fn len(&self) -> usize {
        match self {
            Body::Shared(b) => b.len(),
            Body::Written(b) => b.len(),
        }
    }
}

#[derive(Debug)]
pub enum UpstreamError {
    Connect(io::Error),
    ConnectTimeout,
    /// No response head within the first-byte timeout (connecting included).
    FirstByteTimeout,
    Io(io::Error),
    /// The backend closed before sending a complete response head.
    Closed,
    BadResponse(&'static str),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connect failed: {e}"),
            UpstreamError::ConnectTimeout => f.write_str("connect timed out"),
            UpstreamError::FirstByteTimeout => {
                f.write_str("no response head within the first-byte timeout")
            }
            UpstreamError::Io(e) => write!(f, "i/o error: {e}"),
            UpstreamError::Closed => f.write_str("connection closed before a response"),
            UpstreamError::BadResponse(m) => write!(f, "invalid response: {m}"),
        }
    }
}

pub struct UpstreamConn {
    /// Split, so that the response's first read goes out with the request's write.
    pub stream: SplitStream,
    pub buf: ReadBuf,
    pub addr: SocketAddr,
    /// The connection's one timer, kept in the pool with it: each leg's first-byte timeout,
    /// then its body's idle timeout between reads (docs/benchmarks.md, "One timer per
    /// upstream connection").
    pub deadline: Deadline,
    reused: bool,
}

// Moved between the pool, the leg and the relay: up to 128 bytes the compiler copies it inline,
// larger it became a `memcpy` call per move (docs/benchmarks.md, "One timer per upstream
// connection").
const _: () = assert!(std::mem::size_of::<UpstreamConn>() <= 128);

/// A connection's next read, in flight: it owns the buffer it fills (and gives it back with
/// the read's result), not the read half, and has a type of its own, so it waits inside
/// `Idle` without a box. On io_uring it is submitted when made; on epoll when first polled.
type Armed = OwnedFill<ReadOwned<SliceMut<Vec<u8>>>>;

fn arm(rd: &mut ReadHalf, buf: ReadBuf) -> Armed {
    buf.fill_owned(|spare| rd.read_owned(spare))
}

/// A connection ready to send a request on: its halves, and its read already armed (no other
/// read is started on `rd` until that one completes).
struct Primed {
    rd: ReadHalf,
    wr: WriteHalf,
    fd: RawFd,
    read: Armed,
    deadline: Deadline,
    reused: bool,
}

/// A pooled connection keeps its read buffer (inside its armed read): a reused connection
/// allocates nothing.
struct Idle {
    conn: Primed,
    since: Instant,
}

/// Polls an armed read once without a task to wake: a pooled connection's read is looked at
/// only when the connection is taken (its completion must not wake whoever pooled it).
fn poll_once(read: &mut Armed) -> bool {
    Pin::new(read)
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_ready()
}

/// First capacity of a new connection's read buffer (it grows when a response needs it).
const UPSTREAM_BUF: usize = 8 * 1024;

pub struct Pool {
    /// Per backend, oldest first.
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>, FastHash>>,
    connect_timeout: Duration,
    /// Idle connections older than this are closed, not reused: servers close theirs
    /// (uvicorn, which vLLM runs on, after 5 s), and a reuse would then fail.
    idle_timeout: Duration,
    /// Topology generation the pool last pruned against.
    generation: Cell<u64>,
    /// The response heads the worker's backends send, recognised by their bytes.
    heads: RefCell<ResponseMemo>,
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Pool {
            idle: RefCell::new(HashMap::default()),
            connect_timeout,
            idle_timeout,
            generation: Cell::new(0),
            heads: RefCell::default(),
        }
    }

    /// Closes connections idle for longer than the idle timeout (run periodically by the
    /// worker, so that fds to quiet backends are released too).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            let fresh = list.partition_point(|i| now.duration_since(i.since) > self.idle_timeout);
            list.drain(..fresh);
        }
        idle.retain(|_, l| !l.is_empty());
    }

    /// On a new topology generation, closes idle connections to instances that left it
    /// (removed and drained). One integer compare per request otherwise.
    pub fn sync(&self, topo: &Topology) {
        if self.generation.get() == topo.generation {
            return;
        }
        self.generation.set(topo.generation);
        self.idle
            .borrow_mut()
            .retain(|addr, _| topo.find(*addr).is_some());
    }

    /// A new connection, within the connect timeout and the leg's first-byte deadline `due`.
    async fn connect(
        &self,
        addr: SocketAddr,
        now: Instant,
        due: Instant,
    ) -> Result<Primed, UpstreamError> {
        let connected = after(now, self.connect_timeout);
        let at = monoio::time::Instant::from_std(connected.min(due));
        let stream = match monoio::time::timeout_at(at, TcpStream::connect_addr(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) if due < connected => return Err(UpstreamError::FirstByteTimeout),
            Err(_) => return Err(UpstreamError::ConnectTimeout),
        };
        let _ = stream.set_nodelay(true);
        let (mut rd, wr, fd) = SplitStream::new(stream).into_parts();
        let read = arm(&mut rd, ReadBuf::with_capacity(UPSTREAM_BUF));
        Ok(Primed {
            rd,
            wr,
            fd,
            read,
            deadline: Deadline::new(),
            reused: false,
        })
    }

    /// The newest idle connection to `addr` that is still clean: its armed read has not
    /// completed. One whose read completed received something while idle (a stray or late
    /// response, a FIN, an RST) and is closed, never reused: those bytes would be read as the
    /// answer to the next request, which may be another client's. No syscall: the read's
    /// state is what the worker's last kernel entry reported (docs/resilience.md).
    fn take_idle(&self, addr: SocketAddr, now: Instant) -> Option<Primed> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        // Newest first; if it is too old, so is everything before it.
        while let Some(mut idle) = list.pop() {
            if now.saturating_duration_since(idle.since) > self.idle_timeout {
                list.clear();
                return None;
            }
            if poll_once(&mut idle.conn.read) {
                crate::debug!(
                    "upstream {addr}: idle connection received data or closed; discarding it"
                );
                continue; // its read is over: dropping it closes the connection
            }
            return Some(idle.conn);
        }
        None
    }

    /// Returns a connection whose last response was read to its exact end. Connections to
    /// a draining instance are closed instead.
    ///
    /// Its next read is started here, so that anything the backend sends while the
    /// connection is idle completes it.
    pub fn put_back(&self, conn: UpstreamConn, inst: &Instance) {
        if !conn.buf.is_empty() || inst.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return; // stray bytes: the connection's framing can no longer be trusted
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(conn.addr).or_default();
        if list.len() >= MAX_IDLE_PER_BACKEND {
            return;
        }
        let (mut rd, wr, fd) = conn.stream.into_parts();
        let mut read = arm(&mut rd, conn.buf);
        if poll_once(&mut read) {
            return; // something was already there (epoll reads at once): not reusable
        }
        list.push(Idle {
            conn: Primed {
                rd,
                wr,
                fd,
                read,
                deadline: conn.deadline,
                reused: true,
            },
            since: crate::clock::recent(),
        });
    }

    /// Drops every idle connection to `addr` (after it failed).
    pub fn forget(&self, addr: SocketAddr) {
        self.idle.borrow_mut().remove(&addr);
    }

    /// Sends `head` + `body` and waits for the response head until `due` (the leg's
    /// first-byte deadline: `FirstByteTimeout` after it). A pooled connection that turns
    /// out to be dead before any response byte (the backend closed it while idle) is
    /// replaced by a fresh one once; a fresh connection's failure is reported. The head's
    /// buffer comes back with the response, for reuse. `now`: the caller's clock reading,
    /// for the idle connections' age (one read less per leg).
    pub async fn send(
        &self,
        addr: SocketAddr,
        head: Vec<u8>,
        body: Body<'_>,
        now: Instant,
        due: Instant,
    ) -> Result<(UpstreamConn, ResponseHead, Vec<u8>), UpstreamError> {
        let mut head = head;
        loop {
            let mut ready = match self.take_idle(addr, now) {
                Some(c) => c,
                None => self.connect(addr, now, due).await?,
            };
            // The connection's own timer bounds the wait: a pooled one keeps it from leg to
            // leg, so a leg registers none (the deadline moves later, the timer stays).
            ready.deadline.set(due);
            // By reference: the connection, its armed read inside, is not moved into the
            // future (a copy of it per leg).
            let Primed {
                rd,
                wr,
                read,
                deadline,
                ..
            } = &mut ready;
            // Pinned here and bounded by reference: moved into `bound`, the future (the
            // write and the head's read) was copied again per leg.
            let got = {
                let once = std::pin::pin!(send_once(rd, wr, read, head, body, &self.heads));
                deadline.bound(once).await
            };
            let Some((res, buf, h)) = got else {
                return Err(UpstreamError::FirstByteTimeout);
            };
            head = h;
            let conn = UpstreamConn {
                stream: SplitStream::from_parts(ready.rd, ready.wr, ready.fd),
                buf,
                addr,
                deadline: ready.deadline,
                reused: ready.reused,
            };
            match res {
                Ok(resp) => return Ok((conn, resp, head)),
                Err(e) if conn.reused && conn.buf.is_empty() && is_stale(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_stale(e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Closed => true,
        UpstreamError::Io(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted
        ),
        _ => false,
    }
}

/// Writes the request and reads the response head. The connection's armed read is the
/// response's first read: on a pooled connection it has waited in the kernel since the
/// connection was pooled; on a new one it goes to the kernel with the write (on io_uring one
/// `io_uring_enter` for the two). A failed write wins over whatever the read got: the
/// connection is not reusable. The armed read is over when this returns; the read buffer
/// comes back with the result.
async fn send_once(
    rd: &mut ReadHalf,
    wr: &mut WriteHalf,
    read: &mut Armed,
    mut head: Vec<u8>,
    body: Body<'_>,
    heads: &RefCell<ResponseMemo>,
) -> (Result<ResponseHead, UpstreamError>, ReadBuf, Vec<u8>) {
    let head_len = head.len();
    // Each made in its pinned place: made first and pinned after, each whole future was
    // copied (a `memcpy` call per leg for each).
    let write = std::pin::pin!(async {
        match body {
            Body::Written(b) => {
                head.extend_from_slice(b);
                wr.write_all(head).await
            }
            Body::Shared(b) if b.len() <= crate::http::write::COALESCE_LIMIT => {
                head.extend_from_slice(b);
                wr.write_all(head).await
            }
            Body::Shared(b) => {
                let (r, h) = wr.write_all(head).await;
                match r {
                    Ok(_) => (wr.write_all(b.clone()).await.0, h),
                    Err(e) => (Err(e), h),
                }
            }
        }
    });
    let read = std::pin::pin!(async {
        // The armed read is the only read on `rd` until it completes.
        let (first, mut buf) = read.await;
        let got = match first {
            Ok(0) => Err(UpstreamError::Closed),
            Ok(_) => read_head(rd, &mut buf, heads).await,
            Err(e) => Err(UpstreamError::Io(e)),
        };
        (got, buf)
    });
    let ((written, mut head), (got, buf)) = both(write, read).await;
    head.truncate(head_len);
    match written {
        Err(e) => (Err(UpstreamError::Io(e)), buf, head),
        Ok(_) => (got, buf, head),
    }
}

/// Both futures' outputs, polled in turn on each wake-up until both are ready. In place of
/// `monoio::join!`, whose `MaybeDone` moves each whole future out to take its output (a
/// `memcpy` call per leg for each), and a future of its own rather than an async fn around a
/// `poll_fn`: one state machine fewer per wake-up.
struct Both<'f, A: Future, B: Future> {
    a: Pin<&'f mut A>,
    b: Pin<&'f mut B>,
    out_a: Option<A::Output>,
    out_b: Option<B::Output>,
}

// Pins only through `Pin<&mut _>`: moving a `Both` moves no pinned future.
impl<A: Future, B: Future> Unpin for Both<'_, A, B> {}

impl<A: Future, B: Future> Future for Both<'_, A, B> {
    type Output = (A::Output, B::Output);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.out_a.is_none() {
            if let Poll::Ready(o) = this.a.as_mut().poll(cx) {
                this.out_a = Some(o);
            }
        }
        if this.out_b.is_none() {
            if let Poll::Ready(o) = this.b.as_mut().poll(cx) {
                this.out_b = Some(o);
            }
        }
        if this.out_a.is_some() && this.out_b.is_some() {
            if let (Some(a), Some(b)) = (this.out_a.take(), this.out_b.take()) {
                return Poll::Ready((a, b));
            }
        }
        Poll::Pending
    }
}

fn both<'f, A: Future, B: Future>(a: Pin<&'f mut A>, b: Pin<&'f mut B>) -> Both<'f, A, B> {
    Both {
        a,
        b,
        out_a: None,
        out_b: None,
    }
}

async fn read_head<R: AsyncReadRent>(
    rd: &mut R,
    buf: &mut ReadBuf,
    heads: &RefCell<ResponseMemo>,
) -> Result<ResponseHead, UpstreamError> {
    loop {
        // Nothing read yet (the read goes out with the request's write): nothing to parse.
        let parsed = if buf.is_empty() {
            Err(HeadError::Partial)
        } else {
            // Borrowed for the parse alone: no other borrow can be live (no await inside).
            heads.borrow_mut().parse(buf.data())
        };
        match parsed {
            Ok(h) if h.status.is_informational() => {
                // 100 Continue and friends: skip and read the real response.
                buf.consume(h.len);
            }
            Ok(h) => {
                buf.consume(h.len);
                return Ok(h);
            }
            Err(HeadError::Partial) => {
                if buf.len() > MAX_RESPONSE_HEAD {
                    return Err(UpstreamError::BadResponse("response head too large"));
                }
                match buf.fill(rd).await {
                    Ok(0) => return Err(UpstreamError::Closed),
                    Ok(_) => {}
                    Err(e) => return Err(UpstreamError::Io(e)),
                }
            }
            Err(HeadError::TooManyHeaders) => {
                return Err(UpstreamError::BadResponse("too many headers"))
            }
            Err(HeadError::Malformed(m)) => return Err(UpstreamError::BadResponse(m)),
        }
    }
}

/// Turns a response's framing into its decoded body bytes, piece by piece as they arrive.
pub struct BodyDecoder(BodyState);

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        BodyDecoder(match framing {
            Framing::None | Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkedDecoder::new()),
            Framing::UntilClose => BodyState::UntilClose,
        })
    }

    /// Moves the decoded bytes buffered in `buf` to `out`; true once the body is complete.
    /// Bytes after the body stay in `buf`.
    pub fn decode(&mut self, buf: &mut ReadBuf, out: &mut Vec<u8>) -> Result<bool, UpstreamError> {
        self.decode_with(buf, |d| out.extend_from_slice(d))
    }

    /// `decode`, each piece of decoded bytes given to `sink` (which may drop them).
    fn decode_with(
        &mut self,
        buf: &mut ReadBuf,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<bool, UpstreamError> {
        let data = buf.data();
        match &mut self.0 {
            BodyState::Done => return Ok(true),
            BodyState::Length(rem) => {
                let take = (*rem).min(data.len() as u64) as usize;
                sink(&data[..take]);
                buf.consume(take);
                *rem -= take as u64;
                if *rem > 0 {
                    return Ok(false);
                }
            }
            BodyState::Chunked(dec) => {
                let used = dec
                    .feed(data, sink)
                    .map_err(|_| UpstreamError::BadResponse("bad chunked encoding"))?;
                buf.consume(used);
                if !dec.is_done() {
                    return Ok(false);
                }
            }
            BodyState::UntilClose => {
                sink(data);
                buf.clear();
                return Ok(false);
            }
        }
        self.0 = BodyState::Done;
        Ok(true)
    }

    /// Whether the peer closing the connection ends the body cleanly.
    pub fn ends_at_eof(&self) -> bool {
        matches!(self.0, BodyState::UntilClose | BodyState::Done)
    }
}

/// Why a whole body was not read.
pub enum BodyFailed {
    Upstream(UpstreamError),
    /// What the head's reads had not brought did not arrive within the time limit.
    Timeout,
}

impl From<UpstreamError> for BodyFailed {
    fn from(e: UpstreamError) -> Self {
        BodyFailed::Upstream(e)
    }
}

/// Reads a whole response body (the prefill leg's) into `out`, or past it when `out` is None
/// (nobody reads it: the connection is pooled without copying it); `max` bounds its size
/// either way. What the head's reads already brought — the whole body, usually, for a short
/// one — is taken at once, without a timer; only the rest is read, within `limit`.
pub async fn read_body(
    conn: &mut UpstreamConn,
    head: &ResponseHead,
    max: usize,
    limit: Duration,
    mut out: Option<&mut Vec<u8>>,
) -> Result<(), BodyFailed> {
    if matches!(head.framing, Framing::Length(n) if n > max as u64) {
        return Err(UpstreamError::BadResponse("response body too large").into());
    }
    let mut dec = BodyDecoder::new(head.framing);
    let mut taken = 0;
    if take_body(&mut dec, &mut conn.buf, &mut out, &mut taken, max)? {
        return Ok(());
    }
    // On the connection's one timer, like every wait on it.
    conn.deadline.set(after(crate::clock::recent(), limit));
    let UpstreamConn {
        stream,
        buf,
        deadline,
        ..
    } = conn;
    let rest = async {
        loop {
            match buf.fill(stream).await {
                Ok(0) if dec.ends_at_eof() => return Ok(()),
                Ok(0) => return Err(UpstreamError::Closed),
                Ok(_) => {}
                Err(e) => return Err(UpstreamError::Io(e)),
            }
            if take_body(&mut dec, buf, &mut out, &mut taken, max)? {
                return Ok(());
            }
        }
    };
    let rest = std::pin::pin!(rest);
    match deadline.bound(rest).await {
        Some(r) => r.map_err(BodyFailed::Upstream),
        None => Err(BodyFailed::Timeout),
    }
}

/// Moves the buffered part of a body to `out` (or drops it), counting it in `taken`; true
/// once the body is complete.
fn take_body(
    dec: &mut BodyDecoder,
    buf: &mut ReadBuf,
    out: &mut Option<&mut Vec<u8>>,
    taken: &mut usize,
    max: usize,
) -> Result<bool, UpstreamError> {
    let done = dec.decode_with(buf, |d| {
        *taken += d.len();
        if let Some(out) = out {
            out.extend_from_slice(d);
        }
    })?;
    if done {
        return Ok(true);
    }
    if *taken > max {
        return Err(UpstreamError::BadResponse("response body too large"));
    }
    Ok(false)
}
