//! Scheduling end to end: session affinity under cache_aware and consistent_hash, spread
//! across decode instances, and in-flight counters back to zero afterwards.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const SESSIONS: usize = 20;
const PER_SESSION: usize = 10;

/// Sends 200 requests from 20 sessions (each its own connection, X-Session-ID and long
/// shared prefix), the sessions concurrently, each session's requests one after another.
/// Returns, per decode node, the sessions and request count it served.
fn run_sessions(proxy: &Proc, decodes: &[&Proc]) -> (f64, f64) {
    let url = proxy.url("/v1/completions");
    let handles: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let url = url.clone();
            std::thread::spawn(move || {
                let a = agent();
                let system = format!("Session {s}. You are an assistant for customer {s}. ").repeat(8);
                for q in 0..PER_SESSION {
                    let body = json!({"model": MODEL, "prompt": format!("{system} Question {q}?"), "max_tokens": 4});
                    let resp = a
                        .post(&url)
                        .set("X-Session-ID", &format!("session-{s}"))
                        .set("X-Request-Id", &format!("s{s}-q{q}"))
                        .send_json(body)
                        .expect("request");
                    assert_eq!(resp.status(), 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Which decode node served each request, from the nodes' own request logs.
    let mut by_session: HashMap<usize, HashMap<usize, usize>> = HashMap::new();
    let mut per_node = vec![0usize; decodes.len()];
    for (n, d) in decodes.iter().enumerate() {
        for r in received(d) {
            let rid = r["request_id"].as_str().unwrap();
            let s: usize = rid[1..rid.find('-').unwrap()].parse().unwrap();
            *by_session.entry(s).or_default().entry(n).or_default() += 1;
            per_node[n] += 1;
        }
    }
    let total: usize = per_node.iter().sum();
    assert_eq!(total, SESSIONS * PER_SESSION);
    // Hit rate: share of requests on their session's most used node.
    let hits: usize = by_session
        .values()
        .map(|m| *m.values().max().unwrap())
        .sum();
    let max_share = *per_node.iter().max().unwrap() as f64 / total as f64;
    (hits as f64 / total as f64, max_share)
}

fn assert_counters_zero(proxy: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, v) = get_json(&proxy.url("/status/instances"));
        let list = v["instances"].as_array().unwrap().clone();
        let busy: Vec<&Value> = list
            .iter()
            .filter(|i| {
                i["active_requests"] != 0
                    || i["in_flight_prompt_tokens"] != 0
                    || i["in_flight_decode_tokens"] != 0
            })
            .collect();
        if busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in-flight counters not released: {busy:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One prefill and four decode nodes (`token_delay` seconds per token) behind the proxy.
fn setup(policy: &str, token_delay: &str) -> (Proc, Vec<Proc>, Proc) {
    let p = dummy("prefill", &[]);
    let ds: Vec<Proc> = (0..4)
        .map(|_| dummy("decode", &["--decode-delay-per-token", token_delay]))
        .collect();
    let refs: Vec<&Proc> = ds.iter().collect();
    let proxy = proxy_with(
        &format!("{}scheduling: {policy}\n", pd_yaml(&[&p], &refs)),
        true,
    );
    (p, ds, proxy)
}

#[test]
fn cache_aware_keeps_sessions_on_their_instance_and_spreads_load() {
    let (_p, ds, proxy) = setup("cache_aware", "0.002");
    let refs: Vec<&Proc> = ds.iter().collect();
    let (hit, max_share) = run_sessions(&proxy, &refs);
    eprintln!("cache_aware: hit rate {hit}, max share {max_share}");
    assert!(hit >= 0.9, "hit rate {hit}");
    assert!(max_share <= 0.4, "one instance took {max_share}");
    assert_counters_zero(&proxy);
}

#[test]
fn consistent_hash_keeps_sessions_on_their_instance_and_spreads_load() {
    let (_p, ds, proxy) = setup("consistent_hash", "0.002");
    let refs: Vec<&Proc> = ds.iter().collect();
    let (hit, max_share) = run_sessions(&proxy, &refs);
    eprintln!("consistent_hash: hit rate {hit}, max share {max_share}");
    // Bounded load trades some affinity for the spread guarantee: with 20 sessions on
    // 4 nodes a node may be home to 8+ sessions and must pass some on. The ring's points
    // come from the nodes' addresses, so each run (new ports) deals the sessions anew: a
    // node home to 10 of them was measured at 0.67. Without affinity it would be ~0.3.
    assert!(hit >= 0.6, "hit rate {hit}");
    assert!(max_share <= 0.4, "one instance took {max_share}");
    assert_counters_zero(&proxy);
}

#[test]
fn counters_return_to_zero_after_client_disconnects() {
    // 500 tokens at 20 ms: each stream would last 10 s, far longer than opening the ten
    // (which a loaded CI machine can stretch past a second), so none ends on its own.
    let (_p, ds, proxy) = setup("loadbalanced", "0.02");
    use std::io::{Read, Write};
    let mut open = Vec::new();
    for _ in 0..10 {
        let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
        let body = serde_json::to_vec(
            &json!({"model": MODEL, "prompt": "hi", "max_tokens": 500, "stream": true}),
        )
        .unwrap();
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).unwrap();
        s.write_all(&body).unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).unwrap();
        open.push(s);
    }
    let (_, v) = get_json(&proxy.url("/status/instances"));
    let active: u64 = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["active_requests"].as_u64().unwrap())
        .sum();
    assert_eq!(active, 10, "ten streams in flight on the decode nodes");
    // Abandon every stream mid-way.
    drop(open);
    assert_counters_zero(&proxy);
    // The nodes see the abandoned streams when their next token write fails (a write or
    // two after the proxy closed the connection): wait for all ten, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let aborted = loop {
        let aborted: u64 = ds
            .iter()
            .map(|d| dummy_stats(d)["aborted"].as_u64().unwrap())
            .sum();
        if aborted >= 10 || std::time::Instant::now() > deadline {
            break aborted;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stats: Vec<_> = ds.iter().map(dummy_stats).collect();
    assert_eq!(aborted, 10, "{stats:?}");
    // Loadbalanced spread the ten streams: no decode node had more than 3.
    for d in &ds {
        assert!(dummy_stats(d)["requests"].as_u64().unwrap() <= 3);
    }
}

#[test]
fn long_prompts_only_go_to_instances_that_can_take_them() {
    let p = dummy("prefill", &["--max-model-len", "100000"]);
    let small = dummy("decode", &["--max-model-len", "300"]);
    let large = dummy("decode", &["--max-model-len", "100000"]);
    let proxy = proxy_with(
        &format!(
            "{}scheduling: roundrobin\n",
            pd_yaml(&[&p], &[&small, &large])
        ),
        true,
    );
    // Ready needs one instance per role; this test needs both decode nodes' context lengths.
    let instances_up = |want_healthy: usize| {
        let (_, v) = get_json(&proxy.url("/status/instances"));
        let insts = v["instances"].as_array().cloned().unwrap_or_default();
        insts
            .iter()
            .filter(|i| i["status"] == "healthy" && i["max_model_len"].as_u64().unwrap_or(0) > 0)
            .count()
            == want_healthy
    };
    wait_for(
        "every instance healthy, its max_model_len read",
        Duration::from_secs(15),
        || instances_up(3),
    );
    let a = agent();
    // ~2000 bytes: estimated 500 tokens, more than the small node takes.
    let long = vec!["word"; 400].join(" ");
    for _ in 0..6 {
        let (status, _, v) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": long, "max_tokens": 2}),
        );
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(dummy_stats(&small)["requests"], 0);
    assert_eq!(dummy_stats(&large)["requests"], 6);
    // Short prompts still use both.
    for _ in 0..4 {
        let (status, _, _) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        );
        assert_eq!(status, 200);
    }
    assert_eq!(dummy_stats(&small)["requests"], 2);
    // Longer than every instance: the proxy answers 400 itself.
    let huge = vec!["word"; 100_000].join(" ");
    let (status, _, v) = post(
        &a,
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": huge, "max_tokens": 2}),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(dummy_stats(&p)["requests"], 10);
    // The large node goes down: a prompt only it takes waits for it (503, retried by
    // clients), not a 400 that says it can never be served; one longer than it still is.
    drop(large);
    wait_for(
        "the large node marked down",
        Duration::from_secs(15),
        || instances_up(2),
    );
    let (status, _, v) = post(
        &a,
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": long, "max_tokens": 2}),
    );
    assert_eq!(status, 503, "{v}");
    let (status, _, v) = post(
        &a,
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": huge, "max_tokens": 2}),
    );
    assert_eq!(status, 400, "{v}");
}

/// The prefix index is shared by the proxy's workers: requests of one prefix group, each on
/// its own connection (so spread over both workers by SO_REUSEPORT), land on one node.
#[test]
fn cache_aware_prefix_groups_stay_on_one_node_across_workers() {
    let (_p, ds, proxy) = setup("cache_aware", "0");
    const GROUPS: usize = 12;
    const PER_GROUP: usize = 8;
    let url = proxy.url("/v1/completions");
    let prompt = |g: usize, q: usize| {
        let system = format!("Group {g}: you answer questions about topic {g}. ").repeat(60);
        format!("{}... question {q}?", &system[..2400])
    };
    let send = |g: usize, q: usize| {
        // A fresh agent per request: a new connection, accepted by either worker.
        let resp = agent()
            .post(&url)
            .set("X-Request-Id", &format!("g{g}-q{q}"))
            .send_json(json!({"model": MODEL, "prompt": prompt(g, q), "max_tokens": 2}))
            .expect("request");
        assert_eq!(resp.status(), 200);
    };
    // Each group's first request alone, then the rest from four client threads at once.
    for g in 0..GROUPS {
        send(g, 0);
    }
    std::thread::scope(|s| {
        for t in 0..4 {
            let send = &send;
            s.spawn(move || {
                for k in (t..GROUPS * (PER_GROUP - 1)).step_by(4) {
                    send(k % GROUPS, 1 + k / GROUPS);
                }
            });
        }
    });
    let mut by_group: HashMap<usize, HashMap<usize, usize>> = HashMap::new();
    for (n, d) in ds.iter().enumerate() {
        for r in received(d) {
            let rid = r["request_id"].as_str().unwrap();
            let g: usize = rid[1..rid.find('-').unwrap()].parse().unwrap();
            *by_group.entry(g).or_default().entry(n).or_default() += 1;
        }
    }
    let total: usize = by_group.values().flat_map(|m| m.values()).sum();
    assert_eq!(total, GROUPS * PER_GROUP);
    let on_main: usize = by_group.values().map(|m| *m.values().max().unwrap()).sum();
    let affinity = on_main as f64 / total as f64;
    let nodes_used = (0..ds.len())
        .filter(|n| by_group.values().any(|m| m.contains_key(n)))
        .count();
    eprintln!("prefix affinity across workers: {affinity}, nodes used {nodes_used}");
    assert!(affinity >= 0.95, "affinity {affinity}: {by_group:?}");
    assert!(nodes_used >= 3, "groups piled up: {by_group:?}");
    assert_counters_zero(&proxy);
}

/// Per-role policies: the prefill leg follows the prefix (cache_aware), the decode leg the
/// model's `scheduling` (round robin) — one request's legs pick differently.
#[test]
fn prefill_and_decode_legs_use_their_own_policies() {
    let ps: Vec<Proc> = (0..2).map(|_| dummy("prefill", &[])).collect();
    let ds: Vec<Proc> = (0..2).map(|_| dummy("decode", &[])).collect();
    let proxy = proxy_with(
        &format!(
            "{}scheduling: roundrobin\nprefill_scheduling: cache_aware\n",
            pd_yaml(&[&ps[0], &ps[1]], &[&ds[0], &ds[1]])
        ),
        true,
    );
    let a = agent();
    let system = "One long system prompt that every request shares. ".repeat(20);
    for q in 0..10 {
        let (status, _, _) = post(
            &a,
            &proxy.url("/v1/completions"),
            &json!({"model": MODEL, "prompt": format!("{system} question {q}"), "max_tokens": 2}),
        );
        assert_eq!(status, 200);
    }
    let count = |n: &Proc| dummy_stats(n)["requests"].as_u64().unwrap();
    let prefill: Vec<u64> = ps.iter().map(count).collect();
    let decode: Vec<u64> = ds.iter().map(count).collect();
    assert!(
        prefill.contains(&10),
        "prefill followed the prefix: {prefill:?}"
    );
    // Round robin alternates (5/5 on a quiet machine); a decode node that misses a health
    // probe under load is skipped for a turn, so allow a little drift. Following the prefix
    // (the prefill policy) would have sent all ten to one node.
    assert!(
        decode.iter().all(|&d| (3..=7).contains(&d)) && decode.iter().sum::<u64>() == 10,
        "decode went round robin: {decode:?}"
    );
    let (_, v) = get_json(&proxy.url("/status"));
    let m = &v["models"][0];
    assert_eq!(m["prefill_scheduler"], "cache_aware", "{m}");
    assert_eq!(m["decode_scheduler"], "roundrobin", "{m}");
}

/// `replicas` proxies (separate processes, two workers each) in front of the same four
/// nodes, which publish KV events; with `sync`, each lists the others in
/// `prefix_sync.peers`. Many prefix groups; each request on a fresh connection to the
/// replicas in turn, a group's requests close together (four client threads take them in
/// order), so a group's first requests reach every replica (and both workers) before any
/// has learned anything. With `burst`, the groups' first requests come first, one after
/// another, so that new groups are placed before the engines' events say where the others
/// went. Returns per group the requests each node served, and the groups the first replica
/// had counted on each node before them (the warm-up's).
fn prefix_groups(
    policy: &str,
    replicas: usize,
    sync: bool,
    burst: bool,
) -> (Vec<Vec<usize>>, Vec<u64>) {
    const GROUPS: usize = 12;
    const PER_GROUP: usize = 20;
    let nodes: Vec<Proc> = (0..4)
        // A prefill takes a little time, so a group's requests overlap.
        .map(|_| kv_dummy(4000, &["--prefill-delay-per-token", "0.0001"]))
        .collect();
    let yaml = format!(
        "{}scheduling: {policy}\nadmin_api_key: adm\n{}{FAST_PROBES}",
        dual_yaml(&nodes.iter().collect::<Vec<_>>()),
        kv_events_yaml(&nodes)
    );
    let paths: Vec<_> = (0..replicas).map(|_| write_config(&yaml)).collect();
    let replicas: Vec<Proc> = paths.iter().map(|p| proxy_on(p, true)).collect();
    let n = replicas.len();
    if sync {
        // Each replica's peers are the others; a reload applies the list.
        for (k, path) in paths.iter().enumerate() {
            let peers: Vec<String> = (0..n)
                .filter(|&o| o != k)
                .map(|o| format!("\"{}\"", replicas[o].addr))
                .collect();
            let peers = peers.join(", ");
            std::fs::write(path, format!("{yaml}prefix_sync:\n  peers: [{peers}]\n")).unwrap();
            let reloaded = agent()
                .post(&replicas[k].url("/admin/reload"))
                .set("X-API-Key", "adm")
                .call()
                .expect("reload");
            assert_eq!(reloaded.status(), 200);
        }
    }
    let send = |replica: usize, rid: &str, prompt: &[u32]| {
        let resp = agent()
            .post(&replicas[replica].url("/v1/completions"))
            .set("X-Request-Id", rid)
            .send_json(json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}))
            .expect("request");
        assert_eq!(resp.status(), 200);
    };
    // Every replica receives every node's events before the groups start (a SUB socket
    // misses what is published before it is connected): distinct warm-up prompts (each a
    // group of its own) until each replica has seen a batch from each node and (kv_aware
    // without sync) has seen the engines store prompts it did not send, so that it knows it
    // is not the only router and deals new groups by what every replica sees alike.
    let mut w = 0u32;
    let kv_status = |r: &Proc, k: &str| -> Vec<u64> {
        let status = get_json(&r.url("/status/instances")).1;
        let list = status["instances"].as_array().cloned().unwrap_or_default();
        list.iter()
            .map(|i| i["kv_events"][k].as_u64().unwrap_or(0))
            .collect()
    };
    let others_seen = policy == "kv_aware" && n > 1 && !sync;
    wait_for(
        "every replica to receive every node's KV events",
        Duration::from_secs(30),
        || {
            w += 1;
            send(
                w as usize % n,
                &format!("w{w}"),
                &(0..32).map(|t| 900_000 + w * 100 + t).collect::<Vec<_>>(),
            );
            replicas.iter().all(|r| {
                kv_status(r, "batches").iter().all(|&b| b > 0)
                    && (!others_seen || kv_status(r, "unsent_chains").iter().any(|&u| u > 0))
            })
        },
    );
    // The groups each replica has counted on each node (`prefix_groups`).
    let groups = |r: &Proc| -> Vec<u64> {
        let v = get_json(&r.url("/status/instances")).1;
        let list = v["instances"].as_array().cloned().unwrap_or_default();
        nodes
            .iter()
            .map(|n| {
                list.iter()
                    .find(|i| i["address"] == n.addr.to_string())
                    .and_then(|i| i["prefix_groups"].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    };
    let counted_before = groups(&replicas[0]);
    // Group g: 256 shared tokens (16 blocks), then 16 of the request's own.
    let prompt = |g: usize, q: usize| -> Vec<u32> {
        let mut t: Vec<u32> = (0..256).map(|k| 10_000 + g as u32 * 1000 + k).collect();
        t.extend([500_000 + q as u32; 16]);
        t
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if j >= GROUPS * PER_GROUP {
                    break;
                }
                let (g, q) = match burst {
                    true => (j % GROUPS, j / GROUPS),
                    false => (j / PER_GROUP, j % PER_GROUP),
                };
                send(j % n, &format!("g{g}-q{q}"), &prompt(g, q));
            });
        }
    });
    let mut by_group = vec![vec![0usize; nodes.len()]; GROUPS];
    for (n, d) in nodes.iter().enumerate() {
        for r in received(d) {
            let rid = r["request_id"].as_str().unwrap_or("");
            if let Some(rest) = rid.strip_prefix('g') {
                let g: usize = rest[..rest.find('-').unwrap()].parse().unwrap();
                by_group[g][n] += 1;
            }
        }
    }
    let total: usize = by_group.iter().flatten().sum();
    assert_eq!(total, GROUPS * PER_GROUP, "{by_group:?}");
    if sync {
        // The replicas count the same groups on the same nodes once the last placements
        // have crossed.
        let agree = poll_until(Duration::from_secs(30), || {
            replicas.iter().all(|r| groups(r) == groups(&replicas[0]))
        });
        let sync = |r: &Proc| -> Vec<f64> {
            ["sent", "failed", "dropped", "received", "conflict"]
                .iter()
                .map(|o| {
                    metric(
                        r,
                        &format!("proxy_prefix_sync_placements_total{{outcome=\"{o}\"}}"),
                    )
                })
                .collect()
        };
        assert!(
            agree,
            "the replicas count different groups per node after 30 s: {:?}; placements \
             sent/failed/dropped/received/conflict: {:?}; requests per node per group: \
             {by_group:?}",
            replicas.iter().map(groups).collect::<Vec<_>>(),
            replicas.iter().map(sync).collect::<Vec<_>>(),
        );
    }
    for r in &replicas {
        assert_counters_zero(r);
        if sync {
            let received = metric(
                r,
                "proxy_prefix_sync_placements_total{outcome=\"received\"}",
            );
            assert!(received > 0.0, "no placement received from its peer");
        }
    }
    (by_group, counted_before)
}

