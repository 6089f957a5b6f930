//! The proxy: worker threads serving clients, plus the health thread.

mod flow;
pub mod health;
mod openai;
mod relay;
mod server;
mod upstream;

use crate::config::Config;
use crate::http::Limits;
use crate::runtime::{self, Driver};
use crate::topology::Shared;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use openai::{inspect, prefill_body, Endpoint};

/// Per-worker state: owned by one thread, never shared.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub pool: upstream::Pool,
    pub limits: Limits,
}

pub struct RunOptions {
    pub workers: usize,
    pub driver: Driver,
    pub pin: bool,
}

pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl ProxyHandle {
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Binds the listeners, starts the health thread and the workers, and returns at once.
pub fn start(cfg: &Config, opts: RunOptions) -> std::io::Result<ProxyHandle> {
    let shared = Shared::new(cfg);
    health::spawn(shared.clone(), cfg.health.clone())?;
    let listeners = runtime::bind_listeners(&cfg.host, cfg.port, opts.workers)?;
    let addr = listeners[0].local_addr()?;
    let limits = cfg.limits;
    let connect_timeout = cfg.connect_timeout;
    let sh = shared.clone();
    let threads = runtime::spawn_workers(
        "xpyd-worker",
        opts.driver,
        listeners,
        opts.pin,
        move |id, l| {
            let shared = sh.clone();
            async move {
                let listener = match monoio::net::TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        crate::error!("worker {id}: cannot register listener: {e}");
                        return;
                    }
                };
                let w = Rc::new(Worker {
                    id,
                    shared,
                    pool: upstream::Pool::new(connect_timeout),
                    limits,
                });
                server::accept_loop(w, listener).await
            }
        },
    )?;
    Ok(ProxyHandle {
        addr,
        shared,
        threads,
    })
}
