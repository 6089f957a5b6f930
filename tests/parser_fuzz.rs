//! Property tests over the parsers that face the network: whatever the bytes, they return an
//! answer and never panic; chunked coding round-trips under any split. Clients send heads and
//! bodies; engines send heads, bodies, their `/metrics` text and KV-event batches.

use proptest::prelude::*;
use rmpv::Value as Msg;
use xpyd::engine_load as metrics_text;
use xpyd::http::chunked::{encode_chunk, ChunkedDecoder, LAST_CHUNK};
use xpyd::http::head::{parse_request, parse_response};
use xpyd::kv_index::KvIndex;
use xpyd::proxy::kv_events::{decode_batch, Learned};
use xpyd::proxy::{inspect, prefill_body, Endpoint};

const VALID: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 12\r\nTransfer-Encoding: chunked\r\nX-Request-Id: r\r\n\r\n";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_head_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_request(&bytes);
        let _ = parse_response(&bytes, false);
    }

    #[test]
    fn mutated_valid_heads_never_panic(pos in 0..VALID.len(), byte in any::<u8>(), cut in 0..VALID.len()) {
        let mut v = VALID.to_vec();
        v[pos] = byte;
        let _ = parse_request(&v);
        let _ = parse_request(&v[..cut]);
    }

    #[test]
    fn chunked_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut d = ChunkedDecoder::new();
        if let Ok(n) = d.feed(&bytes, |_| {}) {
            prop_assert!(n <= bytes.len());
        }
    }

    #[test]
    fn chunked_round_trips_under_any_split(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20),
        splits in proptest::collection::vec(1usize..64, 1..50),
    ) {
        let mut wire = Vec::new();
        for c in &chunks {
            encode_chunk(&mut wire, c);
        }
        wire.extend_from_slice(LAST_CHUNK);
        wire.extend_from_slice(b"NEXT");
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut pos = 0;
        let mut k = 0;
        while !d.is_done() && pos < wire.len() {
            let end = (pos + splits[k % splits.len()]).min(wire.len());
            pos += d.feed(&wire[pos..end], |s| out.extend_from_slice(s)).unwrap();
            k += 1;
        }
        prop_assert!(d.is_done());
        prop_assert_eq!(out, chunks.concat());
        prop_assert_eq!(&wire[pos..], b"NEXT");
    }

    #[test]
    fn request_body_inspection_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        for ep in [Endpoint::Completions, Endpoint::ChatCompletions] {
            if let Ok(i) = inspect(ep, &bytes) {
                // A body that passed inspection always yields a valid JSON prefill body.
                let p = prefill_body(&i.obj);
                prop_assert!(serde_json::from_slice::<serde_json::Value>(&p).is_ok());
            }
        }
    }

    #[test]
    fn json_like_bodies_round_trip(prompt in ".{0,64}", extra in proptest::collection::vec(("[a-z_]{1,8}", any::<i32>()), 0..6)) {
        let mut obj = serde_json::Map::new();
        obj.insert("prompt".into(), prompt.clone().into());
        obj.insert("stream".into(), true.into());
        for (k, v) in extra {
            obj.insert(k, v.into());
        }
        let body = serde_json::to_vec(&obj).unwrap();
        let i = inspect(Endpoint::Completions, &body).unwrap();
        let p: serde_json::Value = serde_json::from_slice(&prefill_body(&i.obj)).unwrap();
        prop_assert_eq!(&p["prompt"], &serde_json::Value::from(prompt));
        prop_assert_eq!(&p["stream"], &serde_json::Value::from(false));
        prop_assert_eq!(&p["max_tokens"], &serde_json::Value::from(1));
    }

    #[test]
    fn engine_metrics_text_never_panics(text in "[ -~\n]{0,600}") {
        let _ = metrics_text::parse_metrics(&text);
        let _ = metrics_text::block_size(&text);
    }

    #[test]
    fn mutated_engine_metrics_never_panic(pos in 0..METRICS.len(), byte in 0x20u8..0x7f, cut in 0..METRICS.len()) {
        let mut t = METRICS.as_bytes().to_vec();
        t[pos] = byte;
        let t = String::from_utf8(t[..cut.max(pos + 1)].to_vec()).unwrap();
        let _ = metrics_text::parse_metrics(&t);
        let _ = metrics_text::block_size(&t);
    }

    #[test]
    fn kv_event_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok((_, events)) = decode_batch(&bytes) {
            apply_all(&events);
        }
    }

    /// Batches in vLLM's shape with any hashes, parents, token lists and block sizes (zero and
    /// huge included), then cut or with one byte changed: decoded and applied to an index, never
    /// a panic.
    #[test]
    fn kv_event_batches_never_panic(
        events in proptest::collection::vec((0u8..4, proptest::collection::vec(any::<u64>(), 0..6),
            proptest::option::of(any::<u64>()), proptest::collection::vec(any::<u32>(), 0..40),
            prop_oneof![Just(0u64), 1u64..20, Just(u64::MAX)]), 0..6),
        flip in any::<(usize, u8)>(),
        cut in any::<usize>(),
    ) {
        let batch = kv_batch(&events);
        let (_, decoded) = decode_batch(&batch).expect("a well-formed batch decodes");
        apply_all(&decoded);
        let mut mutated = batch.clone();
        let at = flip.0 % mutated.len();
        mutated[at] ^= flip.1;
        mutated.truncate(1 + cut % mutated.len());
        if let Ok((_, events)) = decode_batch(&mutated) {
            apply_all(&events);
        }
    }
}

