//! The KV-event subscriber: a control-side thread (never a worker) holding one ZeroMQ SUB
//! socket per instance that has a `kv_events` endpoint, decoding vLLM's `KVEventBatch`es and
//! keeping the global `kv_index` current. Sequence numbers are checked per instance: a gap
//! is filled from the publisher's replay socket when there is one, otherwise (and after a
//! publisher restart, whose sequence starts again) the instance's entries are dropped and
//! relearned from the events that follow. Nothing here can affect serving: a dead publisher
//! only means that instance's cached blocks are unknown (docs/scheduling.md, "KV events").

use super::contain::step;
use crate::instance::Instance;
use crate::kv_index::{self, KvIndex};
use crate::shared::Shared;
use rmpv::Value;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One decoded event (vLLM's `BlockStored`, `BlockRemoved`, `AllBlocksCleared`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        tokens: Vec<u32>,
        block_size: usize,
        lora: bool,
    },
    Removed {
        hashes: Vec<u64>,
    },
    Cleared,
}

/// A block hash as vLLM sends it: an int, or bytes (folded to 64 bits).
fn hash_of(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|x| x as u64)),
        Value::Binary(b) => Some(crate::hash::hash64(7, b)),
        _ => None,
    }
}

fn hashes_of(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(hash_of).collect())
        .unwrap_or_default()
}

/// A msgspec struct's fields, whether encoded as a tagged array (`[tag, f1, f2, ...]`) or a
/// tagged map (`{"type": tag, "f1": ...}`); `names` are the fields in declaration order.
fn fields<'v>(v: &'v Value, names: &[&str]) -> Option<(&'v str, Vec<Option<&'v Value>>)> {
    match v {
        Value::Array(a) => {
            let tag = a.first()?.as_str()?;
            Some((tag, (0..names.len()).map(|i| a.get(i + 1)).collect()))
        }
        Value::Map(m) => {
            let get = |k: &str| {
                m.iter()
                    .find(|(key, _)| key.as_str() == Some(k))
                    .map(|(_, v)| v)
            };
            let tag = get("type")?.as_str()?;
            Some((tag, names.iter().map(|n| get(n)).collect()))
        }
        _ => None,
    }
}

/// Decodes one `KVEventBatch` payload: `[ts, events, data_parallel_rank]` or its map form.
pub fn decode(payload: &[u8]) -> Result<Vec<Event>, String> {
    decode_batch(payload).map(|(_, e)| e)
}

/// The batch's publish time (`ts`, Unix seconds) and its events.
pub fn decode_batch(payload: &[u8]) -> Result<(Option<f64>, Vec<Event>), String> {
    let v = rmpv::decode::read_value(&mut &payload[..]).map_err(|e| format!("msgpack: {e}"))?;
    let ts = match &v {
        Value::Array(a) => a.first(),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| k.as_str() == Some("ts"))
            .map(|(_, v)| v),
        _ => None,
    }
    .and_then(Value::as_f64);
    let events = match &v {
        Value::Array(a) => a.get(1),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| k.as_str() == Some("events"))
            .map(|(_, v)| v),
        _ => None,
    }
    .and_then(Value::as_array)
    .ok_or("not a KVEventBatch")?;
    const STORED: &[&str] = &[
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ];
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let (tag, f) = fields(e, STORED).ok_or("an event is not a tagged struct")?;
        out.push(match tag {
            "BlockStored" => Event::Stored {
                hashes: f[0].map(hashes_of).unwrap_or_default(),
                parent: f[1].and_then(hash_of),
                tokens: f[2]
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_u64().map(|t| t as u32))
                            .collect()
                    })
                    .unwrap_or_default(),
                block_size: f[3].and_then(Value::as_u64).unwrap_or(0) as usize,
                lora: f[4].is_some_and(|v| !v.is_nil()),
            },
            // BlockRemoved's fields are (block_hashes, medium): the first is the same slot.
            "BlockRemoved" => Event::Removed {
                hashes: f[0].map(hashes_of).unwrap_or_default(),
            },
            "AllBlocksCleared" => Event::Cleared,
            other => return Err(format!("unknown event {other}")),
        });
    }
    Ok((ts, out))
}

