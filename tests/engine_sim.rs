//! xpyd-dummy as a loaded vLLM engine: KV-cache events decoded by Python's msgspec into
//! vLLM's own structs (over a real ZeroMQ SUB socket), prefix-cache hits, KV-cache capacity
//! and eviction, preemption, the batch limit's queue, and vLLM's metrics parsed by
//! prometheus_client.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// vLLM's structs (vllm/distributed/kv_events.py, current main / 0.33), a strict typed
/// msgspec decoder, and vLLM's block hash recomputed from each BlockStored's token ids.
const SUBSCRIBER: &str = r#"
import hashlib, json, os, pickle, sys
from typing import Any
import msgspec, zmq

class EventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None

class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass

class BlockStored(KVCacheEvent):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None

class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None

class AllBlocksCleared(KVCacheEvent):
    pass

class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]

def sha256(x):
    return hashlib.sha256(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)).digest()

NONE_HASH = sha256(sys.argv[2])
full = {}  # external hash -> full digest, to chain from a parent

dec = msgspec.msgpack.Decoder(type=KVEventBatch)
s = zmq.Context().socket(zmq.SUB)
s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect(sys.argv[1])
print(json.dumps({"ready": True}), flush=True)
while True:
    topic, seq, payload = s.recv_multipart()
    batch = dec.decode(payload)
    out = []
    for e in batch.events:
        d = {"type": type(e).__name__}
        for f in e.__struct_fields__:
            d[f] = getattr(e, f)
        if isinstance(e, BlockStored):
            parent = NONE_HASH if e.parent_block_hash is None else full[e.parent_block_hash]
            ok = True
            for k, h in enumerate(e.block_hashes):
                toks = tuple(e.token_ids[k * e.block_size:(k + 1) * e.block_size])
                digest = sha256((parent, toks, None))
                ok = ok and h == int.from_bytes(digest, "big") & ((1 << 64) - 1)
                full[h] = digest
                parent = digest
            d["hashes_match_vllm"] = ok
        out.append(d)
    print(json.dumps({"topic": topic.decode(), "seq": int.from_bytes(seq, "big"),
                      "dp": batch.data_parallel_rank, "ts": batch.ts, "events": out}), flush=True)
"#;

struct Subscriber {
    _child: KillOnDrop,
    lines: Receiver<Value>,
}

impl Subscriber {
    fn start(endpoint: &str, seed: &str) -> Subscriber {
        let venv = python_venv(&[("msgspec", "msgspec"), ("zmq", "pyzmq")]);
        let mut child = Command::new(venv.join("bin/python"))
            .args(["-c", SUBSCRIBER, endpoint, seed])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(serde_json::from_str(&l).unwrap()).is_err() {
                    return;
                }
            }
        });
        let s = Subscriber {
            _child: KillOnDrop(child),
            lines: rx,
        };
        assert_eq!(s.next(Duration::from_secs(30))["ready"], true);
        s
    }

    fn next(&self, within: Duration) -> Value {
        self.lines
            .recv_timeout(within)
            .expect("no KV-event batch arrived in time")
    }
}

/// A `mode` node with a KV cache of 100 blocks and a prefill of 5 ms per prompt token (400
/// tokens: 2 s), slow enough that cached and computed prefixes differ by far.
fn slow_prefill_node(mode: &str) -> Proc {
    dummy(
        mode,
        &[
            "--kv-cache-blocks",
            "100",
            "--prefill-delay-per-token",
            "0.005",
        ],
    )
}

