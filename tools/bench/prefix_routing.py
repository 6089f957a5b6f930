#!/usr/bin/env python3
"""Engine-state routing side by side (docs/benchmarks.md, "Engine-state routing side by
side"): the same realistic simulated nodes, the same open-loop client, one run, for xpyd's
round_robin, cache_aware (approximate) and kv_aware (precise, from the nodes' KV events),
sglang-router `cache_aware`, vllm-router `cache_aware` and vllm-router `kv_aware` fed the
same nodes' KV events; then two xpyd replicas in front of the same nodes (the client
alternating between them). Topologies: 4 dual nodes, and 1 prefill + 3 decode nodes.

Every target gets fresh nodes (cold caches) and a fresh router. The workload has the shape
of `vllm bench serve --dataset-name prefix_repetition`: PREFIXES shared text prefixes of
PREFIX_TOKENS tokens, each request one of them (uniformly at random) + a unique
SUFFIX_TOKENS-token suffix, OUTPUT tokens streamed back; Poisson arrivals (open loop, a
fixed seed: every target gets the same prompts at the same times; RATE for dual nodes,
RATE_PD for 1P+3D) on up to 256 client connections. Tokens are counted with the test
tokenizer (tests/engine/tokenizers/test-model/tokenizer.json), which the nodes
(`--tokenizer`), xpyd (`tokenizer_path`) and vllm-router (`VLLM_ROUTER_TOKENIZER`) all load,
so token-id matching agrees everywhere.

Scenario `affinity` (issue 16's affinity measurement, `--scenario affinity`): 4 dual nodes,
GROUPS groups of PER_GROUP requests sharing a ~2,400-byte prefix (+ a unique question),
CLIENTS concurrent clients in a closed loop, each request on a fresh connection (so the
proxy's workers all take some), the client alternating between xpyd replicas; the share of
each group's requests on its main node (prefix affinity) and the load spread, per target.
`--scenario load,affinity` (the default) runs both.

Needs aiohttp and tokenizers: run it with the peers' virtualenv (tools/bench/compare
--prefix does), e.g.
    /tmp/xpyd-peers/bin/python tools/bench/prefix_routing.py --bin target/release
Options: --scenario load,affinity  --topology dual,1p3d  --targets a,b  --repeats 3  --rate 20
--rate-pd 15  --requests 400 (see --help for the node sizing and the affinity scenario).
Prints markdown tables on stdout (medians over repeats, min–max), progress on stderr, and
every run as JSON to --json (default /tmp/prefix-routing-<pid>.json).
"""
import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK_ROOT = os.path.join(ROOT, "tests", "engine", "tokenizers")
MODEL = "test-model"
TOK_FILE = os.path.join(TOK_ROOT, MODEL, "tokenizer.json")
VENV = os.environ.get("XPYD_PEERS_VENV", "/tmp/xpyd-peers")

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
ap.add_argument("--dummy-bin", default=None, help="where xpyd-dummy is (default: --bin)")
ap.add_argument("--scenario", default="load,affinity",
                help="load: the Poisson side by side (--topology); affinity: issue 16's prefix-affinity run")
ap.add_argument("--topology", default="dual,1p3d")
ap.add_argument("--targets", default="", help="comma-separated target names (default: all)")
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--rate", type=float, default=20.0, help="requests per second (Poisson)")
ap.add_argument("--rate-pd", type=float, default=15.0,
                help="requests per second for 1P+3D (its three decode nodes saturate at ~20/s)")
