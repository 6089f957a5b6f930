//! Proxy replicas in front of the same instances tell each other where `cache_aware` and
//! `kv_aware` placed each new prefix group (`prefix_sync.peers`), so that every replica's
//! index and group counts describe the same placement and new groups are dealt out over
//! the nodes alike (docs/scheduling.md, "Replicas").
//!
//! Sending: a worker that places a new group hands it to a background thread with
//! `try_send` on a bounded queue (full: dropped and counted; a request never waits), which
//! batches placements for a few milliseconds and posts them to every peer's
//! `/admin/prefixes` with the admin key, on a kept-alive connection per peer. Receiving: that endpoint writes the placements
//! into the shared prefix table (atomic stores, like a local pick).
//!
//! Two replicas placing the same new group at once, on different nodes, each receive the
//! other's placement: both keep the node with the higher rendezvous score for the group's
//! key, so they agree after one exchange whatever the order.

use super::prefix_index::PrefixTable;
use crate::config::Role;
use crate::hash::hash64;
use crate::http::blocking::KeptAlive;
use crate::http::ApiError;
use crate::instance::Instance;
use crate::shared::Shared;
use crate::topology::Topology;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Placements waiting for the sender thread.
const QUEUE: usize = 4096;
/// Placements per message.
const BATCH: usize = 256;
/// A partial batch waits at most this long: the window in which two replicas can place
/// one group apart, so short next to a prefill.
const FLUSH_EVERY: Duration = Duration::from_millis(2);
/// Connecting to, writing to and hearing from a peer, each.
const IO_TIMEOUT: Duration = Duration::from_millis(500);

/// One new group's placement: the instance, the group's key (the block its home is hashed
/// on) and the block hashes recorded for it.
pub struct Placement {
    pub instance: Arc<Instance>,
    pub key: u64,
    pub hashes: Vec<u64>,
}

/// What the sync did, for `/metrics` and `/status`.
#[derive(Default)]
pub struct Stats {
    pub sent: AtomicU64,
    /// Placements a peer could not be sent (unreachable, refused), per peer and message.
    pub failed: AtomicU64,
    /// The queue was full when a worker handed a placement over.
    pub dropped: AtomicU64,
    pub received: AtomicU64,
    /// Received placements of a group this replica had placed elsewhere, resolved by score.
    pub conflicts: AtomicU64,
}

pub static STATS: Stats = Stats {
    sent: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    received: AtomicU64::new(0),
    conflicts: AtomicU64::new(0),
};

static OUTBOX: OnceLock<Sender<Placement>> = OnceLock::new();
/// Peers are configured (set at start and on every reload).
static ON: AtomicBool = AtomicBool::new(false);

