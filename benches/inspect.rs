//! What reading a request body costs (`xpyd::proxy::inspect`: the JSON split, the fields the
//! proxy needs), from an 80-character prompt to a 256 KiB one, completions and chat.
//! Run: `cargo bench --bench inspect`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use xpyd::proxy::{inspect, Endpoint};

/// Prose of about `len` bytes, as a prompt's text (no escapes), and with a newline and a
/// quote every few hundred bytes (escapes, as in code or documents).
fn prose(len: usize, escapes: bool) -> String {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "engine",
    ];
    let mut s = String::with_capacity(len + 16);
    let mut k = 0usize;
    while s.len() < len {
        s.push_str(words[k % words.len()]);
        s.push(' ');
        k += 1;
        if escapes && k.is_multiple_of(50) {
            s.push_str("\\n\\\"");
        }
    }
    s
}

fn bodies(c: &mut Criterion) {
    let mut g = c.benchmark_group("inspect");
    for (len, escapes) in [(80, false), (4096, false), (4096, true), (262_144, false)] {
        let body = format!(
            r#"{{"model":"bench-model","prompt":"{}","max_tokens":128,"temperature":0.7,"stream":true}}"#,
            prose(len, escapes)
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        let name = format!(
            "completion {len} B{}",
            if escapes { " escaped" } else { "" }
        );
        g.bench_function(name, |b| {
            b.iter(|| inspect(Endpoint::Completions, black_box(body.as_bytes())).is_ok())
        });
    }
    let chat = format!(
        r#"{{"model":"bench-model","messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":"{}"}}],"max_completion_tokens":256,"stream":true,"stream_options":{{"include_usage":true}}}}"#,
        prose(1024, false),
        prose(3072, true)
    );
    g.throughput(Throughput::Bytes(chat.len() as u64));
    g.bench_function("chat 4 KiB", |b| {
        b.iter(|| inspect(Endpoint::ChatCompletions, black_box(chat.as_bytes())).is_ok())
    });
    g.finish();
}

criterion_group!(benches, bodies);
criterion_main!(benches);
