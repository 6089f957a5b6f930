//! The exposition text of `/metrics`: every worker's series summed, section by section.

use super::histogram::HistAcc;
use super::*;
use std::fmt::Write;

pub(super) fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `# HELP` and `# TYPE` lines that open a series.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
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
            let idx = match inst.iter().position(|x| x.0 == m.address && x.1 == m.role) {
                Some(i) => i,
                None => {
                    inst.push((
                        m.address.clone(),
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
    let sent: Vec<python::Sent> = inst
        .iter()
        .filter_map(|(address, role, model, requests, _)| {
            Some(python::Sent {
                address,
                role: role.parse().ok()?,
                model,
                requests: *requests,
            })
        })
        .collect();
    python::render(&mut out, &scrape.instances, &sent, esc, header);
    render_discovery(&mut out, scrape.discovery);
    crate::scheduler::stats::render(&mut out, &scrape.instances);
    crate::tokenize::render_metrics(&mut out);
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
