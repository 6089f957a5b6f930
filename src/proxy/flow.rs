//! One inference request end to end (docs/api.md): validate, pick the instances, run the
//! prefill leg (`max_tokens: 1`, not streamed), then relay the decode leg — or one pass on a
//! dual instance. The whole flow races the client's disconnect: if the client goes away,
//! the flow future is dropped, which closes any upstream connection it holds (never
//! pooled) and releases its in-flight counters.

use super::first_token::{self, FirstToken};
use super::openai::{self, Endpoint};
use super::relay::{relay, Outcome, RelayParams, Timeline};
use super::upstream::{UpstreamConn, UpstreamError};
use super::Worker;
use crate::config::DisaggMode;
use crate::config::Role;
use crate::http::head::ResponseHead;
use crate::http::watch::DisconnectWatch;
use crate::http::write::{error_response, full_response};
use crate::http::{ApiError, Request};
use crate::instance::{InFlight, Instance};
use crate::metrics::ErrorType;
use crate::resilience;
use crate::scheduler::PickContext;
use crate::topology::{ModelRoute, RoleSet, Topology};
use bytes::Bytes;
use http::StatusCode;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use std::borrow::Cow;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper bound on a prefill response kept in memory (it is one token plus metadata).
const MAX_PREFILL_RESPONSE: usize = 16 * 1024 * 1024;

/// Ends a request with an error response (nothing was sent to the client yet).
pub async fn answer_error(
    client: &mut TcpStream,
    err: &ApiError,
    request_id: Option<&str>,
    keep_alive: bool,
) -> Outcome {
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if let Some(id) = request_id {
        extra.push(("X-Request-Id", id));
    }
    if err.status == StatusCode::SERVICE_UNAVAILABLE {
        extra.push(("Retry-After", "1"));
    }
    let keep = keep_alive && !err.close;
    let (res, _) = client.write_all(error_response(err, &extra, keep)).await;
    Outcome::new(err.status.as_u16(), res.is_ok() && keep)
}

/// The topology snapshot for a request, or the error to answer: 404 for an unknown model,
/// 400 when several models are served and none is named, 503 while the model is gated
/// (each model on its own: one model's absence never holds back another's requests).
fn open_route(w: &Worker, model: Option<&str>) -> Result<(Arc<Topology>, usize), ApiError> {
    let topo = w.shared.topology.load_full();
    w.pool.sync(&topo);
    match topo.route_index(model) {
        Some(i) if !topo.models[i].is_open() => Err(ApiError::unavailable(format!(
            "model `{}` is waiting for backend nodes: it needs a healthy prefill and decode instance, or a healthy dual instance",
            topo.models[i].name
        ))),
        Some(i) => Ok((topo, i)),
        None => Err(match model {
            Some(m) => ApiError::not_found(format!("The model `{m}` does not exist."))
                .with_param("model")
                .with_code("model_not_found"),
            None => ApiError::bad_request("`model` is required when several models are served")
                .with_param("model"),
        }),
    }
}

/// Runs `work` unless the client goes away first; then the work is dropped, which closes
/// its upstream connections and releases its counters.
async fn unless_client_leaves(
    work: impl std::future::Future<Output = Outcome>,
    watch: Option<&DisconnectWatch>,
    request_id: &str,
) -> Outcome {
    match watch {
        Some(watch) => {
            monoio::select! {
                // Work first: when the response completes in the same wakeup as the client's
                // next request arrives, return without probing the socket.
                biased;
                outcome = work => outcome,
                _ = watch.closed() => {
                    crate::info!("request {request_id}: client disconnected; abandoning its legs");
                    Outcome::close(499)
                }
            }
        }
        None => work.await,
    }
}

/// Tokens assumed for a request without `max_tokens`, for decode load accounting.
const DEFAULT_DECODE_TOKENS: u64 = 256;

