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
    node_with_metrics(running, waiting, kv, "ok")
}

/// The same node with a broken /metrics page: `garbage` or `hang` (busy_node.py says how).
fn node_with_metrics(running: u32, waiting: u32, kv: f64, metrics: &str) -> Proc {
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
        metrics,
    ]);
    spawn_listening(cmd)
}

fn metrics_text(proxy: &Proc) -> String {
    ureq::get(&proxy.url("/metrics"))
        .call()
        .expect("/metrics")
        .into_string()
        .unwrap()
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

#[test]
fn scrape_and_kv_event_failures_never_affect_serving() {
    // One node's /metrics never answers, the other's is not an exposition; one KV-event
    // endpoint speaks HTTP instead of ZeroMQ, the other has nobody listening.
    let hung = node_with_metrics(0, 0, 0.0, "hang");
    let garbled = node_with_metrics(0, 0, 0.0, "garbage");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap();
    drop(closed);
    let proxy = proxy_with(
        &format!(
            "{}scheduling: kv_aware\nengine_metrics:\n  interval_seconds: 0.1\n  timeout_seconds: 0.1\n\
             kv_events:\n  endpoints:\n    \"{}\": \"tcp://{}\"\n    \"{}\": \"tcp://{}\"\n",
            dual_yaml(&[&hung, &garbled]),
            hung.addr,
            garbled.addr,
            garbled.addr,
            nobody,
        ),
        true,
    );
    let failures = |node: &Proc| -> f64 {
        let needle = format!(
            "proxy_engine_scrape_failures_total{{instance=\"{}\"",
            node.addr
        );
        metrics_text(&proxy)
            .lines()
            .find(|l| l.starts_with(&needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    wait_for(
        "the hung scrape to time out and be counted",
        Duration::from_secs(15),
        || failures(&hung) >= 2.0,
    );
    let a = agent();
    for k in 0..40 {
        let (status, _, body) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": format!("request {k}"), "max_tokens": 2}),
        );
        assert_eq!(status, 200, "request {k}: {body}");
    }
    // Both nodes served (nothing was excluded for its broken metrics or events) ...
    for node in [&hung, &garbled] {
        let served = get_json(&node.url("/stats")).1["requests"]
            .as_u64()
            .unwrap();
        assert!(served > 0, "{} served nothing", node.addr);
    }
    // ... neither is believed to report engine numbers, and the proxy still answers its
    // own status and metrics.
    let (_, v) = get_json(&proxy.url("/status/instances"));
    for node in [&hung, &garbled] {
        assert_eq!(instance(&v, node)["engine"]["scraped"], false, "{v}");
    }
    assert!(failures(&hung) >= 2.0);
}

/// A real ZeroMQ publisher of vLLM's KV-event structures (pyzmq + msgspec).
struct Publisher {
    _child: KillOnDrop,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    endpoint: String,
    /// The replay (ROUTER) endpoint, when started with one.
    replay: Option<String>,
}

impl Publisher {
    fn start(endpoint: &str) -> Publisher {
        Self::spawn(endpoint, None)
    }

    /// With vLLM's replay socket on `replay` too.
    fn with_replay(endpoint: &str, replay: &str) -> Publisher {
        Self::spawn(endpoint, Some(replay))
    }

    fn spawn(endpoint: &str, replay: Option<&str>) -> Publisher {
        use std::io::BufRead;
        let venv = python_venv(&[("zmq", "pyzmq"), ("msgspec", "msgspec")]);
        let mut child = Command::new(venv.join("bin/python"))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/engine/kv_publisher.py"
            ))
            .arg(endpoint)
            .args(replay.map(|r| ["0", r]).iter().flatten())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the KV-event publisher");
        let stdin = child.stdin.take().unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines
            .next()
            .expect("publisher output")
            .expect("publisher line");
        let endpoint = first
            .strip_prefix("publishing on ")
            .unwrap_or_else(|| panic!("unexpected: {first}"))
            .to_string();
        let replay = replay.map(|_| {
            let line = lines.next().expect("replay line").expect("publisher line");
            line.strip_prefix("replay on ")
                .unwrap_or_else(|| panic!("unexpected: {line}"))
                .to_string()
        });
        Publisher {
            _child: KillOnDrop(child),
            stdin,
            lines,
            endpoint,
            replay,
        }
    }

    fn send(&mut self, cmd: Value) {
        use std::io::Write;
        writeln!(self.stdin, "{cmd}").unwrap();
        let answer = self.lines.next().expect("publisher answer").unwrap();
        assert!(
            answer.starts_with("sent") || answer.starts_with("skipped"),
            "{answer}"
        );
    }
}

const BLOCK: usize = 16;

/// 64 tokens (four blocks) the publisher says node 1 holds, and a prompt starting with them.
fn cached_tokens() -> Vec<u32> {
    (0..64).map(|t| 1000 + t * 7).collect()
}

fn stored_cmd() -> Value {
    json!({"stored": [101, 102, 103, 104], "parent": null, "tokens": cached_tokens(), "block_size": BLOCK})
}

fn kv_status(proxy: &Proc, node: &Proc) -> Value {
    let (_, v) = get_json(&proxy.url("/status/instances"));
    instance(&v, node)["kv_events"].clone()
}

/// Publishes `cmd` until the proxy's view of `node` satisfies `done` (a SUB socket only
/// receives once connected: early messages are lost, as with any ZeroMQ subscriber).
fn publish_until(
    pubr: &mut Publisher,
    cmd: Value,
    proxy: &Proc,
    node: &Proc,
    what: &str,
    done: impl Fn(&Value) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        pubr.send(cmd.clone());
        let mut k = 0;
        while k < 10 {
            if done(&kv_status(proxy, node)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
            k += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            kv_status(proxy, node)
        );
    }
}

/// Sends `n` requests whose prompt starts with the cached tokens; how many reached `node`.
fn requests_to(proxy: &Proc, node: &Proc, n: usize) -> u64 {
    let before = dummy_stats(node)["requests"].as_u64().unwrap();
    let a = agent();
    for k in 0..n {
        let mut prompt = cached_tokens();
        prompt.extend([5, 6, 7, k as u32]);
        let (status, _, body) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
        );
        assert_eq!(status, 200, "{body}");
    }
    dummy_stats(node)["requests"].as_u64().unwrap() - before
}