/// The node's `/metrics`, parsed.
fn node_metrics(node: &Proc) -> Vec<Value> {
    parse_exposition(
        &ureq::get(&node.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
}

fn post_ok(node: &Proc, path: &str, body: &Value) -> Value {
    let (status, _, v) = post(&agent(), &node.url(path), body);
    assert_eq!(status, 200, "{v}");
    v
}

/// `n` one-token words: the built-in tokenizer gives one token per word of up to 4 bytes.
fn words(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{prefix}{}", i % 100))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn kv_events_decode_into_vllm_structs_in_order() {
    let port = free_port();
    let pub_ep = format!("tcp://*:{port}");
    let d = {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xpyd-dummy"));
        cmd.args([
            "--port",
            "0",
            "--mode",
            "dual",
            "--model",
            MODEL,
            "--workers",
            "1",
        ])
        .args([
            "--prefill-delay-per-token",
            "0",
            "--decode-delay-per-token",
            "0",
        ])
        .args(["--kv-cache-blocks", "6", "--block-size", "4"])
        .args([
            "--kv-events-endpoint",
            &pub_ep,
            "--kv-events-topic",
            "kv@test",
        ])
        .env("PYTHONHASHSEED", "42");
        spawn_listening(cmd)
    };
    let sub = Subscriber::start(&format!("tcp://127.0.0.1:{port}"), "42");
    // A subscription takes effect asynchronously: publish AllBlocksCleared (a reset of the
    // idle cache) until the subscriber sees one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        post_ok(&d, "/reset_prefix_cache", &json!({}));
        if let Ok(b) = sub.lines.recv_timeout(Duration::from_millis(100)) {
            break b;
        }
        assert!(Instant::now() < deadline, "subscriber never got an event");
    };
    assert_eq!(first["topic"], "kv@test");
    assert_eq!(first["dp"], 0);
    assert_eq!(first["events"], json!([{"type": "AllBlocksCleared"}]));
    let mut seq = first["seq"].as_u64().unwrap();
    let mut next = || {
        let b = sub.next(Duration::from_secs(20));
        seq += 1;
        assert_eq!(
            b["seq"].as_u64(),
            Some(seq),
            "sequence numbers are consecutive"
        );
        // Resets sent before the subscription took effect may still trail in.
        (b["events"] != json!([{"type": "AllBlocksCleared"}])).then_some(b)
    };
    let mut batch = || loop {
        if let Some(b) = next() {
            return b;
        }
    };

    // 10 prompt tokens: two full blocks of 4 are stored (the tail of 2 tokens is not).
    let prompt = words("a", 10);
    let toks = post_ok(&d, "/tokenize", &json!({"prompt": prompt}))["tokens"].clone();
    let r = post_ok(
        &d,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 1}),
    );
    assert_eq!(r["usage"]["prompt_tokens"], 10);
    let b = batch();
    let ev = &b["events"][0];
    assert_eq!(b["events"].as_array().unwrap().len(), 1);
    assert_eq!(ev["type"], "BlockStored");
    assert_eq!(ev["parent_block_hash"], Value::Null);
    assert_eq!(ev["token_ids"], json!(toks.as_array().unwrap()[..8]));
    assert_eq!(ev["block_size"], 4);
    assert_eq!(ev["lora_id"], Value::Null);
    assert_eq!(ev["medium"], "GPU");
    assert_eq!(ev["lora_name"], Value::Null);
    assert_eq!(ev["extra_keys"], Value::Null);
    assert_eq!(ev["hashes_match_vllm"], true, "{ev}");
    let stored = ev["block_hashes"].as_array().unwrap().clone();
    assert_eq!(stored.len(), 2);

    // The same 8 tokens then 4 more: two blocks hit, the third is stored chained to them.
    let longer = format!("{prompt} b0 b1 b2 b3");
    post_ok(
        &d,
        "/v1/completions",
        &json!({"prompt": longer, "max_tokens": 1}),
    );
    let ev = &batch()["events"][0];
    assert_eq!(ev["type"], "BlockStored");
    assert_eq!(ev["parent_block_hash"], stored[1]);
    assert_eq!(ev["block_hashes"].as_array().unwrap().len(), 1);
    assert_eq!(ev["hashes_match_vllm"], true, "{ev}");
    let third = ev["block_hashes"][0].clone();

    // 24 other tokens need all 6 blocks: the three cached ones are evicted, least recently
    // used first (the chain's tail first: vLLM frees a request's blocks in reverse).
    let other = words("c", 23);
    post_ok(
        &d,
        "/v1/completions",
        &json!({"prompt": other, "max_tokens": 1}),
    );
    let mut removed = Vec::new();
    let mut stored_other = 0;
    while removed.len() < 3 || stored_other == 0 {
        for ev in batch()["events"].as_array().unwrap() {
            match ev["type"].as_str().unwrap() {
                "BlockRemoved" => {
                    assert_eq!(ev["medium"], "GPU");
                    removed.extend(ev["block_hashes"].as_array().unwrap().clone());
                }
                "BlockStored" => {
                    assert_eq!(ev["hashes_match_vllm"], true, "{ev}");
                    stored_other += ev["block_hashes"].as_array().unwrap().len();
                }
                t => panic!("unexpected {t}"),
            }
        }
    }
    assert_eq!(removed, vec![third, stored[1].clone(), stored[0].clone()]);
    assert_eq!(stored_other, 5);
    // The evicted prefix is a miss again.
    let stats = dummy_stats(&d);
    assert_eq!(stats["prefix_cache_hits"], 8);
    post_ok(
        &d,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 1}),
    );
    assert_eq!(dummy_stats(&d)["prefix_cache_hits"], 8);

    // A request that can never fit the cache is refused, as vLLM refuses too-long prompts.
    let (status, _, v) = post(
        &agent(),
        &d.url("/v1/completions"),
        &json!({"prompt": words("z", 30), "max_tokens": 1}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("KV-cache blocks"));
}