/// Whether new placements are shared (peers configured and the sender running).
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Hands a placement to the sender; never blocks.
pub fn offer(p: Placement) {
    let Some(tx) = OUTBOX.get() else { return };
    if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(p) {
        STATS.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Follows the policy's peer list (start, reload).
pub fn configure(peers: &[String]) {
    ON.store(
        !peers.is_empty() && OUTBOX.get().is_some(),
        Ordering::Relaxed,
    );
}

/// Starts the sender thread; it reads the peers and the admin key from the current policy
/// for every batch, so a reload applies them.
pub fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    let (tx, rx) = bounded(QUEUE);
    if OUTBOX.set(tx).is_err() {
        return Ok(()); // one sender per process
    }
    let peers = shared.policy.load().prefix_sync.peers.clone();
    std::thread::Builder::new()
        .name("xpyd-prefix-sync".into())
        .spawn(move || run(rx, &shared))?;
    configure(&peers);
    Ok(())
}

fn run(rx: Receiver<Placement>, shared: &Shared) {
    let mut batch: Vec<Placement> = Vec::with_capacity(BATCH);
    let mut peers: HashMap<String, Peer> = HashMap::new();
    loop {
        match rx.recv() {
            Ok(p) => batch.push(p),
            Err(_) => return,
        }
        let deadline = Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(p) => batch.push(p),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let policy = shared.policy.load();
        let key = policy.admin_api_key.as_deref().unwrap_or("");
        let body = encode(&batch);
        peers.retain(|addr, _| policy.prefix_sync.peers.contains(addr));
        for addr in &policy.prefix_sync.peers {
            let peer = peers.entry(addr.clone()).or_default();
            let sent = peer.post(addr, key, &body);
            let counter = if sent.is_ok() {
                &STATS.sent
            } else {
                &STATS.failed
            };
            counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
            // Logged once per failure streak and peer: a replica down must not flood the log.
            match (sent, peer.failing) {
                (Ok(()), true) => {
                    peer.failing = false;
                    crate::warn!("prefix sync: peer {addr} takes placements again");
                }
                (Err(e), false) => {
                    peer.failing = true;
                    crate::warn!("prefix sync: cannot send placements to peer {addr}: {e}");
                }
                _ => {}
            }
        }
        batch.clear();
    }
}

/// One peer: its connection, and whether its last batch failed (logged once per streak).
#[derive(Default)]
struct Peer {
    conn: KeptAlive,
    failing: bool,
}

impl Peer {
    /// Posts one batch: Ok when the peer took it.
    fn post(&mut self, addr: &str, key: &str, body: &[u8]) -> std::io::Result<()> {
        let headers = [("X-API-Key", key), ("Content-Type", "application/json")];
        let status = self
            .conn
            .post(addr, "/admin/prefixes", &headers, body, IO_TIMEOUT)?;
        if status.is_success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("it answered {status}")))
        }
    }
}

fn encode(batch: &[Placement]) -> Vec<u8> {
    let list: Vec<Value> = batch
        .iter()
        .map(|p| {
            json!({
                "model": &*p.instance.model,
                "role": p.instance.role.as_str(),
                "instance": p.instance.address,
                "key": p.key,
                "hashes": p.hashes,
            })
        })
        .collect();
    serde_json::to_vec(&json!({ "placements": list })).unwrap_or_default()
}

#[derive(Deserialize)]
struct Wire {
    model: String,
    role: String,
    instance: String,
    key: u64,
    hashes: Vec<u64>,
}

#[derive(Deserialize)]
struct Batch {
    placements: Vec<Wire>,
}

/// Applies a peer's placements to this replica's prefix tables; answers how many were
/// taken. A placement naming a model, role or instance this replica does not have, or a
/// policy that is not a prefix policy, is skipped (the replicas' configs may differ for a
/// while during a rollout).
pub fn apply(topology: &Topology, body: &[u8]) -> Result<Value, ApiError> {
    let batch: Batch = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("not a placement batch: {e}")))?;
    let (mut taken, mut skipped) = (0u64, 0u64);
    for p in &batch.placements {
        let set = topology
            .models
            .iter()
            .find(|m| m.name == p.model)
            .zip(p.role.parse::<Role>().ok())
            .map(|(m, role)| m.role_set(role));
        let inst = set.and_then(|s| s.instances.iter().find(|i| i.address == p.instance));
        match set.zip(inst) {
            Some((set, inst))
                if set
                    .scheduler
                    .take_placement(&set.instances, inst, p.key, &p.hashes) =>
            {
                taken += 1
            }
            _ => skipped += 1,
        }
    }
    STATS.received.fetch_add(taken, Ordering::Relaxed);
    Ok(json!({ "taken": taken, "skipped": skipped }))
}

/// Records a peer's placement of the group `key` on `inst`, unless this replica placed the
/// group on an instance with a higher score for the key (then the peer moves instead).
/// True when the placement was taken or already held.
pub fn take(
    table: &PrefixTable,
    instances: &[Arc<Instance>],
    inst: &Arc<Instance>,
    key: u64,
    hashes: &[u64],
) -> bool {
    let sid = PrefixTable::slot_id(inst.id);
    match table.get(key) {
        Some(s) if s == sid => return true,
        Some(s) => {
            let score = |i: &Instance| hash64(key, i.address.as_bytes());
            if let Some(mine) = instances.iter().find(|i| PrefixTable::slot_id(i.id) == s) {
                STATS.conflicts.fetch_add(1, Ordering::Relaxed);
                if score(mine) > score(inst) {
                    return false;
                }
                let _ =
                    mine.prefix_groups
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(n.saturating_sub(1))
                        });
            }
        }
        None => {}
    }
    for &h in hashes {
        table.insert(h, sid);
    }
    inst.prefix_groups.fetch_add(1, Ordering::Relaxed);
    true
}

