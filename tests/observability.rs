//! Metrics, status and logs: a known mix of requests, then `/metrics` parsed by the real
//! Prometheus text parser (`prometheus_client`, in the test virtualenv) must count exactly.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s["name"] == name)
        .find(|s| labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

/// Scrapes until the business endpoints have counted `requests` requests (bounded): a
/// worker records a request's metrics just after writing its last byte, so a scrape on
/// another connection can come microseconds early.
fn scrape_settled(proxy: &Proc, requests: f64) -> (String, Vec<Value>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let (text, s) = scrape(proxy);
        let counted: f64 = s
            .iter()
            .filter(|x| x["name"] == "proxy_requests_total")
            .filter(|x| {
                x["labels"]["endpoint"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("/v1/")
            })
            .filter_map(|x| x["value"].as_f64())
            .sum();
        if counted >= requests || std::time::Instant::now() > deadline {
            return (text, s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn scrape(proxy: &Proc) -> (String, Vec<Value>) {
    let resp = ureq::get(&proxy.url("/metrics")).call().unwrap();
    assert!(resp.content_type().starts_with("text/plain"));
    let text = resp.into_string().unwrap();
    let parsed = parse_exposition(&text);
    (text, parsed)
}

#[test]
fn metrics_count_exactly_and_parse_as_prometheus() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &["--decode-delay-per-token", "0.01"]);
    let dual = dummy_of("dual-model", "dual", &["--decode-delay-per-token", "0.002"]);
    let proxy = proxy_with(
        &format!("{}admin_api_key: k\n", pd_yaml(&[&p], &[&d])),
        true,
    );
    let a = agent();
    // A second model served by a dual node, added at run time.
    a.post(&proxy.url("/instances/add"))
        .set("X-API-Key", "k")
        .send_json(json!({"address": dual.addr.to_string(), "role": "dual", "model": "dual-model", "create_model": true}))
        .unwrap();
    let url = proxy.url("/v1/completions");
    let req = |model: &str, stream_it: bool| json!({"model": model, "prompt": "a b c", "max_tokens": 5, "stream": stream_it});
    for _ in 0..3 {
        assert_eq!(post(&a, &url, &req(MODEL, false)).0, 200);
    }
    for _ in 0..2 {
        assert_eq!(stream(&a, &url, &req(MODEL, true)).status, 200);
    }
    for _ in 0..2 {
        assert_eq!(post(&a, &url, &req("dual-model", false)).0, 200);
    }
    assert_eq!(stream(&a, &url, &req("dual-model", true)).status, 200);
    assert_eq!(post(&a, &url, &json!({"model": MODEL})).0, 400);
    assert_eq!(
        post(&a, &url, &json!({"model": "nope", "prompt": "x"})).0,
        404
    );
    let chat =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2});
    assert_eq!(post(&a, &proxy.url("/v1/chat/completions"), &chat).0, 200);

    // 10 on /v1/completions (8 answered, one 400, one 404) and 1 chat.
    let (text, s) = scrape_settled(&proxy, 11.0);
    for family in [
        "proxy_requests_total",
        "proxy_request_duration_seconds",
        "proxy_active_requests",
        "proxy_prefill_duration_seconds",
        "proxy_kv_transfer_duration_seconds",
        "proxy_decode_duration_seconds",
        "proxy_ttft_seconds",
        "proxy_tpot_seconds",
        "proxy_e2e_latency_seconds",
        "proxy_prefill_active",
        "proxy_decode_active",
        "proxy_instance_requests_total",
        "proxy_instance_errors_total",
        "proxy_retries_total",
        "proxy_circuit_state",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "missing TYPE for {family}"
        );
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "missing HELP for {family}"
        );
    }
    let ep = "/v1/completions";
    assert_eq!(
        sample(
            &s,
            "proxy_requests_total",
            &[("endpoint", ep), ("status", "200")]
        ),
        8.0
    );
    assert_eq!(
        sample(
            &s,
            "proxy_requests_total",
            &[("endpoint", ep), ("status", "400")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &s,
            "proxy_requests_total",
            &[("endpoint", ep), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &s,
            "proxy_requests_total",
            &[("endpoint", "/v1/chat/completions"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &s,
            "proxy_request_duration_seconds_count",
            &[("endpoint", ep)]
        ),
        10.0
    );
    let (pa, da, dd) = (
        p.addr.to_string(),
        d.addr.to_string(),
        dual.addr.to_string(),
    );
    let pd = [
        ("model", MODEL),
        ("prefill_instance", pa.as_str()),
        ("decode_instance", da.as_str()),
    ];
    let du = [
        ("model", "dual-model"),
        ("prefill_instance", ""),
        ("decode_instance", dd.as_str()),
    ];
    // 5 completions + 1 chat through P/D, 3 through dual.
    assert_eq!(sample(&s, "proxy_ttft_seconds_count", &pd), 6.0);
    assert_eq!(sample(&s, "proxy_e2e_latency_seconds_count", &pd), 6.0);
    assert_eq!(sample(&s, "proxy_prefill_duration_seconds_count", &pd), 6.0);
    assert_eq!(
        sample(&s, "proxy_kv_transfer_duration_seconds_count", &pd),
        6.0
    );
    assert_eq!(
        sample(&s, "proxy_tpot_seconds_count", &pd),
        2.0,
        "TPOT from the 2 streams"
    );
    assert_eq!(sample(&s, "proxy_ttft_seconds_count", &du), 3.0);
    assert_eq!(sample(&s, "proxy_tpot_seconds_count", &du), 1.0);
    // +Inf bucket equals the count.
    let mut inf = pd.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(sample(&s, "proxy_ttft_seconds_bucket", &inf), 6.0);
    // TPOT ~ the decode node's 10 ms per token. The proxy times tokens as it reads them, so
    // on a loaded machine a late first read shortens the measured span: keep a wide band
    // (half to five times the pace) that still catches a unit or divisor mistake.
    let tpot = sample(&s, "proxy_tpot_seconds_sum", &pd) / 2.0;
    assert!((0.005..0.05).contains(&tpot), "tpot {tpot}");
    assert_eq!(
        sample(
            &s,
            "proxy_instance_requests_total",
            &[("instance", pa.as_str()), ("role", "prefill")]
        ),
        6.0
    );
    assert_eq!(
        sample(
            &s,
            "proxy_instance_requests_total",
            &[("instance", da.as_str()), ("role", "decode")]
        ),
        6.0
    );
    assert_eq!(
        sample(
            &s,
            "proxy_instance_requests_total",
            &[("instance", dd.as_str()), ("role", "dual")]
        ),
        3.0
    );
    assert_eq!(sample(&s, "proxy_retries_total", &[]), 0.0);
    assert_eq!(
        sample(&s, "proxy_circuit_state", &[("instance", da.as_str())]),
        0.0
    );
    assert_eq!(
        sample(&s, "proxy_decode_active", &[("instance", da.as_str())]),
        0.0
    );
}

#[test]
fn errors_and_retries_are_counted_per_instance() {
    let p = dummy("prefill", &[]);
    let bad = dummy("decode", &["--fail-rate", "1.0"]);
    let good = dummy("decode", &[]);
    let yaml = format!(
        "{}scheduling: roundrobin\nretry:\n  initial_backoff_ms: 1\ncircuit_breaker:\n  enabled: false\n",
        pd_yaml(&[&p], &[&bad, &good])
    );
    let proxy = proxy_with(&yaml, true);
    let a = agent();
    for _ in 0..6 {
        assert_eq!(
            post(
                &a,
                &proxy.url("/v1/completions"),
                &json!({"model": MODEL, "prompt": "x", "max_tokens": 2})
            )
            .0,
            200
        );
    }
    let (_, s) = scrape_settled(&proxy, 6.0);
    let ba = bad.addr.to_string();
    // The shared round-robin cursor advances on the retry's pick too, so with two decode
    // nodes every first attempt lands on the bad one and every retry on the good one.
    assert_eq!(
        sample(
            &s,
            "proxy_instance_errors_total",
            &[
                ("instance", ba.as_str()),
                ("error_type", "status_5xx"),
                ("model", MODEL)
            ]
        ),
        6.0
    );
    assert_eq!(sample(&s, "proxy_retries_total", &[]), 6.0);
    let ga = good.addr.to_string();
    assert_eq!(
        sample(
            &s,
            "proxy_instance_requests_total",
            &[("instance", ga.as_str()), ("role", "decode")]
        ),
        6.0
    );
    assert_eq!(
        sample(
            &s,
            "proxy_requests_total",
            &[("endpoint", "/v1/completions"), ("status", "200")]
        ),
        6.0
    );
}

#[test]
fn status_instances_reflects_a_node_going_down() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(
        &format!(
            "{}circuit_breaker:\n  failure_threshold: 2\n",
            pd_yaml(&[&p], &[&d])
        ),
        true,
    );
    let da = d.addr.to_string();
    let find = || {
        let (_, v) = get_json(&proxy.url("/status/instances"));
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["address"] == da.as_str())
            .cloned()
            .unwrap()
    };
    let before = find();
    for key in [
        "address",
        "role",
        "model",
        "status",
        "circuit",
        "active_requests",
        "last_check",
        "max_model_len",
    ] {
        assert!(before.get(key).is_some(), "missing {key}: {before}");
    }
    assert_eq!(before["status"], "healthy");
    assert_eq!(before["max_model_len"], 131072);
    drop(d);
    wait_for(
        "the node to be unhealthy with its circuit open",
        Duration::from_secs(10),
        || {
            let now = find();
            now["status"] == "unhealthy" && now["circuit"] == "open"
        },
    );
    let (_, s) = scrape(&proxy);
    assert_eq!(
        sample(&s, "proxy_circuit_state", &[("instance", da.as_str())]),
        1.0
    );
    let (status, st) = get_json(&proxy.url("/status"));
    assert_eq!(status, 200);
    assert_eq!(st["models"][0]["decode"]["healthy"], 0);
    assert_eq!(st["models"][0]["scheduler"], "loadbalanced");
}

#[test]
fn every_operational_endpoint_answers_while_gated() {
    let dead = dead_address();
    let proxy = proxy_with(&format!("model: {MODEL}\ndual: [\"{dead}\"]\n"), false);
    assert_eq!(get_json(&proxy.url("/health")).0, 503);
    for path in [
        "/ping",
        "/status",
        "/status/instances",
        "/version",
        "/v1/models",
    ] {
        assert_eq!(get_json(&proxy.url(path)).0, 200, "{path}");
    }
    let (_, s) = scrape(&proxy);
    // The scrape counts itself (a request just answered on another connection may still
    // be finishing its bookkeeping on the other worker).
    let active = sample(&s, "proxy_active_requests", &[]);
    assert!((1.0..=2.0).contains(&active), "{active}");
    assert_eq!(
        post(
            &agent(),
            &proxy.url("/v1/completions"),
            &json!({"prompt": "x"})
        )
        .0,
        503
    );
}
