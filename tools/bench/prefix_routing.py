#!/usr/bin/env python3
"""xpyd's own policies side by side on a prefix-heavy workload over realistic simulated
nodes (docs/benchmarks.md, "Prefix routing"): round_robin, cache_aware (approximate) and
kv_aware (precise, from the nodes' KV events), same nodes' settings, same client.

Each policy gets fresh nodes (cold caches) and a fresh proxy. The client: CONC threads in a
closed loop, each request a token-id prompt = one of PREFIXES shared prefixes of
PREFIX_TOKENS tokens + a unique SUFFIX_TOKENS suffix, max_tokens 1 (so latency ≈ TTFT).

usage: prefix_routing.py TARGET_DIR [REQUESTS] [CONC]
"""
import json, os, random, socket, subprocess, sys, threading, time, urllib.request

target = sys.argv[1]
REQUESTS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
CONC = int(sys.argv[3]) if len(sys.argv) > 3 else 16
NODES, PREFIXES, PREFIX_TOKENS, SUFFIX_TOKENS = 4, 10, 512, 64
NODE_FLAGS = ["--prefill-delay-per-token", "0.0002", "--decode-delay-per-token", "0.001",
              "--max-num-seqs", "8", "--kv-cache-blocks", os.environ.get("KV_BLOCKS", "200"), "--block-size", "16"]


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def spawn(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    addr = line.split("http://")[1].split()[0]
    return p, addr


def post(addr, body):
    req = urllib.request.Request(f"http://{addr}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return r.status


def node_hits(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    val = lambda n: sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(n + "{"))
    return val("vllm:prefix_cache_hits_total"), val("vllm:prefix_cache_queries_total")


def run(policy):
    procs, nodes, kv = [], [], []
    for _ in range(NODES):
        port = free_port()
        p, a = spawn([f"{target}/xpyd-dummy", "--port", "0", "--mode", "dual", "--model", "m",
                      "--workers", "1", *NODE_FLAGS, "--kv-events-endpoint", f"tcp://*:{port}"])
        procs.append(p); nodes.append(a); kv.append(port)
    cfg = f"/tmp/prefix-routing-{os.getpid()}.yaml"
    with open(cfg, "w") as f:
        f.write("model: m\ndual: [" + ", ".join(f'"{a}"' for a in nodes) + "]\n")
        f.write(f"scheduling: {policy}\nkv_events:\n  endpoints:\n")
        for a, p in zip(nodes, kv):
            f.write(f'    "{a}": "tcp://127.0.0.1:{p}"\n')
        f.write("startup:\n  probe_interval_seconds: 0.1\nhealth_check:\n  interval_seconds: 1\n")
    p, proxy = spawn([f"{target}/xpyd", "proxy", "-c", cfg, "--port", "0", "--workers", "2",
                      "--log-level", "error"])
    procs.append(p)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://{proxy}/health", timeout=1).status == 200:
                break
        except Exception:
            time.sleep(0.1)
    time.sleep(1.0)  # SUB sockets connect in the background
    rng = random.Random(7)
    prefixes = [[rng.randrange(100, 30000) for _ in range(PREFIX_TOKENS)] for _ in range(PREFIXES)]
    jobs = [(rng.randrange(PREFIXES), i) for i in range(REQUESTS)]
    lat, lock, errors = [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                g, i = jobs.pop()
            prompt = prefixes[g] + [40000 + i * SUFFIX_TOKENS + t for t in range(SUFFIX_TOKENS)]
            t0 = time.perf_counter()
            try:
                post(proxy, {"model": "m", "prompt": prompt, "max_tokens": 1})
                with lock:
                    lat.append(time.perf_counter() - t0)
            except Exception:
                with lock:
                    errors[0] += 1
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(CONC)]
    [t.start() for t in ts]; [t.join() for t in ts]
    wall = time.perf_counter() - t0
    hits = [node_hits(a) for a in nodes]
    m = urllib.request.urlopen(f"http://{proxy}/metrics", timeout=5).read().decode()
    picks = {l.split('outcome="')[1].split('"')[0]: int(float(l.split()[-1]))
             for l in m.splitlines()
             if l.startswith("proxy_routing_picks_total") and f'policy="{policy}"' in l and not l.endswith(" 0")}
    for p in procs:
        p.kill(); p.wait()
    lat.sort()
    h, q = sum(x for x, _ in hits), sum(y for _, y in hits)
    return {
        "policy": policy, "ok": len(lat), "errors": errors[0],
        "mean_ms": 1000 * sum(lat) / max(1, len(lat)),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0,
        "req_s": len(lat) / wall, "hit_rate": h / q if q else 0, "picks": picks,
    }


print("| policy | ok | mean latency (≈TTFT) ms | p99 ms | req/s | nodes' prefix-cache hit rate | proxy's picks by outcome |")
print("|---|---:|---:|---:|---:|---:|---|")
for pol in (sys.argv[4].split(",") if len(sys.argv) > 4 else ["round_robin", "cache_aware", "kv_aware"]):
    r = run(pol)
    print(f"| {r['policy']} | {r['ok']} ({r['errors']} err) | {r['mean_ms']:.1f} | {r['p99_ms']:.1f} | "
          f"{r['req_s']:.1f} | {r['hit_rate']:.2f} | {r['picks'] or '-'} |", flush=True)