/// Prefix affinity, as issue 16 and the bench measure it: of all requests, the share that
/// reached its group's main node, at least 95 %. (Per group it is usually 100 %; on a
/// loaded CI machine one group of twelve has been seen split 9/11 between the replicas'
/// choices, cause not yet found — docs/scheduling.md.) At most one group may split.
fn assert_each_group_on_one_node(policy: &str, by_group: &[Vec<usize>]) {
    eprintln!("{policy}: requests per node, per group: {by_group:?}");
    let total: usize = by_group.iter().flatten().sum();
    let on_main: usize = by_group.iter().map(|c| *c.iter().max().unwrap()).sum();
    assert!(
        on_main as f64 >= 0.95 * total as f64,
        "{policy}: prefix affinity {on_main}/{total} below 95 %: {by_group:?}"
    );
    let split = by_group
        .iter()
        .filter(|c| (*c.iter().max().unwrap() as f64) < 0.95 * c.iter().sum::<usize>() as f64)
        .count();
    assert!(split <= 1, "{policy}: {split} groups split: {by_group:?}");
    let used = (0..4)
        .filter(|&n| by_group.iter().any(|c| c[n] > 0))
        .count();
    assert!(used >= 3, "{policy}: groups piled up: {by_group:?}");
}

/// Twelve groups dealt over four nodes: three each when no two new groups race, never
/// fewer than two or more than four.
fn assert_dealt_evenly(policy: &str, by_group: &[Vec<usize>]) {
    let mut groups = [0usize; 4];
    for c in by_group {
        let main = (0..4).max_by_key(|&n| c[n]).unwrap();
        groups[main] += 1;
    }
    assert!(
        groups.iter().all(|&g| (2..=4).contains(&g)),
        "{policy}: groups per node {groups:?}: {by_group:?}"
    );
}

