//! Pick latency per policy with 8 and 128 instances; cache_aware with 4 KiB prompts and a
//! full prefix index; kv_aware with a 1,024-token prompt, and with 2,048 such prompts over a
//! filled KV index and pending layer (with and without the engines' learned speed); what a tokenizer thread spends per KiB (completion
//! and chat) and the worker ↔ tokenizer-thread hand-off on each driver.
//! Run: `cargo bench --bench scheduler`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::Arc;
use xpyd::config::{Role, SchedulerKind, SchedulingOptions};
use xpyd::instance::{InFlight, Instance};
use xpyd::scheduler::testing::{instances, learn_speed};
use xpyd::scheduler::{self, PickContext};

fn picks(c: &mut Criterion) {
    let opts = SchedulingOptions::default();
    for n in [8usize, 128] {
        let inst = instances(n, Role::Decode);
        // Some load so that comparisons are not all ties.
        let _load: Vec<InFlight> = inst
            .iter()
            .enumerate()
            .map(|(k, i)| InFlight::new(i, (k * 37 % 11) as u64 * 100, (k % 5) as u64))
            .collect();
        for kind in [
            SchedulerKind::LoadBalanced,
            SchedulerKind::RoundRobin,
            SchedulerKind::ConsistentHash,
            SchedulerKind::PowerOfTwo,
        ] {
            let s = scheduler::build(kind, "m", Role::Decode, &opts, &inst);
            let mut k = 0u64;
            c.bench_function(&format!("pick/{}/{n}", kind.as_str()), |b| {
                b.iter(|| {
                    k += 1;
                    let key = k.to_string();
                    let ctx = PickContext {
                        key: Some(&key),
                        prompt_tokens: 100,
                        ..Default::default()
                    };
                    black_box(s.pick(&inst, &ctx))
                })
            });
        }
        // cache_aware: 4 KiB prompts, index filled to max_tree_size first.
        let s = scheduler::build(SchedulerKind::CacheAware, "m", Role::Decode, &opts, &inst);
        let prompts: Vec<Vec<u8>> = (0..4096)
            .map(|p| {
                format!("{p:05} {}", "lorem ipsum dolor sit amet ".repeat(160)).as_bytes()[..4096]
                    .to_vec()
            })
            .collect();
        let blocks_per_prompt = 4096 / 64;
        for p in prompts
            .iter()
            .cycle()
            .take(opts.max_tree_size / blocks_per_prompt + 64)
        {
            s.pick(
                &inst,
                &PickContext {
                    prompt_text: p,
                    ..Default::default()
                },
            );
        }
        kv_aware_full(c, &inst, n);
        let mut k = 0usize;
        c.bench_function(&format!("pick/cache_aware_4KiB_full/{n}"), |b| {
            b.iter(|| {
                k = (k + 1) % prompts.len();
                let ctx = PickContext {
                    prompt_text: &prompts[k],
                    prompt_tokens: 1024,
                    ..Default::default()
                };
                black_box(s.pick(&inst, &ctx))
            })
        });
    }
}

/// kv_aware: a 1,024-token prompt (64 blocks of 16) against an index where each instance
/// holds a different share of it, the pick including the block-chain hashing.
fn kv_aware(c: &mut Criterion) {
    use std::sync::atomic::Ordering;
    let idx = xpyd::kv_index::global();
    idx.block_size.store(16, Ordering::Relaxed);
    let opts = SchedulingOptions::default();
    for n in [8usize, 64] {
        let inst = instances(n, Role::Decode);
        let tokens: Vec<u32> = (0..1024u32).map(|t| t * 7 + n as u32).collect();
        let keys = xpyd::kv_index::prompt_keys(&tokens, 16);
        for (k, i) in inst.iter().enumerate() {
            i.kv_bit.store(k as u32 + 1, Ordering::Relaxed);
            for &key in &keys[..(k * 7) % keys.len()] {
                idx.add(key, k as u32); // the index bit is kv_bit - 1
            }
        }
        let s = scheduler::build(SchedulerKind::KvAware, "m", Role::Prefill, &opts, &inst);
        c.bench_function(&format!("pick/kv_aware_1024tok/{n}"), |b| {
            b.iter(|| {
                let ctx = PickContext {
                    tokens: Some(&tokens),
                    prompt_tokens: 1024,
                    ..Default::default()
                };
                black_box(s.pick(&inst, &ctx))
            })
        });
    }
}

