//! Running as a fleet, end to end with real processes: `dns://` names followed through a real
//! DNS server (dnsmasq on a loopback port, serving a hosts directory the test rewrites) with
//! xpyd-dummy nodes on 127.0.0.2, 127.0.0.3, …; and two xpyd replicas behind a real L4
//! balancer (HAProxy in TCP mode).
//!
//! Needs `dnsmasq` and `haproxy` (Debian: `dnsmasq-base`, `haproxy`; .ci/run installs them).

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const HAPROXY: &str = "/usr/sbin/haproxy";
/// Client threads of the bounded load.
const THREADS: usize = 4;

fn need(bin: &str, package: &str) {
    assert!(
        Path::new(bin).exists(),
        "{bin} is missing: apt-get install {package}"
    );
}

fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "xpyd-fleet-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `f` until it returns Some, or fails with `what` after `secs`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// dnsmasq answering from a hosts directory on 127.0.0.1:`port` (auto re-read on change).
struct Dns {
    child: KillOnDrop,
    dir: PathBuf,
    port: u16,
    log: Receiver<String>,
}

impl Dns {
    fn start(hosts: &[(&str, &[&str])]) -> Dns {
        let dir = scratch_dir("dns");
        // dnsmasq binds UDP and TCP on its port: another test's socket can take the TCP side
        // between our pick and its bind; then it says so and we pick again (bounded).
        for _ in 0..5 {
            let port = free_udp_and_tcp_port();
            if let Some(dns) = Self::try_start_on(port, dir.clone(), hosts) {
                return dns;
            }
        }
        panic!("dnsmasq found no free port in 5 tries");
    }

    /// dnsmasq again on the port the proxy was configured with. While it was down a test
    /// running beside this one can hold that port a moment (CI saw "port in use" once):
    /// polled until it is free again, within a deadline.
    fn start_on(port: u16, dir: PathBuf, hosts: &[(&str, &[&str])]) -> Dns {
        wait_for(20, &format!("dnsmasq to bind port {port} again"), || {
            Self::try_start_on(port, dir.clone(), hosts)
        })
    }

    /// None when dnsmasq could not bind its port.
    fn try_start_on(port: u16, dir: PathBuf, hosts: &[(&str, &[&str])]) -> Option<Dns> {
        need(DNSMASQ, "dnsmasq-base");
        let hostsdir = dir.join("hosts.d");
        std::fs::create_dir_all(&hostsdir).unwrap();
        write_hosts(&dir, hosts);
        let mut child = Command::new(DNSMASQ)
            .arg("--no-daemon")
            .arg("--log-facility=-")
            .arg(format!("--port={port}"))
            .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--no-poll"])
            // Names of the test domain that the file lacks get NXDOMAIN (not REFUSED).
            .arg("--local=/fleet.test/")
            .arg(format!("--hostsdir={}", hostsdir.display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq");
        let (tx, rx): (Sender<String>, Receiver<String>) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let dns = Dns {
            child: KillOnDrop(child),
            dir,
            port,
            log: rx,
        };
        dns.try_wait_read(hosts.iter().map(|h| h.1.len()).sum())
            .then_some(dns)
    }

    /// Replaces the whole hosts file and waits until dnsmasq has read it.
    fn set(&self, hosts: &[(&str, &[&str])]) {
        write_hosts(&self.dir, hosts);
        self.wait_read(hosts.iter().map(|h| h.1.len()).sum());
    }

    /// Waits for dnsmasq's "read .../hosts - N names" (N lines in our file).
    fn wait_read(&self, names: usize) {
        assert!(self.try_wait_read(names), "dnsmasq: its port is in use");
    }

    /// As `wait_read`; false when dnsmasq reports that its port is taken.
    fn try_wait_read(&self, names: usize) -> bool {
        let want = format!("{names} names");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("[dnsmasq] {line}");
                    if line.contains("read ") && line.contains("hosts") && line.ends_with(&want) {
                        return true;
                    }
                    if line.contains("Address already in use") {
                        return false;
                    }
                    assert!(!line.contains("FAILED"), "dnsmasq: {line}");
                }
                Err(_) => panic!("dnsmasq did not read its hosts file ({want})"),
            }
        }
    }

    /// Stops the server (the name then fails to resolve); returns its port and directory.
    fn stop(mut self) -> (u16, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.port, self.dir.clone())
    }
}

