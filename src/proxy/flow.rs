//! One inference request end to end (docs/api.md): validate, pick the instances, run the
//! prefill leg (`max_tokens: 1`, not streamed), then relay the decode leg — or one pass on a
//! dual instance. The whole flow races the client's disconnect: if the client goes away,
//! the flow future is dropped, which closes any upstream connection it holds (never
//! pooled) and releases its in-flight counters.

use super::context::RequestCtx;
use super::failure;
use super::first_token::{self, FirstToken};
use super::forward_headers::{self, Forwarding};
use super::leg::Answered;
use super::openai::{self, Endpoint};
use super::outcome::{answer_error, Outcome};
use super::relay::relay;
use super::spans;
use super::timeline::Timeline;
use super::upstream::{read_body, Body, BodyFailed};
use super::Worker;
use crate::config::Role;
use crate::config::{DisaggMode, Policy};
use crate::http::conn::ClientWriter;
use crate::http::watch::NextRead;
use crate::http::write::{full_response, COALESCE_LIMIT};
use crate::http::{ApiError, Request};
use crate::metrics::ErrorType;
use crate::scheduler::PickContext;
use crate::shared::Snapshot;
use crate::topology::{ModelRoute, RoleSet, Topology};
use crate::trace::RequestTrace;
use bytes::Bytes;
use http::StatusCode;
use std::borrow::Cow;
use std::pin::pin;
use std::time::Instant;

/// Upper bound on a prefill response kept in memory (it is one token plus metadata).
const MAX_PREFILL_RESPONSE: usize = 16 * 1024 * 1024;

/// The topology snapshot for a request, or the error to answer: 404 for an unknown model,
/// 400 when several models are served and none is named, 503 while the model is gated
/// (each model on its own: one model's absence never holds back another's requests).
fn open_route(w: &Worker, model: Option<&str>) -> Result<(Snapshot<Topology>, usize), ApiError> {
    let topo = w.topology();
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

/// A request's id: the client's `X-Request-Id`, or a new UUID (kept inline, no allocation).
pub(super) enum RequestId<'a> {
    Client(&'a str),
    New(crate::ids::Uuid),
}

impl std::ops::Deref for RequestId<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            RequestId::Client(s) => s,
            RequestId::New(u) => u.as_str(),
        }
    }
}

/// The client's `X-Request-Id`, or a new one: every answer on a business endpoint has one.
pub(super) fn request_id<'a>(req: &'a Request<'_>) -> RequestId<'a> {
    match req.head.request_id.as_deref() {
        Some(id) => RequestId::Client(id),
        None => RequestId::New(crate::ids::Uuid::new_v4()),
    }
}

/// The model's route in the current topology when it differs from `seen`, else None: a
/// reload or admin change published since `seen` was read marks removed instances draining.
fn newer_route(w: &Worker, seen: &Topology, model: &str) -> Option<(Snapshot<Topology>, usize)> {
    let now = w.topology();
    // The same snapshot, or a newer one (both alive here, so their addresses differ).
    if std::ptr::eq(&*now, seen) {
        return None;
    }
    w.pool.sync(&now);
    let i = now.route_index(Some(model))?;
    Some((now, i))
}

/// The outcome of a request's work raced against its client leaving
/// (`NextRead::unless_closed`, which takes the work pinned where it was made: the request's
/// whole flow is one large future, and moving it into the race cost a copy of it per
/// request). `None`: the client left, and the work was dropped, which closed its upstream
/// connections and released its counters.
fn unless_left(raced: Option<Outcome>, request_id: &str) -> Outcome {
    raced.unwrap_or_else(|| {
        crate::info!("request {request_id}: client disconnected; abandoning its legs");
        Outcome::close(499)
    })
}

/// Tokens assumed for a request without `max_tokens`, for decode load accounting.
const DEFAULT_DECODE_TOKENS: u64 = 256;

