//! The proxy: worker threads serving clients, plus the control thread.

mod admin;
pub(crate) mod contain;
mod context;
pub mod control;
mod failure;
mod first_token;
mod flow;
mod forward_headers;
pub mod kv_events;
mod leg;
mod openai;
mod outcome;
mod prefix_sync;
mod raw_object;
mod relay;
mod relay_task;
mod route;
mod scrape;
mod server;
mod spans;
mod sse;
mod timeline;
mod upstream;

use crate::config::{Config, Policy};
use crate::runtime::{self, Driver};
use crate::shared::{LocalSnapshot, Shared, Snapshot};
use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use forward_headers::{find as client_header, DEFAULT_DENY as DEFAULT_DENY_HEADERS};
pub use openai::{inspect, prefill_body, Endpoint};

/// Per-worker state: owned by one thread, never shared.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub pool: upstream::Pool,
    pub control: Sender<control::Command>,
    /// Open client connections on this worker.
    pub connections: Cell<usize>,
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
    pub metric_index: crate::metrics::LocalIndex,
    pub metrics_enabled: bool,
    /// Reused output buffers for relaying.
    pub scratch: relay::Scratch,
    /// This worker's admission queues.
    pub admission: Rc<crate::admission::Local>,
    topology_now: LocalSnapshot<crate::topology::Topology>,
    policy_now: Rc<LocalSnapshot<Policy>>,
}

impl Worker {
    /// The settings in force now (a reload may replace them between two calls). Cheap: a
    /// count of this worker's own is touched (`LocalSnapshot`).
    #[inline]
    pub fn policy(&self) -> Snapshot<Policy> {
        self.policy_now.get()
    }

    /// The topology snapshot in force now, as `policy`.
    #[inline]
    pub fn topology(&self) -> Snapshot<crate::topology::Topology> {
        self.topology_now.get()
    }
}

pub struct RunOptions {
    pub workers: usize,
    pub driver: Driver,
    pub pin: bool,
}

pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    /// Duplicates of the workers' listeners, owned here: a worker closes its own when its
    /// accept loop ends, and a bare descriptor number could by then name another socket.
    listeners: Vec<std::net::TcpListener>,
    control: Sender<control::Command>,
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data (zeroed is a valid starting value), sigemptyset
    // initialises the local set and sigaddset adds valid signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts
/// afterwards, so that `ProxyHandle::wait_for_shutdown` takes them with `sigwait`. Call it
/// first.
pub fn block_shutdown_signals() {
    let set = signal_set();
    // SAFETY: set is a valid, initialised signal set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

impl ProxyHandle {
    /// Waits for SIGINT/SIGTERM, then shuts down gracefully: stop accepting, let requests
    /// in flight finish (up to `shutdown_grace_seconds`), return.
    /// SIGHUP reloads the configuration file meanwhile.
    pub fn wait_for_shutdown(self) {
        let set = signal_set();
        let sig = loop {
            let mut sig = 0;
            // SAFETY: set is an initialised signal set and sig a valid place for sigwait to
            // write the signal number.
            unsafe { libc::sigwait(&set, &mut sig) };
            if sig == libc::SIGHUP {
                crate::warn!("SIGHUP: reloading the configuration");
                let _ = self.control.send(control::Command::Reload { reply: None });
                continue;
            }
            break sig;
        };
        crate::warn!("signal {sig} received: no new connections, finishing requests in flight");
        self.shared.shutting_down.store(true, Ordering::Release);
        for l in &self.listeners {
            // Shuts the listening socket (shared with the worker's descriptor) down: wakes
            // the worker's pending accept and refuses new connections.
            let _ = socket2::SockRef::from(l).shutdown(std::net::Shutdown::Both);
        }
        let deadline = Instant::now() + self.shared.policy.load().shutdown_grace;
        loop {
            let active = self.shared.active_requests();
            if active == 0 {
                crate::warn!("all requests finished; exiting");
                return;
            }
            if Instant::now() >= deadline {
                crate::error!(
                    "shutdown grace period over with {active} request(s) still in flight; exiting"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Binds the listeners, starts the control thread and the workers, and returns at once.
pub fn start(cfg: &Config, opts: RunOptions) -> std::io::Result<ProxyHandle> {
    let shared = Shared::new(cfg, opts.workers);
    prefix_sync::spawn(shared.clone())?;
    let control = control::spawn(shared.clone(), cfg)?;
    if let Some(root) = &cfg.tokenizer_path {
        let names: Vec<String> = cfg.models.iter().map(|m| m.name.clone()).collect();
        crate::tokenize::load(root, &names);
    }
    crate::tokenize::set_max_queued_kib(cfg.tokenizer.max_queued_kib);
    crate::tokenize::start_threads(cfg.tokenizer.threads)?;
    scrape::spawn(shared.clone())?;
    kv_events::spawn(shared.clone())?;
    let control_for_handle = control.clone();
    let listeners = runtime::bind_listeners(&cfg.host, cfg.port, opts.workers)?;
    let addr = listeners[0].local_addr()?;
    let owned = listeners
        .iter()
        .map(|l| l.try_clone()) // F_DUPFD_CLOEXEC
        .collect::<std::io::Result<Vec<_>>>()?;
    let cfg = cfg.clone();
    let sh = shared.clone();
    runtime::spawn_workers(
        "xpyd-worker",
        opts.driver,
        listeners,
        opts.pin,
        move |id, l| {
            let shared = sh.clone();
            // The sender is cloned once per worker at start-up, never on the request path.
            let control = control.clone();
            let cfg = cfg.clone();
            async move {
                let listener = match monoio::net::TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        crate::error!("worker {id}: cannot register listener: {e}");
                        return;
                    }
                };
                let policy_now = Rc::new(LocalSnapshot::new(shared.clone(), |s| &s.policy));
                let w = Rc::new(Worker {
                    id,
                    topology_now: LocalSnapshot::new(shared.clone(), |s| &s.topology),
                    metrics: shared.metrics[id % shared.metrics.len()].clone(),
                    metric_index: Default::default(),
                    metrics_enabled: cfg.metrics_enabled,
                    scratch: Default::default(),
                    admission: crate::admission::Local::new(shared.clone(), policy_now.clone(), id),
                    policy_now,
                    shared,
                    pool: upstream::Pool::new(cfg.timeouts.connect, cfg.timeouts.pool_idle),
                    control,
                    connections: Cell::new(0),
                });
                server::accept_loop(w, listener).await
            }
        },
    )?;
    Ok(ProxyHandle {
        addr,
        shared,
        listeners: owned,
        control: control_for_handle,
    })
}
