//! The dummy's HTTP side: the accept and connection loops, and the handlers by route
//! (health, models, metrics, recorded requests, faults); inference is in `inference.rs`.

use super::engine::Kind;
use super::inference::inference;
use super::reply::{send, send_error, send_json};
use super::stats::Exposition;
use super::{engine, Node};
use crate::deadline::Deadline;
use crate::http::watch::DisconnectWatch;
use crate::http::write::{error_response, full_response};
use crate::http::{lingering_close, read_request, ApiError, Limits, ReadBuf, ReadError, Request};
use http::{Method, StatusCode};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};
use serde_json::{json, Value};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub(super) async fn accept_loop(node: Arc<Node>, listener: TcpListener) {
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
    let mut deadline = Deadline::new();
    loop {
        let req = match read_request(&mut stream, &mut buf, &limits, &mut deadline, None).await {
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

async fn handle(
    node: &Node,
    req: Request<'_>,
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
                "prefilled_tokens": s.prefilled_tokens.load(Ordering::Relaxed),
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
