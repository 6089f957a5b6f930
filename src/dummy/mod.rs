//! `xpyd-dummy`: a simulated vLLM node (docs/cli.md) on the same runtime and HTTP code as the
//! proxy. It answers with vLLM's JSON, paces tokens like an engine, can inject faults, and
//! can record what it received so that tests can check what the proxy sent.

pub mod block_hash;
pub mod engine;
pub mod kv_events;
pub mod scheduler;
pub mod stats;

use crate::http::watch::DisconnectWatch;
use crate::http::write::{error_response, full_response, response_head, BodyLen, JSON};
use crate::http::{lingering_close, read_request, ApiError, Limits, ReadBuf, ReadError, Request};
use crate::runtime::{self, Driver};
use engine::{Job, Kind, StreamFrames, Timing, Tokenize, DONE_EVENT};
use http::{Method, StatusCode};
use kv_events::KvEventSink;
use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};
use scheduler::{Preempted, Prompt, SchedConfig, Scheduler, Ticket};
use serde_json::{json, Value};
use stats::{Exposition, Stats};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Prefill,
    Decode,
    Dual,
}

#[derive(Clone)]
pub struct DummyOptions {
    pub host: String,
    pub port: u16,
    pub mode: Mode,
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
    pub fn new(mode: Mode, model: &str) -> Self {
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

async fn accept_loop(node: Arc<Node>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                // `xpyd demo` runs the dummy inside the proxy's process.
                crate::runtime::close_on_exec(std::os::fd::AsRawFd::as_raw_fd(&s));
                let node = node.clone();
                monoio::spawn(async move { serve_connection(node, s).await });
            }
            Err(e) => {
                crate::error!("dummy: accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(node: Arc<Node>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = ReadBuf::with_capacity(8 * 1024);
    let limits = Limits {
        max_body_bytes: 256 * 1024 * 1024,
        header_timeout: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(600),
        ..Limits::default()
    };
    let mut watch: Option<Rc<DisconnectWatch>> = None;
    loop {
        let req = match read_request(&mut stream, &mut buf, &limits).await {
            Ok(r) => r,
            Err(ReadError::Closed) | Err(ReadError::Io(_)) | Err(ReadError::TimedOut) => return,
            Err(ReadError::Reject(e)) => {
                let _ = stream.write_all(error_response(&e, &[], false)).await;
                lingering_close(stream, buf).await;
                return;
            }
        };
        let keep = req.head.keep_alive;
        let ok = match handle(&node, req, &mut stream, &mut watch).await {
            Ok(()) => keep,
            Err(()) => false,
        };
        if !ok {
            return;
        }
    }
}

async fn send(stream: &mut TcpStream, out: Vec<u8>) -> Result<(), ()> {
    stream.write_all(out).await.0.map(|_| ()).map_err(|_| ())
}

async fn send_json(
    stream: &mut TcpStream,
    status: StatusCode,
    v: &Value,
    keep: bool,
) -> Result<(), ()> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    send(stream, full_response(status, &[JSON], &body, keep)).await
}

async fn send_error(stream: &mut TcpStream, e: ApiError, keep: bool) -> Result<(), ()> {
    send(stream, error_response(&e, &[], keep)).await
}

async fn handle(
    node: &Node,
    req: Request,
    stream: &mut TcpStream,
    watch: &mut Option<Rc<DisconnectWatch>>,
) -> Result<(), ()> {
    let keep = req.head.keep_alive;
    let path = req.head.route().to_string();
    let method = req.head.method.clone();
    match (&method, path.as_str()) {
        (&Method::POST, "/v1/completions") => {
            inference(node, Kind::Completion, req, stream, watch).await
        }
        (&Method::POST, "/v1/chat/completions") => {
            inference(node, Kind::Chat, req, stream, watch).await
        }
        (&Method::GET, "/health") => {
            send(stream, full_response(StatusCode::OK, &[], b"", keep)).await
        }
        (&Method::GET | &Method::POST, "/ping") => {
            send_json(stream, StatusCode::OK, &json!({"status": "ok"}), keep).await
        }
        (&Method::GET, "/version") => {
            send_json(
                stream,
                StatusCode::OK,
                &json!({"version": crate::VERSION}),
                keep,
            )
            .await
        }
        (&Method::GET, "/v1/models") => {
            let m = &node.opts.model;
            let v = json!({"object": "list", "data": [{
                "id": m, "object": "model", "created": node.created, "owned_by": "vllm",
                "root": m, "parent": null, "max_model_len": node.opts.max_model_len,
                "permission": [],
            }]});
            send_json(stream, StatusCode::OK, &v, keep).await
        }
        (&Method::POST, "/v1/embeddings") => {
            let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let inputs: Vec<String> = match &v["input"] {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .collect(),
                _ => {
                    let e = ApiError::bad_request("`input` is required").with_param("input");
                    return send_error(stream, e, keep).await;
                }
            };
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let ids = engine::tokenize(t);
                    let emb: Vec<f64> = (0..8)
                        .map(|k| {
                            ids.iter()
                                .map(|&x| ((x as u64 * 31 + k) % 1000) as f64 / 1000.0)
                                .sum::<f64>()
                                / ids.len().max(1) as f64
                        })
                        .collect();
                    json!({"object": "embedding", "index": i, "embedding": emb})
                })
                .collect();
            let tokens: usize = inputs.iter().map(|t| engine::count_text_tokens(t)).sum();
            let v = json!({"object": "list", "data": data, "model": node.opts.model,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
            send_json(stream, StatusCode::OK, &v, keep).await
        }
        (&Method::POST, "/tokenize") => {
            let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            let text = v["prompt"].as_str().map(str::to_string).or_else(|| {
                v["messages"].as_array().map(|m| {
                    m.iter()
                        .filter_map(|x| x["content"].as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
            });
            match text {
                Some(t) => {
                    let tokens = node.tokenizer.encode(&t);
                    let v = json!({"count": tokens.len(), "max_model_len": node.opts.max_model_len, "tokens": tokens});
                    send_json(stream, StatusCode::OK, &v, keep).await
                }
                None => {
                    send_error(
                        stream,
                        ApiError::bad_request("`prompt` or `messages` is required")
                            .with_param("prompt"),
                        keep,
                    )
                    .await
                }
            }
        }
        (&Method::POST, "/detokenize") => {
            let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            match v["tokens"].as_array() {
                Some(t) => {
                    let ids: Vec<u64> = t.iter().filter_map(Value::as_u64).collect();
                    send_json(
                        stream,
                        StatusCode::OK,
                        &json!({"prompt": engine::detokenize(&ids)}),
                        keep,
                    )
                    .await
                }
                None => {
                    send_error(
                        stream,
                        ApiError::bad_request("`tokens` is required").with_param("tokens"),
                        keep,
                    )
                    .await
                }
            }
        }
        (&Method::POST, "/reset_prefix_cache") => {
            if node.sched.reset_prefix_cache() {
                send(stream, full_response(StatusCode::OK, &[], b"", keep)).await
            } else {
                let e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableError",
                    "cannot reset the prefix cache while requests hold KV-cache blocks",
                );
                send_error(stream, e, keep).await
            }
        }
        (&Method::GET, "/metrics") => {
            let body = node.stats.render(&Exposition {
                model: &node.opts.model,
                kv_blocks: node.opts.kv_cache_blocks,
                block_size: node.opts.block_size,
                prefix_caching: node.opts.prefix_caching && node.opts.kv_cache_blocks > 0,
            });
            send(
                stream,
                full_response(
                    StatusCode::OK,
                    &[("Content-Type", "text/plain; version=0.0.4")],
                    body.as_bytes(),
                    keep,
                ),
            )
            .await
        }
        (&Method::GET, "/debug/requests") => {
            let list: Vec<Value> = node
                .recorded
                .lock()
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default();
            send_json(stream, StatusCode::OK, &Value::Array(list), keep).await
        }
        (&Method::GET, "/debug/stats") => {
            let s = &node.stats;
            let v = json!({
                "requests": s.requests.load(Ordering::Relaxed),
                "running": s.running.load(Ordering::Relaxed),
                "waiting": s.waiting.load(Ordering::Relaxed),
                "preemptions": s.preemptions.load(Ordering::Relaxed),
                "prefix_cache_queries": s.prefix_queries.load(Ordering::Relaxed),
                "prefix_cache_hits": s.prefix_hits.load(Ordering::Relaxed),
                "kv_used_blocks": s.kv_used_blocks.load(Ordering::Relaxed),
                "aborted": s.aborted.load(Ordering::Relaxed),
                "last_abort_unix_us": s.last_abort_unix_us.load(Ordering::Relaxed),
                "failures_injected": s.failures_injected.load(Ordering::Relaxed),
                "prompt_tokens": s.prompt_tokens.load(Ordering::Relaxed),
            });
            send_json(stream, StatusCode::OK, &v, keep).await
        }
        _ => {
            send_error(
                stream,
                ApiError::not_found(format!("{method} {path} not found")),
                keep,
            )
            .await
        }
    }
}

async fn inference(
    node: &Node,
    kind: Kind,
    req: Request,
    stream: &mut TcpStream,
    watch: &mut Option<Rc<DisconnectWatch>>,
) -> Result<(), ()> {
    let arrival = Instant::now();
    let keep = req.head.keep_alive;
    let opts = &node.opts;
    node.stats.requests.fetch_add(1, Ordering::Relaxed);
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return send_error(
                stream,
                ApiError::bad_request(format!("invalid JSON: {e}")),
                keep,
            )
            .await
        }
    };
    if opts.record_requests > 0 {
        if let Ok(mut r) = node.recorded.lock() {
            if r.len() >= opts.record_requests {
                r.pop_front();
            }
            r.push_back(json!({
                "path": req.head.route(),
                "request_id": req.head.request_id,
                "authorization": req.head.authorization,
                "headers": String::from_utf8_lossy(&req.head.headers),
                "body": body,
            }));
        }
    }
    if let Some(m) = body.get("model").and_then(Value::as_str) {
        if m != opts.model {
            let e = ApiError::not_found(format!("The model `{m}` does not exist."))
                .with_code("model_not_found");
            return send_error(stream, e, keep).await;
        }
    }
    // Token ids only when something uses them: the zero-delay default just counts.
    let ids = (node.sched.config().needs_token_ids() || opts.tokenizer.is_some())
        .then(|| engine::prompt_token_ids(kind, &body, node.tokenizer.as_ref()));
    let job = match Job::from_request(
        kind,
        &body,
        &opts.model,
        opts.max_model_len,
        ids.as_ref().map(Vec::len),
    ) {
        Ok(j) => Job {
            prefill_marker: opts.mode == Mode::Prefill,
            ..j
        },
        Err(e) => return send_error(stream, ApiError::bad_request(e.0), keep).await,
    };
    if let Err(e) = node.sched.check_fits(job.prompt_tokens + job.max_tokens) {
        return send_error(stream, ApiError::bad_request(e.0), keep).await;
    }
    let kv_in = body.get("kv_transfer_params").filter(|v| v.is_object());
    if opts.mode == Mode::Decode && opts.require_kv_params && kv_in.is_none() {
        let e =
            ApiError::bad_request("decode node requires kv_transfer_params from a prefill node")
                .with_param("kv_transfer_params");
        return send_error(stream, e, keep).await;
    }
    if opts.fail_rate > 0.0 && (crate::ids::next_u64() as f64 / u64::MAX as f64) < opts.fail_rate {
        node.stats.failures_injected.fetch_add(1, Ordering::Relaxed);
        let e = ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "injected failure",
        );
        return send_error(stream, e, keep).await;
    }
    node.stats
        .prompt_tokens
        .fetch_add(job.prompt_tokens as u64, Ordering::Relaxed);
    // A decode node's prompt KV arrives from the prefill node: the blocks it names (all of
    // the prompt when it names none) cost no prefill here.
    let arrived = match (opts.mode, kv_in) {
        (Mode::Decode, Some(kv)) => match kv.get("remote_block_ids").and_then(Value::as_array) {
            Some(ids) => job.prompt_tokens.min(ids.len() * opts.block_size.max(1)),
            None => job.prompt_tokens,
        },
        (Mode::Decode, None) => job.prompt_tokens,
        _ => 0,
    };
    let prompt = ids
        .filter(|_| node.sched.config().needs_token_ids())
        .map(|tokens| {
            let hashes = block_hash::prompt_block_hashes(&node.none_hash, &tokens, opts.block_size);
            Arc::new(Prompt { tokens, hashes })
        });
    let plan = Plan {
        job: &job,
        kv_wanted: opts.mode == Mode::Prefill && kv_in.is_some(),
        prompt,
        arrived,
        arrival,
    };
    let limited = opts.max_num_seqs > 0 || opts.kv_cache_blocks > 0;
    let needs_watch = job.stream || !node.timing.is_zero() || opts.stall_ms > 0 || limited;
    if needs_watch && watch.is_none() {
        *watch = DisconnectWatch::new(stream).ok().map(Rc::new);
    }
    // Like an engine that joins the caller's trace: its id comes back in `X-Trace-Id`.
    let trace_id = crate::proxy::client_header(&req.head.headers, "traceparent")
        .and_then(crate::trace::context::parse)
        .map(|tp| crate::trace::context::hex(&tp.trace_id));
    let work = generate(node, plan, stream, keep, trace_id.as_deref());
    let result = match watch.clone().filter(|_| needs_watch) {
        Some(w) => monoio::select! {
            // Work first: a peer that closes right after the last byte is not an abort.
            biased;
            r = work => r,
            _ = w.closed() => {
                node.stats.aborted.fetch_add(1, Ordering::Relaxed);
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                node.stats.last_abort_unix_us.store(now.as_micros() as u64, Ordering::Relaxed);
                Err(())
            }
        },
        None => work.await,
    };
    if result.is_ok() {
        let s = &node.stats;
        s.generation_tokens
            .fetch_add(job.max_tokens as u64, Ordering::Relaxed);
        s.success.fetch_add(1, Ordering::Relaxed);
        s.e2e.observe(arrival.elapsed());
    }
    result
}

/// What `generate` needs to run a request.
struct Plan<'a> {
    job: &'a Job,
    /// A prefill node answers with `kv_transfer_params`.
    kv_wanted: bool,
    prompt: Option<Arc<Prompt>>,
    /// Prompt tokens whose KV arrived from a prefill node.
    arrived: usize,
    arrival: Instant,
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        monoio::time::sleep(d).await;
    }
}

