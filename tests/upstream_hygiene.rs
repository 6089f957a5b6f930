//! Pooled upstream connections are proven clean before reuse: a backend that writes on an
//! idle keep-alive connection (a stray response) or closes it must never make a client
//! receive another request's answer, nor fail a request. And the timer a pooled connection
//! keeps from one request to the next times each request out on its own deadline.
//!
//! The backend here is a small raw-TCP HTTP/1.1 server in the test process, so that the test
//! decides exactly when it misbehaves.

mod common;

use common::raw::{parse_request, probe_answer, response, set_linger_zero, ScriptedNode};
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// On command, writes one unsolicited complete response on every idle connection that
    /// answered a completion.
    StrayResponse,
    /// Closes a connection idle for this long (with an RST instead of a FIN if `reset`).
    CloseIdle { after: Duration, reset: bool },
}

#[derive(Default)]
struct NodeState {
    /// Bumped by `poison_idle`; each connection writes one stray response per bump.
    poison_gen: AtomicU64,
    /// Open connections that answered a completion → the last generation they poisoned.
    poisoned: Mutex<HashMap<u64, u64>>,
    completion_conns: AtomicU64,
    completions: AtomicU64,
    strays: AtomicU64,
    idle_closes: AtomicU64,
    stop: AtomicBool,
}

/// A dual node answering `/health`, `/v1/models` and completions whose `text` echoes the
/// request's `prompt` (the marker the test checks), misbehaving as told.
struct RawNode {
    addr: SocketAddr,
    state: Arc<NodeState>,
}

impl Drop for RawNode {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

impl RawNode {
    fn start(how: Misbehaviour) -> RawNode {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(NodeState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for (id, conn) in listener.incoming().enumerate() {
                if st.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve_conn(id as u64, conn, how, &st));
            }
        });
        RawNode { addr, state }
    }

    /// Makes every idle connection that answered a completion write a stray response, and
    /// waits until all of them did (nothing is in flight between two rounds).
    fn poison_idle(&self) {
        let gen = self.state.poison_gen.fetch_add(1, Ordering::SeqCst) + 1;
        wait_for(
            "every idle connection to get its stray response",
            Duration::from_secs(20),
            || {
                self.state
                    .poisoned
                    .lock()
                    .unwrap()
                    .values()
                    .all(|&g| g >= gen)
            },
        );
    }

    fn count(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

/// A complete, well-formed response that no request asked for.
fn stray() -> Vec<u8> {
    let body = r#"{"id":"stray","object":"text_completion","choices":[{"index":0,"text":"STRAY RESPONSE"}]}"#;
    response("200 OK", "application/json", body, false)
}

fn serve_conn(id: u64, mut s: TcpStream, how: Misbehaviour, st: &NodeState) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(5)));
    let _ = s.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut last_activity = Instant::now();
    let mut answered_completion = false;
    let mut my_gen = st.poison_gen.load(Ordering::SeqCst);
    let done = |answered: bool| {
        if answered {
            st.poisoned.lock().unwrap().remove(&id);
        }
    };
    loop {
        if st.stop.load(Ordering::Relaxed) {
            return done(answered_completion);
        }
        if let Some((req_len, req)) = parse_request(&buf) {
            buf.drain(..req_len);
            let resp = probe_answer(&req).unwrap_or_else(|| completion(&req.body));
            if s.write_all(&resp).is_err() || req.close {
                return done(answered_completion);
            }
            if req.method == "POST" {
                st.completions.fetch_add(1, Ordering::SeqCst);
                if !answered_completion {
                    answered_completion = true;
                    st.completion_conns.fetch_add(1, Ordering::SeqCst);
                    my_gen = st.poison_gen.load(Ordering::SeqCst);
                    st.poisoned.lock().unwrap().insert(id, my_gen);
                }
            }
            last_activity = Instant::now();
            continue;
        }
        match s.read(&mut chunk) {
            Ok(0) => return done(answered_completion),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                last_activity = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !buf.is_empty() {
                    continue;
                }
                match how {
                    Misbehaviour::StrayResponse => {
                        let gen = st.poison_gen.load(Ordering::SeqCst);
                        if answered_completion && my_gen < gen {
                            if s.write_all(&stray()).is_err() {
                                return done(true);
                            }
                            my_gen = gen;
                            st.strays.fetch_add(1, Ordering::SeqCst);
                            st.poisoned.lock().unwrap().insert(id, gen);
                        }
                    }
                    Misbehaviour::CloseIdle { after, reset } => {
                        if last_activity.elapsed() >= after {
                            if reset {
                                set_linger_zero(&s);
                            }
                            st.idle_closes.fetch_add(1, Ordering::SeqCst);
                            return done(answered_completion);
                        }
                    }
                }
            }
            Err(_) => return done(answered_completion),
        }
    }
}