#[test]
fn repeated_prefix_is_a_hit_and_skips_its_prefill() {
    let d = slow_prefill_node("dual");
    let prompt = words("p", 400);
    let ttft = || {
        let t0 = Instant::now();
        let s = stream(
            &agent(),
            &d.url("/v1/completions"),
            &json!({"prompt": prompt, "max_tokens": 2, "stream": true}),
        );
        assert_eq!(s.status, 200);
        s.events[0].0 - t0
    };
    let cold = ttft();
    assert!(cold >= Duration::from_millis(1950), "cold TTFT {cold:?}");
    // 24 of 25 blocks hit (vLLM always computes the last token): 16 tokens left, 80 ms.
    let warm = ttft();
    assert!(
        warm < Duration::from_millis(1000),
        "warm TTFT {warm:?} should skip the cached 384 tokens' prefill"
    );
    let m = node_metrics(&d);
    assert_eq!(value(&m, "vllm:prefix_cache_queries_total"), 800.0);
    assert_eq!(value(&m, "vllm:prefix_cache_hits_total"), 384.0);
    assert_eq!(value(&m, "vllm:prompt_tokens_total"), 800.0);
}

/// vLLM caches a prompt's blocks when it schedules them: a request that arrives while they
/// are still being computed hits them and gets its first token once they are done (after
/// the first request's), instead of computing the whole prefix a second time.
#[test]
fn a_prefix_still_being_computed_is_waited_for_not_recomputed() {
    let d = slow_prefill_node("dual");
    let prefix = words("p", 400);
    let first_token = |prompt: String| {
        let url = d.url("/v1/completions");
        std::thread::spawn(move || {
            let s = stream(
                &agent(),
                &url,
                &json!({"prompt": prompt, "max_tokens": 2, "stream": true}),
            );
            assert_eq!(s.status, 200);
            s.events[0].0
        })
    };
    let running = || {
        let m = node_metrics(&d);
        value(&m, "vllm:num_requests_running")
    };
    let a = first_token(prefix.clone());
    wait_for(
        "the first request to be scheduled",
        Duration::from_secs(10),
        || running() == 1.0,
    );
    // Same 400 tokens (25 full blocks) and 20 more, while the first is mid-prefill.
    let b = first_token(format!("{prefix} {}", words("q", 20)));
    let (ta, tb) = (a.join().unwrap(), b.join().unwrap());
    assert!(
        tb >= ta,
        "the second request's first token came before its prefix was computed"
    );
    let m = node_metrics(&d);
    // The second request hit all 25 blocks; computed from scratch it would hit none.
    assert_eq!(value(&m, "vllm:prefix_cache_hits_total"), 400.0);
}

#[test]
fn kv_cache_full_preempts_and_both_finish() {
    // 4 blocks of 4 tokens; two requests of 4 prompt tokens growing to 12 need 6.
    let d = dummy(
        "dual",
        &[
            "--kv-cache-blocks",
            "4",
            "--block-size",
            "4",
            "--decode-delay-per-token",
            "0.01",
        ],
    );
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let url = d.url("/v1/completions");
            std::thread::spawn(move || {
                let body = json!({"prompt": words(&format!("r{i}x"), 4), "max_tokens": 8});
                post(&agent(), &url, &body)
            })
        })
        .collect();
    for h in handles {
        let (status, _, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 8);
    }
    let st = dummy_stats(&d);
    assert!(st["preemptions"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["running"], 0);
    assert_eq!(st["kv_used_blocks"], 0);
}

