//! vLLM's `ZmqEventPublisher`, for the simulated node: a PUB socket sending multipart
//! `[topic, seq (8-byte big-endian), payload]`, payload a msgpack `KVEventBatch` encoded as
//! msgspec encodes vLLM's structs, and an optional ROUTER socket answering replay requests
//! from a buffer of recent batches. Runs on its own thread: the node's workers hand it
//! batches through a bounded queue and never block on it (docs/cli.md, "KV events").

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;
use xpyd::dummy::kv_events::{KvEvent, KvEventSink, MEDIUM_GPU};

/// How msgspec lays the structs out: tagged maps (`{"type": "BlockStored", ...}`, vLLM's
/// current structs), tagged arrays (`["BlockStored", ...]`, `array_like=True` releases), or
/// releases whose batch is `array_like` (`[ts, events, rank]`) but whose events are tagged
/// maps — the layout vllm-router 0.1 reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Map,
    Array,
    Mixed,
}

pub struct Config {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub topic: String,
    pub format: Format,
    /// Batches kept for replay.
    pub buffer_steps: usize,
}

#[derive(Serialize)]
struct Batch<'a> {
    ts: f64,
    events: Vec<Ev<'a>>,
    data_parallel_rank: u32,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum Ev<'a> {
    BlockStored {
        block_hashes: &'a [u64],
        parent_block_hash: Option<u64>,
        token_ids: &'a [u32],
        block_size: usize,
        lora_id: Option<u32>,
        medium: Option<&'static str>,
        lora_name: Option<&'static str>,
    },
    BlockRemoved {
        block_hashes: &'a [u64],
        medium: Option<&'static str>,
    },
    AllBlocksCleared {},
}

/// One `KVEventBatch`, as vLLM's publisher encodes it.
pub fn encode(events: &[KvEvent], ts: f64, format: Format) -> Vec<u8> {
    let events = events
        .iter()
        .map(|e| match e {
            KvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
            } => Ev::BlockStored {
                block_hashes,
                parent_block_hash: *parent_block_hash,
                token_ids,
                block_size: *block_size,
                lora_id: None,
                medium: Some(MEDIUM_GPU),
                lora_name: None,
            },
            KvEvent::BlockRemoved { block_hashes } => Ev::BlockRemoved {
                block_hashes,
                medium: Some(MEDIUM_GPU),
            },
            KvEvent::AllBlocksCleared => Ev::AllBlocksCleared {},
        })
        .collect();
    let b = Batch {
        ts,
        events,
        data_parallel_rank: 0,
    };
    let r = match format {
        Format::Map => rmp_serde::to_vec_named(&b),
        Format::Array => rmp_serde::to_vec(&b),
        Format::Mixed => return encode_mixed(&b),
    };
    r.unwrap_or_default()
}

/// `[ts, [{"type": ...}, ...], rank]`: serde's struct layout is per serializer, so the
/// events are written as maps one by one and placed in a positional batch.
fn encode_mixed(b: &Batch) -> Vec<u8> {
    let events = b
        .events
        .iter()
        .filter_map(|e| rmp_serde::to_vec_named(e).ok())
        .filter_map(|bytes| rmpv::decode::read_value(&mut bytes.as_slice()).ok())
        .collect();
    let v = rmpv::Value::Array(vec![
        rmpv::Value::F64(b.ts),
        rmpv::Value::Array(events),
        rmpv::Value::from(b.data_parallel_rank),
    ]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &v);
    out
}

pub struct ZmqSink {
    tx: SyncSender<Vec<KvEvent>>,
    dropped: AtomicU64,
    /// The endpoint as bound or connected: with a wildcard port (`tcp://127.0.0.1:*`) the
    /// port the system chose, which the banner reports (tests bind this way: a port drawn
    /// beforehand can be taken by another process before the dummy binds it).
    pub endpoint: String,
}

impl KvEventSink for ZmqSink {
    fn publish(&self, events: Vec<KvEvent>) {
        if self.tx.try_send(events).is_err() {
            // vLLM's queue would block the engine; a simulator drops and says so.
            if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                xpyd::warn!("kv events: publisher queue full, dropping batches");
            }
        }
    }
}