/// One request with the cached prefix does not follow it: a no_match pick, not a hit. (Where
/// it goes is its rendezvous home, which may be the former holder; the requests after it
/// follow it, as blocks sent there and not yet announced.)
fn does_not_follow_the_prefix(proxy: &Proc) {
    let hits = r#"proxy_routing_picks_total{policy="kv_aware",outcome="prefix_hit"}"#;
    let misses = r#"proxy_routing_picks_total{policy="kv_aware",outcome="no_match"}"#;
    let (h, m) = (metric(proxy, hits), metric(proxy, misses));
    let mut prompt = cached_tokens();
    prompt.extend([9, 9, 9, 9]);
    let (status, _, body) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!((metric(proxy, hits), metric(proxy, misses)), (h, m + 1.0));
}

#[test]
fn kv_aware_follows_the_blocks_an_engine_published() {
    let nodes: Vec<Proc> = (0..3).map(|_| dummy("dual", &[])).collect();
    let mut pubr = Publisher::start("tcp://127.0.0.1:*");
    let proxy = proxy_with(
        &format!(
            "{}scheduling: kv_aware\nkv_events:\n  endpoints:\n    \"{}\": \"{}\"\n",
            dual_yaml(&[&nodes[0], &nodes[1], &nodes[2]]),
            nodes[1].addr,
            pubr.endpoint
        ),
        true,
    );
    let holder = &nodes[1];
    // BlockStored: every request with that prefix goes to the node that holds it.
    publish_until(
        &mut pubr,
        stored_cmd(),
        &proxy,
        holder,
        "BlockStored",
        |s| s["blocks"] == 4,
    );
    assert_eq!(requests_to(&proxy, holder, 12), 12);
    // BlockRemoved of the first block: the prefix is gone, load decides (three idle nodes).
    publish_until(
        &mut pubr,
        json!({"removed": [101, 102, 103, 104]}),
        &proxy,
        holder,
        "BlockRemoved",
        |s| s["blocks"] == 0,
    );
    does_not_follow_the_prefix(&proxy);
    // Stored again, then AllBlocksCleared.
    publish_until(
        &mut pubr,
        stored_cmd(),
        &proxy,
        holder,
        "BlockStored again",
        |s| s["blocks"] == 4,
    );
    assert_eq!(requests_to(&proxy, holder, 6), 6);
    publish_until(
        &mut pubr,
        json!({"cleared": true}),
        &proxy,
        holder,
        "AllBlocksCleared",
        |s| s["blocks"] == 0,
    );
    does_not_follow_the_prefix(&proxy);
    // A sequence gap without a replay socket: the instance's entries are dropped, relearned.
    publish_until(
        &mut pubr,
        stored_cmd(),
        &proxy,
        holder,
        "BlockStored before the gap",
        |s| s["blocks"] == 4,
    );
    pubr.send(json!({"skip": 3}));
    publish_until(
        &mut pubr,
        json!({"stored": [201], "parent": null, "tokens": (0..16).collect::<Vec<u32>>(), "block_size": BLOCK}),
        &proxy,
        holder,
        "the gap",
        |s| s["seq_gaps"] == 1 && s["blocks"] == 1,
    );
    does_not_follow_the_prefix(&proxy);
    // The publisher restarts (its sequence starts at 0 again): the proxy relearns from it.
    let endpoint = pubr.endpoint.clone();
    drop(pubr);
    let mut pubr = Publisher::start(&endpoint);
    publish_until(
        &mut pubr,
        stored_cmd(),
        &proxy,
        holder,
        "BlockStored after a restart",
        |s| s["publisher_restarts"] == 1 && s["blocks"] == 4,
    );
    assert_eq!(requests_to(&proxy, holder, 12), 12);
    // Observable: picks that followed a prefix, matched blocks, gaps and restarts.
    let m = metrics_text(&proxy);
    let value = |prefix: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
    };
    assert!(value("proxy_routing_picks_total{policy=\"kv_aware\",outcome=\"prefix_hit\"}") >= 30.0);
    assert!(value("proxy_routing_picks_total{policy=\"kv_aware\",outcome=\"no_match\"}") >= 1.0);
    assert!(value("proxy_routing_matched_prefix_blocks_sum{policy=\"kv_aware\"}") >= 30.0 * 4.0);
    let inst = format!("{{instance=\"{}\"}}", holder.addr);
    assert_eq!(value(&format!("proxy_kv_events_seq_gaps_total{inst}")), 1.0);
    assert_eq!(
        value(&format!("proxy_kv_events_publisher_restarts_total{inst}")),
        1.0
    );
    assert_eq!(value(&format!("proxy_kv_events_blocks{inst}")), 4.0);
    // Serving never depended on the events: new prefixes spread over every node (their
    // rendezvous homes), the ones without a publisher included.
    let a = agent();
    for k in 0..40u32 {
        let (status, _, body) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": (0..20).map(|t| 70_000 + k * 100 + t).collect::<Vec<u32>>(), "max_tokens": 1}),
        );
        assert_eq!(status, 200, "{body}");
    }
    for n in [&nodes[0], &nodes[2]] {
        assert!(dummy_stats(n)["requests"].as_u64().unwrap() > 0);
    }
}

