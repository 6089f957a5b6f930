//! Network faults that loopback cannot make. On loopback a dead node answers with a reset at
//! once; in a cluster a node that loses power or its link simply stops answering, and links
//! drop packets. Each test here runs the proxy, its nodes (real `xpyd-dummy` processes) and
//! its client inside a fresh network namespace of its own (`unshare --net`, `lo` brought up
//! inside; nothing leaves the machine) and makes the faults with nftables rules in that
//! namespace's output hook:
//! - blackhole: every packet to and from a node's port dropped (no reset, SYNs vanish);
//! - half-open: only the node's answers (its source port) dropped;
//! - loss: `numgen random mod 100 < 1` drops 1 % of the node traffic (TCP retransmits).
//!
//! They need root (or CAP_SYS_ADMIN + CAP_NET_ADMIN), iproute2 and nftables, so they are
//! ignored by a plain `cargo test`; `.ci/run` runs them with
//! `cargo test --test netns_faults -- --ignored --test-threads=1`. A test that cannot make
//! its namespace fails and says why. The test re-executes its own binary under
//! `unshare --net` with `XPYD_IN_NETNS=1` and its exact name; the scenario runs in there.
//! Measurements are printed as `netns:` lines (`--nocapture`); docs/resilience.md has them.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IN_NETNS: &str = "XPYD_IN_NETNS";

// ---------------------------------------------------------------------------------------
// The namespace and the faults

/// Runs `scenario` inside a fresh network namespace: re-executes this test binary there
/// (only the test named `test`) and fails unless it ran and passed.
fn in_netns(test: &str, scenario: impl FnOnce()) {
    if std::env::var_os(IN_NETNS).is_some() {
        let links = cmd_out("ip", &["-o", "link", "show"]);
        assert!(
            links.lines().count() == 1 && links.contains(": lo:"),
            "{IN_NETNS} is set but this is not a fresh network namespace: {links}"
        );
        cmd_out("ip", &["link", "set", "lo", "up"]);
        scenario();
        return;
    }
    for (tool, arg, package) in [
        ("unshare", "--version", "util-linux"),
        ("ip", "-V", "iproute2"),
        ("nft", "--version", "nftables"),
    ] {
        let ok = Command::new(tool).arg(arg).output();
        assert!(
            matches!(&ok, Ok(o) if o.status.success()),
            "this test needs `{tool}` (Debian package {package}): {ok:?}"
        );
    }
    let probe = Command::new("unshare")
        .args(["--net", "--", "nft", "list", "ruleset"])
        .output()
        .expect("run unshare");
    assert!(
        probe.status.success(),
        "cannot create a network namespace with nftables in it (needs root, or CAP_SYS_ADMIN \
         and CAP_NET_ADMIN): `unshare --net nft list ruleset` said: {}",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let exe = std::env::current_exe().expect("own test binary");
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(IN_NETNS, "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run the test inside a network namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "`{test}` failed inside its network namespace (its output is above)"
    );
    assert!(
        stdout.contains("1 passed"),
        "`{test}` did not run inside the namespace: {stdout}"
    );
}

fn cmd_out(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "`{prog} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// nftables rules in the namespace's output hook (on `lo` every packet passes it once).
struct Faults;

impl Faults {
    fn new() -> Faults {
        cmd_out("nft", &["add table inet xpyd_faults"]);
        cmd_out(
            "nft",
            &["add chain inet xpyd_faults out { type filter hook output priority 0 ; }"],
        );
        Faults
    }

    fn rule(&self, rule: &str) {
        cmd_out(
            "nft",
            &[&format!(
                "add rule inet xpyd_faults out {rule} counter drop"
            )],
        );
    }

    /// Nothing reaches the node and nothing comes back from it: no reset, no answer.
    fn blackhole(&self, port: u16) {
        self.rule(&format!("tcp dport {port}"));
        self.rule(&format!("tcp sport {port}"));
    }

    /// What is sent to the node arrives; everything it sends vanishes.
    fn half_open(&self, port: u16) {
        self.rule(&format!("tcp sport {port}"));
    }

    /// Drops `percent` % of the packets to and from `ports`.
    fn loss(&self, ports: &[u16], percent: u32) {
        let set = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        self.rule(&format!(
            "tcp dport {{ {set} }} numgen random mod 100 < {percent}"
        ));
        self.rule(&format!(
            "tcp sport {{ {set} }} numgen random mod 100 < {percent}"
        ));
    }

    /// Packets dropped so far by the current rules.
    fn dropped(&self) -> u64 {
        cmd_out("nft", &["list chain inet xpyd_faults out"])
            .split("counter packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    fn lift(&self) {
        cmd_out("nft", &["flush chain inet xpyd_faults out"]);
    }
}

// ---------------------------------------------------------------------------------------
// Requests and what the client saw

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Ok,
    /// The client can tell the request failed: an error status, an SSE error event without
    /// `[DONE]`, or a body cut short (the client's read fails).
    Failed(String),
    /// Looks finished but is not what was asked: a failure the client cannot see.
    Silent(String),
}

struct Done {
    started_us: u64,
    took: Duration,
    outcome: Outcome,
}

fn client() -> ureq::Agent {
    // Longer than any configured timeout here: a request still open after this has hung.
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

fn body(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream})
}

/// Sends one completion request; `expected` is the whole completion text.
fn request(a: &ureq::Agent, url: &str, req: &Value, expected: &str) -> Outcome {
    let resp = match a
        .post(url)
        .set("Content-Type", "application/json")
        .send_json(req.clone())
    {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let v: Value = r.into_json().unwrap_or(Value::Null);
            return match v["error"]["message"].as_str() {
                Some(m) => Outcome::Failed(format!("{code}: {m}")),
                None => Outcome::Silent(format!("{code} without an OpenAI error body: {v}")),
            };
        }
        Err(e) => return Outcome::Failed(format!("transport: {e}")),
    };
    if req["stream"] != true {
        let mut text = String::new();
        if let Err(e) = resp.into_reader().read_to_string(&mut text) {
            return Outcome::Failed(format!("body cut short: {e}"));
        }
        return match serde_json::from_str::<Value>(&text) {
            Ok(v) if v["choices"][0]["text"] == expected => Outcome::Ok,
            _ => Outcome::Silent(format!("200 with a wrong body: {text}")),
        };
    }
    let mut events = Vec::new();
    for line in BufReader::new(resp.into_reader()).lines() {
        match line {
            Ok(l) => {
                if let Some(d) = l.strip_prefix("data: ") {
                    events.push(d.to_string());
                }
            }
            Err(e) => {
                return match stream_outcome(&events, expected) {
                    Outcome::Failed(m) => Outcome::Failed(format!("{m}, then the body cut short")),
                    _ => Outcome::Failed(format!(
                        "stream cut short after {} events, no error event: {e}",
                        events.len()
                    )),
                }
            }
        }
    }
    stream_outcome(&events, expected)
}

