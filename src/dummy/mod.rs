//! `xpyd-dummy`: a simulated vLLM node (docs/cli.md) on the same runtime and HTTP code as the
//! proxy. It answers with vLLM's JSON, paces tokens like an engine, can inject faults, and
//! can record what it received so that tests can check what the proxy sent.

pub mod block_hash;
pub mod engine;
mod inference;
pub mod kv_events;
mod reply;
pub mod scheduler;
mod server;
pub mod stats;

use crate::config::Role;
use crate::runtime::{self, Driver};
use engine::{Timing, Tokenize};
use kv_events::KvEventSink;
use monoio::net::TcpListener;
use scheduler::{SchedConfig, Scheduler};
use serde_json::Value;
use server::accept_loop;
use stats::Stats;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone)]
pub struct DummyOptions {
    pub host: String,
    pub port: u16,
    pub mode: Role,
    pub model: String,
    pub max_model_len: usize,
    /// Seconds per prompt token.
    pub prefill_delay_per_token: f64,
    /// Seconds per generated token.
    pub decode_delay_per_token: f64,
    pub workers: usize,
    pub driver: Driver,
    /// Fraction (0..1) of inference requests answered with a 500.
    pub fail_rate: f64,
    /// Close the connection after this many streamed tokens.
    pub drop_mid_stream: Option<usize>,
    /// Go silent for `PAUSE_MID_STREAM` after this many streamed tokens.
    pub pause_mid_stream: Option<usize>,
    /// Wait this long before answering an inference request.
    pub stall_ms: u64,
    /// Keep the last N inference requests for `GET /debug/requests`.
    pub record_requests: usize,
    /// Decode mode: reject requests without `kv_transfer_params`.
    pub require_kv_params: bool,
    /// Seconds added to each decode step per other running sequence (0: batch-independent).
    pub decode_delay_per_seq: f64,
    /// Running requests at most (0: unlimited); the rest wait in FIFO order.
    pub max_num_seqs: usize,
    /// KV-cache blocks (0: no KV-cache model, no prefix caching, no KV events).
    pub kv_cache_blocks: usize,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Keep computed prompt blocks for reuse (with `kv_cache_blocks`).
    pub prefix_caching: bool,
    /// `NONE_HASH`'s seed (vLLM: `$PYTHONHASHSEED`, else "vllm-none-hash").
    pub hash_seed: String,
    /// A real tokenizer (the built-in stand-in otherwise).
    pub tokenizer: Option<Arc<dyn Tokenize>>,
    /// Where KV-cache events go (with `kv_cache_blocks`).
    pub kv_events: Option<Arc<dyn KvEventSink>>,
}

impl DummyOptions {
    pub fn new(mode: Role, model: &str) -> Self {
        DummyOptions {
            host: "127.0.0.1".into(),
            port: 0,
            mode,
            model: model.into(),
            max_model_len: 131072,
            prefill_delay_per_token: 0.0,
            decode_delay_per_token: 0.0,
            workers: 1,
            driver: Driver::Auto,
            fail_rate: 0.0,
            drop_mid_stream: None,
            pause_mid_stream: None,
            stall_ms: 0,
            record_requests: 0,
            require_kv_params: false,
            decode_delay_per_seq: 0.0,
            max_num_seqs: 0,
            kv_cache_blocks: 0,
            block_size: 16,
            prefix_caching: true,
            hash_seed: block_hash::DEFAULT_SEED.into(),
            tokenizer: None,
            kv_events: None,
        }
    }
}

struct Node {
    opts: DummyOptions,
    addr: SocketAddr,
    timing: Timing,
    stats: Stats,
    sched: Scheduler,
    tokenizer: Arc<dyn Tokenize>,
    none_hash: block_hash::BlockHash,
    recorded: Mutex<VecDeque<Value>>,
    created: u64,
}

pub struct DummyHandle {
    pub addr: SocketAddr,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DummyHandle {
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub fn start(opts: DummyOptions) -> std::io::Result<DummyHandle> {
    let listeners = runtime::bind_listeners(&opts.host, opts.port, opts.workers)?;
    let addr = listeners[0].local_addr()?;
    let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
    let timing = Timing {
        prefill_per_token: secs(opts.prefill_delay_per_token),
        decode_per_token: secs(opts.decode_delay_per_token),
        decode_per_seq: secs(opts.decode_delay_per_seq),
    };
    let driver = opts.driver;
    let sched = Scheduler::new(
        SchedConfig {
            max_num_seqs: opts.max_num_seqs,
            kv_blocks: opts.kv_cache_blocks,
            block_size: opts.block_size.max(1),
            prefix_caching: opts.prefix_caching,
            prefill_per_token: timing.prefill_per_token,
        },
        opts.kv_events.clone(),
    );
    let tokenizer = opts
        .tokenizer
        .clone()
        .unwrap_or_else(|| Arc::new(engine::Builtin));
    let none_hash = block_hash::none_hash(&opts.hash_seed);
    let node = Arc::new(Node {
        opts,
        addr,
        timing,
        stats: Stats::default(),
        sched,
        tokenizer,
        none_hash,
        recorded: Mutex::new(VecDeque::new()),
        created: crate::ids::unix_seconds(),
    });
    let threads = runtime::spawn_workers("xpyd-dummy", driver, listeners, false, move |_, l| {
        let node = node.clone();
        async move {
            match TcpListener::from_std(l) {
                Ok(l) => accept_loop(node, l).await,
                Err(e) => crate::error!("dummy: cannot register listener: {e}"),
            }
        }
    })?;
    Ok(DummyHandle { addr, threads })
}
