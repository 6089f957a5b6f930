//! `xpyd-dummy`: a simulated vLLM node (docs/cli.md) on the same runtime and HTTP code as the
//! proxy. It answers with vLLM's JSON, paces tokens like an engine, can inject faults, and
//! can record what it received so that tests can check what the proxy sent.

pub mod engine;

use crate::http::watch::DisconnectWatch;
use crate::http::write::{error_response, full_response, response_head, BodyLen, JSON};
use crate::http::{lingering_close, read_request, ApiError, Limits, ReadBuf, ReadError, Request};
use crate::runtime::{self, Driver};
use engine::{Job, Kind, StreamFrames, Timing, DONE_EVENT};
use http::{Method, StatusCode};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Prefill,
    Decode,
    Dual,
}

#[derive(Debug, Clone)]
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
        }
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    running: AtomicU64,
    aborted: AtomicU64,
    last_abort_unix_us: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    failures_injected: AtomicU64,
}

struct Node {
    opts: DummyOptions,
    addr: SocketAddr,
    timing: Timing,
    stats: Stats,
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
    let timing = Timing {
        prefill_per_token: Duration::from_secs_f64(opts.prefill_delay_per_token.max(0.0)),
        decode_per_token: Duration::from_secs_f64(opts.decode_delay_per_token.max(0.0)),
        skip_prefill: opts.mode == Mode::Decode,
    };
    let driver = opts.driver;
    let node = Arc::new(Node {
        opts,
        addr,
        timing,
        stats: Stats::default(),
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
                    let tokens = engine::tokenize(&t);
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
        (&Method::GET, "/metrics") => {
            let body = metrics(node);
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

fn metrics(node: &Node) -> String {
    let s = &node.stats;
    let m = &node.opts.model;
    format!(
        "# HELP vllm:num_requests_running Number of requests currently running.\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"{m}\"}} {}\n\
# HELP vllm:num_requests_waiting Number of requests waiting.\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"{m}\"}} 0\n\
# HELP vllm:request_success_total Finished requests.\n# TYPE vllm:request_success_total counter\nvllm:request_success_total{{model_name=\"{m}\"}} {}\n\
# HELP vllm:prompt_tokens_total Prompt tokens processed.\n# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{{model_name=\"{m}\"}} {}\n\
# HELP vllm:generation_tokens_total Tokens generated.\n# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{{model_name=\"{m}\"}} {}\n\
# HELP dummy_aborted_requests_total Requests whose client went away before the end.\n# TYPE dummy_aborted_requests_total counter\ndummy_aborted_requests_total {}\n",
        s.running.load(Ordering::Relaxed),
        s.requests.load(Ordering::Relaxed),
        s.prompt_tokens.load(Ordering::Relaxed),
        s.generation_tokens.load(Ordering::Relaxed),
        s.aborted.load(Ordering::Relaxed),
    )
}

/// Decrements `running` however the request ends.
struct Running<'a>(&'a Stats);
impl<'a> Running<'a> {
    fn new(s: &'a Stats) -> Self {
        s.running.fetch_add(1, Ordering::Relaxed);
        Running(s)
    }
}
impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn inference(
    node: &Node,
    kind: Kind,
    req: Request,
    stream: &mut TcpStream,
    watch: &mut Option<Rc<DisconnectWatch>>,
) -> Result<(), ()> {
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
    let job = match Job::from_request(kind, &body, &opts.model, opts.max_model_len) {
        Ok(j) => Job {
            prefill_marker: opts.mode == Mode::Prefill,
            ..j
        },
        Err(e) => return send_error(stream, ApiError::bad_request(e.0), keep).await,
    };
    let kv_in = body.get("kv_transfer_params").filter(|v| v.is_object());
    if opts.mode == Mode::Decode && opts.require_kv_params && kv_in.is_none() {
        let e =
            ApiError::bad_request("decode node requires kv_transfer_params from a prefill node")
                .with_param("kv_transfer_params");
        return send_error(stream, e, keep).await;
    }
    let kv_out = (opts.mode == Mode::Prefill && kv_in.is_some()).then(|| {
        json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": format!("dummy-{}", node.addr.port()),
            "remote_block_ids": (0..job.prompt_tokens.div_ceil(16).max(1)).collect::<Vec<_>>(),
            "remote_host": node.addr.ip().to_string(),
            "remote_port": node.addr.port(),
            "tp_size": 1,
        })
    });
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
    let _running = Running::new(&node.stats);

    let needs_watch = job.stream
        || node.timing.total(job.prompt_tokens, job.max_tokens) > Duration::ZERO
        || opts.stall_ms > 0;
    if needs_watch && watch.is_none() {
        *watch = DisconnectWatch::new(stream).ok().map(Rc::new);
    }
    // Like an engine that joins the caller's trace: its id comes back in `X-Trace-Id`.
    let trace_id = crate::proxy::client_header(&req.head.headers, "traceparent")
        .and_then(crate::trace::context::parse)
        .map(|tp| crate::trace::context::hex(&tp.trace_id));
    let work = generate(
        node,
        &job,
        kv_out.as_ref(),
        stream,
        keep,
        trace_id.as_deref(),
    );
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
        node.stats
            .generation_tokens
            .fetch_add(job.max_tokens as u64, Ordering::Relaxed);
    }
    result
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        monoio::time::sleep(d).await;
    }
}

async fn generate(
    node: &Node,
    job: &Job,
    kv: Option<&Value>,
    stream: &mut TcpStream,
    keep: bool,
    trace_id: Option<&str>,
) -> Result<(), ()> {
    let opts = &node.opts;
    let echo = trace_id.map(|t| ("X-Trace-Id", t));
    sleep(Duration::from_millis(opts.stall_ms)).await;
    let created = crate::ids::unix_seconds();
    let id = match job.kind {
        Kind::Completion => format!("cmpl-{}", crate::ids::hex_id()),
        Kind::Chat => format!("chatcmpl-{}", crate::ids::hex_id()),
    };
    if !job.stream {
        sleep(node.timing.total(job.prompt_tokens, job.max_tokens)).await;
        let body =
            serde_json::to_vec(&engine::full_body(job, &id, created, kv)).unwrap_or_default();
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
    // gap between tokens is the configured delay.
    let mut due = monoio::time::Instant::now();
    for i in 0..job.max_tokens {
        let gap = node.timing.before_token(i, job.prompt_tokens);
        if !gap.is_zero() {
            due += gap;
            monoio::time::sleep_until(due).await;
        }
        if i == 0 {
            // Later tokens are paced from when the first one really went out, so a late
            // first token (timer rounding) never shortens the gaps after it.
            due = monoio::time::Instant::now();
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
    Ok(())
}

async fn write_flush(stream: &mut TcpStream, out: Vec<u8>) -> Result<Vec<u8>, ()> {
    let (res, mut out) = stream.write_all(out).await;
    res.map_err(|_| ())?;
    out.clear();
    Ok(out)
}
