//! Test harness: real `xpyd-dummy` and `xpyd` processes on loopback, a real HTTP client.
#![allow(dead_code)]

pub mod raw;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped, so that no test leaves one behind,
/// whether it passes or panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

pub struct Proc {
    pub child: KillOnDrop,
    pub addr: SocketAddr,
    /// The first stdout line, the one naming the address (and for xpyd-dummy, the KV-events
    /// endpoint it bound).
    pub banner: String,
    _stderr_thread: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The KV-events endpoint an xpyd-dummy bound, as its start-up line names it.
    pub fn kv_endpoint(&self) -> &str {
        self.banner
            .split("kv events: ")
            .nth(1)
            .and_then(|s| s.split([')', ' ']).next())
            .unwrap_or_else(|| panic!("no KV-events endpoint in `{}`", self.banner))
    }
}

/// Starts `cmd`, whose first stdout line says `... listening on http://ADDR ...`.
pub fn spawn_listening(mut cmd: Command) -> Proc {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    // Relay the child's stderr to the test output (visible on failure).
    let t = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[child] {line}");
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("process did not report its address");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in `{line}`"));
    // CI runs the suite once per driver; make sure the forced one is really in use by our
    // binaries (their banners name the driver; a test's own helper node names none).
    let ours = line.starts_with("xpyd ") || line.starts_with("xpyd-dummy ");
    if ours && std::env::var("XPYD_DRIVER").as_deref() == Ok("epoll") {
        assert!(
            line.contains("driver: epoll"),
            "expected the epoll driver: {line}"
        );
    }
    Proc {
        child: KillOnDrop(child),
        addr,
        banner: line,
        _stderr_thread: Some(t),
    }
}

/// Polls `f` until it holds; fails the test naming `what` once `timeout` has passed. Tests
/// wait for events this way, never by sleeping a guessed time. Returns the time it took
/// (the fault tests print how long detection took; none asserts it).
pub fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    assert!(
        poll_until(timeout, f),
        "timed out after {timeout:?} waiting for {what}"
    );
    start.elapsed()
}

/// Polls `f` until it holds (true) or `timeout` has passed (false).
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback address with nothing listening (bound, then released): for a node that is
/// down, or one a test starts later on that port.
pub fn dead_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

pub fn free_port() -> u16 {
    dead_address().port()
}

/// `n` distinct free loopback addresses: every listener is held until all are bound (ports
/// drawn one at a time and released at once can be handed out twice).
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// `n` distinct free loopback ports (see `free_addrs`).
pub fn free_ports(n: usize) -> Vec<u16> {
    free_addrs(n).iter().map(SocketAddr::port).collect()
}

pub const MODEL: &str = "test-model";

pub fn dummy(mode: &str, extra: &[&str]) -> Proc {
    dummy_at(0, mode, extra)
}

/// A zero-delay node of `MODEL` recording its requests, on `port` (0: any free port).
pub fn dummy_at(port: u16, mode: &str, extra: &[&str]) -> Proc {
    node(port, MODEL, mode, extra)
}

/// A zero-delay node serving another model than `MODEL`, on any free port.
pub fn dummy_of(model: &str, mode: &str, extra: &[&str]) -> Proc {
    node(0, model, mode, extra)
}

fn node(port: u16, model: &str, mode: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xpyd-dummy"));
    cmd.args([
        "--port",
        &port.to_string(),
        "--mode",
        mode,
        "--model",
        model,
    ])
    .args(["--workers", "1", "--record-requests", "1000"])
    .env("PREFILL_DELAY_PER_TOKEN", "0")
    .env("DECODE_DELAY_PER_TOKEN", "0")
    .args(extra);
    spawn_listening(cmd)
}

pub fn write_config(yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xpyd-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("cfg-{}.yaml", next_id()));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub const FAST_PROBES: &str =
    "startup:\n  probe_interval_seconds: 0.1\nhealth_check:\n  interval_seconds: 0.5\n  timeout_seconds: 1\n";

/// Starts the proxy on a free port and waits until it reports ready (unless `wait_ready`).
pub fn proxy_with(yaml: &str, wait_ready: bool) -> Proc {
    proxy_on(&write_config(&format!("{yaml}\n{FAST_PROBES}")), wait_ready)
}

