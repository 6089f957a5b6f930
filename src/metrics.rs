//! Prometheus metrics (docs/metrics.md) recorded per worker without locks and without atomics shared
//! between cores: each worker owns a `WorkerMetrics` and is its only writer (plain
//! load + store on its own cache lines); a scrape reads every worker's values and sums them.
//! Labelled series (instance pairs, instances) are created by their worker on first use
//! and published through an `ArcSwap` list, so the scraper can find them.

use crate::config::Role;
use crate::instance::Instance;
use arc_swap::ArcSwap;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bucket bounds in seconds: 1 ms to 10 min, for LLM latencies.
pub const BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Single-writer increment: the owning worker is the only writer, so no read-modify-write
/// instruction is needed; readers may see the value a moment late, never torn.
#[inline]
fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

#[derive(Default)]
pub struct Histogram {
    /// Non-cumulative counts; the last slot is above the largest bound (+Inf).
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        bump(&self.counts[idx], 1);
        bump(&self.sum_micros, d.as_micros() as u64);
    }

    fn add_to(&self, acc: &mut HistAcc) {
        for (a, c) in acc.counts.iter_mut().zip(&self.counts) {
            *a += c.load(Ordering::Relaxed);
        }
        acc.sum_micros += self.sum_micros.load(Ordering::Relaxed);
    }
}

#[derive(Default, Clone)]
struct HistAcc {
    counts: [u64; BUCKETS.len() + 1],
    sum_micros: u64,
}

impl HistAcc {
    /// Writes the `_bucket`, `_sum` and `_count` lines; the count is the sum of the buckets,
    /// so the exposition is consistent even while workers keep recording.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let lb = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{lb} {}", self.sum_micros as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{lb} {cum}");
    }
}

/// The `endpoint` label of `proxy_requests_total` / `proxy_request_duration_seconds`
/// (which routes count in which: `proxy::route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    Completions,
    ChatCompletions,
    Models,
    Health,
    Ping,
    Status,
    Metrics,
    Instances,
    Forwarded,
    Other,
}

impl Series {
    const ALL: [Series; 10] = [
        Series::Completions,
        Series::ChatCompletions,
        Series::Models,
        Series::Health,
        Series::Ping,
        Series::Status,
        Series::Metrics,
        Series::Instances,
        Series::Forwarded,
        Series::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Series::Completions => "/v1/completions",
            Series::ChatCompletions => "/v1/chat/completions",
            Series::Models => "/v1/models",
            Series::Health => "/health",
            Series::Ping => "/ping",
            Series::Status => "/status",
            Series::Metrics => "/metrics",
            Series::Instances => "/instances",
            Series::Forwarded => "forwarded",
            Series::Other => "other",
        }
    }
}

/// Status codes with their own series; anything else is counted as `status="other"`.
const STATUSES: [u16; 19] = [
    200, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 431, 499, 500, 501, 502, 503, 504, 0,
];

fn status_index(s: u16) -> usize {
    STATUSES[..STATUSES.len() - 1]
        .iter()
        .position(|&x| x == s)
        .unwrap_or(STATUSES.len() - 1)
}

/// Error kinds of `proxy_instance_errors_total`.
#[derive(Clone, Copy)]
pub enum ErrorType {
    Connect = 0,
    Timeout = 1,
    Status5xx = 2,
    Closed = 3,
    BadResponse = 4,
}

const ERROR_TYPES: [&str; 5] = ["connect", "timeout", "status_5xx", "closed", "bad_response"];

pub struct PairMetrics {
    model: Arc<str>,
    prefill: String,
    decode: String,
    pub prefill_duration: Histogram,
    pub kv_transfer: Histogram,
    pub decode_duration: Histogram,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
}

pub struct InstanceMetrics {
    instance: String,
    role: &'static str,
    model: Arc<str>,
    requests: AtomicU64,
    errors: [AtomicU64; ERROR_TYPES.len()],
}

