//! Distributed tracing (docs/tracing.md): W3C trace context in and out, one span per
//! request with a child per leg, exported over OTLP/HTTP by a background thread.

pub mod context;
pub mod export;
pub mod otlp;

pub use export::Exporter;

use context::{SpanId, TraceId, SAMPLED};
use std::cell::RefCell;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Something that happened on a leg: a retry on another instance, or its failure.
pub struct LegEvent {
    pub at: Instant,
    pub prefill: bool,
    pub name: &'static str,
    pub instance: String,
    pub reason: String,
}

/// A request being recorded: its trace, the ids of its spans (drawn up front, so each leg's
/// `traceparent` can name its span before the leg ends), and the events of its legs.
pub struct RequestTrace {
    pub trace_id: TraceId,
    /// The client's span, when its trace is continued.
    pub parent: Option<SpanId>,
    /// The client's `traceparent` was valid and is continued (its `tracestate` goes along).
    pub continued: bool,
    pub request_span: SpanId,
    pub prefill_span: SpanId,
    /// The leg that answers the client: decode, or dual.
    pub answer_span: SpanId,
    start: Instant,
    start_unix_nano: u64,
    pub events: RefCell<Vec<LegEvent>>,
}

impl RequestTrace {
    /// Starts recording when the request is sampled: parent-based (a client's valid
    /// `traceparent` decides by its sampled flag), else by `ratio`. `None`: not recorded
    /// (the client's trace context, if any, is then forwarded untouched).
    pub fn begin(client_traceparent: Option<&str>, ratio: f64, start: Instant) -> Option<Self> {
        let client = client_traceparent.and_then(context::parse);
        let sampled = match &client {
            Some(tp) => tp.sampled(),
            None => ratio >= 1.0 || (crate::ids::next_u64() as f64) < ratio * u64::MAX as f64,
        };
        if !sampled {
            return None;
        }
        let since_start = start.elapsed();
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(since_start);
        Some(RequestTrace {
            trace_id: client.map_or_else(context::new_trace_id, |c| c.trace_id),
            parent: client.map(|c| c.parent_id),
            continued: client.is_some(),
            request_span: context::new_span_id(),
            prefill_span: context::new_span_id(),
            answer_span: context::new_span_id(),
            start,
            start_unix_nano: now_unix.as_nanos() as u64,
            events: RefCell::new(Vec::new()),
        })
    }

    /// The `traceparent` value a leg carries: its own span as the parent.
    pub fn traceparent(&self, prefill: bool) -> [u8; 55] {
        let span = if prefill {
            &self.prefill_span
        } else {
            &self.answer_span
        };
        context::format(&self.trace_id, span, SAMPLED)
    }

    /// Wall-clock nanoseconds of `t` (monotonic offsets from one clock reading).
    pub fn unix_nano(&self, t: Instant) -> u64 {
        self.start_unix_nano + t.saturating_duration_since(self.start).as_nanos() as u64
    }

    pub fn event(
        &self,
        prefill: bool,
        name: &'static str,
        instance: &str,
        reason: impl Into<String>,
    ) {
        self.events.borrow_mut().push(LegEvent {
            at: Instant::now(),
            prefill,
            name,
            instance: instance.to_string(),
            reason: reason.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLED_TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn continues_a_sampled_client_trace() {
        let t = RequestTrace::begin(Some(SAMPLED_TP), 0.0, Instant::now()).unwrap();
        assert_eq!(
            context::hex(&t.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            t.parent.map(|p| context::hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(t.continued);
        let tp = context::parse(std::str::from_utf8(&t.traceparent(true)).unwrap()).unwrap();
        assert_eq!(tp.trace_id, t.trace_id);
        assert_eq!(tp.parent_id, t.prefill_span);
        assert!(tp.sampled());
        assert_ne!(t.prefill_span, t.answer_span);
    }

    #[test]
    fn parent_based_sampling() {
        let unsampled = SAMPLED_TP.replace("-01", "-00");
        assert!(RequestTrace::begin(Some(&unsampled), 1.0, Instant::now()).is_none());
        assert!(RequestTrace::begin(None, 0.0, Instant::now()).is_none());
        let t = RequestTrace::begin(Some("garbage"), 1.0, Instant::now()).unwrap();
        assert!(!t.continued && t.parent.is_none());
        let n = (0..2000)
            .filter(|_| RequestTrace::begin(None, 0.25, Instant::now()).is_some())
            .count();
        assert!((300..700).contains(&n), "{n} of 2000 at 0.25");
    }
}