ap.add_argument("--requests", type=int, default=400)
ap.add_argument("--prefixes", type=int, default=10)
ap.add_argument("--prefix-tokens", type=int, default=2000)
ap.add_argument("--suffix-tokens", type=int, default=100)
ap.add_argument("--output", type=int, default=32)
ap.add_argument("--kv-blocks", type=int, default=640)
ap.add_argument("--max-num-seqs", type=int, default=4)
ap.add_argument("--prefill", default="0.000075", help="seconds per computed prompt token")
ap.add_argument("--decode", default="0.015", help="seconds per decode step, one sequence")
ap.add_argument("--decode-per-seq", default="0.001", help="added per other running sequence")
ap.add_argument("--proxy-workers", type=int, default=2)
ap.add_argument("--connections", type=int, default=256)
ap.add_argument("--groups", type=int, default=12, help="affinity: prefix groups")
ap.add_argument("--per-group", type=int, default=8, help="affinity: requests per group")
ap.add_argument("--clients", type=int, default=4, help="affinity: concurrent closed-loop clients")
ap.add_argument("--prefix-bytes", type=int, default=2400, help="affinity: shared prefix length")
ap.add_argument("--affinity-output", type=int, default=16, help="affinity: output tokens")
ap.add_argument("--scrape-interval", default="0.5",
                help="xpyd's engine_metrics.interval_seconds (the engines' queues feed its picks)")
ap.add_argument("--xpyd-config", default="",
                help="extra YAML lines for xpyd's config, `;`-separated (e.g. a scheduling_config)")
ap.add_argument("--json", default=f"/tmp/prefix-routing-{os.getpid()}.json")
ap.add_argument("--xpyd-logs", default="",
                help="a folder: xpyd runs at log level info, each proxy's log (one line per "
                     "request: node, TTFT) written there as <n>.log, to study its picks")
ap.add_argument("--from-json", default="", help="print the tables of saved runs (a --json file) and exit")
A = ap.parse_args()
BIN = os.path.abspath(A.bin)
DUMMY_BIN = os.path.abspath(A.dummy_bin or A.bin)
BLOCK = 16


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


PROCS = []


def spawn(args, env=None, read_addr=False, stderr=None):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.Popen(args, stdout=subprocess.PIPE if read_addr else subprocess.DEVNULL,
                         stderr=stderr or subprocess.DEVNULL, env=e, start_new_session=True)
    PROCS.append(p)
    if not read_addr:
        return p, None
    line = p.stdout.readline().decode()
    m = re.search(r"http://([\d.]+:\d+)", line)
    if not m:
        raise SystemExit(f"no address from {args[0]}: {line!r}")
    return p, m.group(1)


def stop(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        if p in PROCS:
            PROCS.remove(p)


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_serving(base, timeout=90):
    """Until a small completion through `base` answers 200 (routers wait for their workers)."""
    body = json.dumps({"model": MODEL, "prompt": "warm", "max_tokens": 1}).encode()
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://{base}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.2)
    raise SystemExit(f"{base} never served: {last}")


# ---------------------------------------------------------------- workload

def build_workload(rate):
    """Prompts (text) and arrival times, identical for every target of a topology."""
    tok = Tokenizer.from_file(TOK_FILE)
    vocab = tok.get_vocab()
    # Whole words that are one token in context (ByteLevel: a leading space joins the word,
    # so a prompt made of " word" pieces tokenizes word by word and a prefix's tokens do not
    # depend on what follows it).
    words = sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isalpha())
    words = [w for w in words if len(tok.encode(" " + w).ids) == 1]
    rng = random.Random(16)

    def text(n):
        return "".join(" " + rng.choice(words) for _ in range(n))

    prefixes = [text(A.prefix_tokens) for _ in range(A.prefixes)]
    reqs, t = [], 0.0
    for i in range(A.requests):
        t += rng.expovariate(rate)
        g = rng.randrange(A.prefixes)
        reqs.append((t, g, prefixes[g] + text(A.suffix_tokens)))
    # Check the token counts once, as the nodes and routers will see them.
    full = tok.encode(reqs[0][2]).ids
    assert len(full) == A.prefix_tokens + A.suffix_tokens, len(full)
    assert full[:A.prefix_tokens] == tok.encode(prefixes[reqs[0][1]]).ids
    return prefixes, reqs