impl InstanceMetrics {
    #[inline]
    pub fn request(&self) {
        bump(&self.requests, 1);
    }
    #[inline]
    pub fn error(&self, t: ErrorType) {
        bump(&self.errors[t as usize], 1);
    }
}

/// One worker's metrics; written only by that worker.
#[derive(Default)]
pub struct WorkerMetrics {
    requests: [[AtomicU64; STATUSES.len()]; Series::ALL.len()],
    durations: [Histogram; Series::ALL.len()],
    retries: AtomicU64,
    pairs: ArcSwap<Vec<Arc<PairMetrics>>>,
    instances: ArcSwap<Vec<Arc<InstanceMetrics>>>,
}

impl WorkerMetrics {
    #[inline]
    pub fn request(&self, series: Series, status: u16, took: Duration) {
        bump(&self.requests[series as usize][status_index(status)], 1);
        self.durations[series as usize].observe(took);
    }

    #[inline]
    pub fn retry(&self) {
        bump(&self.retries, 1);
    }
}

/// The worker-local index over its published series (no synchronisation needed).
#[derive(Default)]
pub struct LocalIndex {
    pairs: RefCell<HashMap<(u64, u64), Arc<PairMetrics>>>,
    instances: RefCell<HashMap<u64, Arc<InstanceMetrics>>>,
}

impl LocalIndex {
    pub fn pair(
        &self,
        m: &WorkerMetrics,
        prefill: Option<&Instance>,
        decode: &Instance,
    ) -> Arc<PairMetrics> {
        let key = (prefill.map_or(0, |p| p.id), decode.id);
        if let Some(p) = self.pairs.borrow().get(&key) {
            return p.clone();
        }
        let p = Arc::new(PairMetrics {
            model: decode.model.clone(),
            prefill: prefill.map(|p| p.address.clone()).unwrap_or_default(),
            decode: decode.address.clone(),
            prefill_duration: Histogram::default(),
            kv_transfer: Histogram::default(),
            decode_duration: Histogram::default(),
            ttft: Histogram::default(),
            tpot: Histogram::default(),
            e2e: Histogram::default(),
        });
        self.pairs.borrow_mut().insert(key, p.clone());
        m.pairs.rcu(|list| {
            let mut l = Vec::clone(list);
            l.push(p.clone());
            l
        });
        p
    }

