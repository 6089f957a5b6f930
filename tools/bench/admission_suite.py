#!/usr/bin/env python3
"""The admission-control measurement of docs/benchmarks.md ("Admission control under
overload"): realistic simulated nodes, the capacity measured, then open-loop overloads at
3x that capacity through xpyd with admission on and off, through sglang-router with its
limits, engine-aware shedding, and two API keys with one flooding. Every run is bounded in
requests and time; each scenario starts fresh nodes and a fresh proxy. One JSON line per
scenario and repeat goes to --out; `--summary` prints medians and spreads of a results file.

usage: admission_suite.py --bin target/release --out results.jsonl [--repeats 3]
                          [--duration 60] [--only name,name] [--sglang PATH]
       admission_suite.py --summary results.jsonl
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
MODEL = "m"
# Two nodes with vLLM's shape: 4 sequences run at once (later ones wait in a FIFO queue),
# prefill 0.5 ms per prompt token, 20 ms per generated token.
DUMMY = ["--mode", "dual", "--model", MODEL, "--max-num-seqs", "4",
         "--prefill-delay-per-token", "0.0005", "--decode-delay-per-token", "0.02",
         "--workers", "1"]
MAX_TOKENS = 16
# Past this a request counts as timed out (the admission-off runs would take minutes to
# drain otherwise).
TIMEOUT = 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_until(what, f, seconds=60):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if f():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def completes(port, key=None):
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status == 200


class Stack:
    """Processes of one scenario, all stopped at its end."""

    def __init__(self, args):
        self.args, self.procs, self.logs = args, [], []

    def spawn(self, cmd):
        log = tempfile.TemporaryFile()
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        self.logs.append(log)

    def nodes(self, n=2):
        ports = [free_port() for _ in range(n)]
        for p in ports:
            self.spawn([os.path.join(self.args.bin, "xpyd-dummy"), "--port", str(p)] + DUMMY)
        for p in ports:
            wait_until("a node", lambda p=p: get(f"http://127.0.0.1:{p}/health")[0] == 200)
        return ports

    def xpyd(self, nodes, yaml="", key=None):
        port = free_port()
        cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        dual = ", ".join(f'"127.0.0.1:{p}"' for p in nodes)
        cfg.write(f"model: {MODEL}\ndual: [{dual}]\nstartup: {{probe_interval_seconds: 0.1}}\n"
                  f"{yaml}\n")
        cfg.close()
        self.spawn([os.path.join(self.args.bin, "xpyd"), "proxy", "-c", cfg.name, "--port",
                    str(port), "--workers", "2", "--log-level", "error"])
        wait_until("the proxy", lambda: get(f"http://127.0.0.1:{port}/health")[0] == 200)
        wait_until("a first answer", lambda: completes(port, key))
        return port

    def sglang(self, nodes, flags):
        port = free_port()
        self.spawn([self.args.sglang, "launch", "--host", "127.0.0.1", "--port", str(port),
                    "--worker-urls"] + [f"http://127.0.0.1:{p}" for p in nodes] +
                   ["--policy", "round_robin", "--prometheus-port", str(free_port()),
                    "--log-level", "error"] + flags)
        wait_until("sglang-router", lambda: completes(port), 90)
        return port

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def load(port, rate, duration, key=None, closed=None):
    """Starts overload.py; `.result()` waits for its summary."""
    cmd = [PY, os.path.join(HERE, "overload.py"), f"127.0.0.1:{port}", MODEL, str(rate),
           str(duration), str(MAX_TOKENS), str(TIMEOUT)]
    if key:
        cmd += ["--key", key]
    if closed:
        cmd += ["--closed", str(closed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)

    class Run:
        def result(self):
            out, _ = proc.communicate(timeout=duration + TIMEOUT + 120)
            return json.loads(out)
    return Run()


def admission_metrics(port):
    _, text = get(f"http://127.0.0.1:{port}/metrics")
    keep = ("proxy_admission_rejected_total", "proxy_admission_queue_seconds_count",
            "proxy_admission_key_rejected_total")
    return {l.split(" ")[0]: float(l.split(" ")[1]) for l in text.splitlines()
            if l.startswith(keep) and not l.endswith(" 0")}


# Scenarios: each takes (args, stack, capacity) and returns its record.

def s_capacity(a, st, cap):
    port = st.xpyd(st.nodes())
    r = load(port, 0, 20, closed=32).result()
    return {"config": "xpyd, admission off, closed loop 32 clients x 20 s", "load": r,
            "capacity_rps": r["completed_per_s"]}


def s_unloaded(a, st, cap):
    port = st.xpyd(st.nodes())
    return {"config": "xpyd, admission off, 2 req/s x 20 s", "load": load(port, 2, 20).result()}


def xpyd_overload(yaml):
    def run(a, st, cap):
        port = st.xpyd(st.nodes(), yaml)
        r = load(port, round(3 * cap, 1), a.duration).result()
        return {"config": f"xpyd {yaml or '(admission off)'}", "rate": round(3 * cap, 1),
                "load": r, "metrics": admission_metrics(port)}
    return run


def sglang_overload(flags):
    def run(a, st, cap):
        port = st.sglang(st.nodes(), flags)
        r = load(port, round(3 * cap, 1), a.duration).result()
        return {"config": "sglang-router " + " ".join(flags), "rate": round(3 * cap, 1),
                "load": r}
    return run


def fairness(yaml):
    """key-a floods at 3x capacity; key-b sends 4 req/s (under its half of the capacity)."""
    def run(a, st, cap):
        port = st.xpyd(st.nodes(), "api_keys: [key-a, key-b]\n" + yaml, "key-b")
        flood = load(port, round(3 * cap, 1), a.duration, key="key-a")
        quiet = load(port, 4, a.duration, key="key-b")
        ra, rb = flood.result(), quiet.result()
        return {"config": f"xpyd api_keys [key-a, key-b] {yaml or '(admission off)'}",
                "rate": {"key-a": round(3 * cap, 1), "key-b": 4},
                "load": {"key-a": ra, "key-b": rb},
                "metrics": admission_metrics(port)}
    return run


def quiet_alone(a, st, cap):
    port = st.xpyd(st.nodes(), "api_keys: [key-a, key-b]\n", "key-b")
    return {"config": "xpyd api_keys, key-b alone at 4 req/s x 20 s",
            "load": load(port, 4, 20, key="key-b").result()}


ON_Q0 = "admission: {max_concurrent_requests: 8}"
ON_Q8 = "admission: {max_concurrent_requests: 8, queue_size: 8, queue_timeout_seconds: 1}"
ON_Q8_FAST = "admission: {max_concurrent_requests: 8, queue_size: 8, queue_timeout_seconds: 0.05}"
SHED = ("engine_metrics: {interval_seconds: 0.1}\n"
        "admission: {engine_waiting_threshold: 1, queue_size: 64, queue_timeout_seconds: 1}")
SHED_FAST = ("engine_metrics: {interval_seconds: 0.1}\n"
             "admission: {engine_waiting_threshold: 1, queue_size: 8, queue_timeout_seconds: 0.05}")

SCENARIOS = [
    ("capacity", s_capacity),
    ("unloaded", s_unloaded),
    ("on_n8_q0", xpyd_overload(ON_Q0)),
    ("on_n8_q8_t0.05", xpyd_overload(ON_Q8_FAST)),
    ("on_n8_q8_t1", xpyd_overload(ON_Q8)),
    ("off", xpyd_overload("")),
    ("sglang_n8_q0", sglang_overload(["--max-concurrent-requests", "8", "--queue-size", "0"])),
    ("sglang_n8_q8_t1", sglang_overload(["--max-concurrent-requests", "8", "--queue-size", "8",
                                         "--queue-timeout-secs", "1"])),
    ("sglang_n8_q0_rate22", sglang_overload(["--max-concurrent-requests", "8", "--queue-size",
                                             "0", "--rate-limit-tokens-per-second", "22"])),
    ("shed_w1_q64_t1", xpyd_overload(SHED)),
    ("shed_w1_q8_t0.05", xpyd_overload(SHED_FAST)),
    ("key_b_alone", quiet_alone),
    ("fair_on_n8_q0", fairness(ON_Q0)),
    ("fair_off", fairness("")),
]


def run_all(a):
    only = set(a.only.split(",")) if a.only else None
    with open(a.out, "a") as out:
        for rep in range(a.repeats):
            cap = a.capacity
            for name, f in SCENARIOS:
                if only and name not in only and name != "capacity":
                    continue
                if name == "capacity" and cap:
                    continue
                st = Stack(a)
                t0 = time.time()
                try:
                    rec = f(a, st, cap)
                except Exception as e:  # recorded, and the suite goes on
                    rec = {"error": repr(e)}
                finally:
                    st.stop()
                rec.update({"scenario": name, "repeat": rep, "started": t0,
                            "seconds": round(time.time() - t0, 1)})
                if name == "capacity":
                    cap = rec.get("capacity_rps")
                out.write(json.dumps(rec) + "\n")
                out.flush()
                print(json.dumps(rec), flush=True)
                time.sleep(2)


def summarize(path):
    """Median and range over repeats of the numbers docs/benchmarks.md shows."""
    rows = {}
    for line in open(path):
        r = json.loads(line)
        if "error" in r:
            continue
        loads = r["load"] if "key-a" not in r.get("load", {}) else r["load"]
        parts = {"": loads} if "key-a" not in loads else loads
        for part, l in parts.items():
            key = r["scenario"] + (f" {part}" if part else "")
            d = rows.setdefault(key, {})
            st = l["statuses"]
            vals = {"200": st.get("200", 0), "429": st.get("429", 0),
                    "timed_out": l.get("timed_out", 0),
                    "other": sum(v for k, v in st.items() if k not in ("200", "429", "-1")),
                    "ttft_p50": l["ttft_ms_admitted"]["p50"],
                    "ttft_p99": l["ttft_ms_admitted"]["p99"],
                    "429_p50": l["answer_ms_429"]["p50"], "429_p99": l["answer_ms_429"]["p99"],
                    "429_max": l["answer_ms_429"]["max"],
                    "429_within_10ms": l["answer_ms_429"].get("within_10ms"),
                    "capacity": r.get("capacity_rps"), "wall_s": l["wall_s"]}
            for k, v in vals.items():
                if v is not None:
                    d.setdefault(k, []).append(v)
    for key, d in rows.items():
        cells = []
        for k, vs in d.items():
            med = statistics.median(vs)
            spread = f" [{min(vs)}..{max(vs)}]" if len(vs) > 1 else ""
            cells.append(f"{k}={med}{spread}")
        print(f"{key} (n={max(len(v) for v in d.values())}): " + ", ".join(cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default="target/release")
    p.add_argument("--out", default="admission-results.jsonl")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--only")
    p.add_argument("--capacity", type=float, help="skip the capacity run, use this (req/s)")
    p.add_argument("--sglang", default="/tmp/xpyd-peers/bin/sglang-router")
    p.add_argument("--summary")
    a = p.parse_args()
    if a.summary:
        summarize(a.summary)
    else:
        run_all(a)


main()