def build_affinity_workload():
    """GROUPS prefixes of ~PREFIX_BYTES bytes (one-token words, so every target and node
    counts the same tokens) and GROUPS × PER_GROUP requests in a seeded random order: a
    fixed cycle (group k % GROUPS) would line up with round robin's (12 groups on 4 nodes:
    every group on one node by accident), and a group's requests may be in flight together."""
    tok = Tokenizer.from_file(TOK_FILE)
    words = sorted(w[1:] for w in tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha())
    words = [w for w in words if len(tok.encode(" " + w).ids) == 1]
    rng = random.Random(24)
    prefixes = []
    for _ in range(A.groups):
        t = ""
        while len(t) < A.prefix_bytes:
            t += " " + rng.choice(words)
        prefixes.append(t)
    reqs = []
    for k in range(A.groups * A.per_group):
        g = k % A.groups
        q = "".join(" " + rng.choice(words) for _ in range(16))
        reqs.append((None, g, prefixes[g] + q))
    rng.shuffle(reqs)
    return prefixes, reqs


# ---------------------------------------------------------------- nodes

def node_flags():
    return ["--max-num-seqs", str(A.max_num_seqs), "--kv-cache-blocks", str(A.kv_blocks),
            "--block-size", str(BLOCK), "--prefill-delay-per-token", A.prefill,
            "--decode-delay-per-token", A.decode, "--decode-delay-per-seq", A.decode_per_seq,
            "--tokenizer", TOK_FILE, "--record-requests", str(A.requests + 50)]


def start_nodes(roles):
    """[(role, addr, kv_port)] for fresh nodes of `roles` (dual/prefill/decode)."""
    out, procs = [], []
    for role in roles:
        kv = free_port()
        p, addr = spawn([f"{DUMMY_BIN}/xpyd-dummy", "--port", "0", "--mode", role, "--model", MODEL,
                         "--workers", "1", *node_flags(), "--kv-events-endpoint", f"tcp://*:{kv}",
                         # The layout vllm-router 0.1 reads (xpyd reads all three).
                         "--kv-events-format", "mixed"],
                        read_addr=True)
        procs.append(p)
        out.append((role, addr, kv))
    return out, procs


def metrics_of(addr):
    text = http_get(f"http://{addr}/metrics")
    vals = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name = line.split("{")[0].split(" ")[0]
        try:
            vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except ValueError:
            pass
    return vals


class Sampler(threading.Thread):
    """Samples each node's running / waiting (vLLM gauges) every 0.5 s while the load runs."""

    def __init__(self, addrs):
        super().__init__(daemon=True)
        self.addrs, self.samples, self.halt = addrs, {a: [] for a in addrs}, threading.Event()

    def run(self):
        while not self.halt.wait(0.5):
            for a in self.addrs:
                try:
                    m = metrics_of(a)
                    self.samples[a].append((m.get("vllm:num_requests_running", 0),
                                            m.get("vllm:num_requests_waiting", 0)))
                except Exception:  # noqa: BLE001 - a slow scrape is a missing sample
                    pass


# ---------------------------------------------------------------- targets

def scheduling(nodes, policy):
    """In P/D the prefill leg follows the policy under test and the decode leg the load
    (xpyd's loadbalanced: in-flight + the engines' queues), as vllm-router's P/D targets
    below do with power_of_two; round_robin stays round_robin on both legs (the baseline)."""
    if policy == "round_robin" or all(r == "dual" for r, _, _ in nodes):
        return [f"scheduling: {policy}"]
    return [f"prefill_scheduling: {policy}", "decode_scheduling: loadbalanced"]


def xpyd_config(nodes, policy):
    cfg = f"/tmp/prefix-routing-{os.getpid()}-{free_port()}.yaml"
    lines = [f"model: {MODEL}", "host: 127.0.0.1", f"tokenizer_path: \"{TOK_ROOT}\"",
             *scheduling(nodes, policy), "startup:", "  probe_interval_seconds: 0.1",
             # The engines' queues and batch feed the picks (on by default, every 1 s).
             "engine_metrics:", "  enabled: true", f"  interval_seconds: {A.scrape_interval}",
             *[l for l in A.xpyd_config.split(";") if l], "kv_events:", "  endpoints:"]
    lines += [f'    "{a}": "tcp://127.0.0.1:{kv}"' for _, a, kv in nodes]
    for role in ("dual", "prefill", "decode"):
        xs = [a for r, a, _ in nodes if r == role]
        if xs:
            lines.append(f"{role}: [{', '.join(json.dumps(x) for x in xs)}]")
    open(cfg, "w").write("\n".join(lines) + "\n")
    return cfg


