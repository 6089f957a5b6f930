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
/// How often this replica tells its peers its requests in flight per instance (`PeerLoad`):
/// short next to a request, so that a peer's view of a node is that much old at most.
const LOAD_EVERY: Duration = Duration::from_millis(50);

/// This process's id in its load reports: a peer keeps one count per reporting replica.
fn replica_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(|| crate::ids::next_u64().max(1))
}

/// `{"replica", "placements": [], "load": [{instance, in_flight}]}`: this replica's requests
/// in flight per instance address (summed over the models and roles that name it: the
/// engine is one).
fn load_report(topology: &Topology) -> Vec<u8> {
    let mut by_address: HashMap<&str, u64> = HashMap::new();
    for i in topology.instances() {
        *by_address.entry(&i.address).or_default() += i.in_flight();
    }
    let load: Vec<Value> = by_address
        .into_iter()
        .map(|(a, n)| json!({"instance": a, "in_flight": n}))
        .collect();
    serde_json::to_vec(&json!({"replica": replica_id(), "placements": [], "load": load}))
        .unwrap_or_default()
}

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
    let mut load_at = Instant::now();
    loop {
        // With peers, wake up for the next load report; with batches held for a failing
        // peer, to retry them, even when no new placement comes.
        let reporting = !shared.policy.load().prefix_sync.peers.is_empty();
        let waiting = peers.values().any(|p| !p.backlog.is_empty());
        let first = if reporting {
            rx.recv_timeout(load_at.saturating_duration_since(Instant::now()))
        } else if waiting {
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
        // A bug's panic here loses this batch, not the thread (`contain::step`).
        super::contain::step("prefix sync: a batch", || {
            let policy = shared.policy.load();
            let key = policy.admin_api_key.as_deref().unwrap_or("");
            let body = (!batch.is_empty()).then(|| Arc::new(prefix_sync::encode(&batch)));
            let load = (Instant::now() >= load_at).then(|| {
                load_at = Instant::now() + LOAD_EVERY;
                load_report(&shared.topology.load())
            });
            peers.retain(|addr, _| policy.prefix_sync.peers.contains(addr));
            for addr in &policy.prefix_sync.peers {
                let peer = peers.entry(addr.clone()).or_default();
                if let Some(body) = &body {
                    peer.hold(body.clone(), batch.len() as u64);
                }
                peer.flush(addr, key);
                if let Some(load) = &load {
                    peer.report(addr, key, load);
                }
            }
        });
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
        if self.resting() {
            return;
        }
        while let Some((body, n)) = self.backlog.front().cloned() {
            match self.post(addr, key, &body) {
                Ok(()) => {
                    self.backlog.pop_front();
                    STATS.sent.fetch_add(n, Ordering::Relaxed);
                    self.recovered(addr);
                }
                Err(e) => {
                    let held: u64 = self.backlog.iter().map(|(_, n)| n).sum();
                    STATS.failed.fetch_add(held, Ordering::Relaxed);
                    self.failed(addr, &e);
                    return;
                }
            }
        }
    }

    /// Sends a load report unless the peer failed less than `RETRY_AFTER` ago; not held
    /// (the next one replaces it).
    fn report(&mut self, addr: &str, key: &str, body: &[u8]) {
        if self.resting() {
            return;
        }
        match self.post(addr, key, body) {
            Ok(()) => self.recovered(addr),
            Err(e) => self.failed(addr, &e),
        }
    }

    fn recovered(&mut self, addr: &str) {
        self.retry_at = None;
        if self.failing {
            self.failing = false;
            crate::warn!("prefix sync: peer {addr} takes placements and load reports again");
        }
    }

    /// The peer failed less than `RETRY_AFTER` ago: nothing is sent to it yet.
    fn resting(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    /// The peer is tried again in `RETRY_AFTER`; said once per failure streak (a replica
    /// down must not flood the log).
    fn failed(&mut self, addr: &str, e: &std::io::Error) {
        self.retry_at = Some(Instant::now() + RETRY_AFTER);
        if !self.failing {
            self.failing = true;
            crate::warn!(
                "prefix sync: cannot send to peer {addr}: {e}; holding its placements and \
                 trying again every {RETRY_AFTER:?}"
            );
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
    /// The count a new group was dealt at (cache_aware; absent: not dealt by count).
    #[serde(default)]
    dealt_at: Option<u64>,
}

/// One instance's line of a load report.
#[derive(Deserialize)]
struct LoadWire {
    instance: String,
    in_flight: u64,
}

#[derive(Deserialize)]
struct Batch {
    placements: Vec<Wire>,
    /// The sending replica's id and its requests in flight per instance (a load report).
    #[serde(default)]
    replica: u64,
    #[serde(default)]
    load: Vec<LoadWire>,
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
                    dealt_at: p.dealt_at,
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
    // A load report: every instance of that address (in any model or role) hears the
    // peer's count. Not from this replica itself (listed as its own peer by mistake).
    let mut loads = 0u64;
    if batch.replica != 0 && batch.replica != replica_id() {
        let now = crate::resilience::now_ms();
        for l in &batch.load {
            for i in topology.instances().filter(|i| i.address == l.instance) {
                i.engine.peers.report(batch.replica, l.in_flight, now);
                loads += 1;
            }
        }
    }
    Ok(json!({ "taken": taken, "skipped": skipped, "load": loads }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(yaml: &str) -> Topology {
        Topology::from_config(&crate::config::Config::from_yaml(yaml).unwrap())
    }

    #[test]
    fn a_batch_naming_what_this_replica_lacks_is_skipped() {
        let topo = topology("model: m\nscheduling: cache_aware\ndual: [\"127.0.0.1:9\"]\n");
        let body = br#"{"placements":[
            {"model":"m","role":"dual","instance":"127.0.0.1:9","key":1,"hashes":[1,2]},
            {"model":"other","role":"dual","instance":"127.0.0.1:9","key":3,"hashes":[3]},
            {"model":"m","role":"dual","instance":"10.0.0.1:1","key":4,"hashes":[4]}]}"#;
        let v = apply(&topo, body).unwrap();
        assert_eq!(v, json!({"taken": 1, "skipped": 2, "load": 0}));
        assert!(apply(&topo, b"{\"placements\": 3}").is_err());
    }

    /// A move is taken from the holder this replica knows, skipped from one it lacks.
    #[test]
    fn a_move_names_the_holder_it_left() {
        let topo = topology(
            "model: m\nscheduling: cache_aware\ndual: [\"127.0.0.1:9\", \"127.0.0.1:10\"]\n",
        );
        let new = br#"{"placements":[
            {"model":"m","role":"dual","instance":"127.0.0.1:9","key":11,"hashes":[11,12]}]}"#;
        assert_eq!(apply(&topo, new).unwrap()["taken"], 1);
        let moves = br#"{"placements":[
            {"model":"m","role":"dual","instance":"127.0.0.1:10","key":11,"hashes":[11,12],"from":"10.9.9.9:1"},
            {"model":"m","role":"dual","instance":"127.0.0.1:10","key":11,"hashes":[11,12],"from":"127.0.0.1:9"}]}"#;
        assert_eq!(
            apply(&topo, moves).unwrap(),
            json!({"taken": 1, "skipped": 1, "load": 0})
        );
        // The group is on node 10 now: a second move from node 9 finds nothing to follow.
        let dual = &topo.models[0].dual;
        let again = Received {
            inst: &dual.instances[1],
            key: 11,
            hashes: &[11, 12],
            from: Some(&dual.instances[0]),
            dealt_at: None,
        };
        assert!(!dual.scheduler.take_placement(&dual.instances, &again));
    }

    /// A load report reaches every instance of its address; a replica ignores its own and
    /// an anonymous one; this replica's report names its own in-flight requests.
    #[test]
    fn load_reports_reach_every_instance_of_an_address() {
        let topo = topology("models:\n  - name: a\n    dual: [\"127.0.0.1:9\", \"127.0.0.1:10\"]\n  - name: b\n    dual: [\"127.0.0.1:9\"]\n");
        let report = |replica: u64| {
            format!(
                r#"{{"replica": {replica}, "placements": [], "load": [
                    {{"instance": "127.0.0.1:9", "in_flight": 3}},
                    {{"instance": "10.0.0.1:1", "in_flight": 5}}]}}"#
            )
        };
        assert_eq!(apply(&topo, report(42).as_bytes()).unwrap()["load"], 2);
        let peers = |addr: &str| -> Vec<u64> {
            topo.instances()
                .filter(|i| i.address == addr)
                .map(|i| i.engine.peers.sum())
                .collect()
        };
        assert_eq!(peers("127.0.0.1:9"), [3, 3]);
        assert_eq!(peers("127.0.0.1:10"), [0]);
        assert_eq!(
            apply(&topo, report(replica_id()).as_bytes()).unwrap()["load"],
            0
        );
        assert_eq!(apply(&topo, report(0).as_bytes()).unwrap()["load"], 0);
        // What this replica would tell its peers.
        let mine: Value = serde_json::from_slice(&load_report(&topo)).unwrap();
        assert_eq!(mine["replica"], replica_id());
        assert_eq!(mine["load"].as_array().map(Vec::len), Some(2));
    }
}