/// Written beside the watched directory, then renamed in: dnsmasq never reads half a file.
fn write_hosts(dir: &Path, hosts: &[(&str, &[&str])]) {
    let mut text = String::new();
    for (name, ips) in hosts {
        for ip in *ips {
            text.push_str(&format!("{ip} {name}\n"));
        }
    }
    let tmp = dir.join("hosts.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("hosts.d/hosts")).unwrap();
}

/// A port free on every one of `ips` (the nodes behind one name share it).
fn shared_port(ips: &[&str]) -> u16 {
    wait_for(10, "a port free on every node address", || {
        let first = TcpListener::bind((ips[0], 0)).ok()?;
        let port = first.local_addr().ok()?.port();
        let rest: Option<Vec<TcpListener>> = ips[1..]
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)).ok())
            .collect();
        rest.map(|_| port)
    })
}

/// An xpyd-dummy node on `ip:port`; each completion takes ~8 × 5 ms so that requests are in
/// flight when the topology changes.
fn node_on(ip: &str, port: u16, mode: &str) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xpyd-dummy"));
    cmd.args(["--host", ip, "--port", &port.to_string(), "--mode", mode])
        .args([
            "--model",
            MODEL,
            "--workers",
            "1",
            "--record-requests",
            "100000",
        ])
        .env("PREFILL_DELAY_PER_TOKEN", "0")
        .env("DECODE_DELAY_PER_TOKEN", "0.005");
    spawn_listening(cmd)
}

fn requests_served(node: &Proc) -> u64 {
    dummy_stats(node)["requests"].as_u64().unwrap_or(0)
}