/// A sequence gap answered by the publisher's replay socket: the missed batch is fetched
/// and applied, nothing is dropped, and the stream goes on (a chain stored in the missed
/// batch is the parent of the next one).
#[test]
fn kv_events_gap_filled_from_the_replay_socket() {
    let nodes: Vec<Proc> = (0..2).map(|_| dummy("dual", &[])).collect();
    let mut pubr = Publisher::with_replay("tcp://127.0.0.1:*", "tcp://127.0.0.1:*");
    let replay = pubr.replay.clone().unwrap();
    let proxy = proxy_with(
        &format!(
            "{}scheduling: kv_aware\nkv_events:\n  endpoints:\n    \"{a}\": \"{}\"\n  replay_endpoints:\n    \"{a}\": \"{replay}\"\n",
            dual_yaml(&[&nodes[0], &nodes[1]]),
            pubr.endpoint,
            a = nodes[1].addr,
        ),
        true,
    );
    let holder = &nodes[1];
    publish_until(
        &mut pubr,
        stored_cmd(),
        &proxy,
        holder,
        "BlockStored",
        |s| s["blocks"] == 4,
    );
    // Lost on the way (kept for replay): a block chained to the fourth; then a live batch
    // chained to the lost one. The proxy sees the gap, asks the replay socket, applies the
    // lost batch, then the live one, whose parent it now knows.
    let more: Vec<u32> = (0..32).map(|t| 5000 + t).collect();
    pubr.send(json!({"stored": [105], "parent": 104, "tokens": more[..16], "block_size": BLOCK, "lost": true}));
    pubr.send(json!({"stored": [106], "parent": 105, "tokens": more[16..], "block_size": BLOCK}));
    wait_for("the gap to be filled", Duration::from_secs(20), || {
        let s = kv_status(&proxy, holder);
        s["seq_gaps"] == 1 && s["blocks"] == 6
    });
    let s = kv_status(&proxy, holder);
    assert_eq!(s["orphan_chains"], 0, "{s}");
    assert_eq!(s["publisher_restarts"], 0, "{s}");
    // The whole chain (4 + 2 blocks) routes to the holder.
    let mut prompt = cached_tokens();
    prompt.extend(&more);
    prompt.extend([1, 2, 3]);
    let before = dummy_stats(holder)["requests"].as_u64().unwrap();
    let (status, _, body) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        dummy_stats(holder)["requests"].as_u64().unwrap(),
        before + 1
    );
    let hits = r#"proxy_routing_matched_prefix_blocks_sum{policy="kv_aware"}"#;
    assert!(metric(&proxy, hits) >= 6.0);
}

