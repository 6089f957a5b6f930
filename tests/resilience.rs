//! Resilience with real processes: gating, node failure and recovery, retries, timeouts,
//! drain through the admin API, graceful shutdown. Faults come from xpyd-dummy's flags.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn body(max_tokens: u32, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "hello world", "max_tokens": max_tokens, "stream": stream})
}

fn instance_status(proxy: &Proc, addr: &str) -> Value {
    let (_, v) = get_json(&proxy.url("/status/instances"));
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["address"] == addr)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn gated_until_nodes_come_up_and_operational_endpoints_always_answer() {
    let [port_p, port_d] = free_ports(2)[..] else {
        unreachable!()
    };
    let yaml = format!(
        "model: {MODEL}\nprefill: [\"127.0.0.1:{port_p}\"]\ndecode: [\"127.0.0.1:{port_d}\"]\n"
    );
    let proxy = proxy_with(&yaml, false);
    let a = agent();
    let (status, _, v) = post(&a, &proxy.url("/v1/completions"), &body(4, false));
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("waiting for backend nodes"));
    assert_eq!(get_json(&proxy.url("/health")).0, 503);
    for path in ["/ping", "/status", "/status/instances", "/version"] {
        assert_eq!(get_json(&proxy.url(path)).0, 200, "{path}");
    }
    let _p = dummy_at(port_p, "prefill", &[]);
    let _d = dummy_at(port_d, "decode", &[]);
    wait_for("the proxy to open", Duration::from_secs(5), || {
        get_json(&proxy.url("/health")).0 == 200
    });
    assert_eq!(
        post(&a, &proxy.url("/v1/completions"), &body(4, false)).0,
        200
    );
}