fn instances(proxy: &Proc) -> Vec<Value> {
    get_json(&proxy.url("/status/instances")).1["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Addresses of the proxy's instances that are healthy and not draining.
fn serving(proxy: &Proc) -> HashSet<String> {
    instances(proxy)
        .iter()
        .filter(|i| i["status"] == "healthy" && i["draining"] == false)
        .filter_map(|i| i["address"].as_str().map(str::to_string))
        .collect()
}

fn listed(proxy: &Proc) -> HashSet<String> {
    instances(proxy)
        .iter()
        .filter_map(|i| i["address"].as_str().map(str::to_string))
        .collect()
}

fn metric(proxy: &Proc, line_start: &str) -> Option<f64> {
    let text = ureq::get(&proxy.url("/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Bounded load: THREADS clients sending completions one after another until stopped (or
/// their count or time cap). Failures are kept whole.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<LoadResult>>,
}

#[derive(Default)]
struct LoadResult {
    ok: u64,
    failures: Vec<String>,
    /// Connection-level failures that were retried (the client's own retry, as the OpenAI
    /// SDK does on connection errors), by the request id of the failed attempt.
    conn_retries: u64,
    failed_attempts: Vec<String>,
}

impl Load {
    fn start(url: String, sessions: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..THREADS)
            .map(|t| {
                let (stop, sent, url) = (stop.clone(), sent.clone(), url.clone());
                std::thread::spawn(move || {
                    let agent = agent();
                    let started = Instant::now();
                    let mut r = LoadResult::default();
                    let mut k = 0u64;
                    while !stop.load(Ordering::Relaxed)
                        && k < 20_000
                        && started.elapsed() < Duration::from_secs(120)
                    {
                        k += 1;
                        let body = json!({"model": MODEL, "prompt": format!("load {t} {k}"), "max_tokens": 8});
                        let mut attempt = 0;
                        loop {
                            attempt += 1;
                            let id = format!("load-{t}-{k}-{attempt}");
                            let mut req = agent.post(&url).set("X-Request-Id", &id);
                            if sessions {
                                req = req.set("X-Session-ID", &format!("session-{t}-{}", k % 7));
                            }
                            match req.send_json(body.clone()) {
                                Ok(resp) if resp.status() == 200 => {
                                    let _ = resp.into_string();
                                    r.ok += 1;
                                }
                                Ok(resp) => r.failures.push(format!("status {}", resp.status())),
                                Err(ureq::Error::Status(s, resp)) => r.failures.push(format!(
                                    "status {s}: {}",
                                    resp.into_string().unwrap_or_default()
                                )),
                                Err(ureq::Error::Transport(e)) if attempt < 4 => {
                                    r.conn_retries += 1;
                                    r.failed_attempts.push(id);
                                    eprintln!("connection-level failure, retrying: {e}");
                                    continue;
                                }
                                Err(e) => r.failures.push(format!("transport: {e}")),
                            }
                            break;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        Load {
            stop,
            sent,
            threads,
        }
    }

    /// Waits until `n` more requests were answered.
    fn wait_more(&self, n: u64) {
        let from = self.sent.load(Ordering::Relaxed);
        wait_for(60, &format!("{n} more requests"), || {
            (self.sent.load(Ordering::Relaxed) >= from + n).then_some(())
        });
    }

    fn finish(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadResult::default();
        for t in self.threads {
            let r = t.join().expect("load thread");
            all.ok += r.ok;
            all.conn_retries += r.conn_retries;
            all.failed_attempts.extend(r.failed_attempts);
            all.failures.extend(r.failures);
        }
        all
    }
}

fn discovery_yaml(dns: &Dns, roles: &str) -> String {
    format!(
        "model: {MODEL}\n{roles}\nadmin_api_key: fleet-key\ndiscovery:\n  interval_seconds: 0.5\n  timeout_seconds: 2\n  nameservers: [\"127.0.0.1:{}\"]\n",
        dns.port
    )
}

/// Decode nodes come and go through DNS while clients keep sending: nothing fails, a new
/// address takes traffic after one resolution plus its first probe, a vanished one drains.
#[test]
fn dns_names_follow_records_under_load() {
    const NAME: &str = "decode.fleet.test";
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let port = shared_port(&ips);
    let nodes: Vec<Proc> = ips.iter().map(|ip| node_on(ip, port, "decode")).collect();
    let prefill = dummy("prefill", &[]);
    let dns = Dns::start(&[(NAME, &ips[..2])]);
    let proxy = proxy_with(
        &discovery_yaml(
            &dns,
            &format!(
                "prefill: [\"{}\"]\ndecode: [\"dns://{NAME}:{port}\"]",
                prefill.addr
            ),
        ),
        true,
    );
    let addr = |i: usize| format!("{}:{port}", ips[i]);
    wait_for(20, "both resolved decode nodes healthy", || {
        let s = serving(&proxy);
        (s.contains(&addr(0)) && s.contains(&addr(1))).then_some(())
    });
    // A plain address stays one instance: the prefill entry is not followed.
    assert_eq!(listed(&proxy).len(), 3, "{:?}", listed(&proxy));

    let load = Load::start(proxy.url("/v1/completions"), false);
    wait_for(30, "traffic on both nodes", || {
        (requests_served(&nodes[0]) > 0 && requests_served(&nodes[1]) > 0).then_some(())
    });

    // A record appears: the node takes traffic within one interval plus a probe.
    let t0 = Instant::now();
    dns.set(&[(NAME, &ips[..])]);
    wait_for(30, "the new node to take traffic", || {
        (requests_served(&nodes[2]) > 0).then_some(())
    });
    let joined = t0.elapsed();
    eprintln!("new node took traffic {joined:?} after dnsmasq re-read its hosts");

    // A record vanishes: the node gets nothing new and its requests in flight finish.
    let t1 = Instant::now();
    dns.set(&[(NAME, &ips[1..])]);
    wait_for(30, "the vanished node to leave the topology", || {
        (!listed(&proxy).contains(&addr(0))).then_some(())
    });
    eprintln!("vanished node left after {:?}", t1.elapsed());
    let at_removal = requests_served(&nodes[0]);
    load.wait_more(200);
    let after = requests_served(&nodes[0]);
    // Only requests picked from the previous snapshot can still arrive (≤ one per client).
    assert!(
        after - at_removal <= THREADS as u64,
        "a removed node kept receiving: {at_removal} → {after}"
    );
    wait_for(30, "the removed node to drain", || {
        (dummy_stats(&nodes[0])["running"] == 0).then_some(())
    });
    let result = load.finish();
    assert!(
        result.failures.is_empty(),
        "failed requests: {:?}",
        result.failures
    );
    assert_eq!(result.conn_retries, 0, "no connection may fail");
    eprintln!(
        "{} requests, 0 failed; served per node: {:?}",
        result.ok,
        nodes.iter().map(requests_served).collect::<Vec<_>>()
    );
    let label = format!("name=\"dns://{NAME}:{port}\"");
    assert_eq!(
        metric(&proxy, &format!("proxy_discovery_addresses{{{label}}}")),
        Some(2.0)
    );
    assert_eq!(
        metric(&proxy, &format!("proxy_discovery_stale{{{label}}}")),
        Some(0.0)
    );
}

/// A name that stops resolving (empty answer, then no server at all) keeps its last good
/// set, says so in the metrics, and the proxy keeps serving; a reload keeps the name's
/// instances; an admin addition lives beside them; when DNS answers again the set follows.
#[test]
fn failed_resolution_keeps_the_last_good_set() {
    const NAME: &str = "nodes.fleet.test";
    let ips = ["127.0.0.5", "127.0.0.6"];
    let port = shared_port(&ips);
    let _nodes: Vec<Proc> = ips.iter().map(|ip| node_on(ip, port, "dual")).collect();
    let dns = Dns::start(&[(NAME, &ips[..])]);
    let cfg = write_config(&format!(
        "{}{FAST_PROBES}",
        discovery_yaml(&dns, &format!("dual: [\"dns://{NAME}:{port}\"]"))
    ));
    let proxy = proxy_on(&cfg, true);
    let both: HashSet<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();
    wait_for(20, "both nodes serving", || {
        (serving(&proxy) == both).then_some(())
    });
    let label = format!("name=\"dns://{NAME}:{port}\"");
    let count = |result: &str| {
        metric(
            &proxy,
            &format!("proxy_discovery_resolutions_total{{{label},model=\"{MODEL}\",role=\"dual\",result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let ask = |n: usize| {
        let a = agent();
        for k in 0..n {
            let (s, _, body) = post(
                &a,
                &proxy.url("/v1/completions"),
                &json!({"model": MODEL, "prompt": format!("p{k}"), "max_tokens": 2}),
            );
            assert_eq!(s, 200, "{body}");
        }
    };

    // The name disappears from DNS: an empty answer keeps the set.
    dns.set(&[("other.fleet.test", &ips[..1])]);
    wait_for(20, "an empty resolution", || {
        (count("empty") > 0.0).then_some(())
    });
    assert_eq!(
        metric(&proxy, &format!("proxy_discovery_stale{{{label}}}")),
        Some(1.0)
    );
    assert_eq!(serving(&proxy), both);
    ask(10);

    // The DNS server goes away: failures keep the set too.
    let (dns_port, dns_dir) = dns.stop();
    let failed = wait_for(30, "a failed resolution", || {
        let f = count("failed");
        (f > 0.0).then_some(f)
    });
    assert_eq!(serving(&proxy), both);
    ask(10);

    // A reload keeps the followed name's instances (no churn), and the admin API works
    // beside discovery.
    let admin = |path: &str, body: Value| {
        let resp = agent()
            .post(&proxy.url(path))
            .set("X-API-Key", "fleet-key")
            .send_json(body);
        match resp {
            Ok(r) => r.into_json::<Value>().unwrap(),
            Err(e) => panic!("{path}: {e}"),
        }
    };
    let reloaded = admin("/admin/reload", json!({}));
    assert_eq!(reloaded["added"], json!([]), "{reloaded}");
    assert_eq!(reloaded["removed"], json!([]), "{reloaded}");
    let extra = dummy("dual", &[]);
    admin(
        "/instances/add",
        json!({"address": extra.addr.to_string(), "role": "dual", "model": MODEL}),
    );
    wait_for(30, "two more failed resolutions", || {
        (count("failed") >= failed + 2.0).then_some(())
    });
    let mut with_extra = both.clone();
    with_extra.insert(extra.addr.to_string());
    assert_eq!(serving(&proxy), with_extra);

    // DNS answers again, with one node fewer: the set follows, the admin addition stays.
    let dns = Dns::start_on(dns_port, dns_dir, &[(NAME, &ips[1..])]);
    let one: HashSet<String> = [format!("{}:{port}", ips[1]), extra.addr.to_string()].into();
    wait_for(30, "the set to follow DNS again", || {
        (listed(&proxy) == one).then_some(())
    });
    assert_eq!(
        metric(&proxy, &format!("proxy_discovery_stale{{{label}}}")),
        Some(0.0)
    );
    ask(10);
    drop(dns);
}

/// HAProxy (TCP mode) in front of two replicas.
struct Balancer {
    _child: KillOnDrop,
    port: u16,
}

impl Balancer {
    fn start(replicas: &[&Proc]) -> Balancer {
        need(HAPROXY, "haproxy");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let servers: String = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "  server xpyd{i} {} check inter 200ms fall 1 rise 1\n",
                    r.addr
                )
            })
            .collect();
        // redispatch: a connection refused by a dead replica is tried on another one.
        let cfg = format!(
            "global\n  maxconn 512\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  retries 3\n  option redispatch\n\nfrontend fleet\n  bind 127.0.0.1:{port}\n  default_backend xpyd\n\nbackend xpyd\n  balance roundrobin\n{servers}"
        );
        let path = scratch_dir("haproxy").join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let mut child = Command::new(HAPROXY)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy");
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[haproxy] {line}");
            }
        });
        let b = Balancer {
            _child: KillOnDrop(child),
            port,
        };
        wait_for(20, "haproxy to pass requests", || {
            ureq::get(&b.url("/ping"))
                .call()
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        });
        b
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// Which node served each request id.
fn served_by(nodes: &[Proc]) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for (n, node) in nodes.iter().enumerate() {
        for r in received(node) {
            if let Some(id) = r["request_id"].as_str() {
                by.insert(id.to_string(), n);
            }
        }
    }
    by
}

/// Two replicas behind HAProxy: consistent_hash maps every session to the same node from
/// either replica; killing one replica mid-run loses no request beyond those in flight on
/// it, which the clients retry through the balancer.
#[test]
fn replicas_behind_an_l4_balancer() {
    let nodes: Vec<Proc> = (0..3).map(|_| node_on("127.0.0.1", 0, "dual")).collect();
    let refs: Vec<&Proc> = nodes.iter().collect();
    let yaml = format!("{}scheduling: consistent_hash\n", dual_yaml(&refs));
    let r1 = proxy_with(&yaml, true);
    let r2 = proxy_with(&yaml, true);
    let lb = Balancer::start(&[&r1, &r2]);

    // Stickiness: each session through r1, through r2, and twice through the balancer.
    const SESSIONS: usize = 24;
    let a = agent();
    for s in 0..SESSIONS {
        let targets = [
            r1.url("/v1/completions"),
            r2.url("/v1/completions"),
            lb.url("/v1/completions"),
            lb.url("/v1/completions"),
        ];
        for (k, url) in targets.iter().enumerate() {
            // A fresh connection per request, so the balancer alternates replicas.
            let one = agent();
            let resp = one
                .post(url)
                .set("X-Session-ID", &format!("user-{s}"))
                .set("X-Request-Id", &format!("sticky-{s}-{k}"))
                .send_json(json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}))
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(resp.status(), 200);
        }
    }
    drop(a);
    let by = served_by(&nodes);
    let mut used = HashSet::new();
    for s in 0..SESSIONS {
        let got: Vec<usize> = (0..4).map(|k| by[&format!("sticky-{s}-{k}")]).collect();
        assert!(
            got.iter().all(|n| *n == got[0]),
            "session user-{s} went to nodes {got:?} (r1, r2, lb, lb)"
        );
        used.insert(got[0]);
    }
    assert!(used.len() > 1, "every session on one node: {used:?}");

    // A replica dies mid-run: clients retry connection-level failures through the balancer.
    let load = Load::start(lb.url("/v1/completions"), true);
    load.wait_more(200);
    let mut r1 = r1;
    let in_flight_before = get_json(&r1.url("/status")).1;
    let _ = r1.child.kill();
    let _ = r1.child.wait();
    eprintln!("killed replica 1 (status just before: {in_flight_before})");
    load.wait_more(300);
    let result = load.finish();
    assert!(
        result.failures.is_empty(),
        "lost requests: {:?}",
        result.failures
    );
    // At most one request per client was in flight (or about to be sent on a pooled
    // connection) on the killed replica.
    assert!(
        result.conn_retries <= THREADS as u64,
        "{} connection-level failures for {THREADS} clients",
        result.conn_retries
    );
    // Which failed attempts had reached a node through the killed replica (in flight on it)
    // and which died on a kept-alive connection to it before reaching anything.
    let by = served_by(&nodes);
    let in_flight = result
        .failed_attempts
        .iter()
        .filter(|id| by.contains_key(*id))
        .count();
    eprintln!(
        "{} requests answered, 0 lost; {} connection-level failures retried: {in_flight} in flight on the killed replica (had reached a node), {} on a kept-alive connection to it",
        result.ok,
        result.conn_retries,
        result.conn_retries as usize - in_flight
    );
    // Everything after the kill went through the surviving replica.
    let (status, _) = get_json(&r2.url("/health"));
    assert_eq!(status, 200);
}

/// A loopback port free for both UDP and TCP at the time of asking.
fn free_udp_and_tcp_port() -> u16 {
    // Below the kernel's ephemeral range: dnsmasq is stopped and started again on this port,
    // and a port inside the range can meanwhile become the local port of any outgoing
    // connection (a pooled keep-alive one holds it for the rest of the test; CI once waited
    // 20 s for it in vain).
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, span) = if low > 12_000 {
        (10_000u16, low - 10_000)
    } else {
        (1_024, low - 1_024)
    };
    let mut x = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = from + (x % u64::from(span)) as u16;
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if udp.is_ok() && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no loopback port below {low} free for both UDP and TCP in 200 tries");
}
