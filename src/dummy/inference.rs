//! One inference request on the dummy: admission to the simulated engine, pacing its
//! tokens like vLLM (step times, KV-cache growth, preemption) and writing the answer.

use super::engine::{Job, Kind, StreamFrames, DONE_EVENT};
use super::reply::{send, send_error};
use super::scheduler::{Preempted, Prompt, Ticket};
use super::{block_hash, engine, Node};
use crate::config::Role;
use crate::http::watch::DisconnectWatch;
use crate::http::write::{full_response, response_head, BodyLen, JSON};
use crate::http::{ApiError, Request};
use http::StatusCode;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) async fn inference(
    node: &Node,
    kind: Kind,
    req: Request<'_>,
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
            prefill_marker: opts.mode == Role::Prefill,
            ..j
        },
        Err(e) => return send_error(stream, ApiError::bad_request(e.0), keep).await,
    };
    if let Err(e) = node.sched.check_fits(job.prompt_tokens + job.max_tokens) {
        return send_error(stream, ApiError::bad_request(e.0), keep).await;
    }
    let kv_in = body.get("kv_transfer_params").filter(|v| v.is_object());
    if opts.mode == Role::Decode && opts.require_kv_params && kv_in.is_none() {
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
    // A decode node's prompt KV arrives from the prefill node: the blocks it names (all of
    // the prompt when it names none) cost no prefill here.
    let arrived = match (opts.mode, kv_in) {
        (Role::Decode, Some(kv)) => match kv.get("remote_block_ids").and_then(Value::as_array) {
            Some(ids) => job.prompt_tokens.min(ids.len() * opts.block_size.max(1)),
            None => job.prompt_tokens,
        },
        (Role::Decode, None) => job.prompt_tokens,
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
        kv_wanted: opts.mode == Role::Prefill && kv_in.is_some(),
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

/// How long `--pause-mid-stream` keeps a stream silent.
const PAUSE_MID_STREAM: Duration = Duration::from_secs(60);

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
    /// When the request got its batch slot (vLLM's "scheduled").
    scheduled: Instant,
    max_tokens: usize,
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
                let now = Instant::now();
                node.stats.first_token(
                    self.prompt_tokens,
                    now - self.arrival,
                    now - self.scheduled,
                );
            }
            return;
        }
        let mut gap = Duration::ZERO;
        if i > 0 {
            // The sequence now holds the prompt and i tokens, and takes one more.
            if let Err(Preempted) = self.ticket.grow(self.prompt_tokens + i + 1) {
                let len = self.prompt_tokens + i;
                let hits = self.ticket.readmit(len, self.arrived).await;
                let recompute = len.saturating_sub(hits.max(self.arrived));
                gap += node.timing.prefill_per_token * recompute as u32;
                self.due = start_at(self.ticket.hits_ready_at());
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
            node.stats
                .first_token(self.prompt_tokens, now - self.arrival, now - self.scheduled);
        } else {
            node.stats.itl.observe(now - self.last);
        }
        if i + 1 == self.max_tokens {
            node.stats.inference_time.observe(now - self.scheduled);
        }
        self.last = now;
    }
}

/// The engine-clock instant a request's compute starts: now, or `at` if that is later.
fn start_at(at: Option<Instant>) -> monoio::time::Instant {
    let now = monoio::time::Instant::now();
    at.map_or(now, |t| now.max(monoio::time::Instant::from_std(t)))
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
        .enter(&node.stats, plan.prompt, job.prompt_tokens, plan.arrived)
        .await;
    // A request that hit blocks another one is still computing starts when they are done
    // (vLLM schedules it in the step after): until then it has not been scheduled.
    let scheduled = ticket
        .hits_ready_at()
        .map_or_else(Instant::now, |t| t.max(Instant::now()));
    let limited = opts.max_num_seqs > 0 || opts.kv_cache_blocks > 0;
    if limited {
        node.stats.queue_time.observe(scheduled - plan.arrival);
    } else {
        node.stats.queue_time.observe(Duration::ZERO);
    }
    let computed = ticket.hit_tokens().max(plan.arrived);
    let prefill_tokens = job.prompt_tokens.saturating_sub(computed);
    node.stats
        .prefilled_tokens
        .fetch_add(prefill_tokens as u64, Ordering::Relaxed);
    let kv = plan
        .kv_wanted
        .then(|| kv_out(node, job, ticket.block_ids()));
    let mut pace = Pacer {
        node,
        ticket,
        prompt_tokens: job.prompt_tokens,
        prefill_tokens,
        arrived: plan.arrived,
        arrival: plan.arrival,
        scheduled,
        max_tokens: job.max_tokens,
        due: start_at(Some(scheduled)),
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
            pace.token(0).await; // unclocked: records the first token, no wait
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
    pace.due = start_at(Some(pace.scheduled));
    for i in 0..job.max_tokens {
        // Zero-delay mode: only the first token has something to record (the gaps are
        // recorded at the end in one go), so the per-token path stays as cheap as before.
        if pace.clocked || i == 0 {
            pace.token(i).await;
        }
        if opts.drop_mid_stream == Some(i) {
            return Err(());
        }
        if opts.pause_mid_stream == Some(i) {
            // A stream that goes quiet with its connection open: a client that leaves now is
            // noticed by its proxy's watch alone, no write fails (tests/pd.rs).
            sleep(PAUSE_MID_STREAM).await;
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

pub(super) async fn write_flush(stream: &mut TcpStream, out: Vec<u8>) -> Result<Vec<u8>, ()> {
    let (res, mut out) = stream.write_all(out).await;
    res.map_err(|_| ())?;
    out.clear();
    Ok(out)
}