/// Binds (or connects: vLLM's rule, bind when the address has `*`, `::`, or is ipc/inproc)
/// the sockets and starts the publisher thread.
pub fn start(cfg: Config) -> Result<std::sync::Arc<ZmqSink>, String> {
    let ctx = zmq::Context::new();
    let publ = ctx
        .socket(zmq::PUB)
        .map_err(|e| format!("zmq PUB socket: {e}"))?;
    publ.set_sndhwm(100_000)
        .map_err(|e| format!("zmq PUB high-water mark: {e}"))?;
    let ep = &cfg.endpoint;
    let bind = ep.contains('*')
        || ep.contains("::")
        || ep.starts_with("ipc://")
        || ep.starts_with("inproc://");
    if bind {
        publ.bind(ep)
    } else {
        publ.connect(ep)
    }
    .map_err(|e| format!("--kv-events-endpoint {ep}: {e}"))?;
    let endpoint = match publ.get_last_endpoint() {
        Ok(Ok(bound)) if bind => bound,
        _ => ep.clone(),
    };
    let replay = match &cfg.replay_endpoint {
        Some(r) => {
            let s = ctx
                .socket(zmq::ROUTER)
                .map_err(|e| format!("zmq ROUTER socket: {e}"))?;
            s.bind(r)
                .map_err(|e| format!("--kv-events-replay-endpoint {r}: {e}"))?;
            Some(s)
        }
        None => None,
    };
    let (tx, rx) = sync_channel(100_000);
    std::thread::Builder::new()
        .name("kv-events".into())
        .spawn(move || {
            let _ctx = ctx;
            run(cfg, publ, replay, rx)
        })
        .map_err(|e| format!("cannot start the KV-events thread: {e}"))?;
    Ok(std::sync::Arc::new(ZmqSink {
        tx,
        dropped: AtomicU64::new(0),
        endpoint,
    }))
}

const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

fn run(cfg: Config, publ: zmq::Socket, replay: Option<zmq::Socket>, rx: Receiver<Vec<KvEvent>>) {
    let topic = cfg.topic.as_bytes();
    let mut buffer: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut seq = 0u64;
    loop {
        if let Some(r) = &replay {
            while r.poll(zmq::POLLIN, 0).unwrap_or(0) > 0 {
                serve_replay(r, &buffer);
            }
        }
        let events = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let payload = encode(&events, ts, cfg.format);
        let frames: [&[u8]; 3] = [topic, &seq.to_be_bytes(), &payload];
        if let Err(e) = publ.send_multipart(frames, 0) {
            xpyd::warn!("kv events: send failed: {e}");
        }
        if cfg.buffer_steps > 0 {
            if buffer.len() == cfg.buffer_steps {
                buffer.pop_front();
            }
            buffer.push_back((seq, payload));
        }
        seq += 1;
    }
}

/// A replay request is `[identity, "", start_seq]`; the answer is every buffered batch from
/// `start_seq` on as `[identity, "", seq, payload]`, then `[identity, "", -1, ""]`.
fn serve_replay(r: &zmq::Socket, buffer: &VecDeque<(u64, Vec<u8>)>) {
    let Ok(frames) = r.recv_multipart(0) else {
        return;
    };
    let [id, _, start] = frames.as_slice() else {
        xpyd::warn!(
            "kv events: invalid replay request ({} frames)",
            frames.len()
        );
        return;
    };
    let start = match <[u8; 8]>::try_from(start.as_slice()) {
        Ok(b) => u64::from_be_bytes(b),
        Err(_) => return,
    };
    for (s, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        let f: [&[u8]; 4] = [id, b"", &s.to_be_bytes(), payload];
        let _ = r.send_multipart(f, 0);
    }
    let f: [&[u8]; 4] = [id, b"", &END_SEQ, b""];
    let _ = r.send_multipart(f, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_array_and_mixed_layouts() {
        let ev = [KvEvent::BlockRemoved {
            block_hashes: vec![7],
        }];
        let m = encode(&ev, 1.5, Format::Map);
        let v: rmpv_like::Value = rmp_serde::from_slice(&m).unwrap();
        assert_eq!(
            v,
            rmpv_like::map(
                1.5,
                "{\"type\":\"BlockRemoved\",\"block_hashes\":[7],\"medium\":\"GPU\"}"
            )
        );
        let a = encode(&ev, 1.5, Format::Array);
        let v: serde_json::Value = rmp_serde::from_slice(&a).unwrap();
        assert_eq!(
            v,
            serde_json::json!([1.5, [["BlockRemoved", [7], "GPU"]], 0])
        );
        let x = encode(&ev, 1.5, Format::Mixed);
        let v: serde_json::Value = rmp_serde::from_slice(&x).unwrap();
        assert_eq!(
            v,
            serde_json::json!([1.5, [{"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"}], 0])
        );
    }

    /// Decoding msgpack maps through serde_json keeps key order (preserve_order).
    mod rmpv_like {
        pub type Value = serde_json::Value;
        pub fn map(ts: f64, ev: &str) -> Value {
            let ev: Value = serde_json::from_str(ev).unwrap();
            serde_json::json!({"ts": ts, "events": [ev], "data_parallel_rank": 0})
        }
    }
}
