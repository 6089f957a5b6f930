//! The per-worker accept loop and per-connection request loop (keep-alive, pipelining), and
//! the routing of each request to an operational or business handler.

use super::contain::{self, Contained};
use super::flow;
use super::outcome::{answer_error, Outcome};
use super::route::{Access, Route};
use super::{admin, Worker};
use crate::deadline::Deadline;
use crate::http::conn::{ClientWriter, SplitStream};
use crate::http::head::RequestMemo;
use crate::http::watch::NextRead;
use crate::http::write::{error_response, full_response, JSON};
use crate::http::{lingering_close, read_request, ApiError, ReadBuf, ReadError, Request};
use crate::metrics;
use crate::shared::ActiveRequest;
use http::{Method, StatusCode};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};
use serde_json::json;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Accepts until shutdown, then keeps the event loop alive for the connections still open:
/// returning would drop the runtime and with it every request in flight. The main thread
/// ends the process once requests are done (or the grace period is over).
pub async fn accept_loop(w: Rc<Worker>, listener: TcpListener) {
    let sweeper = w.clone();
    monoio::spawn(async move {
        loop {
            monoio::time::sleep(std::time::Duration::from_secs(1)).await;
            sweeper.pool.sweep();
        }
    });
    // A task of its own, like every connection, rather than the runtime's main future: a
    // profile that counts task polls (tools/bench/callgrind) then sees the accept work too.
    let acceptor = w.clone();
    monoio::spawn(async move { accept_until_shutdown(&acceptor, listener).await }).await;
    while w.connections.get() > 0 {
        monoio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn accept_until_shutdown(w: &Rc<Worker>, listener: TcpListener) {
    // Accepted sockets are close-on-exec on both drivers: epoll's accept4 and (vendor/monoio's
    // patch) io_uring's accept pass SOCK_CLOEXEC — no fcntl per connection.
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if w.shared.shutting_down.load(Ordering::Relaxed) {
                    return;
                }
                if w.connections.get() >= w.policy().limits.max_connections {
                    // Refuse by closing at once: cheaper than an answer, and the client's
                    // connection error is clear.
                    crate::warn!(
                        "worker {}: {} connections open (limits.max_connections); refusing {peer}",
                        w.id,
                        w.connections.get()
                    );
                    drop(stream);
                    continue;
                }
                // Counted here, not in the task: accepts can complete back to back without
                // the spawned tasks running in between.
                w.connections.set(w.connections.get() + 1);
                let w = w.clone();
                monoio::spawn(async move {
                    // Boxed: the connection's future (every request's state machine, ~8 KiB)
                    // is then written into memory once. Held inline, the task's spawn and end
                    // copy it whole (monoio moves the task's stage by value) — 4 copies per
                    // connection, the largest user-space cost of a new stream.
                    let serve = Box::pin(serve_connection(&w, stream, PeerIp::new(peer.ip())));
                    // A bug's panic closes this connection only (`contain`).
                    if let Err(panic) = Contained(serve).await {
                        crate::error!(
                            "worker {}: serving {peer} panicked ({}); its connection was closed",
                            w.id,
                            contain::message(&panic)
                        );
                    }
                    w.connections.set(w.connections.get() - 1);
                });
            }
            Err(_) if w.shared.shutting_down.load(Ordering::Relaxed) => return,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                crate::error!("worker {}: accept failed: {e}", w.id);
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(w: &Worker, stream: TcpStream, peer: PeerIp) {
    let peer_ip = peer.as_str();
    // No `set_nodelay` here: an accepted socket inherits TCP_NODELAY from the listener
    // (`runtime::bind_listeners` sets it), which saves a syscall per connection.
    let mut conn = SplitStream::new(stream);
    let mut buf = ReadBuf::with_capacity(8 * 1024);
    // The connection's one timer: the wait for the next request, then its header timeout.
    let mut deadline = Deadline::new();
    // A client sends the same head each time but for the body's length: recognised, not
    // parsed again.
    let mut heads = RequestMemo::default();
    loop {
        let limits = w.policy().limits.http;
        let req = match read_request(
            &mut conn,
            &mut buf,
            &limits,
            &mut deadline,
            Some(&mut heads),
        )
        .await
        {
            Ok(r) => r,
            Err(ReadError::Closed) | Err(ReadError::Io(_)) | Err(ReadError::TimedOut) => return,
            Err(ReadError::Reject(e)) => {
                crate::info!("rejecting request from {peer_ip}: {}", e.message);
                answer_error(&mut conn.wr, &e, None, false).await;
                lingering_close(conn, buf).await;
                return;
            }
        };
        let active = ActiveRequest::new(&w.shared, w.id);
        let start = Instant::now();
        let route = Route::from_path(req.head.route());
        // The connection's next read: the flow races it (the client leaving), and after the
        // answer it is the wait for the next request — one read, no poll beside it.
        let buffered = !buf.is_empty();
        let read = pin!(buf.fill(&mut conn.rd));
        let mut next = NextRead::new(read, buffered);
        // By reference: the request stays where it was read (each future it was moved into
        // held a copy of its 280 bytes, written into that request's cold future state).
        let outcome = dispatch(w, route, start, peer_ip, &req, &mut conn.wr, &mut next).await;
        if w.metrics_enabled {
            w.metrics
                .request(route.series(), outcome.status, start.elapsed());
        }
        drop(active);
        if !outcome.keep_alive || w.shared.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        if !next.arrived(limits.keepalive_timeout, &mut deadline).await {
            return;
        }
    }
}

/// The client's address as text — the scheduling key of a request without a session id or
/// user — written once per connection into an inline buffer: no allocation, and an IPv4
/// address without the formatting machinery (a fifth of a new connection's own user-space
/// work went to `to_string` here).
struct PeerIp {
    /// Long enough for any IPv6 address's text (45 bytes, IPv4-mapped).
    buf: [u8; 45],
    len: u8,
}

impl PeerIp {
    fn new(ip: std::net::IpAddr) -> Self {
        let mut p = PeerIp {
            buf: [0; 45],
            len: 0,
        };
        match ip {
            std::net::IpAddr::V4(v4) => {
                for (i, o) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        p.push(b'.');
                    }
                    if o >= 100 {
                        p.push(b'0' + o / 100);
                    }
                    if o >= 10 {
                        p.push(b'0' + o / 10 % 10);
                    }
                    p.push(b'0' + o % 10);
                }
            }
            std::net::IpAddr::V6(v6) => {
                use std::io::Write;
                let mut out = std::io::Cursor::new(&mut p.buf[..]);
                let _ = write!(out, "{v6}");
                p.len = out.position() as u8;
            }
        }
        p
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len as usize] = b;
        self.len += 1;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or_default()
    }
}