/// Paces a running request's tokens: the engine's step times, KV-cache growth and
/// preemption, and the per-token metrics.
struct Pacer<'a> {
    node: &'a Node,
    ticket: Ticket<'a>,
    prompt_tokens: usize,
    prefill_tokens: usize,
    arrived: usize,
    arrival: Instant,
    due: monoio::time::Instant,
    last: Instant,
    /// False in the zero-delay unlimited mode: no clocks, the engine's steps take no time.
    clocked: bool,
}

impl Pacer<'_> {
    /// Waits until token `i` (0-based) is ready.
    async fn token(&mut self, i: usize) {
        let node = self.node;
        if !self.clocked {
            if i == 0 {
                node.stats.ttft.observe(self.arrival.elapsed());
            }
            return;
        }
        let mut gap = Duration::ZERO;
        if i > 0 {
            // The sequence now holds the prompt and i tokens, and takes one more.
            if let Err(Preempted) = self.ticket.grow(self.prompt_tokens + i + 1) {
                let len = self.prompt_tokens + i;
                let hits = self.ticket.readmit(len).await;
                let recompute = len.saturating_sub(hits.max(self.arrived));
                gap += node.timing.prefill_per_token * recompute as u32;
                self.due = monoio::time::Instant::now();
            }
        }
        let running = node.stats.running.load(Ordering::Relaxed);
        gap += if i == 0 {
            node.timing.first_token(self.prefill_tokens, running)
        } else {
            node.timing.decode_step(running)
        };
        if !gap.is_zero() {
            self.due += gap;
            monoio::time::sleep_until(self.due).await;
        }
        let now = Instant::now();
        if i == 0 {
            // Later tokens are paced from when the first one really went out, so a late
            // first token (timer rounding) never shortens the gaps after it.
            self.due = monoio::time::Instant::now();
            self.ticket.prompt_computed();
            node.stats.ttft.observe(now - self.arrival);
        } else {
            node.stats.itl.observe(now - self.last);
        }
        self.last = now;
    }
}