/// The sync's counters in the Prometheus text format (docs/metrics.md).
pub fn render(out: &mut String) {
    use std::fmt::Write;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let _ = write!(
        out,
        "# HELP proxy_prefix_sync_placements_total New prefix placements shared with peer replicas, by outcome.\n\
         # TYPE proxy_prefix_sync_placements_total counter\n\
         proxy_prefix_sync_placements_total{{outcome=\"sent\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"failed\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"dropped\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"received\"}} {}\n\
         proxy_prefix_sync_placements_total{{outcome=\"conflict\"}} {}\n",
        n(&STATS.sent),
        n(&STATS.failed),
        n(&STATS.dropped),
        n(&STATS.received),
        n(&STATS.conflicts),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::testing::instances;

    /// Two replicas placed one new group on different nodes at once; each takes the
    /// other's placement by the same rule, and both end on one node with one group counted.
    #[test]
    fn replicas_that_placed_a_group_apart_agree_after_one_exchange() {
        for key in 0..64u64 {
            let c = instances(4, Role::Dual);
            let (a, b) = (PrefixTable::new(64), PrefixTable::new(64));
            let hashes = [key, key ^ 0xabcdef, key.wrapping_mul(31)];
            let sid = |i: &Instance| PrefixTable::slot_id(i.id);
            // Replica A put the group on node 0, replica B on node 1 (counts shared: the
            // nodes are the same objects here, as both replicas count one placement each).
            for h in hashes {
                a.insert(h, sid(&c[0]));
                b.insert(h, sid(&c[1]));
            }
            c[0].prefix_groups.fetch_add(1, Ordering::Relaxed);
            // Each receives the other's placement.
            take(&a, &c, &c[1], key, &hashes);
            take(&b, &c, &c[0], key, &hashes);
            let (on_a, on_b) = (a.get(key), b.get(key));
            assert_eq!(on_a, on_b, "key {key}");
            for h in hashes {
                assert_eq!(a.get(h), on_a, "key {key}: every block follows");
                assert_eq!(b.get(h), on_b);
            }
        }
    }

    #[test]
    fn a_new_placement_is_taken_and_counted() {
        let c = instances(2, Role::Dual);
        let t = PrefixTable::new(64);
        assert!(take(&t, &c, &c[1], 7, &[7, 8]));
        assert_eq!(t.get(8), Some(PrefixTable::slot_id(c[1].id)));
        assert_eq!(c[1].prefix_groups.load(Ordering::Relaxed), 1);
        // The same again (a duplicate message) changes nothing.
        assert!(take(&t, &c, &c[1], 7, &[7, 8]));
        assert_eq!(c[1].prefix_groups.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_batch_naming_what_this_replica_lacks_is_skipped() {
        let topo = Topology::from_config(
            &crate::config::Config::from_yaml(
                "model: m\nscheduling: cache_aware\ndual: [\"127.0.0.1:9\"]\n",
            )
            .unwrap(),
        );
        let body = br#"{"placements":[
            {"model":"m","role":"dual","instance":"127.0.0.1:9","key":1,"hashes":[1,2]},
            {"model":"other","role":"dual","instance":"127.0.0.1:9","key":3,"hashes":[3]},
            {"model":"m","role":"dual","instance":"10.0.0.1:1","key":4,"hashes":[4]}]}"#;
        let v = apply(&topo, body).unwrap();
        assert_eq!(v, json!({"taken": 1, "skipped": 2}));
        assert!(apply(&topo, b"{\"placements\": 3}").is_err());
    }
}
