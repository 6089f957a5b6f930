//! Routing on what the engines report: the proxy scrapes each instance's vLLM `/metrics`
//! (queue, KV-cache use) and its load-based policies steer away from a node with a long
//! queue, even though the proxy itself has nothing in flight there.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// A node whose /metrics report `running`/`waiting` requests and `kv` cache use.
fn busy_node(running: u32, waiting: u32, kv: f64) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/engine/busy_node.py"
    ))
    .args([
        MODEL,
        &running.to_string(),
        &waiting.to_string(),
        &kv.to_string(),
    ]);
    spawn_listening(cmd)
}

fn instance<'a>(status: &'a Value, node: &Proc) -> &'a Value {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["address"] == node.addr.to_string())
        .unwrap_or_else(|| panic!("{} not in {status}", node.addr))
}

/// Waits until the proxy routes on `node`'s scraped numbers.
fn wait_scraped(proxy: &Proc, node: &Proc) {
    wait_for(
        "the busy node's metrics to be scraped",
        Duration::from_secs(15),
        || {
            let (_, v) = get_json(&proxy.url("/status/instances"));
            instance(&v, node)["engine"]["scraped"] == true
        },
    );
}

#[test]
fn a_node_reporting_a_long_queue_gets_no_new_work_while_others_are_idle() {
    let idle: Vec<Proc> = (0..2).map(|_| dummy("dual", &[])).collect();
    let busy = busy_node(8, 50, 0.97);
    for policy in ["loadbalanced", "power_of_two", "cache_aware"] {
        let proxy = proxy_with(
            &format!(
                "{}scheduling: {policy}\nengine_metrics:\n  interval_seconds: 0.2\n",
                dual_yaml(&[&idle[0], &idle[1], &busy])
            ),
            true,
        );
        wait_scraped(&proxy, &busy);
        let (_, v) = get_json(&proxy.url("/status/instances"));
        let e = &instance(&v, &busy)["engine"];
        assert_eq!(e["num_requests_waiting"], 50, "{e}");
        assert_eq!(e["num_requests_running"], 8, "{e}");
        let before = get_json(&busy.url("/stats")).1["requests"]
            .as_u64()
            .unwrap();
        let a = agent();
        for k in 0..30 {
            // Distinct prompts, some sharing a prefix: cache_aware must still avoid the queue.
            let prompt = format!("{} request {k}", "shared system prompt ".repeat(k % 3 * 20));
            let (status, _, body) = post(
                &a,
                &proxy.url("/v1/completions"),
                &json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
            );
            assert_eq!(status, 200, "{body}");
        }
        let after = get_json(&busy.url("/stats")).1["requests"]
            .as_u64()
            .unwrap();
        assert_eq!(after, before, "{policy}: the queued node got new work");
    }
}

/// Without engine metrics (scraping off) the same node takes its share: the test above
/// fails when the proxy ignores the engines' numbers.
#[test]
fn without_engine_metrics_the_busy_node_takes_its_share() {
    let idle = dummy("dual", &[]);
    let busy = busy_node(8, 50, 0.97);
    let proxy = proxy_with(
        &format!(
            "{}scheduling: loadbalanced\nengine_metrics:\n  enabled: false\n",
            dual_yaml(&[&idle, &busy])
        ),
        true,
    );
    let a = agent();
    for k in 0..20 {
        let (status, _, _) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": format!("r{k}"), "max_tokens": 2}),
        );
        assert_eq!(status, 200);
    }
    let (_, v) = get_json(&proxy.url("/status/instances"));
    assert_eq!(instance(&v, &busy)["engine"]["scraped"], false);
    assert!(
        get_json(&busy.url("/stats")).1["requests"]
            .as_u64()
            .unwrap()
            > 0
    );
}
