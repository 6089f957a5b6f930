//! The replicas' prefix sync on the proxy side (docs/scheduling.md, "Replicas"): the
//! thread that posts this replica's new placements to its peers, and the endpoint that
//! takes theirs (`POST /admin/prefixes`). What a placement is and how a peer's is merged:
//! `scheduler::prefix_sync`.

use crate::config::Role;
use crate::http::blocking::KeptAlive;
use crate::http::ApiError;
use crate::scheduler::prefix_sync::{self, Placement, Received, STATS};
use crate::shared::Shared;
use crate::topology::Topology;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Placements waiting for the sender thread.
const QUEUE: usize = 4096;
/// Placements per message.
const BATCH: usize = 256;
/// A partial batch waits at most this long: the window in which two replicas can place
/// one group apart, so short next to a prefill.
const FLUSH_EVERY: Duration = Duration::from_millis(2);
/// Connecting to, writing to and hearing from a peer, each.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer that failed is tried again after this long: one that drops packets would
/// otherwise hold every batch (and the other peers) for `IO_TIMEOUT`.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Batches held for a peer that does not take them, oldest given up first.
const BACKLOG: usize = 64;

/// Starts the sender thread; it reads the peers and the admin key from the current policy
/// for every batch, so a reload applies them.
pub fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    let (tx, rx) = bounded(QUEUE);
    if !prefix_sync::install(tx) {
        return Ok(()); // one sender per process
    }
    let peers = shared.policy.load().prefix_sync.peers.clone();
    std::thread::Builder::new()
        .name("xpyd-prefix-sync".into())
        .spawn(move || run(rx, &shared))?;
    prefix_sync::configure(&peers);
    Ok(())
}

fn run(rx: Receiver<Placement>, shared: &Shared) {
    let mut batch: Vec<Placement> = Vec::with_capacity(BATCH);
    let mut peers: HashMap<String, Peer> = HashMap::new();
    loop {
        // With batches held for a failing peer, wake up to retry them even when no new
        // placement comes.
        let waiting = peers.values().any(|p| !p.backlog.is_empty());
        let first = if waiting {
            rx.recv_timeout(RETRY_AFTER)
        } else {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        match first {
            Ok(p) => batch.push(p),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let deadline = Instant::now() + FLUSH_EVERY;
        while !batch.is_empty() && batch.len() < BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(p) => batch.push(p),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let policy = shared.policy.load();
        let key = policy.admin_api_key.as_deref().unwrap_or("");
        let body = (!batch.is_empty()).then(|| Arc::new(prefix_sync::encode(&batch)));
        peers.retain(|addr, _| policy.prefix_sync.peers.contains(addr));
        for addr in &policy.prefix_sync.peers {
            let peer = peers.entry(addr.clone()).or_default();
            if let Some(body) = &body {
                peer.hold(body.clone(), batch.len() as u64);
            }
            peer.flush(addr, key);
        }
        batch.clear();
    }
}

/// One peer: its connection, the batches not yet delivered (sent again in order: taking a
/// placement twice is harmless), when a failing one is tried again, and whether it is
/// failing (logged once per streak).
#[derive(Default)]
struct Peer {
    conn: KeptAlive,
    backlog: VecDeque<(Arc<Vec<u8>>, u64)>,
    retry_at: Option<Instant>,
    failing: bool,
}

impl Peer {
    /// Keeps a batch for this peer; beyond `BACKLOG` the oldest is given up (`dropped`).
    fn hold(&mut self, body: Arc<Vec<u8>>, placements: u64) {
        if self.backlog.len() == BACKLOG {
            if let Some((_, n)) = self.backlog.pop_front() {
                STATS.dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.backlog.push_back((body, placements));
    }

    /// Sends what is held, oldest first, unless the peer failed less than `RETRY_AFTER`
    /// ago; stops at the first failure.
    fn flush(&mut self, addr: &str, key: &str) {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        while let Some((body, n)) = self.backlog.front().cloned() {
            match self.post(addr, key, &body) {
                Ok(()) => {
                    self.backlog.pop_front();
                    STATS.sent.fetch_add(n, Ordering::Relaxed);
                    self.retry_at = None;
                    if self.failing {
                        self.failing = false;
                        crate::warn!("prefix sync: peer {addr} takes placements again");
                    }
                }
                Err(e) => {
                    let held: u64 = self.backlog.iter().map(|(_, n)| n).sum();
                    STATS.failed.fetch_add(held, Ordering::Relaxed);
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                    // Once per failure streak: a replica down must not flood the log.
                    if !self.failing {
                        self.failing = true;
                        crate::warn!(
                            "prefix sync: cannot send placements to peer {addr}: {e}; \
                             holding them and trying again every {RETRY_AFTER:?}"
                        );
                    }
                    return;
                }
            }
        }
    }

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

#[derive(Deserialize)]
struct Wire {
    model: String,
    role: String,
    instance: String,
    key: u64,
    hashes: Vec<u64>,
    /// The holder a moved group left (absent or null: a new group).
    #[serde(default)]
    from: Option<String>,
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
            .route_index(Some(&p.model))
            .zip(p.role.parse::<Role>().ok())
            .map(|(k, role)| topology.models[k].role_set(role));
        let Some(set) = set else {
            skipped += 1;
            continue;
        };
        let find = |addr: &str| set.instances.iter().find(|i| i.address == addr);
        let from = p.from.as_deref().map(find);
        let taken_here = match (find(&p.instance), from) {
            // A move from an instance this replica does not have: nothing to follow.
            (Some(_), Some(None)) | (None, _) => false,
            (Some(inst), from) => {
                let received = Received {
                    inst,
                    key: p.key,
                    hashes: &p.hashes,
                    from: from.flatten(),
                };
                set.scheduler.take_placement(&set.instances, &received)
            }
        };
        if taken_here {
            taken += 1;
        } else {
            skipped += 1;
        }
    }
    STATS.received.fetch_add(taken, Ordering::Relaxed);
    Ok(json!({ "taken": taken, "skipped": skipped }))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A move is taken from the holder this replica knows, skipped from one it lacks.
    #[test]
    fn a_move_names_the_holder_it_left() {
        let topo = Topology::from_config(
            &crate::config::Config::from_yaml(
                "model: m\nscheduling: cache_aware\ndual: [\"127.0.0.1:9\", \"127.0.0.1:10\"]\n",
            )
            .unwrap(),
        );
        let new = br#"{"placements":[
            {"model":"m","role":"dual","instance":"127.0.0.1:9","key":11,"hashes":[11,12]}]}"#;
        assert_eq!(apply(&topo, new).unwrap()["taken"], 1);
        let moves = br#"{"placements":[
            {"model":"m","role":"dual","instance":"127.0.0.1:10","key":11,"hashes":[11,12],"from":"10.9.9.9:1"},
            {"model":"m","role":"dual","instance":"127.0.0.1:10","key":11,"hashes":[11,12],"from":"127.0.0.1:9"}]}"#;
        assert_eq!(
            apply(&topo, moves).unwrap(),
            json!({"taken": 1, "skipped": 1})
        );
        // The group is on node 10 now: a second move from node 9 finds nothing to follow.
        let dual = &topo.models[0].dual;
        let again = Received {
            inst: &dual.instances[1],
            key: 11,
            hashes: &[11, 12],
            from: Some(&dual.instances[0]),
        };
        assert!(!dual.scheduler.take_placement(&dual.instances, &again));
    }
}