/// The same with xpyd-dummy as the engine: its prefix cache publishes `BlockStored` after
/// serving a prompt, and the proxy sends every later request with that prefix to it. Each
/// node writes one of the three msgspec layouts vLLM releases have used (maps, arrays, a
/// positional batch of maps), and the proxy reads them all.
#[test]
fn kv_aware_follows_a_simulated_engines_own_events() {
    let nodes: Vec<Proc> = ["map", "array", "mixed"]
        .iter()
        .map(|layout| kv_dummy(400, &["--kv-events-format", layout]))
        .collect();
    let proxy = proxy_with(
        &format!(
            "{}scheduling: kv_aware\n{}",
            dual_yaml(&[&nodes[0], &nodes[1], &nodes[2]]),
            kv_events_yaml(&nodes)
        ),
        true,
    );
    // Ten prefix groups of 96 tokens; a group's first request lands anywhere, its engine
    // stores the blocks and says so, and the group's later requests follow.
    let a = agent();
    let group = |g: u32| -> Vec<u32> { (0..96).map(|t| 100 + g * 1000 + t).collect() };
    let send = |prompt: &Vec<u32>| {
        let (status, _, body) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
        );
        assert_eq!(status, 200, "{body}");
    };
    let total_blocks = || -> u64 {
        let (_, v) = get_json(&proxy.url("/status/instances"));
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["kv_events"]["blocks"].as_u64().unwrap_or(0))
            .sum()
    };
    // The SUB sockets connect in the background: warm up until events arrive.
    // Distinct prompts: a repeated one would be a cache hit, with nothing new to publish.
    let mut warm = 0u32;
    wait_for("the first KV events", Duration::from_secs(20), || {
        warm += 1;
        send(&(0..32).map(|t| 900_000 + warm * 100 + t).collect());
        let (_, v) = get_json(&proxy.url("/status/instances"));
        let subscribed = v["instances"].as_array().unwrap().iter().all(|i| {
            i["kv_events"]["batches"].as_u64().unwrap_or(0) > 0
                || i["kv_events"]["subscribed"] == true
        });
        subscribed && total_blocks() > 0
    });
    for g in 0..10 {
        send(&group(g));
        let want = 6 * (g as u64 + 1);
        wait_for("the group's blocks", Duration::from_secs(10), || {
            total_blocks() >= want
        });
    }
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| dummy_stats(n)["requests"].as_u64().unwrap())
        .collect();
    let mut per_group_node: Vec<Vec<u64>> = Vec::new();
    for g in 0..10 {
        let prev: Vec<u64> = nodes
            .iter()
            .map(|n| dummy_stats(n)["requests"].as_u64().unwrap())
            .collect();
        for q in 0..4 {
            let mut p = group(g);
            p.extend([7, 7, q]);
            send(&p);
        }
        per_group_node.push(
            nodes
                .iter()
                .zip(&prev)
                .map(|(n, b)| dummy_stats(n)["requests"].as_u64().unwrap() - b)
                .collect(),
        );
    }
    for (g, counts) in per_group_node.iter().enumerate() {
        assert!(
            counts.contains(&4),
            "group {g} split over nodes: {counts:?}"
        );
    }
    let after: Vec<u64> = nodes
        .iter()
        .map(|n| dummy_stats(n)["requests"].as_u64().unwrap())
        .collect();
    eprintln!("requests per node before {before:?} after {after:?}");
}

/// With `tokenizer_path`, prompt tokens are counted exactly: the proxy's count equals the
/// Python `tokenizers` package's on the same tokenizer.json, to the token, as seen at the
/// `max_model_len` boundary (bytes / 4 would refuse a prompt that fits).
#[test]
fn exact_token_counts_from_the_models_tokenizer() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/engine/tokenizers");
    let file = format!("{root}/{MODEL}/tokenizer.json");
    // Long enough to be tokenized in pieces (docs/scheduling.md, "Tokenizers"): sent twice,
    // the second time from the pieces kept, and exact to the token both times.
    let text = "Hello world, the proxy routes requests; {\"json\": [1, 2, 3]} ".repeat(60);
    let venv = python_venv(&[("tokenizers", "tokenizers")]);
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", "import sys; from tokenizers import Tokenizer; print(len(Tokenizer.from_file(sys.argv[1]).encode(sys.argv[2]).ids))", &file, &text])
        .output()
        .expect("python tokenizers");
    let exact: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count");
    let estimate = (serde_json::to_string(&text).unwrap().len() / 4) as u64;
    // bytes / 4 is off for this tokenizer (by 35 %), so only an exact count gets the
    // boundary right.
    assert!(estimate.abs_diff(exact) > 10, "{estimate} vs {exact}");
    let a = agent();
    for (max_len, want) in [
        (exact + 1, 200), // fits, to the token
        (exact, 400),     // one token short: the proxy refuses it itself
    ] {
        let node = dummy(
            "dual",
            &[
                "--max-model-len",
                &max_len.to_string(),
                "--tokenizer",
                &file,
            ],
        );
        let proxy = proxy_with(
            &format!("{}tokenizer_path: \"{root}\"\n", dual_yaml(&[&node])),
            true,
        );
        wait_for(
            "max_model_len from /v1/models",
            Duration::from_secs(10),
            || {
                let (_, v) = get_json(&proxy.url("/status/instances"));
                v["instances"][0]["max_model_len"] == max_len
            },
        );
        let mut body = Value::Null;
        for round in ["first", "kept"] {
            let (status, _, b) = post(
                &a,
                &proxy.url("/v1/completions"),
                &json!({"model": MODEL, "prompt": text, "max_tokens": 1}),
            );
            assert_eq!(
                status, want,
                "{round}: max_model_len {max_len}, exact {exact}: {b}"
            );
            body = b;
        }
        let kept = metric(&proxy, "proxy_tokenizer_kept_bytes_total");
        assert!(kept >= 2048.0, "kept bytes {kept} of {}", text.len());
        if want == 400 {
            assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
            assert_eq!(
                dummy_stats(&node)["requests"],
                0,
                "the proxy answered, not the node"
            );
        }
    }
}