#[allow(clippy::too_many_arguments)]
pub async fn serve(
    start: Instant,
    w: &Worker,
    peer_ip: &str,
    req: Request,
    endpoint: Endpoint,
    client: &mut TcpStream,
    watch: Option<&DisconnectWatch>,
) -> Outcome {
    let keep_alive = req.head.keep_alive;
    let request_id = req
        .head
        .request_id
        .clone()
        .unwrap_or_else(crate::ids::uuid_v4);
    let inspected = match openai::inspect(endpoint, &req.body) {
        Ok(i) => i,
        Err(e) => return answer_error(client, &e, Some(&request_id), keep_alive).await,
    };
    let (topo, model_index) = match open_route(w, inspected.model.as_deref()) {
        Ok(t) => t,
        Err(e) => return answer_error(client, &e, Some(&request_id), keep_alive).await,
    };
    let route = &topo.models[model_index];
    let key = req
        .head
        .session_id
        .as_deref()
        .or(inspected.user.as_deref())
        .unwrap_or(peer_ip);
    let ctx = PickContext {
        prompt_tokens: inspected.prompt_tokens(),
        decode_tokens: inspected.max_tokens.unwrap_or(DEFAULT_DECODE_TOKENS),
        key: Some(key),
        prompt_text: inspected.prompt,
        exclude: &[],
    };
    let leg = Leg {
        w,
        path: &req.head.path,
        request_id: &request_id,
        authorization: backend_authorization(w, &req),
    };
    let work = async {
        let mut tl = Timeline::new(start);
        let (prefill_up, decode_up) = (route.prefill.any_available(), route.decode.any_available());
        let result = if prefill_up && decode_up {
            let job = Job {
                inspected: &inspected,
                chat: endpoint == Endpoint::ChatCompletions,
            };
            disaggregated(&leg, route, &ctx, &job, client, &req, &mut tl).await
        } else if route.dual.instances.is_empty() {
            // A P/D-only model with one role down: say which, and spend no prefill on it.
            let missing = if prefill_up {
                Role::Decode
            } else {
                Role::Prefill
            };
            Err(ApiError::unavailable(format!(
                "no healthy {} instance available",
                missing.as_str()
            )))
        } else {
            forward(
                &leg,
                &route.dual,
                &ctx,
                Role::Dual,
                &req.body,
                client,
                &req,
                &mut tl,
            )
            .await
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                if e.status.is_server_error() {
                    crate::error!("request {request_id}: {}", e.message);
                }
                answer_error(client, &e, Some(&request_id), keep_alive).await
            }
        };
        finish(w, &route.name, &request_id, &tl, outcome.status);
        outcome
    };
    unless_client_leaves(work, watch, &request_id).await
}

/// `/tokenize`, `/detokenize`, `/v1/embeddings`: forwarded as they are to one instance of
/// the model that can answer them alone (dual, else decode).
pub async fn serve_forwarded(
    start: Instant,
    w: &Worker,
    req: Request,
    client: &mut TcpStream,
    watch: Option<&DisconnectWatch>,
) -> Outcome {
    let keep_alive = req.head.keep_alive;
    let request_id = req
        .head
        .request_id
        .clone()
        .unwrap_or_else(crate::ids::uuid_v4);
    let model: Option<String> = serde_json::from_slice::<openai::RawObject<'_>>(&req.body)
        .ok()
        .and_then(|o| {
            o.get("model")
                .and_then(|v| serde_json::from_str(v.get()).ok())
        });
    let (topo, model_index) = match open_route(w, model.as_deref()) {
        Ok(t) => t,
        Err(e) => return answer_error(client, &e, Some(&request_id), keep_alive).await,
    };
    let route = &topo.models[model_index];
    let (set, role) = if route.dual.any_available() || route.decode.instances.is_empty() {
        (&route.dual, Role::Dual)
    } else {
        (&route.decode, Role::Decode)
    };
    let leg = Leg {
        w,
        path: &req.head.path,
        request_id: &request_id,
        authorization: backend_authorization(w, &req),
    };
    let ctx = PickContext::default();
    let work = async {
        let mut tl = Timeline::new(start);
        match forward(&leg, set, &ctx, role, &req.body, client, &req, &mut tl).await {
            Ok(o) => o,
            Err(e) => answer_error(client, &e, Some(&request_id), keep_alive).await,
        }
    };
    unless_client_leaves(work, watch, &request_id).await
}

/// Records the request's P/D metrics and writes its log line.
fn finish(w: &Worker, model: &str, request_id: &str, tl: &Timeline, status: u16) {
    let end = Instant::now();
    let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
    let ttft = tl.first_byte.map(|t| t - tl.start);
    if w.metrics_enabled && (200..300).contains(&status) {
        if let Some(decode) = &tl.decode {
            let m = w
                .metric_index
                .pair(&w.metrics, tl.prefill.as_deref(), decode);
            if let (Some(a), Some(b)) = (tl.prefill_sent, tl.prefill_done) {
                m.prefill_duration.observe(b - a);
            }
            if let (Some(a), Some(b)) = (tl.prefill_done, tl.decode_head) {
                m.kv_transfer.observe(b - a);
            }
            if let Some(a) = tl.decode_sent {
                m.decode_duration.observe(end - a);
            }
            if let Some(t) = ttft {
                m.ttft.observe(t);
            }
            if let (Some(first), Some(last)) = (tl.first_byte, tl.last_event) {
                if tl.events > 1 {
                    m.tpot.observe((last - first) / (tl.events - 1) as u32);
                }
            }
            m.e2e.observe(end - tl.start);
        }
    }
    crate::info!(
        "request {request_id} model={model} prefill={} decode={} status={status} ttft_ms={:.2} duration_ms={:.2}",
        tl.prefill.as_ref().map_or("-", |i| i.address.as_str()),
        tl.decode.as_ref().map_or("-", |i| i.address.as_str()),
        ms(ttft),
        ms(Some(end - tl.start)),
    );
}