/// What applying one event found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Ok,
    /// A stored chain whose parent is unknown: its blocks cannot be keyed, so they are
    /// skipped until a chain from the root comes.
    Orphan,
    /// A chain stored from the root of which this proxy had sent no block anywhere in the
    /// last `PENDING_TTL_MS` (no pending entry): a prompt another router (or client) sent
    /// the engine. kv_aware's dealing of new groups reads it (`scheduler::Room`). Not told
    /// in the first `PENDING_TTL_MS` after the block size is learned.
    Unsent,
}

/// What the index knows of one instance: its bit, and its blocks by the engine's hash.
pub struct Learned {
    pub bit: u32,
    blocks: HashMap<u64, u64>,
}

/// At most this many blocks remembered per instance (an engine evicts and says so; a
/// publisher that never does cannot grow the map without bound).
const MAX_BLOCKS_PER_INSTANCE: usize = 1 << 20;

impl Learned {
    pub fn new(bit: u32) -> Self {
        Learned {
            bit,
            blocks: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Forgets every block of this instance, and voids its pending entries (blocks the
    /// proxy sent it but the engine had not announced yet: they are as doubtful now).
    pub fn clear(&mut self, idx: &KvIndex) {
        for (_, key) in self.blocks.drain() {
            idx.remove(key, self.bit);
        }
        idx.void_pending(self.bit);
    }

    /// Applies one event at `now` (`resilience::now_ms`); see `Applied`.
    pub fn apply(&mut self, idx: &KvIndex, e: &Event, now: u64) -> Applied {
        match e {
            Event::Stored {
                hashes,
                parent,
                tokens,
                block_size,
                lora,
            } => {
                if *lora || *block_size == 0 {
                    return Applied::Ok; // adapter blocks never match a base-model prompt
                }
                let mut key = match parent {
                    None => 0,
                    Some(p) => match self.blocks.get(p) {
                        Some(&k) => k,
                        None => return Applied::Orphan,
                    },
                };
                if self.blocks.len() + hashes.len() > MAX_BLOCKS_PER_INSTANCE {
                    self.clear(idx);
                }
                idx.learn_block_size(*block_size as u64, true, now);
                // Prompts picked before the block size was known pended nothing: judged
                // only once theirs would have expired anyway.
                let judged = now.saturating_sub(idx.sized_ms.load(Ordering::Relaxed))
                    >= kv_index::PENDING_TTL_MS;
                let mut sent = false;
                for (h, toks) in hashes.iter().zip(tokens.chunks_exact(*block_size)) {
                    key = kv_index::chain(key, toks);
                    sent |= parent.is_none() && idx.pending(key, now).is_some();
                    idx.add(key, self.bit);
                    self.blocks.insert(*h, key);
                }
                if judged && parent.is_none() && !sent && !hashes.is_empty() {
                    Applied::Unsent
                } else {
                    Applied::Ok
                }
            }
            Event::Removed { hashes } => {
                for h in hashes {
                    if let Some(key) = self.blocks.remove(h) {
                        idx.remove(key, self.bit);
                        idx.unpend(key, self.bit);
                    }
                }
                Applied::Ok
            }
            Event::Cleared => {
                self.clear(idx);
                Applied::Ok
            }
        }
    }
}

/// One instance's subscription.
struct Sub {
    inst: Arc<Instance>,
    endpoint: String,
    replay: Option<String>,
    sock: zmq::Socket,
    learned: Learned,
    /// The last sequence number applied.
    last_seq: Option<u64>,
}

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("xpyd-kv-events".into())
        .spawn(move || run(&shared))?;
    Ok(())
}

fn run(shared: &Shared) {
    let ctx = zmq::Context::new();
    let idx = kv_index::global();
    let mut subs: Vec<Sub> = Vec::new();
    let mut next_sync = Instant::now();
    loop {
        if Instant::now() >= next_sync {
            sync(shared, &ctx, idx, &mut subs);
            next_sync = Instant::now() + Duration::from_millis(500);
        }
        if subs.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let mut items: Vec<zmq::PollItem<'_>> = subs
            .iter()
            .map(|s| s.sock.as_poll_item(zmq::POLLIN))
            .collect();
        if zmq::poll(&mut items, 100).unwrap_or(0) <= 0 {
            continue;
        }
        let ready: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
        drop(items);
        for (s, ready) in subs.iter_mut().zip(ready) {
            // Drain what is queued, bounded so one busy publisher cannot starve the others.
            for _ in 0..if ready { 256 } else { 0 } {
                match s.sock.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => step("KV events: a message", || receive(&ctx, idx, s, &frames)),
                    Err(_) => break,
                }
            }
        }
    }
}

/// Subscribes to the instances that have an endpoint now, drops the others (reload, removed
/// instances), keeping each instance's bit while it stays.
fn sync(shared: &Shared, ctx: &zmq::Context, idx: &KvIndex, subs: &mut Vec<Sub>) {
    let cfg = shared.policy.load().kv_events.clone();
    let topo = shared.topology.load_full();
    let wanted: Vec<(Arc<Instance>, String, Option<String>)> = topo
        .instances()
        .filter_map(|i| cfg.endpoints_of(&i.address).map(|(e, r)| (i.clone(), e, r)))
        .collect();
    subs.retain_mut(|s| {
        let keep = wanted
            .iter()
            .any(|(i, e, r)| Arc::ptr_eq(i, &s.inst) && *e == s.endpoint && *r == s.replay);
        if !keep {
            s.learned.clear(idx);
            s.inst.kv_bit.store(0, Ordering::Relaxed);
        }
        keep
    });
    let mut unindexed = 0;
    for (inst, endpoint, replay) in wanted {
        if subs.iter().any(|s| Arc::ptr_eq(&s.inst, &inst)) {
            continue;
        }
        let free =
            (0..kv_index::MAX_INSTANCES as u32).find(|b| subs.iter().all(|s| s.learned.bit != *b));
        let Some(bit) = free else {
            // The index tells at most 64 instances apart (a 64-bit mask per block): this one
            // is not subscribed, kv_aware sees it as holding nothing. Said once per instance.
            unindexed += 1;
            if inst.kv_stats.over_limit.swap(1, Ordering::Relaxed) == 0 {
                crate::warn!(
                    "kv_events: more than {} instances publish KV events; {} is not indexed",
                    kv_index::MAX_INSTANCES,
                    inst.address
                );
            }
            continue;
        };
        inst.kv_stats.over_limit.store(0, Ordering::Relaxed);
        let sock = match ctx.socket(zmq::SUB).and_then(|s| {
            s.set_subscribe(cfg.topic.as_bytes())?;
            s.set_rcvhwm(100_000)?;
            s.connect(&endpoint)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                crate::warn!(
                    "kv_events: cannot subscribe to {endpoint} ({}): {e}",
                    inst.address
                );
                continue;
            }
        };
        crate::info!("kv_events: subscribed to {endpoint} for {}", inst.address);
        idx.void_pending(bit); // whatever a previous holder of the bit had pending
        inst.kv_bit.store(bit + 1, Ordering::Relaxed);
        subs.push(Sub {
            inst,
            endpoint,
            replay,
            sock,
            learned: Learned::new(bit),
            last_seq: None,
        });
    }
    kv_index::UNINDEXED.store(unindexed, Ordering::Relaxed);
}

fn seq_of(frame: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(frame.try_into().ok()?))
}