/// A chat request is counted as the engine sees it: the model's chat template (from
/// tokenizer_config.json) rendered with the messages, tools and a generation prompt, then
/// tokenized — equal, to the token, to transformers' way (jinja2 + the Python `tokenizers`
/// package) on the same files, as seen at the `max_model_len` boundary.
#[test]
fn exact_chat_token_counts_from_the_models_chat_template() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/engine/tokenizers");
    let folder = format!("{root}/{MODEL}");
    // A system prompt long enough that the rendered chat is tokenized in pieces
    // (docs/scheduling.md, "Tokenizers").
    let system = format!(
        "  You are a helpful routing assistant.  {}",
        "Route each prompt to the node that holds its prefix; keep groups together. ".repeat(40)
    );
    let request = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": [
                {"type": "text", "text": "Which node holds the prefix of this prompt?"},
                {"type": "text", "text": "Answer with its address; {\"json\": [1, 2, 3]}"}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"prefix\": \"abc\", \"blocks\": 4}"}
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "10.0.0.7:8000 holds 4 blocks"},
            {"role": "user", "content": "Thanks. Über-précis, s'il vous plaît — 日本語も。"}
        ],
        "tools": [{"type": "function", "function": {
            "name": "lookup", "description": "Finds the node holding a prefix",
            "parameters": {"type": "object", "properties": {"prefix": {"type": "string"}}}
        }}],
        "max_tokens": 1
    });
    let venv = python_venv(&[("tokenizers", "tokenizers"), ("jinja2", "jinja2")]);
    let out = Command::new(venv.join("bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/engine/chat_tokens.py"
        ))
        .arg(&folder)
        .arg(request.to_string())
        .output()
        .expect("python chat_tokens.py");
    let exact: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a count: {}", String::from_utf8_lossy(&out.stderr)));
    // The template adds what bytes / 4 cannot know (the tools, role markers): only an exact
    // count gets the boundary right. (kv_aware over two nodes below makes the proxy count
    // every prompt; with one node there is nothing to choose and it would not tokenize.)
    let estimate = (request["messages"].to_string().len() / 4) as u64;
    assert!(estimate.abs_diff(exact) > 10, "{estimate} vs {exact}");
    let a = agent();
    for (max_len, refused) in [(exact + 1, false), (exact, true)] {
        let len = max_len.to_string();
        let nodes = [0, 1].map(|_| dummy("dual", &["--max-model-len", &len]));
        let proxy = proxy_with(
            &format!(
                "{}scheduling: kv_aware\ntokenizer_path: \"{root}\"\n",
                dual_yaml(&[&nodes[0], &nodes[1]])
            ),
            true,
        );
        wait_for(
            "max_model_len from /v1/models",
            Duration::from_secs(10),
            || {
                let (_, v) = get_json(&proxy.url("/status/instances"));
                (0..2).all(|k| v["instances"][k]["max_model_len"] == max_len)
            },
        );
        let (status, _, body) = post(&a, &proxy.url("/v1/chat/completions"), &request);
        let reached_node = nodes
            .iter()
            .map(|n| dummy_stats(n)["requests"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 1;
        if refused {
            assert_eq!(
                status, 400,
                "max_model_len {max_len}, exact {exact}: {body}"
            );
            assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
            assert!(!reached_node, "the proxy answered, not the node");
        } else {
            // The dummy counts chat tokens its own way: only the proxy's decision matters.
            assert!(
                reached_node,
                "refused at {max_len} with {exact} tokens: {body}"
            );
        }
        assert_eq!(
            metric(
                &proxy,
                "proxy_tokenizer_requests_total{kind=\"chat\",outcome=\"tokenized\"}"
            ),
            1.0
        );
    }
}

/// Tokenizing runs on a tokenizer thread: while a long prompt is being tokenized, the one
/// worker thread keeps answering other connections (here its own /metrics, which shows the
/// tokenizer busy, and a request that needs no tokenizer).
#[test]
fn the_worker_serves_other_connections_while_a_long_prompt_is_tokenized() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/engine/tokenizers");
    // Two nodes: with one, kv_aware has nothing to choose and does not tokenize.
    let nodes = [0, 1].map(|_| dummy("dual", &["--max-model-len", "100000000"]));
    let proxy = proxy_with_workers(
        &format!(
            "{}scheduling: kv_aware\ntokenizer_path: \"{root}\"\ntokenizer:\n  max_queued_kib: 65536\n",
            dual_yaml(&[&nodes[0], &nodes[1]])
        ),
        1,
    );
    // Tokenizing is ~50× faster in a release build than in a debug one, so the long prompt
    // is sized from a short one's measured speed: about two seconds of tokenizing, at most
    // 20 MB (under the 32 MiB body limit). Words do not repeat: the tokenizer caches words.
    let words = |from: usize, n: usize| {
        (from..from + n)
            .map(|i| format!("node{i} "))
            .collect::<String>()
    };
    let (status, _, body) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": words(0, 20_000), "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{body}");
    let per_byte = metric(&proxy, "proxy_tokenizer_seconds_total")
        / metric(&proxy, "proxy_tokenizer_bytes_total");
    assert!(per_byte > 0.0, "the short prompt was tokenized and timed");
    let word_bytes = words(20_000, 1).len() as f64;
    let n = (2.0 / per_byte / word_bytes).clamp(20_000.0, 1_500_000.0);
    let text = words(20_000, n as usize);
    let url = proxy.url("/v1/completions");
    let big = std::thread::spawn(move || {
        let (status, _, body) = post(
            &agent(),
            &url,
            &json!({"model": MODEL, "prompt": text, "max_tokens": 1}),
        );
        (status, body)
    });
    wait_for(
        "/metrics, from the same worker, to show the prompt being tokenized",
        Duration::from_secs(60),
        || metric(&proxy, "proxy_tokenizer_busy_threads") == 1.0,
    );
    let (status, _, body) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = big.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let series = "proxy_tokenizer_requests_total{kind=\"completion\",outcome=\"tokenized\"}";
    assert_eq!(
        metric(&proxy, series),
        2.0,
        "the short prompt and the long one"
    );
    eprintln!(
        "tokenized {} bytes in {} s",
        metric(&proxy, "proxy_tokenizer_bytes_total"),
        metric(&proxy, "proxy_tokenizer_seconds_total")
    );
}