/// kv_aware: 1,024-token prompts (64 blocks of 16), each stored in the KV index by one of
/// the instances (up to 64 publish events), the pending layer filled by earlier picks.
fn kv_aware_full(c: &mut Criterion, inst: &[Arc<Instance>], n: usize) {
    use std::sync::atomic::Ordering;
    use xpyd::kv_index;
    let idx = kv_index::global();
    idx.block_size.store(16, Ordering::Relaxed);
    for (k, i) in inst.iter().enumerate().take(kv_index::MAX_INSTANCES) {
        i.kv_bit.store(k as u32 + 1, Ordering::Relaxed);
    }
    let opts = SchedulingOptions::default();
    let s = scheduler::build(SchedulerKind::KvAware, "m", Role::Decode, &opts, inst);
    let prompts: Vec<Vec<u32>> = (0..2048u32)
        .map(|p| (0..1024).map(|t| p * 7919 + t * 31 % 30_000).collect())
        .collect();
    for (p, tokens) in prompts.iter().enumerate() {
        // Half the prompts' first 48 blocks are held by an instance; all were picked once.
        if p % 2 == 0 {
            for &key in &kv_index::prompt_keys(tokens, 16)[..48] {
                idx.add(key, (p % n.min(kv_index::MAX_INSTANCES)) as u32);
            }
        }
        s.pick(inst, &ctx_of(tokens));
    }
    let mut k = 0usize;
    c.bench_function(&format!("pick/kv_aware_1024tok_full/{n}"), |b| {
        b.iter(|| {
            k = (k + 1) % prompts.len();
            black_box(s.pick(inst, &ctx_of(&prompts[k])))
        })
    });
    // The same with every engine's speed and batch learned: the expected-first-token
    // estimate per instance (prefill and dual legs).
    learn_speed(inst);
    let s = scheduler::build(SchedulerKind::KvAware, "m", Role::Dual, &opts, inst);
    c.bench_function(&format!("pick/kv_aware_1024tok_full_speed/{n}"), |b| {
        b.iter(|| {
            k = (k + 1) % prompts.len();
            black_box(s.pick(inst, &ctx_of(&prompts[k])))
        })
    });
}

fn ctx_of(tokens: &[u32]) -> PickContext<'_> {
    PickContext {
        tokens: Some(tokens),
        prompt_tokens: tokens.len() as u64,
        ..Default::default()
    }
}

fn text(kib: usize) -> String {
    "The proxy routes each request to the instance that holds its prefix. "
        .repeat(kib * 1024 / 60 + 1)[..kib * 1024]
        .to_string()
}