#[test]
fn startup_timeout_can_exit_the_process() {
    let dead = dead_address();
    let path = write_config(&format!(
        "model: {MODEL}\ndual: [\"{dead}\"]\nstartup:\n  probe_interval_seconds: 0.1\n  wait_timeout_seconds: 0.5\n  exit_on_timeout: true\n"
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_xpyd"))
        .args(["proxy", "-c"])
        .arg(&path)
        .args(["--port", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if !poll_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the proxy did not exit after its startup timeout");
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&dead.to_string()),
        "the error names the missing instance: {err}"
    );
}

#[test]
fn killed_decode_node_fails_over_and_comes_back() {
    let p = dummy("prefill", &[]);
    let d1 = dummy("decode", &[]);
    let d2 = dummy("decode", &[]);
    let d2_addr = d2.addr.to_string();
    let yaml = format!(
        "{}circuit_breaker:\n  failure_threshold: 3\n  timeout_duration_seconds: 1\n  success_threshold: 2\nretry:\n  initial_backoff_ms: 5\n",
        pd_yaml(&[&p], &[&d1, &d2])
    );
    let proxy = proxy_with(&yaml, true);
    let url = proxy.url("/v1/completions");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop, failures, total) =
                (url.clone(), stop.clone(), failures.clone(), total.clone());
            std::thread::spawn(move || {
                let a = agent();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 5000 {
                    n += 1;
                    let (status, _, _) = post(&a, &url, &body(4, false));
                    total.fetch_add(1, Ordering::Relaxed);
                    if status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    wait_for("load on both decode nodes", Duration::from_secs(10), || {
        dummy_stats(&d2)["requests"].as_u64().unwrap_or(0) > 5
    });
    let d2_port = d2.addr.port();
    drop(d2); // killed
    wait_for(
        "the circuit of the killed node to open",
        Duration::from_secs(5),
        || instance_status(&proxy, &d2_addr)["circuit"] == "open",
    );
    let st = instance_status(&proxy, &d2_addr);
    assert_eq!(st["circuit"], "open", "{st}");
    // Restart it on the same port: probes close the circuit again.
    let d2b = dummy_at(d2_port, "decode", &[]);
    wait_for("the node to come back", Duration::from_secs(8), || {
        let s = instance_status(&proxy, &d2_addr);
        s["circuit"] == "closed" && s["status"] == "healthy"
    });
    wait_for(
        "traffic to reach the restarted node",
        Duration::from_secs(5),
        || dummy_stats(&d2b)["requests"].as_u64().unwrap() > 0,
    );
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.join().unwrap();
    }
    // Retries sent every request that hit the dead node to the live one.
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "of {} requests",
        total.load(Ordering::Relaxed)
    );
    assert!(total.load(Ordering::Relaxed) > 100);
}

#[test]
fn an_open_circuit_closes_on_passing_probes_with_no_traffic_at_all() {
    // Failed probes open the circuit; once the node is back and the open time is over,
    // passing probes alone close it: no request is sent, and only /status/instances looks.
    let d = dummy("dual", &[]);
    let addr = d.addr.to_string();
    let port = d.addr.port();
    let yaml = format!(
        "{}circuit_breaker:\n  failure_threshold: 2\n  timeout_duration_seconds: 1\n  success_threshold: 2\n",
        dual_yaml(&[&d])
    );
    let proxy = proxy_with(&yaml, true);
    drop(d);
    wait_for(
        "failed probes to open the circuit",
        Duration::from_secs(10),
        || instance_status(&proxy, &addr)["circuit"] == "open",
    );
    let back = dummy_at(port, "dual", &[]);
    wait_for(
        "passing probes to close the circuit",
        Duration::from_secs(15),
        || {
            let s = instance_status(&proxy, &addr);
            s["circuit"] == "closed" && s["status"] == "healthy"
        },
    );
    assert_eq!(dummy_stats(&back)["requests"], 0, "no traffic was sent");
}

#[test]
fn retries_hide_a_node_failing_half_the_time() {
    // The breaker would take the bad node out after 5 failures; turn it off to measure
    // what retries alone do.
    let p = dummy("prefill", &[]);
    let bad = dummy("decode", &["--fail-rate", "0.5"]);
    let good = dummy("decode", &[]);
    let yaml = format!(
        "{}scheduling: roundrobin\nretry:\n  initial_backoff_ms: 5\ncircuit_breaker:\n  enabled: false\n",
        pd_yaml(&[&p], &[&bad, &good])
    );
    let proxy = proxy_with(&yaml, true);
    let url = proxy.url("/v1/completions");
    let failures = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..10)
        .map(|_| {
            let (url, failures) = (url.clone(), failures.clone());
            std::thread::spawn(move || {
                let a = agent();
                for _ in 0..30 {
                    if post(&a, &url, &body(4, false)).0 != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let injected = dummy_stats(&bad)["failures_injected"].as_u64().unwrap();
    assert!(injected > 40, "the bad node did fail ({injected})");
    let f = failures.load(Ordering::Relaxed);
    assert!(
        f * 100 < 300,
        "{f} of 300 requests failed (must be under 1 %)"
    );
}

#[test]
fn stalled_node_gives_504_within_the_first_byte_timeout() {
    let d = dummy("dual", &["--stall-ms", "5000"]);
    let yaml = format!(
        "{}timeouts:\n  first_byte_seconds: 0.5\nretry:\n  enabled: false\n",
        dual_yaml(&[&d])
    );
    let proxy = proxy_with(&yaml, true);
    let start = Instant::now();
    let (status, rid, v) = post(&agent(), &proxy.url("/v1/completions"), &body(4, false));
    let took = start.elapsed();
    // The node would answer after 5 s: a 504 means the first-byte timeout cut in first.
    assert_eq!(status, 504, "{v}");
    assert!(rid.is_some());
    assert!(took >= Duration::from_millis(450), "{took:?}");
    // The worker was not hung: the proxy answers at once.
    assert_eq!(get_json(&proxy.url("/ping")).0, 200);
}

#[test]
fn stall_mid_stream_ends_with_an_sse_error_event() {
    // 3 tokens, then 3 s of silence per token: the idle timeout (0.5 s) cuts in.
    let d = dummy(
        "dual",
        &[
            "--decode-delay-per-token",
            "3",
            "--prefill-delay-per-token",
            "0",
        ],
    );
    let yaml = format!("{}timeouts:\n  idle_seconds: 0.5\n", dual_yaml(&[&d]));
    let proxy = proxy_with(&yaml, true);
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let b = serde_json::to_vec(&json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "stream": true})).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", b.len()).unwrap();
    s.write_all(&b).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\"role\":\"assistant\""),
        "the stream had started: {text}"
    );
    assert!(text.contains("stalled mid-stream"), "{text}");
}

/// The idle timeout is the longest silence between reads, not the body's whole length: one
/// timer serves a relay and is moved on at every read (docs/benchmarks.md, "Per relayed
/// token"), so a stream longer than the timeout, with shorter gaps, runs to its end.
#[test]
fn a_stream_longer_than_the_idle_timeout_is_not_cut() {
    // 8 tokens 0.3 s apart: 2.4 s in all against a 1.5 s idle timeout (each gap 1.2 s
    // short of it, for a loaded machine).
    let d = dummy(
        "dual",
        &[
            "--decode-delay-per-token",
            "0.3",
            "--prefill-delay-per-token",
            "0",
        ],
    );
    let yaml = format!("{}timeouts:\n  idle_seconds: 1.5\n", dual_yaml(&[&d]));
    let proxy = proxy_with(&yaml, true);
    let b =
        json!({"model": MODEL, "prompt": "x", "max_tokens": 8, "stream": true, "ignore_eos": true})
            .to_string();
    let req = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len());
    let started = Instant::now();
    let text = raw_exchange(proxy.addr, req.as_bytes(), Duration::from_secs(20));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("stalled"), "{text}");
    assert!(
        text.contains("data: [DONE]"),
        "the stream ran to its end: {text}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the stream outlasted the idle timeout: {:?}",
        started.elapsed()
    );
}