/// The prompt's token ids, only when something needs them (they are not free): a policy of
/// the model matches on them (`kv_aware`), or the byte estimate is near the model's context
/// length, where bytes / 4 could refuse a prompt that fits. Token-id prompts are taken as
/// they are; a text prompt, or chat messages rendered with the model's chat template, are
/// tokenized on a tokenizer thread while this task waits (the worker serves its other
/// connections meanwhile; docs/scheduling.md, "Tokenizers"). None keeps the estimate.
async fn prompt_token_ids(
    route: &crate::topology::ModelRoute,
    inspected: &openai::Inspected<'_>,
    endpoint: Endpoint,
    body: &Bytes,
) -> Option<Vec<u32>> {
    let estimate = inspected.prompt_tokens();
    let near_limit = route.max_model_len().is_some_and(|max| estimate * 2 >= max);
    if !route.needs_tokens() && !near_limit {
        return None;
    }
    let input = match endpoint {
        Endpoint::Completions => {
            if let Some(ids) = openai::token_ids(inspected.prompt) {
                return Some(ids);
            }
            if inspected.prompt.first() != Some(&b'"') {
                return None; // a batch of prompts: each has its own count
            }
            crate::tokenize::Input::Completion(body.slice_ref(inspected.prompt))
        }
        Endpoint::ChatCompletions => {
            let raw = |k: &str| inspected.obj.get(k).map(|v| body.slice_ref(v.as_bytes()));
            crate::tokenize::Input::Chat(crate::tokenize::ChatInput {
                messages: body.slice_ref(inspected.prompt),
                tools: raw("tools"),
                kwargs: raw("chat_template_kwargs"),
                add_generation_prompt: inspected
                    .obj
                    .get("add_generation_prompt")
                    .is_none_or(|v| v != "false"),
            })
        }
    };
    crate::tokenize::token_ids(&route.name, input).await
}

pub async fn serve(
    start: Instant,
    w: &Worker,
    peer_ip: &str,
    req: &Request<'_>,
    endpoint: Endpoint,
    client: &mut ClientWriter,
    next: &mut NextRead<'_>,
) -> Outcome {
    let keep_alive = req.head.keep_alive;
    let id = request_id(req);
    let request_id: &str = &id;
    let inspected = match openai::inspect(endpoint, &req.body) {
        Ok(i) => i,
        Err(e) => return answer_error(client, &e, Some(request_id), keep_alive).await,
    };
    let (topo, model_index) = match open_route(w, inspected.model.as_deref()) {
        Ok(t) => t,
        Err(e) => return answer_error(client, &e, Some(request_id), keep_alive).await,
    };
    let route = &topo.models[model_index];
    let key = req
        .head
        .session_id
        .as_deref()
        .or(inspected.user.as_deref())
        .unwrap_or(peer_ip);
    let trace = w.shared.exporter.as_ref().and_then(|_| {
        let client = forward_headers::find(&req.head.headers, "traceparent");
        RequestTrace::begin(client, w.policy().trace_sample_ratio, start)
    });
    let mut ctx = request_ctx(w, req, request_id, client, start, trace.as_ref());
    // The first token from prefill rewrites the decode stream: it must come uncompressed.
    ctx.forward.decode_identity = ctx.policy.generator_on_p_node && inspected.stream;
    let work = pin!(async {
        // Inside the work too: a client that leaves while its prompt is being tokenized
        // stops waiting for it.
        let tokens = prompt_token_ids(route, &inspected, endpoint, &req.body).await;
        let prompt_hashes = std::cell::OnceCell::new();
        let pick = PickContext {
            tokens: tokens.as_deref(),
            prompt_tokens: tokens
                .as_ref()
                .map_or(inspected.prompt_tokens(), |t| t.len() as u64),
            decode_tokens: inspected.max_tokens.unwrap_or(DEFAULT_DECODE_TOKENS),
            key: Some(key),
            prompt_text: inspected.prompt,
            exclude: &[],
            prompt_hashes: Some(&prompt_hashes),
        };
        // Admission waits inside the work: a client that leaves is taken out of the queue.
        let ask = crate::admission::Ask {
            model: &route.name,
            route,
            authorization: req.head.authorization.as_deref(),
            tokens: pick.prompt_tokens + pick.decode_tokens,
        };
        // Held (its slot in use) until the request is over.
        let admitted = w.admission.admit(ask).await;
        // Decide on the topology as it is now, not as it was when the request arrived (or
        // before it waited in the admission queue).
        let current = newer_route(w, &topo, &route.name);
        let (seen, route) = match &current {
            Some((t, i)) => (t, &t.models[*i]),
            None => (&topo, route),
        };
        let (prefill_up, decode_up) = (route.prefill.any_available(), route.decode.any_available());
        let result = if let Err(rejected) = &admitted {
            crate::info!("request {request_id}: {}", rejected.message);
            Err(rejected.api_error())
        } else if prefill_up && decode_up {
            let job = Job {
                inspected: &inspected,
                chat: endpoint == Endpoint::ChatCompletions,
                body: &req.body,
            };
            disaggregated(&mut ctx, seen, route, &pick, &job).await
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
            forward(&mut ctx, &route.dual, &pick, Role::Dual, &req.body).await
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                if e.status.is_server_error() {
                    crate::error!("request {request_id}: {}", e.message);
                }
                ctx.answer_error(&e).await
            }
        };
        let end = ctx.tl.finish(w, &route.name, request_id, outcome.status);
        if let (Some(t), Some(exporter)) = (&trace, &w.shared.exporter) {
            let info = spans::RequestInfo {
                path: req.head.route(),
                model: &route.name,
                policy: route.kind.as_str(),
                request_id,
                prompt_tokens: inspected.prompt_tokens(),
                max_tokens: inspected.max_tokens,
                stream: inspected.stream,
                dual: ctx.tl.prefill_sent.is_none(),
            };
            spans::emit(exporter, t, &info, &ctx.tl, outcome.status, end);
        }
        if let Some(tokens) = ctx.tl.usage {
            w.admission
                .usage(&route.name, req.head.authorization.as_deref(), tokens);
        }
        outcome
    });
    unless_left(next.unless_closed(work).await, request_id)
}