/// One multipart message `[topic, seq, payload]`.
fn receive(ctx: &zmq::Context, idx: &KvIndex, s: &mut Sub, frames: &[Vec<u8>]) {
    let stats = &s.inst.kv_stats;
    let (Some(seq), Some(payload)) = (frames.get(1).and_then(|f| seq_of(f)), frames.get(2)) else {
        stats.bad.fetch_add(1, Ordering::Relaxed);
        return;
    };
    match s.last_seq {
        Some(last) if seq <= last => {
            // The sequence started again: a restarted publisher (a fresh engine, or one that
            // lost its buffer). What we knew of it is no longer to be trusted.
            crate::info!(
                "kv_events: {} restarted its sequence ({last} → {seq})",
                s.inst.address
            );
            stats.restarts.fetch_add(1, Ordering::Relaxed);
            s.learned.clear(idx);
        }
        Some(last) if seq > last + 1 => {
            stats.gaps.fetch_add(1, Ordering::Relaxed);
            if !replay(ctx, idx, s, last + 1, seq) {
                crate::info!(
                    "kv_events: {} skipped {} batch(es) and has no replay: relearning",
                    s.inst.address,
                    seq - last - 1
                );
                s.learned.clear(idx);
            }
        }
        _ => {}
    }
    apply(idx, s, seq, payload);
}

