//! Property tests over the parsers that face the network: whatever the bytes, they return an
//! answer and never panic; chunked coding round-trips under any split.

use proptest::prelude::*;
use xpyd::http::chunked::{encode_chunk, ChunkedDecoder, LAST_CHUNK};
use xpyd::http::head::{parse_request, parse_response};
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
}
