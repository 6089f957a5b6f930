//! Thread-per-core plumbing: one pinned OS thread per worker, each with its own monoio event
//! loop (io_uring, or epoll where io_uring is missing or `--driver epoll` asks for it) and
//! its own `SO_REUSEPORT` listener, so the kernel spreads connections across workers and
//! nothing on the request path crosses threads.

use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    IoUring,
    Epoll,
}

impl std::str::FromStr for Driver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Driver::Auto),
            "uring" | "io_uring" | "iouring" => Ok(Driver::IoUring),
            "epoll" | "legacy" => Ok(Driver::Epoll),
            o => Err(format!(
                "unknown driver `{o}` (expected auto, io_uring or epoll)"
            )),
        }
    }
}

impl Driver {
    /// `--driver` when given, else the `XPYD_DRIVER` environment variable (CI uses it to run
    /// the whole suite on epoll), else auto.
    pub fn resolve(flag: Option<Driver>) -> Result<Driver, String> {
        match flag {
            Some(d) => Ok(d),
            None => match std::env::var("XPYD_DRIVER") {
                Ok(v) => v.parse(),
                Err(_) => Ok(Driver::Auto),
            },
        }
    }

    /// The driver that will actually run.
    pub fn effective(self) -> &'static str {
        match self {
            Driver::Epoll => "epoll",
            Driver::IoUring => "io_uring",
            Driver::Auto if monoio::utils::detect_uring() => "io_uring",
            Driver::Auto => "epoll",
        }
    }
}

const URING_ENTRIES: u32 = 4096;

/// The ring set-up for a worker. `COOP_TASKRUN`: the kernel does not interrupt the worker
/// (an inter-processor interrupt) to post each completion; it posts them the next time the
/// worker enters the kernel, which it does after every batch of work and before it sleeps.
/// `SINGLE_ISSUER`: only the thread that made the ring submits to it (thread-per-core).
/// Measured: +10–15 % req/s and −15 % CPU per request (docs/benchmarks.md).
/// `XPYD_URING_FLAGS=none` asks for a plain ring (to measure the difference); kernels older
/// than 6.0 refuse the flags, and the runtime then starts with a plain ring too.
/// `XPYD_URING_FLAGS=defer` adds `DEFER_TASKRUN` (kernel ≥ 6.1; completions are then posted
/// only when the worker waits, not at every kernel entry): measured worse — more
/// `io_uring_enter` per request and more CPU (docs/benchmarks.md, "Per-request budget") —
/// so it is not the default; it would also move the pooled-connection check's moment to the
/// worker's last wait (docs/resilience.md).
fn tuned_ring() -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    match std::env::var("XPYD_URING_FLAGS").as_deref() {
        Ok("none") => {}
        Ok("defer") => {
            b.setup_coop_taskrun()
                .setup_single_issuer()
                .setup_defer_taskrun();
        }
        _ => {
            b.setup_coop_taskrun().setup_single_issuer();
        }
    }
    b
}

/// Every io_uring receive is submitted with `IORING_RECVSEND_POLL_FIRST` (vendor/monoio's
/// patch): the proxy's reads are mostly submitted before their data is there — the client's
/// keep-alive read, the response read armed on a pooled upstream connection, a stream's next
/// token — and without the flag the kernel first tries each such receive inline, fails
/// (EAGAIN), and only then arms the socket's poll. With it the poll is armed at once; a read
/// whose data is already there is done from the poll's first check. Measured: 2 failed
/// receives less per dual request (3 per 1P+1D), −1.5 % CPU per request (docs/benchmarks.md,
/// "Beneath monoio"). `XPYD_RECV_POLL_FIRST=0` turns it off (to measure the difference).
/// Kernels before 5.19 do not know the flag (they may refuse the receive), so it is only set
/// from 5.19 on.
fn recv_poll_first() {
    let on = std::env::var("XPYD_RECV_POLL_FIRST").as_deref() != Ok("0")
        && kernel_release().is_some_and(|v| v >= (5, 19));
    monoio::utils::set_recv_poll_first(on);
}

/// The running kernel's (major, minor) version, from uname(2).
fn kernel_release() -> Option<(u32, u32)> {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_str()
        .ok()?;
    parse_release(release)
}

/// "6.18.44-fc" → (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Builds a ring-backed runtime of driver `$driver` (timers on) with the tuned ring, or a
/// plain ring where the kernel refuses the flags, and runs `$fut` on it. A macro because
/// the io_uring and fusion runtimes are different types with the same builder calls.
macro_rules! run_on_ring {
    ($driver:ty, $fut:expr) => {{
        let build = |ring: io_uring::Builder| {
            monoio::RuntimeBuilder::<$driver>::new()
                .with_entries(URING_ENTRIES)
                .uring_builder(ring)
                .enable_timer()
                .build()
        };
        recv_poll_first();
        let mut rt = build(tuned_ring()).or_else(|_| build(io_uring::IoUring::builder()))?;
        Ok(rt.block_on($fut))
    }};
}

/// Runs `fut` to completion on a fresh monoio runtime of the chosen driver (timers enabled).
pub fn block_on<F: Future>(driver: Driver, fut: F) -> io::Result<F::Output> {
    match driver {
        Driver::Epoll => Ok(monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(fut)),
        Driver::IoUring => run_on_ring!(monoio::IoUringDriver, fut),
        Driver::Auto => run_on_ring!(monoio::FusionDriver, fut),
    }
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    // The epoll driver needs it; io_uring does not care.
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Binds `n` listeners on the same address with `SO_REUSEPORT`. Port 0 picks a free port
/// once and binds every listener to it.
pub fn bind_listeners(host: &str, port: u16, n: usize) -> io::Result<Vec<TcpListener>> {
    let mut addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("cannot resolve {host}")))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let l = reuseport_listener(addr)?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Starts one pinned thread per listener; each builds its runtime and runs
/// `make(worker_index, listener)` on it.
pub fn spawn_workers<F, Fut>(
    name: &str,
    driver: Driver,
    listeners: Vec<TcpListener>,
    pin: bool,
    make: F,
) -> io::Result<Vec<JoinHandle<()>>>
where
    F: Fn(usize, TcpListener) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()>,
{
    let make = Arc::new(make);
    let cores = if pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut handles = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let make = make.clone();
        let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let h = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                if let Err(e) = block_on(driver, make(i, listener)) {
                    crate::error!("worker {i}: cannot start the event loop: {e}");
                    std::process::exit(1);
                }
            })?;
        handles.push(h);
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn kernel_release_strings_parse_to_major_and_minor() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.19.0"), Some((5, 19)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("6.1"), Some((6, 1)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn accepted_sockets_are_close_on_exec_on_both_drivers() {
        // No fcntl after accept: epoll's accept4 and vendor/monoio's io_uring accept both
        // pass SOCK_CLOEXEC.
        for driver in [super::Driver::IoUring, super::Driver::Epoll] {
            let listener = super::bind_listeners("127.0.0.1", 0, 1).unwrap().remove(0);
            let addr = listener.local_addr().unwrap();
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let flags = super::block_on(driver, async move {
                let l = monoio::net::TcpListener::from_std(listener).unwrap();
                let (s, _) = l.accept().await.unwrap();
                let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
                // SAFETY: F_GETFD on a descriptor `s` keeps open.
                unsafe { libc::fcntl(fd, libc::F_GETFD) }
            })
            .unwrap();
            assert!(
                flags >= 0 && flags & libc::FD_CLOEXEC != 0,
                "{driver:?}: {flags}"
            );
        }
    }
}