/// A completion whose `text` echoes the request's `prompt`: the marker the test checks.
fn completion(body: &[u8]) -> Vec<u8> {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let marker = req["prompt"].as_str().unwrap_or("<no prompt>");
    let body = json!({"id": "cmpl-raw", "object": "text_completion", "created": 0, "model": MODEL,
                      "choices": [{"index": 0, "text": marker, "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    response("200 OK", "application/json", &body.to_string(), false)
}

fn proxy_for(node: &RawNode) -> Proc {
    proxy_with(
        &format!("model: {MODEL}\ndual: [\"{}\"]\n", node.addr),
        true,
    )
}

/// One request whose answer must echo its own marker.
fn check_echo(agent: &ureq::Agent, proxy: &Proc, marker: &str) {
    let (status, _, v) = post(
        agent,
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": marker, "max_tokens": 1}),
    );
    assert_eq!(status, 200, "request {marker} failed: {v}");
    assert_eq!(
        v["choices"][0]["text"], marker,
        "request {marker} received another answer: {v}"
    );
}

#[test]
fn stray_bytes_on_an_idle_upstream_connection_never_reach_a_client() {
    let node = RawNode::start(Misbehaviour::StrayResponse);
    let proxy = proxy_for(&node);
    // Four keep-alive client connections, three requests each per round, concurrently;
    // between rounds every idle upstream connection receives a stray response.
    let agents: Vec<ureq::Agent> = (0..4).map(|_| agent()).collect();
    for round in 0..5 {
        std::thread::scope(|s| {
            for (c, a) in agents.iter().enumerate() {
                let proxy = &proxy;
                s.spawn(move || {
                    for i in 0..3 {
                        check_echo(a, proxy, &format!("round{round}-client{c}-req{i}"));
                    }
                });
            }
        });
        node.poison_idle();
    }
    // And one client connection alone, a stray before each request.
    let a = agent();
    for i in 0..5 {
        check_echo(&a, &proxy, &format!("single-{i}"));
        node.poison_idle();
    }
    let (conns, completions) = (
        node.count(&node.state.completion_conns),
        node.count(&node.state.completions),
    );
    assert!(
        node.count(&node.state.strays) > 0,
        "the node never wrote a stray response: the test tested nothing"
    );
    assert!(
        conns < completions,
        "no upstream connection was reused ({conns} connections for {completions} completions): the pool was not exercised"
    );
}

fn closing_node_never_fails_a_request(reset: bool) {
    let node = RawNode::start(Misbehaviour::CloseIdle {
        after: Duration::from_millis(300),
        reset,
    });
    let proxy = proxy_for(&node);
    // Each request after the node closed the pooled connection it would reuse.
    let a = agent();
    for i in 0..3 {
        let closes = node.count(&node.state.idle_closes);
        check_echo(&a, &proxy, &format!("after-close-{i}"));
        wait_for(
            "the node to close its idle connection",
            Duration::from_secs(20),
            || node.count(&node.state.idle_closes) > closes,
        );
    }
    // Light concurrent load with pauses around the node's idle limit, so that requests
    // also meet connections just as they are being closed.
    std::thread::scope(|s| {
        for c in 0..3u64 {
            let proxy = &proxy;
            s.spawn(move || {
                let a = agent();
                for i in 0..6u64 {
                    check_echo(&a, proxy, &format!("client{c}-req{i}"));
                    // Being idle is the scenario here, not a synchronisation.
                    std::thread::sleep(Duration::from_millis(260 + (i * 37 + c * 13) % 80));
                }
            });
        }
    });
}

#[test]
fn a_node_closing_idle_connections_fails_no_request() {
    closing_node_never_fails_a_request(false);
}

#[test]
fn a_node_resetting_idle_connections_fails_no_request() {
    closing_node_never_fails_a_request(true);
}

#[test]
fn a_first_byte_timeout_on_a_reused_connection_runs_from_its_own_leg() {
    // A pooled connection keeps one timer from leg to leg, set where an earlier leg's
    // first-byte deadline was. Each leg here comes from a client connection of its own, so
    // from another task of the (one) worker. Two answered legs, then a third, 0.4 s later, that
    // the node never answers. It must be cut after its own 0.5 s: not at the second leg's
    // deadline 0.1 s in (the timer must wait on to the deadline in force), and not never (the
    // timer must wake the task waiting now, not the finished one that used the connection
    // before).
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = peers.clone();
    let node = ScriptedNode::start(move |req, s| {
        if req.path != "/v1/completions" {
            // The proxy's engine-metric scrape: nothing to report.
            return s
                .write_all(&response("404 Not Found", "text/plain", "", false))
                .is_ok();
        }
        seen.lock().unwrap().push(s.peer_addr().unwrap());
        if String::from_utf8_lossy(&req.body).contains("stall") {
            std::thread::sleep(Duration::from_secs(3));
            return false;
        }
        s.write_all(&completion(&req.body)).is_ok()
    });
    let proxy = proxy_with_workers(
        &format!(
            "model: {MODEL}\ndual: [\"{}\"]\ntimeouts:\n  first_byte_seconds: 0.5\nretry:\n  enabled: false\n",
            node.addr
        ),
        1,
    );
    check_echo(&agent(), &proxy, "first");
    check_echo(&agent(), &proxy, "second");
    // Not a wait for an event: the gap that puts the second leg's deadline inside the third's.
    std::thread::sleep(Duration::from_millis(400));
    let start = Instant::now();
    let (status, _, v) = post(
        &agent(),
        &proxy.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "stall", "max_tokens": 1}),
    );
    let took = start.elapsed();
    assert_eq!(status, 504, "{v}");
    assert!(
        took >= Duration::from_millis(450),
        "cut at an earlier leg's deadline: {took:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "not cut by the first-byte timeout: {took:?}"
    );
    let peers = peers.lock().unwrap();
    assert_eq!(peers.len(), 3);
    assert!(
        peers.iter().all(|p| *p == peers[0]),
        "the three legs did not share one pooled connection: {peers:?}"
    );
}