def xpyd(policy, replicas=1):
    def start(nodes):
        cfg = xpyd_config(nodes, policy)
        if replicas > 1:
            # The admin key lets the replicas post their placements to each other.
            open(cfg, "a").write("admin_api_key: bench\n")
        procs, bases, files = [], [], []
        for k in range(replicas):
            own = f"{cfg}.{k}"
            open(own, "w").write(open(cfg).read())
            files.append(own)
            level, err = "error", None
            if A.xpyd_logs:
                os.makedirs(A.xpyd_logs, exist_ok=True)
                n = len(os.listdir(A.xpyd_logs))
                level, err = "info", open(os.path.join(A.xpyd_logs, f"{n}.log"), "w")
                log(f"xpyd log: {err.name}")
            p, addr = spawn([f"{BIN}/xpyd", "proxy", "-c", own, "--port", "0", "--workers",
                             str(A.proxy_workers), "--no-pin", "--log-level", level],
                            read_addr=True, stderr=err)
            procs.append(p)
            bases.append(addr)
        # Replicas share their new prefix placements (prefix_sync, docs/scheduling.md
        # "Replicas"): each lists the others, applied by a reload once the ports are known.
        for k, addr in enumerate(bases if replicas > 1 else []):
            peers = ", ".join(json.dumps(b) for j, b in enumerate(bases) if j != k)
            open(files[k], "a").write(f"prefix_sync:\n  peers: [{peers}]\n")
            req = urllib.request.Request(f"http://{addr}/admin/reload", method="POST",
                                         headers={"X-API-Key": "bench"}, data=b"")
            urllib.request.urlopen(req, timeout=10).read()
        return procs, bases
    return start


def sglang(policy):
    def start(nodes):
        port = free_port()
        p, _ = spawn([f"{VENV}/bin/python", "-m", "sglang_router.launch_router", "--policy", policy,
                      "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
                      "--prometheus-port", str(free_port()),
                      "--worker-urls", *[f"http://{a}" for _, a, _ in nodes]])
        return [p], [f"127.0.0.1:{port}"]
    return start


def vllm_router(policy):
    def start(nodes):
        port = free_port()
        args = [f"{VENV}/bin/vllm-router", "--policy", policy, "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "error", "--prometheus-port", str(free_port()),
                # The dummy's /health is up at once; the default 30 s check interval would
                # make the router start late.
                "--worker-startup-check-interval", "1"]
        pd = any(r != "dual" for r, _, _ in nodes)
        if pd:
            args += ["--vllm-pd-disaggregation"]
            for r, a, kv in nodes:
                args += ["--prefill", f"http://{a}"] if r == "prefill" else ["--decode", f"http://{a}"]
                if r == "prefill" and policy == "kv_aware":
                    args += ["--pd-kv-events", f"http://{a}=tcp://127.0.0.1:{kv}"]
            # The prefill leg follows the policy, the decode leg the load (decode nodes'
            # events are not an input of vllm-router's P/D mode anyway).
            args += ["--prefill-policy", policy, "--decode-policy", "power_of_two"]
        else:
            args += ["--worker-urls", *[f"http://{a}" for _, a, _ in nodes]]
            if policy == "kv_aware":
                for _, a, kv in nodes:
                    args += ["--kv-event-source", f"http://{a}=tcp://127.0.0.1:{kv}"]
                args += ["--kv-event-block-size", str(BLOCK), "--kv-event-model", MODEL]
        p, _ = spawn(args, env={"VLLM_ROUTER_TOKENIZER": TOK_FILE})
        return [p], [f"127.0.0.1:{port}"]
    return start