/// When the tokenizer threads are behind (here: a queue budget smaller than the prompt),
/// the request does not wait: it is served on the byte estimate, and the fallback counted.
#[test]
fn a_full_tokenizer_queue_falls_back_to_the_byte_estimate() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/engine/tokenizers");
    let nodes = [0, 1].map(|_| dummy("dual", &[]));
    let proxy = proxy_with(
        &format!(
            "{}scheduling: kv_aware\ntokenizer_path: \"{root}\"\ntokenizer:\n  max_queued_kib: 1\n",
            dual_yaml(&[&nodes[0], &nodes[1]])
        ),
        true,
    );
    let a = agent();
    let text = "a prompt longer than the tokenizer queue's budget ".repeat(100);
    let (status, _, body) = post(
        &a,
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": text, "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post(
        &a,
        &proxy.url("/v1/chat/completions"),
        &json!({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{body}");
    // A short prompt fits the budget and is tokenized.
    let (status, _, body) = post(
        &a,
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "short", "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{body}");
    for (kind, outcome, n) in [
        ("completion", "queue_full", 1.0),
        ("chat", "queue_full", 1.0),
        ("completion", "tokenized", 1.0),
    ] {
        let series =
            format!("proxy_tokenizer_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}");
        assert_eq!(metric(&proxy, &series), n, "{series}");
    }
    assert_eq!(
        metric(
            &proxy,
            "proxy_routing_picks_total{policy=\"kv_aware\",outcome=\"no_tokens\"}"
        ),
        2.0
    );
}

/// The KV index tells 64 instances apart: with 65 publishing, one is left unsubscribed,
/// and that is visible in /metrics and /status/instances (serving does not depend on it).
#[test]
fn a_65th_publishing_instance_is_reported_not_indexed() {
    // 65 instance addresses and 65 event ports, all distinct.
    let ports = free_addrs(130);
    let (addrs, events) = ports.split_at(65);
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let endpoints: String = addrs
        .iter()
        .zip(events)
        .map(|(a, e)| format!("    \"{a}\": \"tcp://{e}\"\n"))
        .collect();
    let proxy = proxy_with(
        &format!(
            "model: {MODEL}\ndual: [{}]\nscheduling: kv_aware\nkv_events:\n  endpoints:\n{endpoints}",
            list.join(", ")
        ),
        false,
    );
    wait_for(
        "the subscriber to count the 65th",
        Duration::from_secs(20),
        || metric(&proxy, "proxy_kv_events_unindexed_instances") == 1.0,
    );
    let (_, v) = get_json(&proxy.url("/status/instances"));
    let list = v["instances"].as_array().unwrap();
    let over = list
        .iter()
        .filter(|i| i["kv_events"]["over_instance_limit"] == true)
        .count();
    let subscribed = list
        .iter()
        .filter(|i| i["kv_events"]["subscribed"] == true)
        .count();
    assert_eq!((over, subscribed), (1, 64), "{v}");
}

/// A reload reads the tokenizer folders again: a model whose tokenizer appears under
/// `tokenizer_path` is counted exactly from the next request, without a restart.
#[test]
fn a_reload_reads_the_tokenizers_again() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/engine/tokenizers");
    let root = std::env::temp_dir().join(format!("xpyd-tok-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let nodes = [0, 1].map(|_| dummy("dual", &[]));
    let yaml = format!(
        "{}scheduling: kv_aware\ntokenizer_path: \"{}\"\nadmin_api_key: adm\n",
        dual_yaml(&[&nodes[0], &nodes[1]]),
        root.display()
    );
    let path = write_config(&format!("{yaml}startup:\n  probe_interval_seconds: 0.1\n"));
    let proxy = proxy_on(&path, true);
    let series = "proxy_tokenizer_requests_total{kind=\"completion\",outcome=\"tokenized\"}";
    let a = agent();
    let body = json!({"model": MODEL, "prompt": "count me exactly", "max_tokens": 1});
    assert_eq!(post(&a, &proxy.url("/v1/completions"), &body).0, 200);
    assert_eq!(metric(&proxy, series), 0.0, "no tokenizer yet");
    std::fs::create_dir_all(root.join(MODEL)).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(format!("{src}/{MODEL}/{f}"), root.join(MODEL).join(f)).unwrap();
    }
    let reloaded = a
        .post(&proxy.url("/admin/reload"))
        .set("X-API-Key", "adm")
        .call()
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    assert_eq!(post(&a, &proxy.url("/v1/completions"), &body).0, 200);
    assert_eq!(metric(&proxy, series), 1.0, "tokenized after the reload");
    let _ = std::fs::remove_dir_all(&root);
}

/// kv_aware with the engines' speed learned from their own metrics: a prefix group follows
/// its holder while the holder has a free batch slot, and goes to a free node when the
/// holder's batch is full with a queue behind it (waiting would take longer than computing
/// the prefix there) — docs/scheduling.md, "KV aware".
#[test]
fn kv_aware_waits_for_its_holder_only_while_that_is_sooner() {
    let nodes: Vec<Proc> = (0..2)
        .map(|_| {
            // One request at a time, 200 µs per computed prompt token, 20 ms per step.
            let timing = [
                "--max-num-seqs",
                "1",
                "--prefill-delay-per-token",
                "0.0002",
                "--decode-delay-per-token",
                "0.02",
            ];
            kv_dummy(400, &timing)
        })
        .collect();
    let proxy = proxy_with(
        &format!(
            "{}scheduling: kv_aware\nengine_metrics:\n  interval_seconds: 0.2\n{}",
            dual_yaml(&[&nodes[0], &nodes[1]]),
            kv_events_yaml(&nodes)
        ),
        true,
    );
    let direct = |node: &Proc, prompt: Vec<u32>, max_tokens: u32| {
        let url = node.url("/v1/completions");
        std::thread::spawn(move || {
            let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens});
            let _ = agent().post(&url).send_json(body);
        })
    };
    // Teach the proxy each engine's speed and batch: rounds of three concurrent requests
    // straight to each node (two of them wait behind the batch of one), until the scrapes
    // have seen a queue and enough computed tokens.
    let mut round = 0u32;
    let learned = |v: &Value, n: &Proc| {
        let e = &instance(v, n)["engine"];
        e["batch_seen"] == 1
            && e["prefill_us_per_token"].is_number()
            && e["mean_run_seconds"].is_number()
    };
    wait_for(
        "the engines' speed to be learned",
        Duration::from_secs(60),
        || {
            round += 1;
            let threads: Vec<_> = nodes
                .iter()
                .flat_map(|n| (0..3u32).map(move |k| (n, k)).collect::<Vec<_>>())
                .map(|(n, k)| {
                    direct(
                        n,
                        (0..600)
                            .map(|t| 500_000 + round * 10_000 + k * 1000 + t)
                            .collect(),
                        10,
                    )
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            let (_, v) = get_json(&proxy.url("/status/instances"));
            nodes.iter().all(|n| learned(&v, n))
        },
    );
    let (_, v) = get_json(&proxy.url("/status/instances"));
    for n in &nodes {
        let us = instance(&v, n)["engine"]["prefill_us_per_token"]
            .as_f64()
            .unwrap();
        assert!(
            (100.0..=1000.0).contains(&us),
            "200 µs per token configured, learned {us}: {v}"
        );
    }
    let requests = |n: &Proc| dummy_stats(n)["requests"].as_u64().unwrap();
    let a = agent();
    // 4,800 tokens: 0.96 s to compute, and as much again for making a second copy of
    // blocks the holder has, against a learned 0.3–0.5 s in the batch per request ahead.
    let prefix: Vec<u32> = (0..4800).map(|t| 70_000 + t).collect();
    // Which node a request with the prefix went to (0 or 1).
    let send = |q: u32| -> usize {
        let before: Vec<u64> = nodes.iter().map(requests).collect();
        let mut p = prefix.clone();
        p.push(q);
        let (status, _, body) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": p, "max_tokens": 1}),
        );
        assert_eq!(status, 200, "{body}");
        let after: Vec<u64> = nodes.iter().map(requests).collect();
        (0..2)
            .find(|&k| after[k] > before[k])
            .expect("a node took the request")
    };
    let home = send(1);
    for q in 2..5 {
        assert_eq!(
            send(q),
            home,
            "the holder has a free slot: request {q} follows the prefix"
        );
    }
    // Requests straight to the holder (the proxy learns of them from the engine's numbers):
    // one running, `waiting` behind it, 50 steps (1 s) each.
    let mut busy = Vec::new();
    let mut occupy = |waiting: u32| {
        for k in 0..=waiting {
            let prompt = (0..32)
                .map(|t| 800_000 + busy.len() as u32 * 100 + k + t)
                .collect();
            busy.push(direct(&nodes[home], prompt, 50));
        }
        wait_for(
            "the holder's queue to be scraped",
            Duration::from_secs(20),
            || {
                let (_, v) = get_json(&proxy.url("/status/instances"));
                let e = &instance(&v, &nodes[home])["engine"];
                e["num_requests_running"] == 1 && e["num_requests_waiting"] == waiting
            },
        );
    };
    // Three ahead (0.9–1.5 s) is sooner than computing the prefix elsewhere (~1.9 s with
    // the copy): the request waits for its holder, though the other node is idle (the
    // balance check and load band used without the engines' speed move it: 5 requests
    // against 0).
    occupy(2);
    assert_eq!(send(9), home, "three ahead of it at the holder");
    // Nine ahead (2.7–4.5 s): the free node is sooner.
    occupy(8);
    assert_eq!(send(10), 1 - home, "nine ahead of it at the holder");
    drop(nodes);
    busy.into_iter().for_each(|t| {
        let _ = t.join();
    });
}

/// A streamed completion held open: the request is sent and its response head read; a
/// thread drains the rest so the proxy keeps relaying. Dropping it closes the connection.
struct OpenStream {
    conn: std::net::TcpStream,
}

impl OpenStream {
    fn new(proxy: &Proc, max_tokens: u64) -> OpenStream {
        use std::io::{Read, Write};
        let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": max_tokens,
                          "stream": true, "ignore_eos": true})
        .to_string();
        let mut conn = std::net::TcpStream::connect(proxy.addr).expect("connect");
        write!(
            conn,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                conn.read(&mut byte).expect("response head"),
                1,
                "closed early"
            );
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut rest = conn.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while matches!(rest.read(&mut buf), Ok(n) if n > 0) {}
        });
        OpenStream { conn }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
    }
}