/// The proxy on the config file at `path` (which a test may rewrite and reload).
pub fn proxy_on(path: &std::path::Path, wait_ready: bool) -> Proc {
    proxy_on_workers(path, wait_ready, 2)
}

/// `proxy_with` (ready) on `workers` workers instead of two; with one, every connection is
/// served by the same event loop and shares its upstream pool.
pub fn proxy_with_workers(yaml: &str, workers: usize) -> Proc {
    proxy_on_workers(
        &write_config(&format!("{yaml}\n{FAST_PROBES}")),
        true,
        workers,
    )
}

fn proxy_on_workers(path: &std::path::Path, wait_ready: bool, workers: usize) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xpyd"));
    cmd.args(["proxy", "-c"]).arg(path).args([
        "--port",
        "0",
        "--workers",
        &workers.to_string(),
        "--log-level",
        "warning",
    ]);
    let p = spawn_listening(cmd);
    if wait_ready {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // Ready means every configured model passed its start-up gate: `/health` turns
            // 200 as soon as the first model can serve, and gating is per model.
            if let Ok(r) = ureq::get(&p.url("/health")).call() {
                let all_models_ready = r.into_json::<Value>().is_ok_and(|body| {
                    body["models"].as_array().is_some_and(|models| {
                        models.iter().all(|m| m["ready"] == serde_json::json!(true))
                    })
                });
                // And every instance probed once: a model is ready with one instance per
                // role, and a test that counts on the others (their context length, their
                // share of the traffic) would race their first probe.
                if all_models_ready && every_instance_probed(&p) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "proxy never became ready for every model"
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    p
}

/// Whether the proxy has probed every instance it knows at least once (none `unknown`);
/// true when it will not say (`protect_status`).
fn every_instance_probed(proxy: &Proc) -> bool {
    let Ok(r) = ureq::get(&proxy.url("/status/instances")).call() else {
        return true;
    };
    r.into_json::<Value>().is_ok_and(|v| {
        v["instances"]
            .as_array()
            .is_some_and(|all| all.iter().all(|i| i["status"] != "unknown"))
    })
}

pub fn pd_yaml(prefill: &[&Proc], decode: &[&Proc]) -> String {
    let list = |ps: &[&Proc]| {
        ps.iter()
            .map(|p| format!("\"{}\"", p.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "model: {MODEL}\nprefill: [{}]\ndecode: [{}]\n",
        list(prefill),
        list(decode)
    )
}

/// A dual node with a KV cache of `blocks` blocks of 16 tokens that publishes its KV events
/// on a loopback port of its own choosing (`Proc::kv_endpoint`; a port drawn beforehand can
/// be taken by a test running beside this one before the node binds it), plus `extra` flags.
pub fn kv_dummy(blocks: u32, extra: &[&str]) -> Proc {
    let blocks = blocks.to_string();
    let mut args = vec![
        "--kv-cache-blocks",
        &blocks,
        "--block-size",
        "16",
        "--kv-events-endpoint",
        "tcp://127.0.0.1:*",
    ];
    args.extend_from_slice(extra);
    dummy("dual", &args)
}

/// A `kv_events:` section naming, for each node, the endpoint its KV events are published
/// on.
pub fn kv_events_yaml(nodes: &[Proc]) -> String {
    let endpoints: String = nodes
        .iter()
        .map(|n| format!("    \"{}\": \"{}\"\n", n.addr, n.kv_endpoint()))
        .collect();
    format!("kv_events:\n  endpoints:\n{endpoints}")
}

pub fn dual_yaml(dual: &[&Proc]) -> String {
    let list = dual
        .iter()
        .map(|p| format!("\"{}\"", p.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!("model: {MODEL}\ndual: [{list}]\n")
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

/// POSTs JSON; returns status, headers of interest and the body, also for 4xx/5xx.
pub fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Option<String>, Value) {
    post_raw(
        agent,
        url,
        "application/json",
        &serde_json::to_vec(body).unwrap(),
    )
}

pub fn post_raw(
    agent: &ureq::Agent,
    url: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, Option<String>, Value) {
    let resp = match agent
        .post(url)
        .set("Content-Type", content_type)
        .send_bytes(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request to {url} failed: {e}"),
    };
    let status = resp.status();
    let rid = resp.header("x-request-id").map(str::to_string);
    let mut text = String::new();
    resp.into_reader().read_to_string(&mut text).unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, rid, v)
}

pub fn get_json(url: &str) -> (u16, Value) {
    let resp = match agent().get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url} failed: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(Value::Null))
}

/// The value of one series of the proxy's `/metrics` (name with its labels as written,
/// e.g. `proxy_retries_total` or `x{a="b"}`); 0 while it is absent.
pub fn metric(proxy: &Proc, series: &str) -> f64 {
    let text = agent()
        .get(&proxy.url("/metrics"))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// What a dummy node received (its request log).
pub fn received(node: &Proc) -> Vec<Value> {
    let (_, v) = get_json(&node.url("/debug/requests"));
    v.as_array().cloned().unwrap_or_default()
}

pub fn dummy_stats(node: &Proc) -> Value {
    get_json(&node.url("/debug/stats")).1
}

/// One streamed response read event by event, each with its arrival time.
pub struct Stream {
    pub status: u16,
    pub request_id: Option<String>,
    pub events: Vec<(Instant, String)>,
}

impl Stream {
    /// JSON payloads of the data events except `[DONE]`.
    pub fn json_events(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|(_, e)| e != "[DONE]")
            .map(|(_, e)| serde_json::from_str(e).unwrap_or_else(|_| panic!("bad event {e}")))
            .collect()
    }
}

pub fn stream(agent: &ureq::Agent, url: &str, body: &Value) -> Stream {
    let resp = agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_json(body.clone())
        .unwrap_or_else(|e| panic!("stream request failed: {e}"));
    let status = resp.status();
    let request_id = resp.header("x-request-id").map(str::to_string);
    let reader = BufReader::new(resp.into_reader());
    let mut events = Vec::new();
    for line in reader.lines() {
        let line = line.expect("read stream");
        if let Some(data) = line.strip_prefix("data: ") {
            events.push((Instant::now(), data.to_string()));
        } else {
            assert!(line.is_empty(), "unexpected SSE line `{line}`");
        }
    }
    Stream {
        status,
        request_id,
        events,
    }
}

/// Raw socket exchange for framing tests: sends bytes, reads until the peer closes or the
/// timeout passes, returns what came back. A server may answer and stop reading before
/// everything was sent (an oversized request): a failed write still reads the answer.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn now_unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Parses exposition text with prometheus_client; fails on invalid exposition.
pub fn parse_exposition(text: &str) -> Vec<Value> {
    let venv = python_venv(&[("prometheus_client", "prometheus-client")]);
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "invalid exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The test virtualenv (outside the sources: `target/pyenv`, or `$XPYD_TEST_VENV`) with the
/// given (module, pip package) pairs installed; installs what is missing.
pub fn python_venv(packages: &[(&str, &str)]) -> PathBuf {
    let venv = match std::env::var("XPYD_TEST_VENV") {
        Ok(v) => PathBuf::from(v),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyenv"),
    };
    // Test binaries run in parallel: one installer at a time.
    let _lock = VenvLock::take(&venv);
    if !venv.join("bin/python").exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map(|s| s.success());
        assert!(
            matches!(ok, Ok(true)),
            "cannot create a virtualenv at {}",
            venv.display()
        );
    }
    let py = venv.join("bin/python");
    for (module, package) in packages {
        let have = Command::new(&py)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status();
        if !matches!(have, Ok(s) if s.success()) {
            let ok = Command::new(venv.join("bin/pip"))
                .args(["install", "-q", package])
                .status();
            assert!(
                matches!(ok, Ok(s) if s.success()),
                "cannot pip install {package} into {}",
                venv.display()
            );
        }
    }
    venv
}

/// A lock directory next to the virtualenv (mkdir is atomic).
struct VenvLock(PathBuf);

impl VenvLock {
    fn take(venv: &std::path::Path) -> VenvLock {
        let dir = venv.with_extension("lock");
        if let Some(parent) = dir.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while std::fs::create_dir(&dir).is_err() {
            assert!(
                Instant::now() < deadline,
                "virtualenv lock {} held too long",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        VenvLock(dir)
    }
}

impl Drop for VenvLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