fn apply(idx: &KvIndex, s: &mut Sub, seq: u64, payload: &[u8]) {
    let stats = &s.inst.kv_stats;
    match decode_batch(payload) {
        Ok((ts, events)) => {
            if let Some(ts) = ts {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let lag = ((now - ts).max(0.0) * 1000.0) as u64;
                stats.lag_ms.store(lag, Ordering::Relaxed);
            }
            let now = crate::resilience::now_ms();
            for e in &events {
                match s.learned.apply(idx, e, now) {
                    Applied::Ok => {}
                    Applied::Orphan => _ = stats.orphans.fetch_add(1, Ordering::Relaxed),
                    Applied::Unsent => {
                        stats.unsent.fetch_add(1, Ordering::Relaxed);
                        stats.unsent_ms.store(now, Ordering::Relaxed);
                    }
                }
            }
            stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.bad.fetch_add(1, Ordering::Relaxed);
            crate::debug!("kv_events: {}: {e}", s.inst.address);
        }
    }
    s.last_seq = Some(seq);
    stats.last_seq.store(seq, Ordering::Relaxed);
    stats
        .blocks
        .store(s.learned.len() as u64, Ordering::Relaxed);
    stats
        .last_event_ms
        .store(crate::resilience::now_ms(), Ordering::Relaxed);
}

