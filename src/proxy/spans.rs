//! A recorded request's spans (docs/tracing.md): the request span (kind server) with a
//! child per leg (kind client), built from the request's timeline when it ends and handed
//! to the exporter.

use super::timeline::Timeline;
use crate::metrics::InstanceMetrics;
use crate::trace::otlp::{Event, Kind, Span, Value};
use crate::trace::{Exporter, RequestTrace};
use std::sync::Arc;
use std::time::Instant;

/// What the request span says about the request beyond its timeline.
pub struct RequestInfo<'a> {
    pub path: &'a str,
    pub model: &'a str,
    pub policy: &'a str,
    pub request_id: &'a str,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// The leg answering the client ran on a dual instance.
    pub dual: bool,
}

fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}

fn leg(
    t: &RequestTrace,
    prefill: bool,
    name: &'static str,
    inst: Option<&Arc<InstanceMetrics>>,
    from: Instant,
    to: Instant,
    failed: Option<&str>,
) -> Span {
    let mut attributes = vec![("xpyd.role", s(name))];
    if let Some(i) = inst {
        attributes.push(("xpyd.instance", s(&i.address)));
        attributes.push(("server.address", s(&i.socket_addr.ip().to_string())));
        attributes.push(("server.port", Value::Int(i.socket_addr.port().into())));
    }
    let events = t
        .events
        .borrow()
        .iter()
        .filter(|e| e.prefill == prefill)
        .map(|e| Event {
            time_unix_nano: t.unix_nano(e.at),
            name: e.name,
            attributes: vec![
                ("xpyd.instance", s(&e.instance)),
                ("xpyd.reason", s(&e.reason)),
            ],
        })
        .collect();
    Span {
        trace_id: t.trace_id,
        span_id: if prefill {
            t.prefill_span
        } else {
            t.answer_span
        },
        parent_span_id: Some(t.request_span),
        trace_state: None,
        name,
        kind: Kind::Client,
        start_unix_nano: t.unix_nano(from),
        end_unix_nano: t.unix_nano(to),
        attributes,
        events,
        error: failed.map(str::to_string),
    }
}

/// Builds the request's spans and hands them over (never waits: see `Exporter::submit`).
pub fn emit(
    exporter: &Exporter,
    t: &RequestTrace,
    info: &RequestInfo<'_>,
    tl: &Timeline,
    status: u16,
    end: Instant,
) {
    let failed = (status >= 500).then(|| format!("answered {status}"));
    let leg_failed = |prefill: bool| {
        t.events
            .borrow()
            .iter()
            .rev()
            .find(|e| e.prefill == prefill && e.name == "failed")
            .map(|e| e.reason.clone())
    };
    if let Some(from) = tl.prefill_sent {
        let to = tl.prefill_done.unwrap_or(end);
        let err = leg_failed(true);
        exporter.submit(leg(
            t,
            true,
            "prefill",
            tl.prefill.as_ref(),
            from,
            to,
            err.as_deref(),
        ));
    }
    if let Some(from) = tl.decode_sent {
        let name = if info.dual { "dual" } else { "decode" };
        let err = leg_failed(false);
        exporter.submit(leg(
            t,
            false,
            name,
            tl.decode.as_ref(),
            from,
            end,
            err.as_deref(),
        ));
    }
    let mut attributes = vec![
        ("http.request.method", s("POST")),
        ("url.path", s(info.path)),
        ("http.response.status_code", Value::Int(status.into())),
        ("gen_ai.request.model", s(info.model)),
        ("xpyd.request_id", s(info.request_id)),
        ("xpyd.policy", s(info.policy)),
        ("xpyd.stream", Value::Bool(info.stream)),
        (
            "xpyd.prompt_tokens_estimate",
            Value::Int(info.prompt_tokens as i64),
        ),
    ];
    if let Some(m) = info.max_tokens {
        attributes.push(("gen_ai.request.max_tokens", Value::Int(m as i64)));
    }
    if let Some(p) = &tl.prefill {
        attributes.push(("xpyd.prefill.instance", s(&p.address)));
    }
    if let Some(d) = &tl.decode {
        let key = if info.dual {
            "xpyd.dual.instance"
        } else {
            "xpyd.decode.instance"
        };
        attributes.push((key, s(&d.address)));
    }
    if tl.events > 0 {
        attributes.push(("xpyd.stream_events", Value::Int(tl.events as i64)));
    }
    if let Some(first) = tl.first_byte {
        let us = first.saturating_duration_since(tl.start).as_micros() as i64;
        attributes.push(("xpyd.ttft_us", Value::Int(us)));
    }
    exporter.submit(Span {
        trace_id: t.trace_id,
        span_id: t.request_span,
        parent_span_id: t.parent,
        trace_state: None,
        name: if info.path.ends_with("/chat/completions") {
            "POST /v1/chat/completions"
        } else {
            "POST /v1/completions"
        },
        kind: Kind::Server,
        start_unix_nano: t.unix_nano(tl.start),
        end_unix_nano: t.unix_nano(end),
        attributes,
        events: Vec::new(),
        error: failed,
    });
}