#[test]
fn requests_beyond_max_num_seqs_wait_in_the_queue() {
    // Each request decodes 20 tokens at 50 ms: about 1 s in the batch.
    let d = dummy(
        "dual",
        &["--max-num-seqs", "2", "--decode-delay-per-token", "0.05"],
    );
    let t0 = Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let url = d.url("/v1/completions");
            std::thread::spawn(move || {
                let body = json!({"prompt": format!("q{i}"), "max_tokens": 20, "stream": true});
                let s = stream(&agent(), &url, &body);
                assert_eq!(s.status, 200);
                s.events[0].0
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = dummy_stats(&d);
        if st["running"] == 2 && st["waiting"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never 2 running + 1 waiting: {st}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut firsts: Vec<Duration> = handles
        .into_iter()
        .map(|h| h.join().unwrap() - t0)
        .collect();
    firsts.sort();
    // The third started only when one of the first two finished its ~1 s.
    assert!(
        firsts[2] >= Duration::from_millis(950),
        "the third request's first token came at {:?}",
        firsts[2]
    );
    let m = node_metrics(&d);
    assert!(value(&m, "vllm:request_queue_time_seconds_sum") >= 0.9);
    assert_eq!(value(&m, "vllm:request_queue_time_seconds_count"), 3.0);
    assert_eq!(value(&m, "vllm:num_requests_waiting"), 0.0);
}

#[test]
fn decode_node_skips_the_prefill_of_arrived_blocks() {
    let d = slow_prefill_node("decode");
    let prompt = words("k", 400);
    let ttft = |kv: Value| {
        let t0 = Instant::now();
        let s = stream(
            &agent(),
            &d.url("/v1/completions"),
            &json!({"prompt": prompt, "max_tokens": 1, "stream": true, "kv_transfer_params": kv}),
        );
        assert_eq!(s.status, 200);
        s.events[0].0 - t0
    };
    // The prefill node names 5 blocks (80 tokens): the other 320 cost 1.6 s here.
    let partial = ttft(json!({"remote_block_ids": [0, 1, 2, 3, 4]}));
    assert!(partial >= Duration::from_millis(1550), "{partial:?}");
    // A cache miss that arrived whole costs no prefill at all: the node computed none of
    // its tokens (counted, not timed).
    let computed = |d: &Proc| dummy_stats(d)["prefilled_tokens"].as_u64().unwrap();
    let before = computed(&d);
    let other = words("m", 400);
    let s = stream(
        &agent(),
        &d.url("/v1/completions"),
        &json!({"prompt": other, "max_tokens": 1, "stream": true,
                "kv_transfer_params": {"remote_block_ids": (0..25).collect::<Vec<u32>>()}}),
    );
    assert_eq!(s.status, 200);
    assert_eq!(
        computed(&d),
        before,
        "an arrived prompt was prefilled again"
    );
    // The partial one computed what had not arrived.
    assert!(
        before >= 320,
        "partial arrival computed {before} tokens, wanted >= 320"
    );
}

#[test]
fn vllm_metrics_parse_and_carry_every_name() {
    let d = dummy("dual", &["--kv-cache-blocks", "50", "--max-num-seqs", "4"]);
    post_ok(
        &d,
        "/v1/completions",
        &json!({"prompt": words("w", 40), "max_tokens": 3}),
    );
    post_ok(
        &d,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}),
    );
    let text = ureq::get(&d.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let m = parse_exposition(&text);
    for (family, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries", "counter"),
        ("vllm:prefix_cache_hits", "counter"),
        ("vllm:prompt_tokens", "counter"),
        ("vllm:generation_tokens", "counter"),
        ("vllm:num_preemptions", "counter"),
        ("vllm:request_success", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:inter_token_latency_seconds", "histogram"),
        ("vllm:request_queue_time_seconds", "histogram"),
        ("vllm:e2e_request_latency_seconds", "histogram"),
    ] {
        let s: Vec<&Value> = m.iter().filter(|s| s["family"] == family).collect();
        assert!(!s.is_empty(), "{family} missing from\n{text}");
        assert!(
            s.iter().all(|s| s["type"] == kind),
            "{family} is not a {kind}"
        );
        assert!(
            s.iter()
                .all(|s| s["labels"]["model_name"] == MODEL && s["labels"]["engine"] == "0"),
            "{family} labels"
        );
    }
    assert_eq!(value(&m, "vllm:generation_tokens_total"), 5.0);
    assert_eq!(value(&m, "vllm:time_to_first_token_seconds_count"), 2.0);
    // 2 + 1 gaps between the tokens of the two requests.
    assert_eq!(value(&m, "vllm:inter_token_latency_seconds_count"), 3.0);
    assert_eq!(value(&m, "vllm:e2e_request_latency_seconds_count"), 2.0);
    assert_eq!(value(&m, "vllm:num_requests_running"), 0.0);
    // Idle: blocks are free (cached ones count as free, as in vLLM).
    assert_eq!(value(&m, "vllm:kv_cache_usage_perc"), 0.0);
}

fn value(samples: &[Value], name: &str) -> f64 {
    samples
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["value"].as_f64())
        .unwrap_or_else(|| panic!("no sample {name}"))
}

#[test]
fn replay_socket_resends_buffered_batches() {
    let [port, replay] = free_ports(2)[..] else {
        unreachable!()
    };
    let d = dummy(
        "dual",
        &[
            "--kv-cache-blocks",
            "8",
            "--kv-events-endpoint",
            &format!("tcp://*:{port}"),
            "--kv-events-replay-endpoint",
            &format!("tcp://*:{replay}"),
        ],
    );
    // Three batches nobody subscribed to (seq 0, 1, 2).
    for _ in 0..3 {
        post_ok(&d, "/reset_prefix_cache", &json!({}));
    }
    // vLLM's replay protocol from a DEALER: ["", start_seq] → ["", seq, payload]... then
    // ["", -1, ""]. The publisher thread may still be sending: ask until all three are there.
    let venv = python_venv(&[("msgspec", "msgspec"), ("zmq", "pyzmq")]);
    let script = r#"
import json, sys, time, msgspec, zmq
s = zmq.Context().socket(zmq.DEALER)
s.connect(sys.argv[1])
deadline = time.time() + 20
while True:
    s.send_multipart([b"", (1).to_bytes(8, "big")])
    got = []
    while True:
        empty, seq, payload = s.recv_multipart()
        seq = int.from_bytes(seq, "big", signed=True)
        if seq == -1:
            assert payload == b""
            break
        got.append([seq, msgspec.msgpack.decode(payload)])
    if len(got) == 2 or time.time() > deadline:
        break
    time.sleep(0.05)
print(json.dumps(got))
"#;
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script, &format!("tcp://127.0.0.1:{replay}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let seqs: Vec<u64> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[0].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2], "replay from seq 1: {got}");
    assert_eq!(got[0][1]["events"], json!([{"type": "AllBlocksCleared"}]));
}

#[test]
fn hugging_face_tokenizer_counts_like_the_python_package() {
    let venv = python_venv(&[("tokenizers", "tokenizers")]);
    let dir = std::env::temp_dir().join(format!("xpyd-engine-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokenizer.json");
    let prompt = "hello the quick brown fox, simulated engines tokenize prompts";
    // A small BPE trained here, saved as tokenizer.json, and the ids Python gives.
    let script = r#"
import json, sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, processors
tok = Tokenizer(models.BPE(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50
                        + ["hello world, simulated engines tokenize prompts"] * 50,
                        trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<s>"]))
tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
tok.save(sys.argv[1])
print(json.dumps(tok.encode(sys.argv[2]).ids))
"#;
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .arg(&file)
        .arg(prompt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = dummy("dual", &["--tokenizer", file.to_str().unwrap()]);
    let got = post_ok(&d, "/tokenize", &json!({"prompt": prompt}));
    assert_eq!(
        got["tokens"], want,
        "special tokens added, as vLLM's completions do"
    );
    let r = post_ok(
        &d,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 1}),
    );
    assert_eq!(r["usage"]["prompt_tokens"], want.as_array().unwrap().len());
    let _ = std::fs::remove_dir_all(&dir);
}