const METRICS: &str =
    "# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 1.0
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25
vllm:prompt_tokens_total{engine=\"0\",model_name=\"m\"} 1234.0
vllm:generation_tokens_total{engine=\"0\",model_name=\"m\"} 567.0
vllm:cache_config_info{block_size=\"16\",engine=\"0\"} 1.0
";

/// An event's kind, block hashes, parent hash, token ids and block size.
type KvEvent = (u8, Vec<u64>, Option<u64>, Vec<u32>, u64);

/// A `KVEventBatch` as vLLM publishes it: `[ts, [event, …], data_parallel_rank]`, each event a
/// tagged array (0, 1: `BlockStored`, 2: `BlockRemoved`, 3: `AllBlocksCleared`).
fn kv_batch(events: &[KvEvent]) -> Vec<u8> {
    let hashes = |hs: &[u64]| Msg::Array(hs.iter().map(|&h| Msg::from(h)).collect());
    let events = events
        .iter()
        .map(|(kind, hs, parent, tokens, block_size)| match kind {
            0 | 1 => Msg::Array(vec![
                Msg::from("BlockStored"),
                hashes(hs),
                parent.map_or(Msg::Nil, Msg::from),
                Msg::Array(tokens.iter().map(|&t| Msg::from(t)).collect()),
                Msg::from(*block_size),
                Msg::Nil,
                Msg::from("GPU"),
                Msg::Nil,
            ]),
            2 => Msg::Array(vec![
                Msg::from("BlockRemoved"),
                hashes(hs),
                Msg::from("GPU"),
            ]),
            _ => Msg::Array(vec![Msg::from("AllBlocksCleared")]),
        })
        .collect();
    let mut out = Vec::new();
    rmpv::encode::write_value(
        &mut out,
        &Msg::Array(vec![Msg::F64(1.5), Msg::Array(events), Msg::from(0)]),
    )
    .unwrap();
    out
}

fn apply_all(events: &[xpyd::proxy::kv_events::Event]) {
    let idx = KvIndex::new(1024);
    let mut learned = Learned::new(3);
    for (i, e) in events.iter().enumerate() {
        learned.apply(&idx, e, i as u64 * 1000);
    }
}