fn kv_out(node: &Node, job: &Job, blocks: &[u32]) -> Value {
    let ids: Vec<u32> = if blocks.is_empty() {
        (0..job
            .prompt_tokens
            .div_ceil(node.opts.block_size.max(1))
            .max(1) as u32)
            .collect()
    } else {
        blocks.to_vec()
    };
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_engine_id": format!("dummy-{}", node.addr.port()),
        "remote_block_ids": ids,
        "remote_host": node.addr.ip().to_string(),
        "remote_port": node.addr.port(),
        "tp_size": 1,
    })
}

async fn generate(
    node: &Node,
    plan: Plan<'_>,
    stream: &mut TcpStream,
    keep: bool,
    trace_id: Option<&str>,
) -> Result<(), ()> {
    let opts = &node.opts;
    let echo = trace_id.map(|t| ("X-Trace-Id", t));
    let job = plan.job;
    sleep(Duration::from_millis(opts.stall_ms)).await;
    let ticket = node
        .sched
        .enter(&node.stats, plan.prompt, job.prompt_tokens)
        .await;
    let limited = opts.max_num_seqs > 0 || opts.kv_cache_blocks > 0;
    if limited {
        node.stats.queue_time.observe(plan.arrival.elapsed());
    } else {
        node.stats.queue_time.observe(Duration::ZERO);
    }
    let computed = ticket.hit_tokens().max(plan.arrived);
    let kv = plan
        .kv_wanted
        .then(|| kv_out(node, job, ticket.block_ids()));
    let mut pace = Pacer {
        node,
        ticket,
        prompt_tokens: job.prompt_tokens,
        prefill_tokens: job.prompt_tokens.saturating_sub(computed),
        arrived: plan.arrived,
        arrival: plan.arrival,
        due: monoio::time::Instant::now(),
        last: plan.arrival,
        clocked: limited || !node.timing.is_zero(),
    };
    let created = crate::ids::unix_seconds();
    let id = match job.kind {
        Kind::Completion => format!("cmpl-{}", crate::ids::hex_id()),
        Kind::Chat => format!("chatcmpl-{}", crate::ids::hex_id()),
    };
    if !job.stream {
        if pace.clocked {
            for i in 0..job.max_tokens {
                pace.token(i).await;
            }
        } else {
            node.stats.ttft.observe(plan.arrival.elapsed());
            node.stats
                .itl
                .observe_n(Duration::ZERO, job.max_tokens.saturating_sub(1) as u64);
        }
        drop(pace);
        let body = serde_json::to_vec(&engine::full_body(job, &id, created, kv.as_ref()))
            .unwrap_or_default();
        if opts.drop_mid_stream.is_some() {
            // Promise the whole body, deliver half, hang up.
            let mut out = Vec::new();
            response_head(
                &mut out,
                StatusCode::OK,
                &[JSON],
                BodyLen::Length(body.len()),
                keep,
            );
            out.extend_from_slice(&body[..body.len() / 2]);
            let _ = send(stream, out).await;
            return Err(());
        }
        let headers: Vec<_> = std::iter::once(JSON).chain(echo).collect();
        return send(stream, full_response(StatusCode::OK, &headers, &body, keep)).await;
    }
    let frames = StreamFrames::new(job, &id, created);
    let mut out = Vec::with_capacity(512);
    response_head(
        &mut out,
        StatusCode::OK,
        &[
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
        ]
        .into_iter()
        .chain(echo)
        .collect::<Vec<_>>(),
        BodyLen::Chunked,
        keep,
    );
    if job.kind == Kind::Chat {
        crate::http::chunked::encode_chunk(&mut out, frames.role_event().as_bytes());
    }
    // Headers (and chat's role event) go out at once, like vLLM's.
    out = write_flush(stream, out).await?;
    // Pace against absolute deadlines, so that timer rounding never accumulates: the mean
    // gap between tokens is the configured step time.
    pace.due = monoio::time::Instant::now();
    for i in 0..job.max_tokens {
        // Zero-delay mode: only the first token has something to record (the gaps are
        // recorded at the end in one go), so the per-token path stays as cheap as before.
        if pace.clocked || i == 0 {
            pace.token(i).await;
        }
        if opts.drop_mid_stream == Some(i) {
            return Err(());
        }
        let last = i + 1 == job.max_tokens;
        let ev = frames.token_event(job.kind, job.token(i), last);
        crate::http::chunked::encode_chunk(&mut out, ev.as_bytes());
        if last {
            if job.include_usage {
                crate::http::chunked::encode_chunk(
                    &mut out,
                    frames.usage_event(&job.usage()).as_bytes(),
                );
            }
            crate::http::chunked::encode_chunk(&mut out, DONE_EVENT.as_bytes());
            out.extend_from_slice(crate::http::chunked::LAST_CHUNK);
        }
        out = write_flush(stream, out).await?;
    }
    if !pace.clocked {
        node.stats
            .itl
            .observe_n(Duration::ZERO, job.max_tokens.saturating_sub(1) as u64);
    }
    Ok(())
}

async fn write_flush(stream: &mut TcpStream, out: Vec<u8>) -> Result<Vec<u8>, ()> {
    let (res, mut out) = stream.write_all(out).await;
    res.map_err(|_| ())?;
    out.clear();
    Ok(out)
}