TARGETS = {
    "dual": [
        ("xpyd round_robin", xpyd("round_robin")),
        ("xpyd cache_aware", xpyd("cache_aware")),
        ("xpyd kv_aware", xpyd("kv_aware")),
        ("sglang-router cache_aware", sglang("cache_aware")),
        ("vllm-router cache_aware", vllm_router("cache_aware")),
        ("vllm-router kv_aware", vllm_router("kv_aware")),
        ("2× xpyd cache_aware", xpyd("cache_aware", 2)),
        ("2× xpyd kv_aware", xpyd("kv_aware", 2)),
    ],
    "1p3d": [
        ("xpyd round_robin", xpyd("round_robin")),
        ("xpyd cache_aware", xpyd("cache_aware")),
        ("xpyd kv_aware", xpyd("kv_aware")),
        ("vllm-router cache_aware", vllm_router("cache_aware")),
        ("vllm-router kv_aware", vllm_router("kv_aware")),
    ],
}
TARGETS["affinity"] = [
    ("xpyd round_robin", xpyd("round_robin")),
    ("xpyd cache_aware", xpyd("cache_aware")),
    ("xpyd kv_aware", xpyd("kv_aware")),
    ("2× xpyd cache_aware", xpyd("cache_aware", 2)),
    ("2× xpyd kv_aware", xpyd("kv_aware", 2)),
    ("sglang-router cache_aware", sglang("cache_aware")),
    ("vllm-router cache_aware", vllm_router("cache_aware")),
    ("vllm-router kv_aware", vllm_router("kv_aware")),
]
ROLES = {"dual": ["dual"] * 4, "1p3d": ["prefill", "decode", "decode", "decode"], "affinity": ["dual"] * 4}


# ---------------------------------------------------------------- client

async def send(s, base, prompt, max_tokens, t0, rid):
    """One streamed completion: ("ok", ttft, latency, tokens, done_at) or why not. `rid`
    (X-Request-Id, "r<index>-g<group>") names the request in the routers' logs."""
    start = time.perf_counter()
    ttft, n = None, 0
    try:
        async with s.post(f"http://{base}/v1/completions", headers={"X-Request-Id": rid},
                          json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                "stream": True}) as r:
            if r.status != 200:
                await r.read()
                return ("status", r.status)
            async for line in r.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    n += 1
        return ("ok", ttft, time.perf_counter() - start, n, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - counted as an error
        return ("error", repr(e))


RUN_LIMIT_S = 300  # a run that has not finished by then is cut (its missing requests are errors)


async def client(bases, reqs):
    """Open loop: request i is sent at its arrival time whatever is still in flight."""
    conn = aiohttp.TCPConnector(limit=A.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    out = [None] * len(reqs)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        t0 = time.perf_counter()

        async def one(i, at, g, prompt):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            out[i] = await send(s, bases[i % len(bases)], prompt, A.output, t0, f"r{i}-g{g}")

        try:
            await asyncio.wait_for(asyncio.gather(*(one(i, at, g, p) for i, (at, g, p) in enumerate(reqs))),
                                   RUN_LIMIT_S)
        except asyncio.TimeoutError:
            log(f"run cut after {RUN_LIMIT_S} s")
        wall = time.perf_counter() - t0
    return out, wall


async def closed_client(bases, reqs):
    """Closed loop: CLIENTS clients take the requests in order, each on a fresh connection
    (force_close: a new TCP connection per request, accepted by whichever proxy worker the
    kernel picks), request i to replica i % replicas."""
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    out = [None] * len(reqs)
    order = iter(range(len(reqs)))
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        t0 = time.perf_counter()

        async def worker():
            for i in order:  # shared: each request is taken by one client
                out[i] = await send(s, bases[i % len(bases)], reqs[i][2], A.affinity_output, t0,
                                    f"r{i}-g{reqs[i][1]}")

        try:
            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(A.clients))), RUN_LIMIT_S)
        except asyncio.TimeoutError:
            log(f"run cut after {RUN_LIMIT_S} s")
        wall = time.perf_counter() - t0
    return out, wall


# ---------------------------------------------------------------- one run