/// With the replicas sharing their placements (`prefix_sync`), cache_aware deals the
/// groups out over the nodes and both replicas follow the same placement.
#[test]
fn cache_aware_prefix_groups_stay_on_one_node_across_two_replicas() {
    let (by_group, _) = prefix_groups("cache_aware", 2, true, false);
    assert_each_group_on_one_node("cache_aware", &by_group);
    assert_dealt_evenly("cache_aware", &by_group);
}

/// kv_aware's replicas agree through the engines' events alone, once each has seen the
/// engines store prompts it did not send.
#[test]
fn kv_aware_prefix_groups_stay_on_one_node_across_two_replicas() {
    let (by_group, _) = prefix_groups("kv_aware", 2, false, false);
    assert_each_group_on_one_node("kv_aware", &by_group);
}

/// One kv_aware proxy (two workers) deals a burst of new groups by its own counts: the
/// groups' first requests come before the engines' events say where any went. With the
/// warm-up's groups, every node ends with as many groups as any other, give or take one
/// (dealt by the engines' blocks instead, 7 of 8 runs ended 2 apart or more).
#[test]
fn one_kv_aware_proxy_deals_a_burst_of_groups_evenly() {
    let (by_group, before) = prefix_groups("kv_aware", 1, false, true);
    assert_each_group_on_one_node("kv_aware", &by_group);
    let mut total = before.clone();
    for c in &by_group {
        total[(0..4).max_by_key(|&n| c[n]).unwrap()] += 1;
    }
    let (most, least) = (total.iter().max().unwrap(), total.iter().min().unwrap());
    assert!(
        most - least <= 1,
        "groups per node {total:?} (warm-up's {before:?}): {by_group:?}"
    );
}