/// Asks the publisher's replay socket for batches `from..until` and applies them; false when
/// there is no replay socket or it could not supply them all.
fn replay(ctx: &zmq::Context, idx: &KvIndex, s: &mut Sub, from: u64, until: u64) -> bool {
    let Some(endpoint) = s.replay.clone() else {
        return false;
    };
    let Ok(sock) = ctx.socket(zmq::DEALER) else {
        return false;
    };
    let _ = sock.set_linger(0);
    let _ = sock.set_rcvtimeo(1000);
    if sock.connect(&endpoint).is_err()
        || sock
            .send_multipart([&b""[..], &from.to_be_bytes()[..]], 0)
            .is_err()
    {
        return false;
    }
    let mut next = from;
    while let Ok(frames) = sock.recv_multipart(0) {
        // [empty, seq, payload]; seq -1 ends the answer.
        let Some(seq) = frames.get(1).and_then(|f| seq_of(f)) else {
            return false;
        };
        if seq == u64::MAX {
            break;
        }
        if seq >= until {
            continue; // the live stream delivers these
        }
        if seq != next {
            return false; // the buffer no longer reaches back far enough
        }
        if let Some(p) = frames.get(2) {
            apply(idx, s, seq, p);
        }
        next += 1;
    }
    next == until
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> Value {
        Value::Array(vec![
            Value::from("BlockStored"),
            Value::Array(hashes.iter().map(|&h| Value::from(h)).collect()),
            parent.map_or(Value::Nil, Value::from),
            Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()),
            Value::from(4),
            Value::Nil,
            Value::from("GPU"),
            Value::Nil,
        ])
    }

    fn batch(events: Vec<Value>) -> Vec<u8> {
        let mut out = Vec::new();
        let v = Value::Array(vec![Value::F64(1.5), Value::Array(events), Value::from(0)]);
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    }

    #[test]
    fn decodes_array_and_map_forms() {
        let a = decode(&batch(vec![stored(
            &[11, 12],
            None,
            &[1, 2, 3, 4, 5, 6, 7, 8],
        )]))
        .unwrap();
        assert_eq!(
            a,
            vec![Event::Stored {
                hashes: vec![11, 12],
                parent: None,
                tokens: vec![1, 2, 3, 4, 5, 6, 7, 8],
                block_size: 4,
                lora: false
            }]
        );
        let map = Value::Map(vec![
            (Value::from("ts"), Value::F64(1.0)),
            (
                Value::from("events"),
                Value::Array(vec![
                    Value::Map(vec![
                        (Value::from("type"), Value::from("BlockRemoved")),
                        (
                            Value::from("block_hashes"),
                            Value::Array(vec![Value::from(12)]),
                        ),
                        (Value::from("medium"), Value::from("GPU")),
                    ]),
                    Value::Map(vec![(Value::from("type"), Value::from("AllBlocksCleared"))]),
                ]),
            ),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &map).unwrap();
        assert_eq!(
            decode(&buf).unwrap(),
            vec![Event::Removed { hashes: vec![12] }, Event::Cleared]
        );
        assert!(decode(b"\xc1").is_err());
        assert!(decode(&batch(vec![Value::from(3)])).is_err());
    }

    #[test]
    fn learns_chains_and_forgets() {
        let idx = KvIndex::new(1024);
        let mut l = Learned::new(2);
        let toks: Vec<u32> = (100..112).collect();
        let keys = kv_index::prompt_keys(&toks, 4);
        let ev = |e: Value| decode(&batch(vec![e])).unwrap().remove(0);
        // Two blocks, then a third chained to the second by the engine's hash.
        l.apply(&idx, &ev(stored(&[11, 12], None, &toks[..8])), 1);
        assert_eq!(
            l.apply(&idx, &ev(stored(&[13], Some(12), &toks[8..])), 1),
            Applied::Ok
        );
        let mut out = [0u32; 64];
        idx.matched(&keys, 1 << 2, &mut out);
        assert_eq!(out[2], 3);
        // Unknown parent: skipped.
        assert_eq!(
            l.apply(&idx, &ev(stored(&[99], Some(98), &toks[..4])), 1),
            Applied::Orphan
        );
        l.apply(&idx, &Event::Removed { hashes: vec![12] }, 1);
        let mut out = [0u32; 64];
        idx.matched(&keys, 1 << 2, &mut out);
        assert_eq!(out[2], 1);
        l.apply(&idx, &Event::Cleared, 1);
        assert!(l.is_empty());
        assert_eq!(idx.get(keys[0]), 0);
    }

    /// A chain stored from the root that this proxy sent (any of its blocks pending, on
    /// any instance) is its own; one it never sent is another router's. A chain continued
    /// from a known parent (a prompt's suffix, the blocks of generated tokens) says nothing.
    #[test]
    fn tells_chains_this_proxy_sent_from_others() {
        let idx = KvIndex::new(1024);
        let mut l = Learned::new(1);
        let ev = |e: Value| decode(&batch(vec![e])).unwrap().remove(0);
        // Right after the block size is learned, nothing is judged: the picks before it
        // could pend nothing.
        let early: Vec<u32> = (50..58).collect();
        assert_eq!(
            l.apply(&idx, &ev(stored(&[7, 8], None, &early)), 1),
            Applied::Ok
        );
        let now = 1 + kv_index::PENDING_TTL_MS;
        let mine: Vec<u32> = (0..8).collect();
        let keys = kv_index::prompt_keys(&mine, 4);
        idx.pend(keys[1], 3, now - 10); // sent to another instance: still this proxy's
        assert_eq!(
            l.apply(&idx, &ev(stored(&[1, 2], None, &mine)), now),
            Applied::Ok
        );
        assert_eq!(
            l.apply(&idx, &ev(stored(&[3], Some(2), &[9, 9, 9, 9])), now),
            Applied::Ok
        );
        let theirs: Vec<u32> = (100..108).collect();
        assert_eq!(
            l.apply(&idx, &ev(stored(&[4, 5], None, &theirs)), now),
            Applied::Unsent
        );
        // Pending entries expire: the same prompt long after is no longer known as sent.
        let later = now + kv_index::PENDING_TTL_MS + 1;
        assert_eq!(
            l.apply(&idx, &ev(stored(&[1, 2], None, &mine)), later),
            Applied::Unsent
        );
    }
}