def affinity_and_spread(nodes, prefixes, roles):
    """Prefix affinity (share of each group's requests on the group's main node) and
    requests per node, from the nodes' own records of what they were sent."""
    keys = {p[:200]: g for g, p in enumerate(prefixes)}
    per_node = {}
    for r, a, _ in nodes:
        if r not in roles:
            continue
        recs = json.loads(http_get(f"http://{a}/debug/requests", timeout=30))
        recs = recs.get("requests", recs) if isinstance(recs, dict) else recs
        counts = {}
        for rec in recs:
            body = rec.get("body")
            if isinstance(body, str):
                try:
                    body = json.loads(body)
                except ValueError:
                    continue
            prompt = (body or {}).get("prompt")
            if isinstance(prompt, str) and prompt[:200] in keys:
                g = keys[prompt[:200]]
                counts[g] = counts.get(g, 0) + 1
        per_node[a] = counts
    total = sum(sum(c.values()) for c in per_node.values())
    main = sum(max((per_node[a].get(g, 0) for a in per_node), default=0) for g in range(len(prefixes)))
    loads = [sum(c.values()) for c in per_node.values()]
    return (main / total if total else float("nan")), loads, per_node


def engine_beliefs(st):
    """address -> the `engine` numbers of /status/instances (batch_seen, prefill µs/token,
    mean run seconds, ...) and the instance's prefix_groups and unsent_chains, wherever they
    sit in the document."""
    out = {}

    def walk(v):
        if isinstance(v, dict):
            if isinstance(v.get("engine"), dict) and "address" in v:
                e = v["engine"]
                out[v["address"]] = {k: e.get(k) for k in ("batch_seen", "prefill_us_per_token",
                                                          "mean_run_seconds", "age_seconds")}
                # How new groups were dealt: this replica's counts, and whether it saw
                # another router's prompts (docs/scheduling.md, "Replicas").
                out[v["address"]]["prefix_groups"] = v.get("prefix_groups")
                out[v["address"]]["unsent_chains"] = (v.get("kv_events") or {}).get("unsent_chains")
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(st)
    return out