struct Leg<'a> {
    w: &'a Worker,
    path: &'a str,
    request_id: &'a str,
    authorization: Option<Cow<'a, str>>,
}

/// A leg whose response head arrived: the instance (still counted), the connection, the head.
struct Answered {
    guard: InFlight,
    conn: UpstreamConn,
    head: ResponseHead,
}

impl Leg<'_> {
    fn head(&self, inst: &Instance, body_len: usize) -> Vec<u8> {
        let mut h = Vec::with_capacity(256);
        let _ = write!(
            h,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {}\r\n",
            self.path, inst.address, body_len, self.request_id
        );
        if let Some(a) = &self.authorization {
            let _ = write!(h, "Authorization: {a}\r\n");
        }
        h.extend_from_slice(b"\r\n");
        h
    }

    /// Picks an instance for one leg and counts the leg against it. Prefill legs carry the
    /// prompt tokens; decode and dual legs the request and its decode tokens.
    fn pick(&self, set: &RoleSet, ctx: &PickContext<'_>, role: Role) -> Result<InFlight, ApiError> {
        let picked = set.scheduler.pick(&set.instances, ctx).or_else(|| {
            // Every other instance failed this request already: the same one beats none.
            (!ctx.exclude.is_empty())
                .then(|| {
                    set.scheduler.pick(
                        &set.instances,
                        &PickContext {
                            exclude: &[],
                            ..*ctx
                        },
                    )
                })
                .flatten()
        });
        if let Some(inst) = picked {
            let (p, d) = match role {
                Role::Prefill => (ctx.prompt_tokens, 0),
                Role::Decode => (0, ctx.decode_tokens),
                Role::Dual => (ctx.prompt_tokens, ctx.decode_tokens),
            };
            return Ok(InFlight::new(inst, p, d));
        }
        let available: Vec<&Arc<Instance>> =
            set.instances.iter().filter(|i| i.is_available()).collect();
        if available.is_empty() {
            return Err(ApiError::unavailable(format!(
                "no healthy {} instance available",
                role.as_str()
            )));
        }
        let largest = available
            .iter()
            .map(|i| i.max_model_len.load(std::sync::atomic::Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        Err(ApiError::bad_request(format!(
            "the prompt (about {} tokens) is longer than the maximum context length of every {} instance of this model ({largest} tokens)",
            ctx.prompt_tokens,
            role.as_str()
        ))
        .with_code("context_length_exceeded"))
    }

    /// Sends `body` to an instance of `set` and waits for its response head, retrying
    /// connection failures and retryable statuses on other instances with backoff (docs/resilience.md).
    /// Nothing has reached the client yet, so every retry is safe. A first-byte timeout is
    /// not retried: the client would wait a multiple of it.
    async fn run(
        &self,
        set: &RoleSet,
        ctx: &PickContext<'_>,
        role: Role,
        body: &Bytes,
        tl: &mut Timeline,
    ) -> Result<Answered, ApiError> {
        let w = self.w;
        let sent = Instant::now();
        match role {
            Role::Prefill => tl.prefill_sent = Some(sent),
            _ => tl.decode_sent = Some(sent),
        }
        // One policy for the whole leg, retries included (a reload applies to the next).
        let policy = w.shared.policy.load_full();
        let retry = &policy.retry;
        let max_retries = if retry.enabled { retry.max_retries } else { 0 };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0u32;
        loop {
            let guard = self.pick(
                set,
                &PickContext {
                    exclude: &tried,
                    ..*ctx
                },
                role,
            )?;
            let inst = guard.instance().clone();
            let counters = w
                .metrics_enabled
                .then(|| w.metric_index.instance(&w.metrics, &inst));
            if let Some(c) = &counters {
                c.request();
            }
            let count_error = |t: ErrorType| {
                if let Some(c) = &counters {
                    c.error(t);
                }
            };
            match role {
                Role::Prefill => tl.prefill = Some(inst.clone()),
                _ => tl.decode = Some(inst.clone()),
            }
            let sent = monoio::time::timeout(
                policy.timeouts.first_byte,
                w.pool
                    .send(inst.socket_addr, self.head(&inst, body.len()), body),
            )
            .await;
            let failure = match sent {
                Ok(Ok((conn, head))) => {
                    let status = head.status.as_u16();
                    if role != Role::Prefill {
                        tl.decode_head = Some(Instant::now());
                    }
                    if head.status.is_server_error() {
                        count_error(ErrorType::Status5xx);
                        inst.record_failure(&policy.circuit);
                    } else {
                        inst.record_success(&policy.circuit);
                    }
                    if attempt >= max_retries || !retry.retryable_status.contains(&status) {
                        return Ok(Answered { guard, conn, head });
                    }
                    // Dropping `conn` closes it: its body is not worth reading.
                    format!("answered {status}")
                }
                Ok(Err(e)) => {
                    count_error(match e {
                        UpstreamError::Connect(_) | UpstreamError::ConnectTimeout => {
                            ErrorType::Connect
                        }
                        UpstreamError::BadResponse(_) => ErrorType::BadResponse,
                        UpstreamError::Io(_) | UpstreamError::Closed => ErrorType::Closed,
                    });
                    inst.record_failure(&policy.circuit);
                    w.pool.forget(inst.socket_addr);
                    if attempt >= max_retries {
                        return Err(self.upstream_failed(&inst, role, &e));
                    }
                    e.to_string()
                }
                Err(_) => {
                    count_error(ErrorType::Timeout);
                    inst.record_failure(&policy.circuit);
                    crate::warn!(
                        "request {}: {} instance {} sent no response within {:?}",
                        self.request_id,
                        role.as_str(),
                        inst.address,
                        policy.timeouts.first_byte
                    );
                    return Err(ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout_error",
                        format!(
                            "{} instance {} did not answer within {:?}",
                            role.as_str(),
                            inst.address,
                            policy.timeouts.first_byte
                        ),
                    ));
                }
            };
            attempt += 1;
            if w.metrics_enabled {
                w.metrics.retry();
            }
            tried.push(inst.socket_addr);
            drop(guard);
            let delay = resilience::backoff(retry, attempt);
            crate::info!(
                "request {}: {} instance {} {failure}; retry {attempt}/{max_retries} in {delay:?}",
                self.request_id,
                role.as_str(),
                inst.address
            );
            monoio::time::sleep(delay).await;
        }
    }

    fn upstream_failed(&self, inst: &Arc<Instance>, role: Role, e: &UpstreamError) -> ApiError {
        crate::warn!(
            "request {}: {} instance {} failed: {e}",
            self.request_id,
            role.as_str(),
            inst.address
        );
        ApiError::bad_gateway(format!(
            "{} instance {} failed: {e}",
            role.as_str(),
            inst.address
        ))
    }
}

