//! One leg of a request: picking an instance of a role, sending it the request and waiting
//! for its response head, with retries on other instances while nothing reached the client.

use super::context::RequestCtx;
use super::failure;
use super::upstream::{Body, UpstreamConn, UpstreamError};
use crate::config::Role;
use crate::http::head::ResponseHead;
use crate::http::write::{push_decimal, push_header};
use crate::http::ApiError;
use crate::instance::{InFlight, Instance};
use crate::metrics::ErrorType;
use crate::resilience;
use crate::scheduler::PickContext;
use crate::topology::RoleSet;
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// A leg whose response head arrived: the instance (still counted), the connection, the head.
pub struct Answered<'s> {
    pub guard: InFlight<'s>,
    pub conn: UpstreamConn,
    pub head: ResponseHead,
}

impl RequestCtx<'_> {
    fn backend_head(
        &self,
        inst: &Instance,
        body_len: usize,
        role: Role,
        deny: &[String],
    ) -> Vec<u8> {
        // A worker's free buffer (given back once the response head arrived): no
        // allocation per leg in steady state.
        let mut h = self.w.scratch.take();
        h.extend_from_slice(b"POST ");
        h.extend_from_slice(self.path.as_bytes());
        h.extend_from_slice(b" HTTP/1.1\r\n");
        push_header(&mut h, "Host", inst.address.as_bytes());
        h.extend_from_slice(b"Content-Type: application/json\r\nContent-Length: ");
        push_decimal(&mut h, body_len as u64);
        h.extend_from_slice(b"\r\n");
        push_header(&mut h, "X-Request-Id", self.request_id.as_bytes());
        if let Some(a) = &self.authorization {
            push_header(&mut h, "Authorization", a.as_bytes());
        }
        self.forward.write(&mut h, role, deny);
        h.extend_from_slice(b"\r\n");
        h
    }

    /// Sends `body` to an instance of `set` and waits for its response head, retrying
    /// connection failures and retryable statuses on other instances with backoff
    /// (docs/resilience.md).
    /// Nothing has reached the client yet, so every retry is safe. A first-byte timeout is
    /// not retried: the client would wait a multiple of it.
    pub async fn run<'s>(
        &mut self,
        set: &'s RoleSet,
        pick: &PickContext<'_>,
        role: Role,
        body: Body<'_>,
    ) -> Result<Answered<'s>, ApiError> {
        let w = self.w;
        let sent = Instant::now();
        match role {
            Role::Prefill => self.tl.prefill_sent = Some(sent),
            _ => self.tl.decode_sent = Some(sent),
        }
        // The request's policy for the whole leg, retries included (a reload applies to
        // the next request).
        let policy = self.policy.clone();
        let retry = &policy.retry;
        let max_retries = if retry.enabled { retry.max_retries } else { 0 };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0u32;
        loop {
            let guard = pick_instance(
                set,
                &PickContext {
                    exclude: &tried,
                    ..*pick
                },
                role,
            )?;
            let inst = guard.instance();
            let record = w.metric_index.instance(&w.metrics, inst);
            if w.metrics_enabled {
                record.request();
            }
            let count_error = |t: ErrorType| {
                if w.metrics_enabled {
                    record.error(t);
                }
            };
            match role {
                Role::Prefill => self.tl.prefill = Some(Arc::clone(&record)),
                _ => self.tl.decode = Some(Arc::clone(&record)),
            }
            // One clock reading per attempt (the leg's own for the first): the first-byte
            // deadline and the pool's idle check both use it.
            let now = if attempt == 0 { sent } else { Instant::now() };
            // The first-byte timeout runs on the connection's own timer (`Pool::send`).
            let sent = w
                .pool
                .send(
                    inst.socket_addr,
                    self.backend_head(inst, body.len(), role, &policy.deny_headers),
                    body,
                    now,
                    crate::clock::after(now, policy.timeouts.first_byte),
                )
                .await;
            let failure = match sent {
                Ok((conn, head, sent)) => {
                    w.scratch.give(sent);
                    let status = head.status.as_u16();
                    if role != Role::Prefill {
                        self.tl.decode_head = Some(Instant::now());
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
                Err(UpstreamError::FirstByteTimeout) => {
                    count_error(ErrorType::Timeout);
                    inst.record_failure(&policy.circuit);
                    self.forward.event(role, "failed", &inst.address, || {
                        "first-byte timeout".into()
                    });
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
                Err(e) => {
                    count_error(failure::error_type(&e));
                    inst.record_failure(&policy.circuit);
                    w.pool.forget(inst.socket_addr);
                    if attempt >= max_retries {
                        self.forward
                            .event(role, "failed", &inst.address, || e.to_string());
                        return Err(self.upstream_failed(inst, &e));
                    }
                    e.to_string()
                }
            };
            attempt += 1;
            if w.metrics_enabled {
                w.metrics.retry();
            }
            self.forward
                .event(role, "retry", &inst.address, || failure.clone());
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

    /// Logs a leg that got no usable response and says so as a 502.
    pub fn upstream_failed(&self, inst: &Arc<Instance>, e: &UpstreamError) -> ApiError {
        let role = inst.role.as_str();
        crate::warn!(
            "request {}: {role} instance {} failed: {e}",
            self.request_id,
            inst.address
        );
        ApiError::bad_gateway(format!("{role} instance {} failed: {e}", inst.address))
    }
}

/// Picks an instance for one leg and counts the leg against it. Prefill legs carry the
/// prompt tokens; decode and dual legs the request and its decode tokens.
fn pick_instance<'s>(
    set: &'s RoleSet,
    pick: &PickContext<'_>,
    role: Role,
) -> Result<InFlight<'s>, ApiError> {
    let picked = set.scheduler.pick(&set.instances, pick).or_else(|| {
        // Every other instance failed this request already: the same one beats none.
        (!pick.exclude.is_empty())
            .then(|| {
                set.scheduler.pick(
                    &set.instances,
                    &PickContext {
                        exclude: &[],
                        ..*pick
                    },
                )
            })
            .flatten()
    });
    if let Some(inst) = picked {
        // What the engine must prefill: the prompt less what it holds (kv_aware knows).
        let cached = crate::scheduler::take_cached(inst.id);
        let (p, d) = match role {
            Role::Prefill => (pick.prompt_tokens.saturating_sub(cached), 0),
            Role::Decode => (0, pick.decode_tokens),
            Role::Dual => (
                pick.prompt_tokens.saturating_sub(cached),
                pick.decode_tokens,
            ),
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
    // An instance that is down, draining or not yet probed may take the prompt once it is
    // back: the request is not wrong, there is just no room for it now (503, which a
    // client retries; a 400 says never to).
    if set
        .instances
        .iter()
        .any(|i| !i.is_available() && i.fits(pick.prompt_tokens))
    {
        return Err(ApiError::unavailable(format!(
            "no available {} instance takes a prompt of about {} tokens now",
            role.as_str(),
            pick.prompt_tokens
        )));
    }
    let largest = available
        .iter()
        .map(|i| i.max_model_len.load(std::sync::atomic::Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    Err(ApiError::bad_request(format!(
        "the prompt (about {} tokens) is longer than the maximum context length of every {} instance of this model ({largest} tokens)",
        pick.prompt_tokens,
        role.as_str()
    ))
    .with_code("context_length_exceeded"))
}