fn stream_outcome(events: &[String], expected: &str) -> Outcome {
    let mut text = String::new();
    for (i, e) in events.iter().enumerate() {
        if e == "[DONE]" {
            return if i + 1 != events.len() {
                Outcome::Silent("events after [DONE]".into())
            } else if text != expected {
                Outcome::Silent(format!("tokens missing or out of order: `{text}`"))
            } else {
                Outcome::Ok
            };
        }
        let v: Value = match serde_json::from_str(e) {
            Ok(v) => v,
            Err(_) => return Outcome::Silent(format!("bad event `{e}`")),
        };
        if let Some(m) = v["error"]["message"].as_str() {
            return if i + 1 == events.len() {
                Outcome::Failed(format!("error event: {m}"))
            } else {
                Outcome::Silent("events after an error event".into())
            };
        }
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    Outcome::Silent(format!(
        "stream ended without [DONE] or an error event after {} events",
        events.len()
    ))
}

/// The completion text for `max_tokens` (asked once before any fault).
fn expected_text(url: &str, max_tokens: usize) -> String {
    let (status, _, v) = post(&agent(), url, &body("reference", max_tokens, false));
    assert_eq!(status, 200, "reference request: {v}");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// Requests over `conns` client threads, half of them streamed, while `more(i)` says
/// request `i` should start.
fn load(
    url: &str,
    conns: usize,
    max_tokens: usize,
    expected: &str,
    t0: Instant,
    started: &Arc<AtomicUsize>,
    more: impl Fn(usize) -> bool + Send + Sync + 'static,
) -> Vec<Done> {
    let more = Arc::new(more);
    let results = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let (url, expected) = (url.to_string(), expected.to_string());
            let (started, more, results) = (started.clone(), more.clone(), results.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let a = client();
                    loop {
                        let i = started.fetch_add(1, Ordering::Relaxed);
                        if !more(i) {
                            break;
                        }
                        let t = Instant::now();
                        let req = body(&format!("netns {i}"), max_tokens, i % 2 == 0);
                        let outcome = request(&a, &url, &req, &expected);
                        results.lock().unwrap().push(Done {
                            started_us: t.duration_since(t0).as_micros() as u64,
                            took: t.elapsed(),
                            outcome,
                        });
                    }
                })
                .unwrap()
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(results).ok().unwrap().into_inner().unwrap()
}

/// `(status, circuit)` of the instance at `addr` as `/status/instances` shows it.
fn instance_state(proxy: &Proc, addr: SocketAddr) -> (String, String) {
    instance_state_at(&proxy.url("/status/instances"), addr)
}

fn instance_state_at(status_url: &str, addr: SocketAddr) -> (String, String) {
    let (_, v) = get_json(status_url);
    let i = v["instances"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["address"] == addr.to_string().as_str()))
        .unwrap_or_else(|| panic!("{addr} not in /status/instances: {v}"))
        .clone();
    (
        i["status"].as_str().unwrap_or("").to_string(),
        i["circuit"].as_str().unwrap_or("").to_string(),
    )
}