/// `(active_requests, in_flight_decode_tokens)` the proxy counts on `node`.
fn in_flight(proxy: &Proc, node: &Proc) -> (u64, u64) {
    let (_, v) = get_json(&proxy.url("/status/instances"));
    let i = instance(&v, node);
    (
        i["active_requests"].as_u64().unwrap(),
        i["in_flight_decode_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn decode_ties_go_to_the_node_with_fewer_tokens_left() {
    // 10 ms per token: a 1,000-token answer streams for 10 s, far longer than the test.
    let slow = ["--decode-delay-per-token", "0.01"];
    let nodes = [dummy("dual", &slow), dummy("dual", &slow)];
    let proxy = proxy_with(
        &format!(
            "{}scheduling: loadbalanced\nengine_metrics:\n  enabled: false\n",
            dual_yaml(&[&nodes[0], &nodes[1]])
        ),
        true,
    );
    let _first = OpenStream::new(&proxy, 1000);
    let (busy, idle) = if in_flight(&proxy, &nodes[0]).0 == 1 {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    // Counted as its max_tokens (the first token or so may already be out).
    let (requests, left) = in_flight(&proxy, busy);
    assert!(
        requests == 1 && (990..=1000).contains(&left),
        "{requests} {left}"
    );
    // Tokens relayed to the client stop counting.
    wait_for(
        "the first answer to stream 100 tokens",
        Duration::from_secs(30),
        || matches!(in_flight(&proxy, busy), (1, left) if left <= 900),
    );
    // The other node, idle, takes the next request, announced as 950 tokens: more left
    // than the first one has now, fewer than it had announced.
    let _second = OpenStream::new(&proxy, 950);
    assert_eq!(in_flight(&proxy, idle).0, 1);
    // One request each: the tie goes to the node whose answer ends first. The third streams
    // for 2 s, so it is still in flight when counted on a slow machine (its head comes with
    // its first token).
    let _third = OpenStream::new(&proxy, 200);
    let (now_busy, now_idle) = (in_flight(&proxy, busy), in_flight(&proxy, idle));
    assert_eq!(
        (now_busy.0, now_idle.0),
        (2, 1),
        "a tie between {now_busy:?} and {now_idle:?} went to the node with more tokens left"
    );
}

/// kv_aware tokenizes a prompt only when it has a choice to make: one prefill node in
/// front of the decode nodes takes every prefill, so its prompts are not tokenized (it would
/// only delay them); with two prefill nodes they are.
#[test]
fn kv_aware_over_a_single_instance_does_not_tokenize() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/engine/tokenizers");
    let prefill = [0, 1].map(|_| dummy("prefill", &[]));
    let decode = dummy("decode", &[]);
    let series = "proxy_tokenizer_requests_total{kind=\"completion\",outcome=\"tokenized\"}";
    let body = json!({"model": MODEL, "prompt": "count me if you must", "max_tokens": 2});
    for (prefill, tokenized) in [(&prefill[..1], 0.0), (&prefill[..], 1.0)] {
        let proxy = proxy_with(
            &format!(
                "{}prefill_scheduling: kv_aware\ntokenizer_path: \"{root}\"\n",
                pd_yaml(&prefill.iter().collect::<Vec<_>>(), &[&decode])
            ),
            true,
        );
        let (status, _, answer) = post(&agent(), &proxy.url("/v1/completions"), &body);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            metric(&proxy, series),
            tokenized,
            "{} prefill node(s)",
            prefill.len()
        );
    }
}

/// While an engine with requests in flight has not shown its batch or speed yet, the
/// scraper comes back four times as often (here: every second instead of every four).
#[test]
fn an_engine_still_being_learned_is_scraped_more_often() {
    let node = dummy("dual", &["--decode-delay-per-token", "0.01"]);
    let proxy = proxy_with(
        &format!(
            "{}engine_metrics:\n  interval_seconds: 4\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    let scrapes = || {
        let (_, v) = get_json(&proxy.url("/status/instances"));
        instance(&v, &node)["engine"]["scrapes_ok"]
            .as_u64()
            .unwrap_or(0)
    };
    // A 1,000-token answer at 10 ms per token keeps a request in flight for 10 s.
    let _busy = OpenStream::new(&proxy, 1000);
    let from = scrapes();
    // At the interval, 6 s hold at most two more scrapes; learning, about six.
    wait_for(
        "four scrapes while the engine is being learned",
        Duration::from_secs(6),
        || scrapes() >= from + 4,
    );
}