/// What a tokenizer thread spends per prompt with the test tokenizer (a 2,000-token
/// byte-level BPE): a completion prompt, and chat messages through the chat template.
fn tokenize(c: &mut Criterion) {
    let root = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/engine/tokenizers"
    ));
    xpyd::tokenize::load(root, &["test-model".to_string()]);
    let m = xpyd::tokenize::get("test-model").expect("test tokenizer");
    for kib in [1usize, 4, 16] {
        let text = text(kib);
        c.bench_function(&format!("tokenize/completion_{kib}KiB"), |b| {
            b.iter(|| black_box(xpyd::tokenize::encode(&m.tokenizer, &text, true)))
        });
    }
    // A long shared prefix and a short new suffix, as the prefix groups send: tokenized
    // whole, and as the proxy does (pieces of the prefix kept from the earlier prompts).
    // Every suffix is new (a counter in front of it), so only the prefix's pieces are kept.
    let (prefix, suffix) = (text(12), text(1));
    let mut n = 0u64;
    let mut prompt = || {
        n += 1;
        format!("{prefix} question {n}: {suffix}")
    };
    c.bench_function("tokenize/shared_prefix_13KiB_whole", |b| {
        b.iter(|| black_box(xpyd::tokenize::encode(&m.tokenizer, &prompt(), true)))
    });
    c.bench_function("tokenize/shared_prefix_13KiB_pieces", |b| {
        b.iter(|| black_box(m.encode(&prompt(), true)))
    });
    let chat = m.chat.as_ref().expect("chat template");
    let messages = serde_json::json!([
        {"role": "system", "content": text(1)},
        {"role": "user", "content": text(3)},
    ])
    .to_string();
    let input = xpyd::tokenize::ChatInput {
        messages: messages.into(),
        tools: None,
        kwargs: None,
        add_generation_prompt: true,
    };
    c.bench_function("tokenize/chat_render_4KiB", |b| {
        b.iter(|| black_box(chat.render(&input)))
    });
    c.bench_function("tokenize/chat_4KiB", |b| {
        b.iter(|| {
            let t = chat.render(&input).unwrap();
            black_box(m.tokenizer.encode(t, false).map(|e| e.len()))
        })
    });
}

/// The hand-off itself: a worker task sends a tiny prompt to the tokenizer thread and
/// awaits the answer (queue, thread wake-up, mailbox byte, worker wake-up), on each driver;
/// `inline` is the same prompt tokenized in place, for the difference.
fn handoff(c: &mut Criterion) {
    let root = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/engine/tokenizers"
    ));
    xpyd::tokenize::load(root, &["test-model".to_string()]);
    xpyd::tokenize::start_threads(1).unwrap();
    let m = xpyd::tokenize::get("test-model").unwrap();
    c.bench_function("tokenize/handoff_inline", |b| {
        b.iter(|| black_box(xpyd::tokenize::encode(&m.tokenizer, "Hello, world", true)))
    });
    // Each driver's runtime lives on a thread of its own for the whole bench, as a worker's
    // does (a worker's mailbox belongs to the one runtime it runs); criterion asks it for
    // `iters` round trips and gets back the time they took.
    let uring = driver_thread(|| {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .map(|mut rt| move |f: Pending| rt.block_on(f))
            .expect("io_uring")
    });
    let epoll = driver_thread(|| {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .map(|mut rt| move |f: Pending| rt.block_on(f))
            .expect("epoll")
    });
    for (name, (ask, answer)) in [("io_uring", uring), ("epoll", epoll)] {
        c.bench_function(&format!("tokenize/handoff_{name}"), |b| {
            b.iter_custom(|iters| {
                ask.send(iters).unwrap();
                answer.recv().unwrap()
            })
        });
    }
}

type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;
type DriverLink = (
    std::sync::mpsc::Sender<u64>,
    std::sync::mpsc::Receiver<std::time::Duration>,
);

/// A thread running one monoio runtime that answers "time `iters` hand-offs".
fn driver_thread<R, F>(make: F) -> DriverLink
where
    F: FnOnce() -> R + Send + 'static,
    R: FnMut(Pending),
{
    let (ask, asked) = std::sync::mpsc::channel::<u64>();
    let (tell, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut run = make();
        let prompt = bytes::Bytes::from_static(b"\"Hello, world\"");
        run(Box::pin(async move {
            while let Ok(iters) = asked.recv() {
                if tell.send(run_iters(&prompt, iters).await).is_err() {
                    return;
                }
            }
        }));
    });
    (ask, answer)
}

async fn run_iters(prompt: &bytes::Bytes, iters: u64) -> std::time::Duration {
    let start = std::time::Instant::now();
    for _ in 0..iters {
        let input = xpyd::tokenize::Input::Completion(prompt.clone());
        black_box(xpyd::tokenize::token_ids("test-model", input).await);
    }
    start.elapsed()
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = picks, kv_aware, tokenize, handoff
}
criterion_main!(benches);
