//! The series xpyd-proxy 1.2 exported under its own names, so that its Grafana dashboard
//! and alerts keep working (docs/migration.md). Each is a view of what xpyd already counts:
//! 1.2 labelled them by the (prefill, decode) pair; here each series carries the instance
//! it is about and leaves the other label empty, which is what the dashboard's
//! `sum by (prefill_instance)` / `sum by (decode_instance)` read.

use crate::config::Role;
use crate::instance::Instance;
use std::fmt::Write;

/// One instance's legs so far, summed over workers.
pub struct Sent<'a> {
    pub address: &'a str,
    pub role: Role,
    pub model: &'a str,
    pub requests: u64,
}

/// `prefill_instance="..",decode_instance="..",model=".."` for one instance.
fn labels(address: &str, role: Role, model: &str, esc: fn(&str) -> String) -> String {
    let (p, d) = if role == Role::Prefill {
        (esc(address), String::new())
    } else {
        (String::new(), esc(address))
    };
    format!(
        "prefill_instance=\"{p}\",decode_instance=\"{d}\",model=\"{}\"",
        esc(model)
    )
}

/// Name, help, which instances it covers, its value for one.
type Gauge = (
    &'static str,
    &'static str,
    fn(Role) -> bool,
    fn(&Instance) -> u64,
);

pub fn render(
    out: &mut String,
    instances: &[&Instance],
    sent: &[Sent<'_>],
    esc: fn(&str) -> String,
    header: fn(&mut String, &str, &str, &str),
) {
    let prefill = |r: Role| r == Role::Prefill;
    let gauges: [Gauge; 3] = [
        (
            "proxy_prefill_active_requests",
            "Requests in their prefill leg, per prefill instance (xpyd-proxy 1.2 name).",
            |r| r == Role::Prefill,
            Instance::in_flight,
        ),
        (
            "proxy_decode_active_requests",
            "Requests in their decode (or dual) leg, per instance (xpyd-proxy 1.2 name).",
            |r| r != Role::Prefill,
            Instance::in_flight,
        ),
        (
            "proxy_prefill_queue_depth",
            "Requests waiting for a given prefill instance: always 0; admission waits are proxy_admission_queue_depth (xpyd-proxy 1.2 name).",
            |r| r == Role::Prefill,
            |_| 0,
        ),
    ];
    for (name, help, of_role, value) in gauges {
        header(out, name, "gauge", help);
        for i in instances.iter().filter(|i| of_role(i.role)) {
            let l = labels(&i.address, i.role, &i.model, esc);
            let _ = writeln!(out, "{name}{{{l}}} {}", value(i));
        }
    }
    for (name, help, is_prefill) in [
        (
            "proxy_prefill_requests_total",
            "Legs sent to each prefill instance (xpyd-proxy 1.2 name).",
            true,
        ),
        (
            "proxy_decode_requests_total",
            "Legs sent to each decode (or dual) instance (xpyd-proxy 1.2 name).",
            false,
        ),
    ] {
        header(out, name, "counter", help);
        for s in sent.iter().filter(|s| prefill(s.role) == is_prefill) {
            let l = labels(s.address, s.role, s.model, esc);
            let _ = writeln!(out, "{name}{{{l}}} {}", s.requests);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn plain(s: &str) -> String {
        s.to_string()
    }

    fn header(out: &mut String, name: &str, kind: &str, _: &str) {
        let _ = writeln!(out, "# TYPE {name} {kind}");
    }

    #[test]
    fn each_instance_under_its_role_label() {
        let p = Instance::new(
            "p:1".into(),
            "127.0.0.1:1".parse().unwrap(),
            Role::Prefill,
            Arc::from("m"),
        );
        let d = Instance::new(
            "d:2".into(),
            "127.0.0.1:2".parse().unwrap(),
            Role::Dual,
            Arc::from("m"),
        );
        let sent = [Sent {
            address: "p:1",
            role: Role::Prefill,
            model: "m",
            requests: 3,
        }];
        let mut out = String::new();
        render(&mut out, &[&p, &d], &sent, plain, header);
        for want in [
            "proxy_prefill_active_requests{prefill_instance=\"p:1\",decode_instance=\"\",model=\"m\"} 0",
            "proxy_decode_active_requests{prefill_instance=\"\",decode_instance=\"d:2\",model=\"m\"} 0",
            "proxy_prefill_queue_depth{prefill_instance=\"p:1\",decode_instance=\"\",model=\"m\"} 0",
            "proxy_prefill_requests_total{prefill_instance=\"p:1\",decode_instance=\"\",model=\"m\"} 3",
            "# TYPE proxy_decode_requests_total counter",
        ] {
            assert!(out.lines().any(|l| l == want), "{want}\n{out}");
        }
        assert!(!out.contains("queue_depth{prefill_instance=\"\""));
    }
}