/// `Authorization` for the backends: the configured `openai_api_key`, else the client's.
fn backend_authorization<'a>(w: &'a Worker, req: &'a Request) -> Option<Cow<'a, str>> {
    match &w.policy().openai_api_key {
        Some(k) => Some(Cow::Owned(format!("Bearer {k}"))),
        None => req.head.authorization.as_deref().map(Cow::Borrowed),
    }
}

/// What the P/D flow needs to know about the request beyond its bytes.
struct Job<'a, 'b> {
    inspected: &'a openai::Inspected<'b>,
    chat: bool,
}

async fn disaggregated(
    leg: &Leg<'_>,
    route: &ModelRoute,
    ctx: &PickContext<'_>,
    job: &Job<'_, '_>,
    client: &mut TcpStream,
    req: &Request,
    tl: &mut Timeline,
) -> Result<Outcome, ApiError> {
    let w = leg.w;
    let nixl = route.mode == DisaggMode::Nixl;
    let prefill_body = Bytes::from(openai::prefill_body_for(&job.inspected.obj, nixl));
    let resp = {
        let Answered {
            guard,
            mut conn,
            head,
        } = leg
            .run(&route.prefill, ctx, Role::Prefill, &prefill_body, tl)
            .await?;
        let inst = guard.instance();
        let idle = w.policy().timeouts.idle;
        let resp = match monoio::time::timeout(
            idle,
            super::upstream::read_body(&mut conn, &head, MAX_PREFILL_RESPONSE),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                inst.record_failure(&w.policy().circuit);
                return Err(leg.upstream_failed(inst, Role::Prefill, &e));
            }
            Err(_) => {
                inst.record_failure(&w.policy().circuit);
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    format!("prefill instance {} stalled mid-response", inst.address),
                ));
            }
        };
        tl.prefill_done = Some(Instant::now());
        if head.keep_alive {
            w.pool.put_back(conn, inst);
        }
        if !head.status.is_success() {
            // The backend's own error goes to the client as it is.
            crate::info!(
                "request {}: prefill instance {} answered {}",
                leg.request_id,
                inst.address,
                head.status
            );
            let ct = head.content_type.as_deref().unwrap_or("application/json");
            let keep = req.head.keep_alive;
            let out = full_response(
                head.status,
                &[("Content-Type", ct), ("X-Request-Id", leg.request_id)],
                &resp,
                keep,
            );
            let (res, _) = client.write_all(out).await;
            return Ok(Outcome::new(head.status.as_u16(), res.is_ok() && keep));
        }
        resp
    };
    // NIXL: the decode leg carries exactly what the prefill node returned.
    let decode_body = match nixl.then(|| openai::kv_params_of(&resp)).flatten() {
        Some(kv) => Bytes::from(openai::with_kv_params(&job.inspected.obj, &kv)),
        None => {
            if nixl {
                crate::debug!(
                    "request {}: prefill response has no kv_transfer_params; decode leg sent without",
                    leg.request_id
                );
            }
            req.body.clone()
        }
    };
    // HTTP/1.0 clients cannot take the chunked stream this path writes; they get the
    // plain relay, which frames by close.
    if w.policy().generator_on_p_node && job.inspected.stream && req.head.minor_version >= 1 {
        if let Some(first) = FirstToken::from_prefill(&resp, job.chat) {
            let keep_alive = req.head.keep_alive;
            return Ok(first_from_prefill(
                leg,
                route,
                ctx,
                &decode_body,
                client,
                keep_alive,
                tl,
                &first,
            )
            .await);
        }
    }
    forward(
        leg,
        &route.decode,
        ctx,
        Role::Decode,
        &decode_body,
        client,
        req,
        tl,
    )
    .await
}

