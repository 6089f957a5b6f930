//! When the parts of a request happened: filled by the legs and the relays, read once at the
//! end for the P/D metrics and the request's log line.

use super::Worker;
use crate::metrics::InstanceMetrics;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Timeline {
    pub start: Instant,
    /// The legs' instances, as this worker records them (not the shared `Arc<Instance>`).
    pub prefill: Option<Arc<InstanceMetrics>>,
    pub prefill_sent: Option<Instant>,
    pub prefill_done: Option<Instant>,
    pub decode: Option<Arc<InstanceMetrics>>,
    pub decode_sent: Option<Instant>,
    pub decode_head: Option<Instant>,
    /// First body byte written to the client.
    pub first_byte: Option<Instant>,
    pub last_event: Option<Instant>,
    /// SSE events relayed.
    pub events: u64,
    /// `(prompt, completion)` tokens from the response's `usage`, when it had one.
    pub usage: Option<(u64, u64)>,
}

impl Timeline {
    pub fn new(start: Instant) -> Self {
        Timeline {
            start,
            prefill: None,
            prefill_sent: None,
            prefill_done: None,
            decode: None,
            decode_sent: None,
            decode_head: None,
            first_byte: None,
            last_event: None,
            events: 0,
            usage: None,
        }
    }

    /// Body bytes carrying `events` SSE events reached the client now.
    pub fn wrote_body(&mut self, events: u64) {
        let now = Instant::now();
        self.first_byte.get_or_insert(now);
        if events > 0 {
            self.events += events;
            self.last_event = Some(now);
        }
    }

    /// Takes in what a relay that ran apart from the request recorded in `relay`'s timeline
    /// (its body bytes, events and usage).
    pub fn relayed(&mut self, relay: &Timeline) {
        if let Some(t) = relay.first_byte {
            self.first_byte.get_or_insert(t);
        }
        self.events += relay.events;
        self.last_event = relay.last_event.or(self.last_event);
        self.usage = relay.usage.or(self.usage);
    }

    /// Records the request's P/D metrics (successful requests only) and writes its log line;
    /// returns when the request ended.
    pub fn finish(&self, w: &Worker, model: &str, request_id: &str, status: u16) -> Instant {
        let end = Instant::now();
        let ms = |d: Option<Duration>| d.map_or(-1.0, |d| d.as_secs_f64() * 1e3);
        let ttft = self.first_byte.map(|t| t - self.start);
        if w.metrics_enabled && (200..300).contains(&status) {
            if let Some(decode) = &self.decode {
                let m = w
                    .metric_index
                    .pair(&w.metrics, self.prefill.as_deref(), decode);
                if let (Some(a), Some(b)) = (self.prefill_sent, self.prefill_done) {
                    m.prefill_duration.observe(b - a);
                }
                if let (Some(a), Some(b)) = (self.prefill_done, self.decode_head) {
                    m.kv_transfer.observe(b - a);
                }
                if let Some(a) = self.decode_sent {
                    m.decode_duration.observe(end - a);
                }
                if let Some(t) = ttft {
                    m.ttft.observe(t);
                }
                if let (Some(first), Some(last)) = (self.first_byte, self.last_event) {
                    if self.events > 1 {
                        m.tpot.observe((last - first) / (self.events - 1) as u32);
                    }
                }
                m.e2e.observe(end - self.start);
            }
        }
        crate::info!(
            "request {request_id} model={model} prefill={} decode={} status={status} ttft_ms={:.2} duration_ms={:.2}",
            self.prefill.as_ref().map_or("-", |i| i.address.as_str()),
            self.decode.as_ref().map_or("-", |i| i.address.as_str()),
            ms(ttft),
            ms(Some(end - self.start)),
        );
        end
    }
}
