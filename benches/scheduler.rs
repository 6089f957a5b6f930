//! Pick latency per policy with 8 and 128 instances; cache_aware with 4 KiB prompts and a
//! full prefix index. Run: `cargo bench --bench scheduler`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::sync::Arc;
use xpyd::config::{Role, SchedulerKind, SchedulingOptions};
use xpyd::instance::{Health, InFlight, Instance};
use xpyd::scheduler::{self, PickContext};

fn instances(n: usize) -> Vec<Arc<Instance>> {
    (0..n)
        .map(|k| {
            let addr = format!("10.0.{}.{}:8000", k / 200, k % 200 + 1);
            let i = Instance::new(
                addr.clone(),
                addr.parse().unwrap(),
                Role::Decode,
                Arc::from("m"),
            );
            i.set_health(Health::Healthy);
            Arc::new(i)
        })
        .collect()
}

fn picks(c: &mut Criterion) {
    let opts = SchedulingOptions::default();
    for n in [8usize, 128] {
        let inst = instances(n);
        // Some load so that comparisons are not all ties.
        let _load: Vec<InFlight> = inst
            .iter()
            .enumerate()
            .map(|(k, i)| InFlight::new(i.clone(), (k * 37 % 11) as u64 * 100, (k % 5) as u64))
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

/// Tokenizing a completion prompt with the test tokenizer (a 2,000-token byte-level BPE):
/// the cost a worker pays when a policy or the context check needs exact tokens.
fn tokenize(c: &mut Criterion) {
    let root = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/engine/tokenizers"
    ));
    xpyd::tokenize::load(root, &["test-model".to_string()]);
    let t = xpyd::tokenize::get("test-model").expect("test tokenizer");
    for kib in [1usize, 4] {
        let text: String = "The proxy routes each request to the instance that holds its prefix. "
            .repeat(kib * 1024 / 70 + 1)[..kib * 1024]
            .to_string();
        c.bench_function(&format!("tokenize/{kib}KiB"), |b| {
            b.iter(|| black_box(xpyd::tokenize::encode(&t, &text)))
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = picks, tokenize
}
criterion_main!(benches);