/// `/tokenize`, `/detokenize`, `/v1/embeddings`: forwarded as they are to one instance of
/// the model that can answer them alone (dual, else decode).
pub async fn serve_forwarded(
    start: Instant,
    w: &Worker,
    req: &Request<'_>,
    client: &mut ClientWriter,
    next: &mut NextRead<'_>,
) -> Outcome {
    let keep_alive = req.head.keep_alive;
    let id = request_id(req);
    let request_id: &str = &id;
    let model: Option<String> = openai::RawObject::parse_bytes(&req.body)
        .ok()
        .and_then(|o| o.get("model").and_then(|v| serde_json::from_str(v).ok()));
    let (topo, model_index) = match open_route(w, model.as_deref()) {
        Ok(t) => t,
        Err(e) => return answer_error(client, &e, Some(request_id), keep_alive).await,
    };
    let route = &topo.models[model_index];
    let (set, role) = if route.dual.any_available() || route.decode.instances.is_empty() {
        (&route.dual, Role::Dual)
    } else {
        (&route.decode, Role::Decode)
    };
    let mut ctx = request_ctx(w, req, request_id, client, start, None);
    let work = pin!(async {
        match forward(&mut ctx, set, &PickContext::default(), role, &req.body).await {
            Ok(o) => o,
            Err(e) => ctx.answer_error(&e).await,
        }
    });
    unless_left(next.unless_closed(work).await, request_id)
}

fn request_ctx<'a>(
    w: &'a Worker,
    req: &'a Request<'_>,
    request_id: &'a str,
    client: &'a mut ClientWriter,
    start: Instant,
    trace: Option<&'a RequestTrace>,
) -> RequestCtx<'a> {
    let policy = w.policy();
    RequestCtx {
        w,
        request_id,
        client,
        keep_alive: req.head.keep_alive,
        http10: req.head.minor_version == 0,
        path: &req.head.path,
        authorization: backend_authorization(&policy, req),
        forward: Forwarding {
            client: &req.head.headers,
            connection: req.head.connection.as_deref(),
            trace,
            decode_identity: false,
        },
        tl: Timeline::new(start),
        policy,
    }
}

/// `Authorization` for the backends: the configured `openai_api_key`, else the client's
/// unless the deny list keeps it (by default it does: it is the client's key to the proxy).
fn backend_authorization<'a>(policy: &Policy, req: &'a Request) -> Option<Cow<'a, str>> {
    match &policy.openai_api_key {
        Some(k) => Some(Cow::Owned(format!("Bearer {k}"))),
        None if policy.deny_headers.iter().any(|h| h == "authorization") => None,
        None => req.head.authorization.as_deref().map(Cow::Borrowed),
    }
}

/// What the P/D flow needs to know about the request beyond its bytes.
struct Job<'a, 'b> {
    inspected: &'a openai::Inspected<'b>,
    chat: bool,
    /// The client's request body.
    body: &'a Bytes,
}

