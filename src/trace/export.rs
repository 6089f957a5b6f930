//! The span exporter: a background thread that batches finished spans and posts them to the
//! OTLP/HTTP endpoint (`application/x-protobuf`). Workers hand spans over with `try_send`
//! on a bounded queue: when it is full (a slow or dead collector), the span is dropped and
//! counted — a request never waits on tracing.

use super::otlp::{encode_request, Span};
use crate::config::OtlpEndpoint;
use crate::http::blocking::KeptAlive;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Spans waiting for the exporter; about a thousand requests' worth.
const QUEUE: usize = 4096;
/// Spans per export request.
const BATCH: usize = 512;
/// A partial batch waits at most this long.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Connecting to, writing to and hearing from the collector, each.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// What the exporter did, for `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub exported: AtomicU64,
    /// The queue was full when a worker handed the span over.
    pub dropped_queue_full: AtomicU64,
    /// The collector could not be reached or refused the batch.
    pub dropped_export_failed: AtomicU64,
}

impl Stats {
    /// The exporter's counters in the Prometheus text format (docs/metrics.md).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP proxy_trace_spans_exported_total Spans the OTLP collector accepted.\n\
             # TYPE proxy_trace_spans_exported_total counter\n\
             proxy_trace_spans_exported_total {}\n\
             # HELP proxy_trace_spans_dropped_total Spans dropped: the export queue was full, or the collector failed.\n\
             # TYPE proxy_trace_spans_dropped_total counter\n\
             proxy_trace_spans_dropped_total{{reason=\"queue_full\"}} {}\n\
             proxy_trace_spans_dropped_total{{reason=\"export_failed\"}} {}\n",
            n(&self.exported),
            n(&self.dropped_queue_full),
            n(&self.dropped_export_failed)
        );
    }
}

/// The workers' end: cheap to share, never blocks.
pub struct Exporter {
    tx: SyncSender<Span>,
    pub stats: Arc<Stats>,
}

impl Exporter {
    /// Starts the exporter thread for `endpoint`.
    pub fn spawn(endpoint: OtlpEndpoint, service_name: String) -> io::Result<Exporter> {
        let (tx, rx) = sync_channel(QUEUE);
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("xpyd-otlp".into())
            .spawn(move || run(rx, &endpoint, &service_name, &st))?;
        Ok(Exporter { tx, stats })
    }

    /// Hands a finished span over; drops (and counts) it when the queue is full.
    pub fn submit(&self, span: Span) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(span) {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn run(rx: Receiver<Span>, endpoint: &OtlpEndpoint, service: &str, stats: &Stats) {
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    let mut failing = false;
    let mut conn = KeptAlive::default();
    loop {
        let deadline = Instant::now() + FLUSH_EVERY;
        let mut closed = false;
        while batch.len() < BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) => batch.push(s),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            // A bug's panic while encoding or posting loses this batch (counted as failed
            // to export), not the thread: the workers' spans would queue up and be dropped.
            let n = batch.len() as u64;
            let mut done = false;
            crate::proxy::contain::step("tracing: exporting a batch", || {
                let body = encode_request(service, &batch);
                match post(&mut conn, endpoint, &body) {
                    Ok(()) => {
                        stats
                            .exported
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        if failing {
                            crate::warn!("tracing: exporting to {} again", endpoint.url);
                            failing = false;
                        }
                    }
                    Err(e) => {
                        stats
                            .dropped_export_failed
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        // Once per failure streak: a dead collector must not flood the log.
                        if !failing {
                            crate::warn!(
                                "tracing: cannot export spans to {}: {e}; dropping them until it answers",
                                endpoint.url
                            );
                            failing = true;
                        }
                    }
                }
                done = true;
            });
            if !done {
                conn = KeptAlive::default();
                stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
            }
            batch.clear();
        }
        if closed {
            return;
        }
    }
}

/// One `POST` on the exporter's kept connection; Ok when the collector answered 2xx.
fn post(conn: &mut KeptAlive, endpoint: &OtlpEndpoint, body: &[u8]) -> io::Result<()> {
    let headers = [("Content-Type", "application/x-protobuf")];
    let status = conn.post(
        &endpoint.authority,
        &endpoint.path,
        &headers,
        body,
        IO_TIMEOUT,
    )?;
    if status.is_success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("the collector answered {status}")))
    }
}