/// Answers one request according to its route: who may call it, which methods it takes,
/// which handler serves it.
async fn dispatch(
    w: &Worker,
    route: Route,
    start: Instant,
    peer_ip: &str,
    req: &Request<'_>,
    stream: &mut ClientWriter,
    next: &mut NextRead<'_>,
) -> Outcome {
    let keep_alive = req.head.keep_alive;
    let method = &req.head.method;
    let authorized = match route.access() {
        Access::Admin => true, // the admin key is checked by the handler, after the method
        Access::Probe => true,
        Access::Status if !w.policy().protect_status => true,
        Access::Status | Access::Client => client_authorized(w, req.head.authorization.as_deref()),
    };
    if !authorized {
        let e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or invalid API key: send `Authorization: Bearer <key>`",
        )
        .with_code("invalid_api_key");
        return answer_error(stream, &e, None, keep_alive).await;
    }
    let methods = route.methods();
    if !methods.allows(method) {
        let allow = methods.allow_header();
        let e = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!(
                "{method} is not allowed on {}; use {allow}",
                req.head.route()
            ),
        );
        let rid = route.is_business().then(|| flow::request_id(req));
        let mut headers = vec![("Allow", allow)];
        if let Some(id) = rid.as_deref() {
            headers.push(("X-Request-Id", id));
        }
        let (res, _) = stream
            .write_all(error_response(&e, &headers, keep_alive))
            .await;
        return Outcome::new(405, res.is_ok() && keep_alive);
    }
    let head_only = method == Method::HEAD;
    let (status, body) = match route {
        Route::Inference(endpoint) => {
            if !crate::http::is_json_content_type(req.head.content_type.as_deref()) {
                let e = ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    "Content-Type must be application/json",
                );
                return answer_error(stream, &e, Some(&flow::request_id(req)), keep_alive).await;
            }
            return flow::serve(start, w, peer_ip, req, endpoint, stream, next).await;
        }
        Route::Forwarded => {
            return flow::serve_forwarded(start, w, req, stream, next).await;
        }
        Route::Admin(action) => {
            let result = match admin::authorize(w, req.head.api_key.as_deref()) {
                Ok(()) => admin::handle(w, action, &req.body).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => (StatusCode::OK, v),
                Err(e) => return answer_error(stream, &e, None, keep_alive).await,
            }
        }
        Route::Metrics => {
            let topo = w.topology();
            let mut body = metrics::render(&metrics::Scrape {
                workers: &w.shared.metrics,
                active_requests: w.shared.active_requests(),
                instances: topo.instances().map(|i| &**i).collect(),
                discovery: &w.shared.discovery.load(),
            });
            if let Some(exporter) = &w.shared.exporter {
                exporter.stats.render(&mut body);
            }
            crate::admission::render(&w.shared.admission, &mut body);
            crate::scheduler::prefix_sync::render(&mut body);
            let headers = [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")];
            let b = body.as_bytes();
            return respond(stream, StatusCode::OK, &headers, b, keep_alive, head_only).await;
        }
        Route::Ping => (StatusCode::OK, json!({"status": "ok", "message": "pong"})),
        Route::Health => health(w),
        Route::Models => (StatusCode::OK, models(w)),
        Route::Status => (StatusCode::OK, status(w)),
        Route::StatusInstances => (StatusCode::OK, status_instances(w)),
        Route::Version => (
            StatusCode::OK,
            json!({"name": "xpyd", "version": crate::VERSION}),
        ),
        Route::Unknown => {
            let e = ApiError::not_found(format!(
                "{method} {} is not an endpoint of this proxy",
                req.head.route()
            ));
            return answer_error(stream, &e, None, keep_alive).await;
        }
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    respond(stream, status, &[JSON], &body, keep_alive, head_only).await
}