/// `route` is the model's route in `seen`.
async fn disaggregated(
    ctx: &mut RequestCtx<'_>,
    seen: &Topology,
    route: &ModelRoute,
    pick: &PickContext<'_>,
    job: &Job<'_, '_>,
) -> Result<Outcome, ApiError> {
    let w = ctx.w;
    let nixl = route.mode == DisaggMode::Nixl;
    // The prefill body is written into a worker's free buffer (no allocation), given back
    // once the leg is answered; one too large for a single write is shared like a client's.
    let mut prefill = w.scratch.take();
    openai::write_prefill_body(&mut prefill, &job.inspected.obj, nixl);
    let large;
    let body = if prefill.len() <= COALESCE_LIMIT {
        Body::Written(&prefill)
    } else {
        large = Bytes::from(std::mem::take(&mut prefill));
        Body::Shared(&large)
    };
    let answered = ctx.run(&route.prefill, pick, Role::Prefill, body).await;
    w.scratch.give(prefill);
    // HTTP/1.0 clients cannot take the chunked stream the first token's path writes; they
    // get the plain relay, which frames by close.
    let first_wanted = ctx.policy.generator_on_p_node && job.inspected.stream && !ctx.http10;
    let mut resp = Vec::new();
    {
        let Answered {
            guard,
            mut conn,
            head,
        } = answered?;
        let inst = guard.instance();
        let idle = ctx.policy.timeouts.idle;
        // The prefill body is read by NIXL (its kv_transfer_params), by the first token's
        // path, and by the client when it is an error; otherwise it is passed over where it
        // lies. Kept, it goes into a free buffer, given back before the decode leg.
        let keep = nixl || first_wanted || !head.status.is_success();
        if keep {
            resp = w.scratch.take();
        }
        let out = keep.then_some(&mut resp);
        let got = read_body(&mut conn, &head, MAX_PREFILL_RESPONSE, idle, out).await;
        match got {
            Ok(()) => {}
            Err(BodyFailed::Upstream(e)) => {
                failure::count(w, inst, failure::error_type(&e));
                return Err(ctx.upstream_failed(inst, &e));
            }
            Err(BodyFailed::Timeout) => {
                failure::count(w, inst, ErrorType::Timeout);
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    format!("prefill instance {} stalled mid-response", inst.address),
                ));
            }
        }
        ctx.tl.prefill_done = Some(Instant::now());
        if head.keep_alive {
            w.pool.put_back(conn, inst);
        }
        if !head.status.is_success() {
            // The backend's own error goes to the client as it is.
            crate::info!(
                "request {}: prefill instance {} answered {}",
                ctx.request_id,
                inst.address,
                head.status
            );
            let ct = head.content_type.as_deref().unwrap_or("application/json");
            let out = full_response(
                head.status,
                &[("Content-Type", ct), ("X-Request-Id", ctx.request_id)],
                &resp,
                ctx.keep_alive,
            );
            let keep = ctx.write(out).await.is_ok() && ctx.keep_alive;
            return Ok(Outcome::new(head.status.as_u16(), keep));
        }
    }
    // NIXL: the decode leg carries exactly what the prefill node returned.
    let with_kv;
    let decode_body = match nixl.then(|| openai::kv_params_of(&resp)).flatten() {
        Some(kv) => {
            with_kv = Bytes::from(openai::with_kv_params(&job.inspected.obj, &kv));
            &with_kv
        }
        None => {
            if nixl {
                crate::debug!(
                    "request {}: prefill response has no kv_transfer_params; decode leg sent without",
                    ctx.request_id
                );
            }
            // Borrowed, not cloned: a clone of the body's `Bytes` allocated its shared header.
            job.body
        }
    };
    let first = first_wanted
        .then(|| FirstToken::from_prefill(&resp, job.chat))
        .flatten();
    w.scratch.give(resp);
    // The prefill leg took time: pick the decode leg from the topology as it is now.
    let current = newer_route(w, seen, &route.name);
    let route = current.as_ref().map_or(route, |(t, i)| &t.models[*i]);
    if let Some(first) = first {
        return Ok(first_from_prefill(ctx, route, pick, decode_body, first).await);
    }
    forward(ctx, &route.decode, pick, Role::Decode, decode_body).await
}

/// The prefill token goes out at once; the decode stream follows it (`first_token.rs`).
async fn first_from_prefill(
    ctx: &mut RequestCtx<'_>,
    route: &ModelRoute,
    pick: &PickContext<'_>,
    body: &Bytes,
    first: FirstToken,
) -> Outcome {
    if first_token::send_first(ctx, &first).await.is_err() {
        return Outcome::client_gone();
    }
    match ctx
        .run(&route.decode, pick, Role::Decode, Body::Shared(body))
        .await
    {
        Ok(Answered { guard, conn, head }) if head.status.is_success() => {
            first_token::relay_rest(ctx, &guard, conn, head, first).await
        }
        Ok(Answered { guard, head, .. }) => {
            let err = ApiError::bad_gateway(format!(
                "decode instance {} answered {}",
                guard.instance().address,
                head.status
            ));
            crate::error!(
                "request {}: {} after the first token was sent",
                ctx.request_id,
                err.message
            );
            first_token::fail_stream(ctx, &err).await
        }
        Err(e) => {
            crate::error!(
                "request {}: {} after the first token was sent",
                ctx.request_id,
                e.message
            );
            first_token::fail_stream(ctx, &e).await
        }
    }
}

/// Runs the leg that answers the client (decode, or dual) and relays its response.
async fn forward(
    ctx: &mut RequestCtx<'_>,
    set: &RoleSet,
    pick: &PickContext<'_>,
    role: Role,
    body: &Bytes,
) -> Result<Outcome, ApiError> {
    let Answered { guard, conn, head } = ctx.run(set, pick, role, Body::Shared(body)).await?;
    Ok(relay(ctx, &guard, conn, head).await)
}