    pub fn instance(&self, m: &WorkerMetrics, inst: &Instance) -> Arc<InstanceMetrics> {
        if let Some(i) = self.instances.borrow().get(&inst.id) {
            return i.clone();
        }
        let i = Arc::new(InstanceMetrics {
            instance: inst.address.clone(),
            role: inst.role.as_str(),
            model: inst.model.clone(),
            requests: AtomicU64::new(0),
            errors: Default::default(),
        });
        self.instances.borrow_mut().insert(inst.id, i.clone());
        m.instances.rcu(|list| {
            let mut l = Vec::clone(list);
            l.push(i.clone());
            l
        });
        i
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One instance's counters summed over workers: address, role, model, requests, errors.
type InstanceSum = (
    String,
    &'static str,
    Arc<str>,
    u64,
    [u64; ERROR_TYPES.len()],
);

/// What a scrape renders: every worker's metrics, the requests in flight and the instances
/// of the current topology (for the per-instance gauges).
pub struct Scrape<'a> {
    pub workers: &'a [Arc<WorkerMetrics>],
    pub active_requests: u64,
    pub instances: Vec<&'a Instance>,
    /// DNS discovery's names.
    pub discovery: &'a [Arc<crate::discovery::TargetStats>],
}

/// The whole exposition, summed over workers.
pub fn render(scrape: &Scrape<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let workers = scrape.workers;

    header(
        &mut out,
        "proxy_requests_total",
        "counter",
        "Requests answered, by endpoint and status.",
    );
    for (e, ep) in Series::ALL.iter().map(|s| s.label()).enumerate() {
        for (s, st) in STATUSES.iter().enumerate() {
            let n: u64 = workers
                .iter()
                .map(|w| w.requests[e][s].load(Ordering::Relaxed))
                .sum();
            if n > 0 {
                let st = if *st == 0 {
                    "other".to_string()
                } else {
                    st.to_string()
                };
                let _ = writeln!(
                    out,
                    "proxy_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
                );
            }
        }
    }
    header(
        &mut out,
        "proxy_request_duration_seconds",
        "histogram",
        "Time from request received to response complete, by endpoint.",
    );
    for (e, ep) in Series::ALL.iter().map(|s| s.label()).enumerate() {
        let mut acc = HistAcc::default();
        for w in workers {
            w.durations[e].add_to(&mut acc);
        }
        if acc.counts.iter().any(|&c| c > 0) {
            acc.render(
                &mut out,
                "proxy_request_duration_seconds",
                &format!("endpoint=\"{ep}\""),
            );
        }
    }
    header(
        &mut out,
        "proxy_active_requests",
        "gauge",
        "Requests in flight.",
    );
    let _ = writeln!(out, "proxy_active_requests {}", scrape.active_requests);

    // P/D histograms, merged by label set across workers.
    let mut pairs: Vec<(String, [HistAcc; 6])> = Vec::new();
    let mut pos: HashMap<String, usize> = HashMap::new();
    for w in workers {
        for p in w.pairs.load().iter() {
            let labels = format!(
                "model=\"{}\",prefill_instance=\"{}\",decode_instance=\"{}\"",
                esc(&p.model),
                esc(&p.prefill),
                esc(&p.decode)
            );
            let i = *pos.entry(labels.clone()).or_insert_with(|| {
                pairs.push((labels, Default::default()));
                pairs.len() - 1
            });
            let acc = &mut pairs[i].1;
            for (k, h) in [
                &p.prefill_duration,
                &p.kv_transfer,
                &p.decode_duration,
                &p.ttft,
                &p.tpot,
                &p.e2e,
            ]
            .iter()
            .enumerate()
            {
                h.add_to(&mut acc[k]);
            }
        }
    }
    let names = [
        (
            "proxy_prefill_duration_seconds",
            "Prefill leg: request sent to prefill response read.",
        ),
        (
            "proxy_kv_transfer_duration_seconds",
            "Prefill end to the first byte of the decode response.",
        ),
        (
            "proxy_decode_duration_seconds",
            "Decode (or dual) leg: request sent to last byte relayed.",
        ),
        (
            "proxy_ttft_seconds",
            "Time to first token: request received to first content byte written to the client.",
        ),
        (
            "proxy_tpot_seconds",
            "Time per output token of streamed responses (mean gap between events).",
        ),
        (
            "proxy_e2e_latency_seconds",
            "Request received to response complete, successful inference requests.",
        ),
    ];
    for (k, (name, help)) in names.iter().enumerate() {
        header(&mut out, name, "histogram", help);
        for (labels, accs) in &pairs {
            if accs[k].counts.iter().any(|&c| c > 0) {
                accs[k].render(&mut out, name, labels);
            }
        }
    }

    for (name, help, prefill) in [
        (
            "proxy_prefill_active",
            "Prefill legs in flight per instance.",
            true,
        ),
        (
            "proxy_decode_active",
            "Decode (and dual) legs in flight per instance.",
            false,
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for i in scrape.instances.iter() {
            if (i.role == Role::Prefill) == prefill {
                let _ = writeln!(
                    out,
                    "{name}{{instance=\"{}\",model=\"{}\"}} {}",
                    esc(&i.address),
                    esc(&i.model),
                    i.in_flight()
                );
            }
        }
    }
    header(
        &mut out,
        "proxy_circuit_state",
        "gauge",
        "Circuit breaker state per instance: 0 closed, 1 open, 2 half-open.",
    );
    for i in &scrape.instances {
        let _ = writeln!(
            out,
            "proxy_circuit_state{{instance=\"{}\"}} {}",
            esc(&i.address),
            i.circuit().gauge()
        );
    }
    header(
        &mut out,
        "proxy_circuit_opened_total",
        "counter",
        "Times each instance's circuit opened.",
    );
    for i in &scrape.instances {
        let _ = writeln!(
            out,
            "proxy_circuit_opened_total{{instance=\"{}\"}} {}",
            esc(&i.address),
            i.breaker.opened_total()
        );
    }

    // Per-instance counters, merged by instance across workers.
    let mut inst: Vec<InstanceSum> = Vec::new();
    for w in workers {
        for m in w.instances.load().iter() {
            let idx = match inst.iter().position(|x| x.0 == m.instance && x.1 == m.role) {
                Some(i) => i,
                None => {
                    inst.push((
                        m.instance.clone(),
                        m.role,
                        m.model.clone(),
                        0,
                        [0; ERROR_TYPES.len()],
                    ));
                    inst.len() - 1
                }
            };
            inst[idx].3 += m.requests.load(Ordering::Relaxed);
            for (a, e) in inst[idx].4.iter_mut().zip(&m.errors) {
                *a += e.load(Ordering::Relaxed);
            }
        }
    }
    header(
        &mut out,
        "proxy_instance_requests_total",
        "counter",
        "Legs sent to each instance (retries included).",
    );
    for (addr, role, _, n, _) in &inst {
        let _ = writeln!(
            out,
            "proxy_instance_requests_total{{instance=\"{}\",role=\"{role}\"}} {n}",
            esc(addr)
        );
    }
    header(
        &mut out,
        "proxy_instance_errors_total",
        "counter",
        "Failed legs per instance, by error type.",
    );
    for (addr, _, model, _, errs) in &inst {
        for (k, n) in errs.iter().enumerate() {
            if *n > 0 {
                let _ = writeln!(
                    out,
                    "proxy_instance_errors_total{{instance=\"{}\",error_type=\"{}\",model=\"{}\"}} {n}",
                    esc(addr),
                    ERROR_TYPES[k],
                    esc(model)
                );
            }
        }
    }
    header(
        &mut out,
        "proxy_retries_total",
        "counter",
        "Legs retried on another instance.",
    );
    let retries: u64 = workers
        .iter()
        .map(|w| w.retries.load(Ordering::Relaxed))
        .sum();
    let _ = writeln!(out, "proxy_retries_total {retries}");
    let sent: Vec<crate::metrics_python::Sent> = inst
        .iter()
        .filter_map(|(address, role, model, requests, _)| {
            Some(crate::metrics_python::Sent {
                address,
                role: role.parse().ok()?,
                model,
                requests: *requests,
            })
        })
        .collect();
    crate::metrics_python::render(&mut out, &scrape.instances, &sent, esc, header);
    render_discovery(&mut out, scrape.discovery);
    crate::scheduler::stats::render(&mut out, &scrape.instances);
    out
}

/// DNS discovery's names: resolutions by result, addresses in use, whether the set is stale.
fn render_discovery(out: &mut String, names: &[Arc<crate::discovery::TargetStats>]) {
    if names.is_empty() {
        return;
    }
    header(
        out,
        "proxy_discovery_resolutions_total",
        "counter",
        "Resolutions of each dns:// name, by result (ok, empty, failed).",
    );
    for n in names {
        let name = esc(&n.label);
        for (result, c) in [
            ("ok", &n.resolved),
            ("empty", &n.empty),
            ("failed", &n.failed),
        ] {
            let _ = writeln!(
                out,
                "proxy_discovery_resolutions_total{{name=\"{name}\",model=\"{}\",role=\"{}\",result=\"{result}\"}} {}",
                esc(&n.target.model),
                n.target.role().as_str(),
                c.load(Ordering::Relaxed)
            );
        }
    }
    header(
        out,
        "proxy_discovery_addresses",
        "gauge",
        "Instances currently taken from each dns:// name.",
    );
    for n in names {
        let _ = writeln!(
            out,
            "proxy_discovery_addresses{{name=\"{}\"}} {}",
            esc(&n.label),
            n.addresses.load(Ordering::Relaxed)
        );
    }
    header(
        out,
        "proxy_discovery_stale",
        "gauge",
        "1 when the last resolution of a dns:// name failed or was empty and its last good set is kept.",
    );
    for n in names {
        let _ = writeln!(
            out,
            "proxy_discovery_stale{{name=\"{}\"}} {}",
            esc(&n.label),
            u8::from(n.stale.load(Ordering::Relaxed))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CircuitConfig, Role};

    fn instance(addr: &str, role: Role) -> Instance {
        Instance::new(addr.into(), addr.parse().unwrap(), role, Arc::from("m"))
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn series_and_statuses_index_their_arrays() {
        for (k, s) in Series::ALL.iter().enumerate() {
            assert_eq!(*s as usize, k, "ALL is in declaration order");
        }
        assert_eq!(STATUSES[status_index(404)], 404);
        assert_eq!(
            STATUSES[status_index(418)],
            0,
            "unlisted statuses are `other`"
        );
    }

    #[test]
    fn a_histogram_is_cumulative_and_its_count_is_its_last_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(1000));
        let mut acc = HistAcc::default();
        h.add_to(&mut acc);
        let mut out = String::new();
        acc.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"600\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert!(out.contains("x_sum 1000.0035\n"), "{out}");
    }

    #[test]
    fn render_sums_workers_and_shows_each_instance() {
        let workers: Vec<Arc<WorkerMetrics>> = (0..2).map(|_| Arc::default()).collect();
        let p = instance("127.0.0.1:1", Role::Prefill);
        let d = instance("127.0.0.1:2", Role::Decode);
        for w in &workers {
            w.request(Series::Completions, 200, Duration::from_millis(2));
            w.retry();
            let idx = LocalIndex::default();
            idx.instance(w, &d).error(ErrorType::Timeout);
            idx.instance(w, &d).request();
            idx.pair(w, Some(&p), &d)
                .ttft
                .observe(Duration::from_millis(1));
        }
        workers[1].request(Series::Other, 418, Duration::from_millis(1));
        let cfg = CircuitConfig {
            enabled: true,
            failure_threshold: 1,
            success_threshold: 1,
            timeout: Duration::from_secs(60),
            window: Duration::from_secs(60),
        };
        d.record_failure(&cfg);
        let text = render(&Scrape {
            workers: &workers,
            active_requests: 3,
            instances: vec![&p, &d],
            discovery: &[],
        });
        let has = |l: &str| assert!(text.lines().any(|x| x == l), "no `{l}` in\n{text}");
        has("proxy_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2");
        has("proxy_requests_total{endpoint=\"other\",status=\"other\"} 1");
        has("proxy_active_requests 3");
        has("proxy_retries_total 2");
        has("proxy_circuit_state{instance=\"127.0.0.1:1\"} 0");
        has("proxy_circuit_state{instance=\"127.0.0.1:2\"} 1");
        has("proxy_circuit_opened_total{instance=\"127.0.0.1:2\"} 1");
        has("proxy_prefill_active{instance=\"127.0.0.1:1\",model=\"m\"} 0");
        has("proxy_decode_active{instance=\"127.0.0.1:2\",model=\"m\"} 0");
        has("proxy_instance_requests_total{instance=\"127.0.0.1:2\",role=\"decode\"} 2");
        has("proxy_instance_errors_total{instance=\"127.0.0.1:2\",error_type=\"timeout\",model=\"m\"} 2");
        has("proxy_ttft_seconds_count{model=\"m\",prefill_instance=\"127.0.0.1:1\",decode_instance=\"127.0.0.1:2\"} 2");
        assert!(line(&text, "proxy_requests_total{endpoint=\"/health\"").is_none());
        // Every series has its HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {base} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "{l}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