/// The prefill token goes out at once; the decode stream follows it (`first_token.rs`).
#[allow(clippy::too_many_arguments)]
async fn first_from_prefill(
    leg: &Leg<'_>,
    route: &ModelRoute,
    ctx: &PickContext<'_>,
    body: &Bytes,
    client: &mut TcpStream,
    keep_alive: bool,
    tl: &mut Timeline,
    first: &FirstToken,
) -> Outcome {
    if first_token::send_first(client, first, leg.request_id, keep_alive, tl)
        .await
        .is_err()
    {
        return Outcome::close(499);
    }
    match leg.run(&route.decode, ctx, Role::Decode, body, tl).await {
        Ok(Answered { guard, conn, head }) if head.status.is_success() => {
            first_token::relay_rest(
                leg.w,
                guard.instance(),
                conn,
                head,
                client,
                first,
                keep_alive,
                tl,
            )
            .await
        }
        Ok(Answered { guard, head, .. }) => {
            let msg = format!(
                "decode instance {} answered {}",
                guard.instance().address,
                head.status
            );
            crate::error!(
                "request {}: {msg} after the first token was sent",
                leg.request_id
            );
            first_token::fail_stream(client, &msg, "upstream_error", 502).await
        }
        Err(e) => {
            crate::error!(
                "request {}: {} after the first token was sent",
                leg.request_id,
                e.message
            );
            first_token::fail_stream(client, &e.message, e.kind, e.status.as_u16()).await
        }
    }
}

/// Runs the leg that answers the client (decode, or dual) and relays its response.
#[allow(clippy::too_many_arguments)]
async fn forward(
    leg: &Leg<'_>,
    set: &RoleSet,
    ctx: &PickContext<'_>,
    role: Role,
    body: &Bytes,
    client: &mut TcpStream,
    req: &Request,
    tl: &mut Timeline,
) -> Result<Outcome, ApiError> {
    let Answered { guard, conn, head } = leg.run(set, ctx, role, body, tl).await?;
    Ok(relay(
        leg.w,
        guard.instance(),
        conn,
        head,
        client,
        RelayParams {
            request_id: leg.request_id,
            http10: req.head.minor_version == 0,
            client_keep_alive: req.head.keep_alive,
            timeline: tl,
        },
    )
    .await)
}