/// Writes a complete response; to a HEAD request, its head alone (the same
/// `Content-Length`, no body: a body would be read as the start of the next response).
async fn respond(
    stream: &mut ClientWriter,
    status: StatusCode,
    headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) -> Outcome {
    let mut out = full_response(status, headers, body, keep_alive);
    if head_only {
        out.truncate(out.len() - body.len());
    }
    let (res, _) = stream.write_all(out).await;
    Outcome::new(status.as_u16(), res.is_ok() && keep_alive)
}

/// With `api_keys` configured, the request must carry `Authorization: Bearer <one of them>`
/// (each compared in constant time).
fn client_authorized(w: &Worker, authorization: Option<&str>) -> bool {
    let policy = w.policy();
    if policy.api_keys.is_empty() {
        return true;
    }
    let Some(key) = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return false;
    };
    policy.api_keys.iter().fold(false, |ok, k| {
        admin::constant_time_eq(key.as_bytes(), k.as_bytes()) | ok
    })
}

/// Readiness of the proxy itself (docs/deployment.md): 200 once start-up gating is met (a
/// first model can serve) until shutdown. A model that cannot serve is reported in the body
/// and answers 503 on its own requests; it does not take the proxy out of service, since no
/// replica could serve it either.
fn health(w: &Worker) -> (StatusCode, serde_json::Value) {
    let topo = w.topology();
    let (status, word) = if w.shared.shutting_down.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if w.shared.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for backend nodes")
    };
    let models: Vec<_> = topo
        .models
        .iter()
        .map(|m| json!({"name": m.name, "ready": m.is_open(), "can_serve": m.can_serve()}))
        .collect();
    let instances: Vec<_> = topo.instances().map(|i| i.status_json()).collect();
    (
        status,
        json!({"status": word, "models": models, "instances": instances}),
    )
}