/// Its health probe failed: no picks until a probe passes again. (An open circuit alone is
/// not enough: it lets trial requests through again after its open time.)
fn taken_out(state: &(String, String)) -> bool {
    state.0 == "unhealthy"
}

fn admitted(state: &(String, String)) -> bool {
    state.0 == "healthy" && state.1 != "open"
}

fn requests_seen(node: &Proc) -> u64 {
    dummy_stats(node)["requests"].as_u64().unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Failure messages grouped with their counts (for the report).
fn failure_kinds(done: &[&Done]) -> Vec<(String, usize)> {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for d in done {
        if let Outcome::Failed(m) | Outcome::Silent(m) = &d.outcome {
            // Drop addresses and durations so that like failures group together.
            let key: String = m
                .split_whitespace()
                .filter(|w| !w.chars().any(|c| c.is_ascii_digit()) || w.ends_with(':'))
                .collect::<Vec<_>>()
                .join(" ");
            match kinds.iter_mut().find(|k| k.0 == key) {
                Some(k) => k.1 += 1,
                None => kinds.push((key, 1)),
            }
        }
    }
    kinds
}

// ---------------------------------------------------------------------------------------
// Scenarios

const TIMEOUTS: &str = "timeouts:\n  connect_ms: 500\n  first_byte_seconds: 2\n  idle_seconds: 2\n";
/// Everything a request may wait for here (connect, first byte, idle), plus slack for a
/// loaded machine: no request may take longer.
const BOUND: Duration = Duration::from_millis(500 + 2000 + 2000 + 10_000);

#[test]
#[ignore = "needs root, iproute2 and nftables; run by .ci/run"]
fn blackholed_decode_node_under_load() {
    in_netns("blackholed_decode_node_under_load", || {
        let total = 2000;
        let conns = 64;
        let slow = ["--decode-delay-per-token", "0.005"];
        let p = dummy("prefill", &[]);
        let ds: Vec<Proc> = (0..3).map(|_| dummy("decode", &slow)).collect();
        let victim = &ds[1];
        let yaml = format!(
            "{}circuit_breaker:\n  failure_threshold: 3\n  timeout_duration_seconds: 1\n\
             retry:\n  initial_backoff_ms: 5\n{TIMEOUTS}",
            pd_yaml(&[&p], &ds.iter().collect::<Vec<_>>())
        );
        let proxy = proxy_with(&yaml, true);
        let url = proxy.url("/v1/completions");
        let expected = expected_text(&url, 16);
        let faults = Faults::new();

        let t0 = Instant::now();
        let started = Arc::new(AtomicUsize::new(0));
        // The load goes on past `total` until a quarter of it started after detection, so
        // that a fast machine cannot finish before the fault and test nothing (bounded).
        let detected_us = Arc::new(AtomicU64::new(u64::MAX));
        let after = Arc::new(AtomicUsize::new(0));
        let runner = {
            let (url, expected, started) = (url.clone(), expected.clone(), started.clone());
            let (detected_us, after) = (detected_us.clone(), after.clone());
            std::thread::spawn(move || {
                load(&url, conns, 16, &expected, t0, &started, move |i| {
                    let d = detected_us.load(Ordering::Relaxed);
                    if d != u64::MAX && (t0.elapsed().as_micros() as u64) > d {
                        after.fetch_add(1, Ordering::Relaxed);
                    }
                    i < total
                        || (after.load(Ordering::Relaxed) < total / 4
                            && t0.elapsed() < Duration::from_secs(60))
                })
            })
        };
        wait_for(
            "a fifth of the load started",
            Duration::from_secs(60),
            || started.load(Ordering::Relaxed) >= total / 5,
        );
        let fault_at = t0.elapsed();
        faults.blackhole(victim.addr.port());
        let detection = wait_for(
            "the proxy takes the blackholed node out",
            Duration::from_secs(20),
            || taken_out(&instance_state(&proxy, victim.addr)),
        );
        detected_us.store((fault_at + detection).as_micros() as u64, Ordering::Relaxed);
        let results = runner.join().unwrap();
        let dropped = faults.dropped();

        let detected = detected_us.load(Ordering::Relaxed);
        let failed_before: Vec<&Done> = results
            .iter()
            .filter(|d| d.outcome != Outcome::Ok && d.started_us <= detected)
            .collect();
        let failed_after: Vec<&Done> = results
            .iter()
            .filter(|d| d.outcome != Outcome::Ok && d.started_us > detected)
            .collect();
        let silent: Vec<&Done> = results
            .iter()
            .filter(|d| matches!(d.outcome, Outcome::Silent(_)))
            .collect();
        let slowest_failure = failed_before.iter().map(|d| d.took).max();
        let slowest = results.iter().map(|d| d.took).max().unwrap_or_default();
        eprintln!(
            "netns: blackhole: {} requests ({} conns), fault at {:.0} ms, detected after {:.0} ms, \
             {} dropped packets; failed before detection {} ({:?}), slowest failure {:?}; \
             failed after {}; slowest request {:.0} ms",
            results.len(),
            conns,
            ms(fault_at),
            ms(detection),
            dropped,
            failed_before.len(),
            failure_kinds(&failed_before),
            slowest_failure.map(ms),
            failed_after.len(),
            ms(slowest)
        );
        assert!(dropped > 0, "the blackhole rule dropped nothing");
        assert!(
            silent.is_empty(),
            "failures a client cannot see: {:?}",
            failure_kinds(&silent)
        );
        assert!(
            failed_after.is_empty(),
            "{} requests started after detection failed: {:?}",
            failed_after.len(),
            failure_kinds(&failed_after)
        );
        assert!(
            slowest < BOUND,
            "a request took {slowest:?}, longer than every configured timeout together"
        );
        assert!(
            after.load(Ordering::Relaxed) > 0,
            "no request started after detection"
        );

        // Lift the rule: the node is probed healthy and gets requests again.
        faults.lift();
        let seen = requests_seen(victim);
        let readmitted = wait_for(
            "the node gets requests again after the blackhole is lifted",
            Duration::from_secs(30),
            || {
                let a = agent();
                let r = request(&a, &url, &body("after", 16, false), &expected);
                assert_eq!(r, Outcome::Ok, "a request after the rule was lifted");
                requests_seen(victim) > seen
            },
        );
        eprintln!(
            "netns: blackhole: re-admitted {:.0} ms after the rule was lifted",
            ms(readmitted)
        );
    });
}

#[test]
#[ignore = "needs root, iproute2 and nftables; run by .ci/run"]
fn half_open_node_mid_stream() {
    in_netns("half_open_node_mid_stream", || {
        let slow = ["--decode-delay-per-token", "0.05"];
        let p = dummy("prefill", &[]);
        let ds: Vec<Proc> = (0..2).map(|_| dummy("decode", &slow)).collect();
        let victim = &ds[0];
        let yaml = format!(
            "{}circuit_breaker:\n  failure_threshold: 3\n  timeout_duration_seconds: 1\n\
             timeouts:\n  connect_ms: 500\n  first_byte_seconds: 10\n  idle_seconds: 2\n",
            pd_yaml(&[&p], &ds.iter().collect::<Vec<_>>())
        );
        let proxy = proxy_with(&yaml, true);
        let url = proxy.url("/v1/completions");
        let expected = expected_text(&url, 60);
        let short = expected_text(&url, 4);
        let faults = Faults::new();

        // Four streams of 3 s each; the scheduler spreads them over both decode nodes.
        let (tx, rx) = std::sync::mpsc::channel();
        let streams: Vec<_> = (0..4)
            .map(|k| {
                let (url, tx) = (url.clone(), tx.clone());
                std::thread::spawn(move || {
                    let resp = client()
                        .post(&url)
                        .set("Content-Type", "application/json")
                        .send_json(body(&format!("half-open {k}"), 60, true))
                        .expect("stream request");
                    let mut events = Vec::new();
                    let mut last = Instant::now();
                    for line in BufReader::new(resp.into_reader()).lines() {
                        let Ok(line) = line else { break };
                        if let Some(d) = line.strip_prefix("data: ") {
                            events.push(d.to_string());
                            last = Instant::now();
                            if events.len() == 2 {
                                let _ = tx.send(k);
                            }
                        }
                    }
                    (events, last, Instant::now())
                })
            })
            .collect();
        for _ in 0..4 {
            rx.recv_timeout(Duration::from_secs(30))
                .expect("every stream sends its first events");
        }
        let on_victim: Vec<bool> = (0..4)
            .map(|k| {
                received(victim)
                    .iter()
                    .any(|r| r["body"]["prompt"] == format!("half-open {k}").as_str())
            })
            .collect();
        assert!(
            on_victim.iter().any(|&v| v) && !on_victim.iter().all(|&v| v),
            "the streams did not spread over both decode nodes: {on_victim:?}"
        );
        let fault_at = Instant::now();
        faults.half_open(victim.addr.port());
        let detector = {
            let (status, addr) = (proxy.url("/status/instances"), victim.addr);
            std::thread::spawn(move || {
                wait_for(
                    "the proxy takes the half-open node out",
                    Duration::from_secs(20),
                    || taken_out(&instance_state_at(&status, addr)),
                )
            })
        };

        for (k, h) in streams.into_iter().enumerate() {
            let (events, last_data, ended) = h.join().unwrap();
            let outcome = stream_outcome(&events, &expected);
            if on_victim[k] {
                // Ends with the error event, at most an idle timeout after its last data.
                assert!(
                    matches!(&outcome, Outcome::Failed(m) if m.starts_with("error event")),
                    "stream {k} on the half-open node: {outcome:?}"
                );
                let quiet = ended.duration_since(last_data.max(fault_at));
                eprintln!(
                    "netns: half-open: stream {k} ended {:.0} ms after the fault with {} events, \
                     the last: {}",
                    ms(ended.duration_since(fault_at)),
                    events.len(),
                    events.last().unwrap()
                );
                assert!(
                    quiet < Duration::from_millis(2000 + 8000),
                    "stream {k} ended {quiet:?} after its last data (idle timeout 2 s)"
                );
            } else {
                assert_eq!(outcome, Outcome::Ok, "stream {k} on the healthy node");
            }
        }

        let detection = detector.join().unwrap();
        eprintln!(
            "netns: half-open: node taken out {:.0} ms after the fault",
            ms(detection)
        );
        // Later requests avoid it: they all succeed, and none reaches it (its log, read
        // once the rule is lifted, has none of them).
        let a = client();
        for i in 0..10 {
            let req = body(&format!("later {i}"), 4, i % 2 == 0);
            assert_eq!(request(&a, &url, &req, &short), Outcome::Ok, "later {i}");
        }
        faults.lift();
        let reached: Vec<Value> = received(victim)
            .into_iter()
            .filter(|r| {
                r["body"]["prompt"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("later"))
            })
            .collect();
        assert!(
            reached.is_empty(),
            "requests reached the half-open node after it was taken out: {reached:?}"
        );
    });
}

#[test]
#[ignore = "needs root, iproute2 and nftables; run by .ci/run"]
fn one_percent_packet_loss() {
    in_netns("one_percent_packet_loss", || {
        let (total, conns, max_tokens) = (1000, 32, 16);
        let ps: Vec<Proc> = (0..2).map(|_| dummy("prefill", &[])).collect();
        let ds: Vec<Proc> = (0..3).map(|_| dummy("decode", &[])).collect();
        let ports: Vec<u16> = ps.iter().chain(&ds).map(|n| n.addr.port()).collect();
        // A lost SYN is retransmitted after 1 s: probes get 3 s (the default), so that loss
        // alone does not take nodes out; generous first-byte and idle timeouts.
        let yaml = format!(
            "{}startup:\n  probe_interval_seconds: 0.1\nhealth_check:\n  interval_seconds: 1\n  \
             timeout_seconds: 3\nretry:\n  initial_backoff_ms: 5\ntimeouts:\n  \
             first_byte_seconds: 30\n  idle_seconds: 30\n",
            pd_yaml(
                &ps.iter().collect::<Vec<_>>(),
                &ds.iter().collect::<Vec<_>>()
            )
        );
        let proxy = proxy_on(&write_config(&yaml), true);
        let url = proxy.url("/v1/completions");
        let expected = expected_text(&url, max_tokens);
        let faults = Faults::new();

        // Warm up (connections, pools, buffers) so that the lossless run is not the cold one.
        let warm = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let results = load(&url, conns, max_tokens, &expected, t0, &warm, |i| i < 200);
        assert!(results.iter().all(|d| d.outcome == Outcome::Ok), "warm-up");
        for loss in [0, 1] {
            if loss > 0 {
                faults.loss(&ports, loss);
            }
            let started = Arc::new(AtomicUsize::new(0));
            let t0 = Instant::now();
            let results = load(&url, conns, max_tokens, &expected, t0, &started, move |i| {
                i < total
            });
            let wall = t0.elapsed();
            let bad: Vec<&Done> = results
                .iter()
                .filter(|d| d.outcome != Outcome::Ok)
                .collect();
            assert!(
                bad.is_empty(),
                "{} of {} requests failed with {loss} % loss: {:?}",
                bad.len(),
                results.len(),
                failure_kinds(&bad)
            );
            assert_eq!(results.len(), total);
            let mut took: Vec<Duration> = results.iter().map(|d| d.took).collect();
            took.sort();
            let dropped = faults.dropped();
            if loss > 0 {
                assert!(dropped > 0, "the loss rules dropped nothing");
            }
            let line = format!(
                "{loss} % loss: {total} requests ({conns} conns) in {:.0} ms, p50 {:.1} ms, \
                 p99 {:.1} ms, max {:.1} ms, {dropped} packets dropped",
                ms(wall),
                ms(percentile(&took, 0.5)),
                ms(percentile(&took, 0.99)),
                ms(*took.last().unwrap())
            );
            eprintln!("netns: {line}");
        }
        faults.lift();
    });
}

#[test]
#[ignore = "needs root, iproute2 and nftables; run by .ci/run"]
fn blackholed_node_at_startup() {
    in_netns("blackholed_node_at_startup", || {
        let p = dummy("prefill", &[]);
        let ds: Vec<Proc> = (0..2).map(|_| dummy("decode", &[])).collect();
        let faults = Faults::new();
        let quick = |url: &str| {
            let t = Instant::now();
            let r = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .build()
                .get(url)
                .call();
            let code = match r {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(c, _)) => c,
                Err(e) => panic!("GET {url} while a node is blackholed: {e}"),
            };
            (code, t.elapsed())
        };

        // 1. One of two decode nodes blackholed: the gate opens on the others, without
        // waiting for the blackholed node's probe to time out (6 s here); /health is 200
        // and lists it unhealthy; requests avoid it.
        faults.blackhole(ds[1].addr.port());
        let yaml = pd_yaml(&[&p], &ds.iter().collect::<Vec<_>>());
        let proxy = proxy_on(
            &write_config(&format!(
                "{yaml}startup:\n  probe_interval_seconds: 0.1\nhealth_check:\n  \
                 interval_seconds: 0.5\n  timeout_seconds: 6\n"
            )),
            false,
        );
        let opened = wait_for("the gate opens", Duration::from_secs(20), || {
            quick(&proxy.url("/health")).0 == 200
        });
        assert!(
            opened < Duration::from_secs(4),
            "the gate opened after {opened:?}: it waited for the blackholed node's probe to \
             time out (6 s)"
        );
        wait_for(
            "the blackholed node is shown unhealthy",
            Duration::from_secs(20),
            || instance_state(&proxy, ds[1].addr).0 == "unhealthy",
        );
        let expected = expected_text(&proxy.url("/v1/completions"), 8);
        let a = client();
        for i in 0..10 {
            let req = body(&format!("startup {i}"), 8, i % 2 == 0);
            assert_eq!(
                request(&a, &proxy.url("/v1/completions"), &req, &expected),
                Outcome::Ok
            );
        }
        faults.lift();
        assert!(
            received(&ds[1]).is_empty(),
            "requests went to the blackholed node"
        );
        wait_for(
            "the node is healthy once the rule is lifted",
            Duration::from_secs(20),
            || admitted(&instance_state(&proxy, ds[1].addr)),
        );
        eprintln!(
            "netns: startup: gate opened {:.0} ms after the proxy listened, a decode node blackholed \
             (its probe's timeout: 6 s)",
            ms(opened)
        );
        drop(proxy);

        // 2. The only prefill node blackholed: gated. Business endpoints 503 with
        // Retry-After, /health 503, the operational endpoints answer at once; the gate
        // opens when the rule is lifted.
        faults.blackhole(p.addr.port());
        let proxy = proxy_with(&yaml, false);
        let url = proxy.url("/v1/completions");
        wait_for(
            "the prefill node is probed and found unhealthy",
            Duration::from_secs(20),
            || instance_state(&proxy, p.addr).0 == "unhealthy",
        );
        let resp = agent()
            .post(&url)
            .set("Content-Type", "application/json")
            .send_json(body("gated", 8, false));
        match resp {
            Err(ureq::Error::Status(503, r)) => {
                assert_eq!(r.header("retry-after"), Some("1"));
                let v: Value = r.into_json().unwrap();
                let m = v["error"]["message"].as_str().unwrap_or("");
                assert!(m.contains("waiting for backend nodes"), "{v}");
            }
            other => panic!("expected 503 while gated, got {other:?}"),
        }
        let mut slowest = Duration::ZERO;
        for path in [
            "/health",
            "/ping",
            "/status",
            "/status/instances",
            "/v1/models",
        ] {
            let (code, took) = quick(&proxy.url(path));
            let want = if path == "/health" { 503 } else { 200 };
            assert_eq!(code, want, "{path} while gated");
            slowest = slowest.max(took);
        }
        let (_, h) = get_json(&proxy.url("/health"));
        assert_eq!(h["status"], "waiting for backend nodes", "{h}");
        faults.lift();
        let opened = wait_for(
            "the gate opens once the rule is lifted",
            Duration::from_secs(20),
            || quick(&proxy.url("/health")).0 == 200,
        );
        let (status, _, v) = post(&agent(), &url, &body("after", 8, false));
        assert_eq!(status, 200, "{v}");
        eprintln!(
            "netns: startup: gated with the prefill node blackholed (operational endpoints \
             answered within {:.0} ms); ready {:.0} ms after the rule was lifted",
            ms(slowest),
            ms(opened)
        );
        drop(proxy);

        // 3. Still blackholed after startup.wait_timeout_seconds with exit_on_timeout: the
        // proxy exits with status 3 (a probe that never answers does not hold it up).
        faults.blackhole(p.addr.port());
        let cfg = write_config(&format!(
            "{yaml}startup:\n  probe_interval_seconds: 0.1\n  wait_timeout_seconds: 1\n  \
             exit_on_timeout: true\nhealth_check:\n  timeout_seconds: 1\n"
        ));
        let mut proxy = proxy_on(&cfg, false);
        let t = Instant::now();
        let code = loop {
            if let Some(s) = proxy.child.try_wait().unwrap() {
                break s.code();
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "the proxy did not exit after its startup wait timeout (1 s)"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(code, Some(3), "exit status after the startup wait timeout");
        eprintln!(
            "netns: startup: exit_on_timeout: exited with 3 after {:.0} ms (wait 1 s, probe \
             timeout 1 s)",
            ms(t.elapsed())
        );
        faults.lift();
    });
}
