//! What admission shows: its series of `/metrics` and the `admission` object of a
//! model in `/status`.

use super::gate::{self, Counters, Gates, Reason};
use crate::config::Policy;
use crate::metrics::{header, render_histogram};
use std::fmt::Write;

/// The admission series of `/metrics`.
pub fn render(gates: &Gates, out: &mut String) {
    let all = gates.all();
    if all.is_empty() {
        return;
    }
    header(
        out,
        "proxy_admission_in_flight",
        "gauge",
        "Admitted requests in flight, by model.",
    );
    for (m, g) in &all {
        let _ = writeln!(
            out,
            "proxy_admission_in_flight{{model=\"{m}\"}} {}",
            g.c.in_flight()
        );
    }
    header(
        out,
        "proxy_admission_queue_depth",
        "gauge",
        "Requests waiting in the admission queue, by model (all workers).",
    );
    for (m, g) in &all {
        let _ = writeln!(
            out,
            "proxy_admission_queue_depth{{model=\"{m}\"}} {}",
            g.c.queued()
        );
    }
    header(
        out,
        "proxy_admission_queue_seconds",
        "histogram",
        "Time waited in the admission queue by requests then admitted.",
    );
    for (m, g) in &all {
        let (counts, sum) = g.queue_time();
        render_histogram(
            out,
            "proxy_admission_queue_seconds",
            &format!("model=\"{m}\""),
            &gate::QUEUE_BUCKETS,
            &counts,
            sum,
        );
    }
    header(
        out,
        "proxy_admission_rejected_total",
        "counter",
        "Requests answered 429 by admission, by model and reason.",
    );
    for (m, g) in &all {
        for r in Reason::ALL {
            let _ = writeln!(
                out,
                "proxy_admission_rejected_total{{model=\"{m}\",reason=\"{}\"}} {}",
                r.as_str(),
                g.c.rejected(r)
            );
        }
    }
    let keyed: Vec<_> = all
        .iter()
        .flat_map(|(m, g)| g.keys().into_iter().map(move |k| (m, k)))
        .collect();
    if !keyed.is_empty() {
        header(
            out,
            "proxy_admission_key_in_flight",
            "gauge",
            "Admitted requests in flight, by model and API key (its place in api_keys).",
        );
        for (m, k) in &keyed {
            let _ = writeln!(
                out,
                "proxy_admission_key_in_flight{{model=\"{m}\",key=\"{}\"}} {}",
                k.label(),
                k.c.in_flight()
            );
        }
        header(
            out,
            "proxy_admission_key_rejected_total",
            "counter",
            "Requests answered 429 by admission, by model, API key and reason.",
        );
        for (m, k) in &keyed {
            for r in Reason::ALL {
                let _ = writeln!(out, "proxy_admission_key_rejected_total{{model=\"{m}\",key=\"{}\",reason=\"{}\"}} {}", k.label(), r.as_str(), k.c.rejected(r));
            }
        }
    }
    header(out, "proxy_tokens_total", "counter", "Tokens the engines reported in `usage`, by model, API key (\"\" without api_keys) and kind.");
    for (m, g) in &all {
        let (prompt, completion) = g.c.tokens.totals();
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            let _ = writeln!(
                out,
                "proxy_tokens_total{{model=\"{m}\",key=\"\",kind=\"{kind}\"}} {n}"
            );
        }
        for k in g.keys() {
            let (prompt, completion) = k.c.tokens.totals();
            for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                let _ = writeln!(
                    out,
                    "proxy_tokens_total{{model=\"{m}\",key=\"{}\",kind=\"{kind}\"}} {n}",
                    k.label()
                );
            }
        }
    }
}

/// The `admission` object of a model in `/status`.
pub fn status_json(gates: &Gates, policy: &Policy, model: &str) -> serde_json::Value {
    use serde_json::json;
    let limits = policy.admission(model).map(|c| {
        json!({
            "max_concurrent_requests": c.max_concurrent_requests,
            "queue_size": c.queue_size,
            "queue_timeout_seconds": c.queue_timeout.as_secs_f64(),
            "tokens_per_second": c.tokens_per_second,
            "token_burst": c.burst(),
            "engine_waiting_threshold": c.engine_waiting_threshold,
        })
    });
    let counters = |c: &Counters| {
        let rejected: serde_json::Map<String, serde_json::Value> = Reason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), json!(c.rejected(*r))))
            .collect();
        let (prompt, completion) = c.tokens.totals();
        json!({
            "in_flight": c.in_flight(),
            "queued": c.queued(),
            "rejected": rejected,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
        })
    };
    let mut v = json!({ "enabled": limits.is_some(), "limits": limits });
    if let Some(g) = gates.find(model) {
        let (counts, sum) = g.queue_time();
        let n: u64 = counts.iter().sum();
        v["state"] = counters(&g.c);
        v["queue_seconds"] = json!({"count": n, "sum": sum});
        v["keys"] = g
            .keys()
            .iter()
            .map(|k| {
                let mut c = counters(&k.c);
                c["key"] = json!(k.label());
                c
            })
            .collect();
    }
    v
}