fn status(w: &Worker) -> serde_json::Value {
    let topo = w.topology();
    let policy = w.policy();
    let models: Vec<_> = topo
        .models
        .iter()
        .map(|m| {
            let count = |set: &crate::topology::RoleSet| {
                let healthy = set.instances.iter().filter(|i| i.is_available()).count();
                json!({"total": set.instances.len(), "healthy": healthy})
            };
            json!({
                "name": m.name,
                "scheduler": m.kind.as_str(),
                "prefill_scheduler": m.roles.for_role(crate::config::Role::Prefill, m.kind).as_str(),
                "decode_scheduler": m.roles.for_role(crate::config::Role::Decode, m.kind).as_str(),
                "prefill": count(&m.prefill),
                "decode": count(&m.decode),
                "dual": count(&m.dual),
                "ready": m.is_open(),
                "can_serve": m.can_serve(),
                "admission": crate::admission::status_json(&w.shared.admission, &policy, &m.name),
                "warnings": m.model_mismatches().iter().map(|(addr, reported)| format!(
                    "instance {addr} serves `{reported}`, not `{}`: its requests fail with 404 model_not_found",
                    m.name
                )).collect::<Vec<_>>(),
            })
        })
        .collect();
    // xpyd-proxy 1.2's fields (configured prefill and decode addresses), beside ours.
    let addresses = |role: crate::config::Role| -> Vec<&str> {
        topo.instances()
            .filter(|i| i.role == role)
            .map(|i| i.address.as_str())
            .collect()
    };
    let (prefill, decode) = (
        addresses(crate::config::Role::Prefill),
        addresses(crate::config::Role::Decode),
    );
    json!({
        "version": crate::VERSION,
        "ready": w.shared.is_ready(),
        "uptime_seconds": w.shared.started.elapsed().as_secs_f64(),
        "models": models,
        "prefill_node_count": prefill.len(),
        "decode_node_count": decode.len(),
        "prefill_nodes": prefill,
        "decode_nodes": decode,
    })
}

/// Every instance, and (as xpyd-proxy 1.2 answered) the same grouped by role.
fn status_instances(w: &Worker) -> serde_json::Value {
    let topo = w.topology();
    let of = |role: crate::config::Role| -> Vec<_> {
        topo.instances()
            .filter(|i| i.role == role)
            .map(|i| i.status_json())
            .collect()
    };
    let all: Vec<_> = topo.instances().map(|i| i.status_json()).collect();
    json!({
        "instances": all,
        "prefill_instances": of(crate::config::Role::Prefill),
        "decode_instances": of(crate::config::Role::Decode),
        "dual_instances": of(crate::config::Role::Dual),
        // 1.8 calls dual instances aggregated.
        "aggregated_instances": of(crate::config::Role::Dual),
    })
}

fn models(w: &Worker) -> serde_json::Value {
    let topo = w.topology();
    let data: Vec<_> = topo
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": w.shared.created_unix,
                "owned_by": "xpyd",
                "root": m.root().unwrap_or(&m.name),
                "parent": null,
                "max_model_len": m.max_model_len(),
            })
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::PeerIp;

    #[test]
    fn peer_ip_text_is_the_address_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let addr: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(PeerIp::new(addr).as_str(), addr.to_string());
        }
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        // serve_connection sets no TCP_NODELAY of its own: a token written while the previous
        // one is unacknowledged would otherwise wait for the ACK (Nagle).
        let listener = crate::runtime::bind_listeners("127.0.0.1", 0, 1)
            .unwrap()
            .remove(0);
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