/// With `prefix_sync`, kv_aware's replicas also deal new groups by the count both see.
#[test]
fn kv_aware_replicas_that_share_placements_deal_groups_evenly() {
    let (by_group, _) = prefix_groups("kv_aware", 2, true, false);
    assert_each_group_on_one_node("kv_aware", &by_group);
    assert_dealt_evenly("kv_aware", &by_group);
}

/// Replicas tell each other their requests in flight per instance (`prefix_sync` load
/// reports): a node a peer has just filled gets no new work from this replica, although
/// its own scrape of the node (taken at the start, the next one 30 s away) shows it idle.
#[test]
fn a_replica_steers_around_what_its_peer_has_in_flight() {
    // Requests that stay a while: 40 tokens at 50 ms each.
    let busy = dummy("dual", &["--decode-delay-per-token", "0.05"]);
    let idle = dummy("dual", &["--decode-delay-per-token", "0.05"]);
    let scrape = "admin_api_key: adm\nengine_metrics:\n  interval_seconds: 30\n";
    // B routes to both nodes by load; A sends only to `busy` and reports to B.
    let b = proxy_with(
        &format!(
            "{}scheduling: loadbalanced\n{scrape}",
            dual_yaml(&[&busy, &idle])
        ),
        true,
    );
    let a = proxy_with(
        &format!(
            "{}{scrape}prefix_sync:\n  peers: [\"{}\"]\n",
            dual_yaml(&[&busy]),
            b.addr
        ),
        true,
    );
    let peer_requests = |node: &Proc| -> u64 {
        let v = get_json(&b.url("/status/instances")).1;
        v["instances"]
            .as_array()
            .and_then(|l| l.iter().find(|i| i["address"] == node.addr.to_string()))
            .and_then(|i| i["engine"]["peer_requests"].as_u64())
            .unwrap_or(0)
    };
    std::thread::scope(|s| {
        for k in 0..4 {
            let a = &a;
            s.spawn(move || {
                let resp = agent()
                    .post(&a.url("/v1/completions"))
                    .send_json(
                        json!({"model": MODEL, "prompt": format!("long {k}"), "max_tokens": 40}),
                    )
                    .expect("request through A");
                assert_eq!(resp.status(), 200);
            });
        }
        wait_for(
            "B to hear of A's four requests on the busy node",
            Duration::from_secs(10),
            || peer_requests(&busy) == 4,
        );
        for k in 0..4 {
            let resp = agent()
                .post(&b.url("/v1/completions"))
                .set("X-Request-Id", &format!("via-b-{k}"))
                .send_json(json!({"model": MODEL, "prompt": "short", "max_tokens": 1}))
                .expect("request through B");
            assert_eq!(resp.status(), 200);
        }
    });
    let from_b = |node: &Proc| {
        received(node)
            .iter()
            .filter(|r| {
                r["request_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("via-b-"))
            })
            .count()
    };
    assert_eq!((from_b(&busy), from_b(&idle)), (0, 4));
    // A's requests are done: its next reports say so.
    wait_for(
        "B to hear that A's requests are done",
        Duration::from_secs(10),
        || peer_requests(&busy) == 0,
    );
}

/// A peer replica that is down costs nothing but the sharing: every request is served, the
/// placements that could not be sent are counted. The receiving endpoint is the admin
/// API's: no key, no entry; a malformed batch is a 400 in the OpenAI error shape.
#[test]
fn prefix_sync_with_a_dead_peer_never_affects_serving() {
    let node = dummy("dual", &[]);
    let peer = dead_address();
    let proxy = proxy_with(
        &format!(
            "{}scheduling: cache_aware\nadmin_api_key: adm\nprefix_sync:\n  peers: [\"{peer}\"]\n",
            dual_yaml(&[&node])
        ),
        true,
    );
    for g in 0..8 {
        let prompt = format!("group {g}: {}", "a long shared system prompt. ".repeat(10));
        let resp = agent()
            .post(&proxy.url("/v1/completions"))
            .send_json(json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}))
            .expect("served");
        assert_eq!(resp.status(), 200);
    }
    let failed = "proxy_prefix_sync_placements_total{outcome=\"failed\"}";
    wait_for(
        "the unsent placements to be counted",
        Duration::from_secs(20),
        || metric(&proxy, failed) >= 8.0,
    );
    let post = |key: Option<&str>, body: &str| {
        let mut req = agent().post(&proxy.url("/admin/prefixes"));
        if let Some(k) = key {
            req = req.set("X-API-Key", k);
        }
        match req.send_string(body) {
            Ok(r) => (r.status(), r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(s, r)) => (s, r.into_json::<Value>().unwrap_or(Value::Null)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(post(None, r#"{"placements": []}"#).0, 401);
    let (status, body) = post(Some("adm"), "{not json");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let one = format!(
        r#"{{"placements": [{{"model": "{MODEL}", "role": "dual", "instance": "{}", "key": 7, "hashes": [7, 8]}}]}}"#,
        node.addr
    );
    assert_eq!(
        post(Some("adm"), &one),
        (200, json!({"taken": 1, "skipped": 0, "load": 0}))
    );
}