def run(topology, name, start, prefixes, reqs):
    nodes, nprocs = start_nodes(ROLES[topology])
    rprocs = []
    try:
        rprocs, bases = start(nodes)
        for b in bases:
            wait_serving(b)
        time.sleep(1.0)  # KV-event subscribers connect in the background
        # The warm-up went to some node: clear every cache so the run starts cold.
        for _, a, _ in nodes:
            urllib.request.urlopen(urllib.request.Request(f"http://{a}/reset_prefix_cache", method="POST"),
                                   timeout=5).read()
        base_m = {a: metrics_of(a) for _, a, _ in nodes}
        sampler = Sampler([a for _, a, _ in nodes])
        sampler.start()
        la0 = os.getloadavg()[0]
        out, wall = asyncio.run((closed_client if topology == "affinity" else client)(bases, reqs))
        la1 = os.getloadavg()[0]
        sampler.halt.set()
        sampler.join()
        ok = [o for o in out if o and o[0] == "ok" and o[1] is not None]
        errors = len(out) - len(ok)
        end_m = {a: metrics_of(a) for _, a, _ in nodes}

        def delta(a, k):
            return end_m[a].get(k, 0.0) - base_m[a].get(k, 0.0)
        # The prefix cache that saves compute: every node in dual, the prefill node in P/D.
        cache_roles = ("dual", "prefill")
        cnodes = [a for r, a, _ in nodes if r in cache_roles]
        hits = sum(delta(a, "vllm:prefix_cache_hits_total") for a in cnodes)
        queries = sum(delta(a, "vllm:prefix_cache_queries_total") for a in cnodes)
        dual = topology != "1p3d"
        aff, loads, groups = affinity_and_spread(nodes, prefixes, ("dual",) if dual else ("prefill",))
        if not dual:
            _, loads, _ = affinity_and_spread(nodes, prefixes, ("decode",))
        ttft = sorted(o[1] for o in ok)
        occ = {a: s for a, s in sampler.samples.items()}
        run_mean = [statistics.mean(x[0] for x in s) if s else 0 for s in occ.values()]
        wait_mean = [statistics.mean(x[1] for x in s) if s else 0 for s in occ.values()]
        wait_max = [max((x[1] for x in s), default=0) for s in occ.values()]
        picks, picks_per_replica, engines = {}, [], []
        if name.startswith("xpyd") or name.startswith("2×"):
            for b in bases:
                mine = {}
                for line in http_get(f"http://{b}/metrics").splitlines():
                    if line.startswith("proxy_routing_picks_total{"):
                        o = re.search(r'outcome="([^"]+)"', line).group(1)
                        mine[o] = mine.get(o, 0) + int(float(line.rsplit(" ", 1)[1]))
                picks_per_replica.append(mine)
                # What xpyd believed about the engines at the end (kv_aware's learned speed).
                try:
                    st = json.loads(http_get(f"http://{b}/status/instances"))
                    engines.append(engine_beliefs(st))
                except Exception as e:  # noqa: BLE001 - diagnostics only
                    engines.append(repr(e))
                for o, n in mine.items():
                    picks[o] = picks.get(o, 0) + n
        last_done = max((o[4] for o in ok), default=wall)
        return {
            "topology": topology, "target": name, "ok": len(ok), "errors": errors,
            "error_kinds": sorted({str(o[:2]) for o in out if not (o and o[0] == "ok")})[:3],
            "ttft_mean_ms": 1000 * statistics.mean(ttft) if ttft else float("nan"),
            "ttft_p50_ms": 1000 * ttft[len(ttft) // 2] if ttft else float("nan"),
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan"),
            "req_s": len(ok) / last_done if last_done else 0,
            "out_tok_s": sum(o[3] for o in ok) / last_done if last_done else 0,
            "hit_rate": hits / queries if queries else float("nan"),
            "affinity": aff, "loads": loads,
            "spread": (max(loads) / min(loads)) if loads and min(loads) > 0 else float("inf"),
            "node_running_mean": run_mean, "node_waiting_mean": wait_mean, "node_waiting_max": wait_max,
            # Mean time a request waited for a batch slot, per node (the engines' own view).
            "node_queue_ms": [1000 * delta(a, "vllm:request_queue_time_seconds_sum")
                              / max(1.0, delta(a, "vllm:request_queue_time_seconds_count"))
                              for _, a, _ in nodes],
            "node_ttft_ms": [1000 * delta(a, "vllm:time_to_first_token_seconds_sum")
                             / max(1.0, delta(a, "vllm:time_to_first_token_seconds_count"))
                             for _, a, _ in nodes],
            "preemptions": sum(delta(a, "vllm:num_preemptions_total") for _, a, _ in nodes),
            "picks": picks, "picks_per_replica": picks_per_replica, "engines": engines,
            # Which node got how many of each group's requests (node address -> group -> n).
            "groups_per_node": {a: {str(g): n for g, n in sorted(c.items())} for a, c in groups.items()},
            "load_avg": [la0, la1],
            # Each request's TTFT in arrival order (None: failed), for where-in-the-run views.
            "ttft_ms_by_request": [round(1000 * o[1], 1) if o and o[0] == "ok" else None
                                   for o in out],
        }
    finally:
        stop(rprocs)
        stop(nprocs)


def fmt_range(xs, f="{:.1f}"):
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    m = statistics.median(xs)
    return f.format(m) if len(xs) == 1 else f"{f.format(m)} ({f.format(min(xs))}–{f.format(max(xs))})"


def per_node_occupancy(rs):
    """Mean running / waiting per node, busiest node first (node order differs per run: the
    k-th busiest of each run), median over runs."""
    runs = [sorted(zip(r["node_running_mean"], r["node_waiting_mean"]), key=lambda x: -(x[0] + x[1]))
            for r in rs]
    return ", ".join(f"{statistics.median(x[k][0] for x in runs):.1f}/{statistics.median(x[k][1] for x in runs):.1f}"
                     for k in range(min(len(x) for x in runs)))


def main():
    machine = subprocess.run("lscpu | grep 'Model name' | sed 's/.*: *//'", shell=True,
                             capture_output=True, text=True).stdout.strip()
    log(f"machine: {os.cpu_count()} CPUs, {machine}; binaries {BIN}; load average {os.getloadavg()}")
    scenarios = set(filter(None, A.scenario.split(",")))
    topos = (A.topology.split(",") if "load" in scenarios else []) + (["affinity"] if "affinity" in scenarios else [])
    loads = {}
    for topo, rate in () if A.from_json else (("dual", A.rate), ("1p3d", A.rate_pd)):
        if topo in topos:
            loads[topo] = build_workload(rate)
            log(f"workload {topo}: {A.requests} requests, Poisson {rate}/s (last arrival "
                f"{loads[topo][1][-1][0]:.1f} s), {A.prefixes} prefixes × {A.prefix_tokens} tokens + "
                f"{A.suffix_tokens}-token suffixes, {A.output} output tokens")
    if "affinity" in topos and not A.from_json:
        loads["affinity"] = build_affinity_workload()
        log(f"workload affinity: {A.groups} groups × {A.per_group} requests, ~{A.prefix_bytes}-byte "
            f"prefixes, {A.clients} closed-loop clients, a connection per request, "
            f"{A.affinity_output} output tokens, {A.proxy_workers} xpyd workers per proxy")
    wanted = set(filter(None, A.targets.split(",")))
    results = []
    if A.from_json:
        results = [r for r in json.load(open(A.from_json)) if not wanted or r["target"] in wanted]
        topos = [t for t in ("dual", "1p3d", "affinity") if any(r["topology"] == t for r in results)]
    for rep in range(0 if A.from_json else A.repeats):
        for topo in topos:
            for name, start in TARGETS[topo]:
                if wanted and name not in wanted:
                    continue
                r = run(topo, name, start, *loads[topo])
                r["rep"] = rep
                results.append(r)
                json.dump(results, open(A.json, "w"), indent=1)
                log(f"[{topo} rep {rep}] {name:26} ok {r['ok']:4} err {r['errors']} "
                    f"TTFT mean {r['ttft_mean_ms']:7.1f} p50 {r['ttft_p50_ms']:7.1f} p99 {r['ttft_p99_ms']:7.1f} ms  "
                    f"{r['req_s']:5.1f} req/s  hit {r['hit_rate']:.2f}  affinity {r['affinity']:.2f}  "
                    f"loads {r['loads']}  running {[round(x, 1) for x in r['node_running_mean']]} "
                    f"waiting {[round(x, 1) for x in r['node_waiting_mean']]} (max {r['node_waiting_max']}) "
                    f"preempt {r['preemptions']:.0f} load avg {r['load_avg'][0]:.1f}→{r['load_avg'][1]:.1f} "
                    f"{r['picks_per_replica'] or ''} {r['error_kinds'] or ''}")
    for topo in topos:
        rows = [r for r in results if r["topology"] == topo]
        if not rows:
            continue
        print(f"\n{topo}: medians over {len({r['rep'] for r in rows})} runs (min–max)\n")
        print("| target | TTFT mean ms | TTFT p50 ms | TTFT p99 ms | req/s | nodes' prefix-cache hit rate | "
              "prefix affinity | load spread (max/min requests) | running/waiting per node, busiest first | errors |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for name, _ in TARGETS[topo]:
            rs = [r for r in rows if r["target"] == name]
            if not rs:
                continue
            print(f"| {name} | {fmt_range([r['ttft_mean_ms'] for r in rs])} | "
                  f"{fmt_range([r['ttft_p50_ms'] for r in rs])} | "
                  f"{fmt_range([r['ttft_p99_ms'] for r in rs])} | {fmt_range([r['req_s'] for r in rs])} | "
                  f"{fmt_range([r['hit_rate'] for r in rs], '{:.2f}')} | "
                  f"{fmt_range([r['affinity'] for r in rs], '{:.2f}')} | "
                  f"{fmt_range([r['spread'] for r in rs], '{:.2f}')} | {per_node_occupancy(rs)} | "
                  f"{sum(r['errors'] for r in rs)} |")
    log(f"runs: {A.json}; load average {os.getloadavg()}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the nodes are stopped too
    try:
        main()
    finally:
        stop(list(PROCS))