#[test]
fn admin_api_requires_the_key() {
    let d = dummy("dual", &[]);
    let proxy = proxy_with(
        &format!("{}admin_api_key: s3cret\n", dual_yaml(&[&d])),
        true,
    );
    let a = agent();
    let url = proxy.url("/instances/add");
    let add = json!({"address": "127.0.0.1:1", "role": "dual", "model": MODEL});
    let send = |key: Option<&str>| {
        let mut r = a.post(&url).set("Content-Type", "application/json");
        if let Some(k) = key {
            r = r.set("X-API-Key", k);
        }
        match r.send_json(add.clone()) {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(send(None), 401);
    assert_eq!(send(Some("wrong")), 403);
    assert_eq!(send(Some("s3cret")), 200);
    let (_, v) = get_json(&proxy.url("/status/instances"));
    assert_eq!(v["instances"].as_array().unwrap().len(), 2);
    // No admin key configured: the admin API is disabled.
    let d2 = dummy("dual", &[]);
    let proxy2 = proxy_with(&dual_yaml(&[&d2]), true);
    let r = a
        .post(&proxy2.url("/instances/remove"))
        .set("X-API-Key", "anything")
        .send_json(json!({"address": d2.addr.to_string()}));
    assert!(matches!(r, Err(ureq::Error::Status(403, _))));
}

#[test]
fn removing_a_node_drains_its_streams_and_sends_it_nothing_new() {
    let p = dummy("prefill", &[]);
    let d1 = dummy("decode", &["--decode-delay-per-token", "0.05"]);
    let d2 = dummy("decode", &[]);
    let yaml = format!("{}admin_api_key: k\n", pd_yaml(&[&p], &[&d1]));
    let proxy = proxy_with(&yaml, true);
    let url = proxy.url("/v1/completions");
    // 20 long streams on d1 (30 tokens × 50 ms).
    let streams: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let s = stream(&agent(), &url, &body(30, true));
                assert_eq!(s.status, 200);
                assert_eq!(s.events.last().unwrap().1, "[DONE]");
                s.json_events()
                    .iter()
                    .filter(|e| !e["choices"].as_array().unwrap().is_empty())
                    .count()
            })
        })
        .collect();
    wait_for("20 streams on d1", Duration::from_secs(5), || {
        dummy_stats(&d1)["running"] == 20
    });
    let a = agent();
    let admin = |path: &str, v: Value| {
        a.post(&proxy.url(path))
            .set("X-API-Key", "k")
            .send_json(v)
            .expect("admin call")
            .into_json::<Value>()
            .unwrap()
    };
    admin(
        "/instances/add",
        json!({"address": d2.addr.to_string(), "role": "decode", "model": MODEL}),
    );
    let r = admin("/instances/remove", json!({"address": d1.addr.to_string()}));
    assert_eq!(r["draining_requests"], 20, "{r}");
    // New requests go to d2 only, while d1 finishes its streams.
    for _ in 0..10 {
        assert_eq!(post(&a, &url, &body(4, false)).0, 200);
    }
    assert_eq!(dummy_stats(&d1)["requests"], 20);
    assert_eq!(dummy_stats(&d2)["requests"], 10);
    for h in streams {
        assert_eq!(h.join().unwrap(), 30, "every drained stream completes");
    }
    assert_eq!(dummy_stats(&d1)["aborted"], 0);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let d = dummy("dual", &["--decode-delay-per-token", "0.05"]);
    let mut proxy = proxy_with(&dual_yaml(&[&d]), true);
    let url = proxy.url("/v1/completions");
    let h = std::thread::spawn(move || stream(&agent(), &url, &body(20, true)));
    wait_for("the stream to start", Duration::from_secs(3), || {
        dummy_stats(&d)["running"] == 1
    });
    let pid = proxy.child.id() as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let s = h.join().unwrap();
    assert_eq!(
        s.events.last().unwrap().1,
        "[DONE]",
        "the in-flight stream completed"
    );
    let status = proxy.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_down_role_is_named_and_costs_no_prefill() {
    let p = dummy("prefill", &[]);
    let d = dummy("decode", &[]);
    let proxy = proxy_with(&pd_yaml(&[&p], &[&d]), true);
    let a = agent();
    let url = proxy.url("/v1/completions");
    assert_eq!(post(&a, &url, &body(2, false)).0, 200);
    let d_addr = d.addr.to_string();
    drop(d); // kill -9
    wait_for(
        "the decode node to be marked down",
        Duration::from_secs(10),
        || {
            let s = instance_status(&proxy, &d_addr);
            s["status"] == "unhealthy" || s["circuit"] == "open"
        },
    );
    let before = dummy_stats(&p)["requests"].as_u64().unwrap();
    let (status, _, v) = post(&a, &url, &body(2, false));
    assert_eq!(status, 503, "{v}");
    assert_eq!(
        v["error"]["message"], "no healthy decode instance available",
        "{v}"
    );
    assert_eq!(
        dummy_stats(&p)["requests"].as_u64().unwrap(),
        before,
        "no prefill is run for a request no decode node can finish"
    );
}
