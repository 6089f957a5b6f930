#!/usr/bin/env python3
"""Baseline benchmark (issue: first baseline): requests/s and latency p50/p99 for
(a) direct to a dual xpyd-dummy and (b) through xpyd 1P+1D, with zero-delay dummy nodes,
at 1, 64 and 512 concurrent connections, using wrk. Every run is bounded in time.

Usage: python3 tools/bench/baseline.py [--duration 10] [--repeats 3] [--proxy-workers 1]
Prints a markdown table (medians, with min-max spread) for docs/benchmarks.md.
"""
import argparse
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REL = os.path.join(ROOT, "target", "release")
LUA = os.path.join(ROOT, "tools", "bench", "post.lua")
MODEL = "bench-model"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_listening(proc):
    line = proc.stdout.readline().decode()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        raise SystemExit(f"no address from {proc.args}: {line!r}")
    return int(m.group(2))


# --isolate: CPU sets (taskset) for the proxy and for everything else (nodes, load).
PROXY_CPUS = None
OTHER_CPUS = None


def pinned(args, cpus):
    return ["taskset", "-c", cpus] + args if cpus else args


def start(args, env=None, cpus=None):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.Popen(pinned(args, cpus), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=e)
    return p, wait_listening(p)


def dummy(mode, workers):
    return start([os.path.join(REL, "xpyd-dummy"), "--port", "0", "--mode", mode, "--model", MODEL,
                  "--workers", str(workers), "--prefill-delay-per-token", "0",
                  "--decode-delay-per-token", "0"], cpus=OTHER_CPUS)


def wait_ready(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://127.0.0.1:{port}/health"], capture_output=True, timeout=2)
            if out.stdout == b"200":
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.05)
    raise SystemExit("proxy not ready")


def start_proxy(roles_yaml, workers):
    """An xpyd (config: `roles_yaml` plus fast start-up probes) ready to serve."""
    cfg = f"/tmp/xpyd-bench-{os.getpid()}-{abs(hash(roles_yaml))}.yaml"
    with open(cfg, "w") as f:
        f.write(f"model: {MODEL}\nhost: 127.0.0.1\n{roles_yaml}startup:\n  probe_interval_seconds: 0.1\n")
    proc, port = start([os.path.join(REL, "xpyd"), "proxy", "-c", cfg, "--port", "0",
                        "--workers", str(workers), "--no-pin"], cpus=PROXY_CPUS)
    wait_ready(port)
    return proc, port


def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def require_wrk():
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the load: install it first (Debian/Ubuntu: apt-get install wrk)")


def wrk(port, conns, duration):
    threads = 1 if conns == 1 else 2
    out = subprocess.run(
        pinned(["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--latency",
                "--timeout", "10s", "-s", LUA, f"http://127.0.0.1:{port}/v1/completions"], OTHER_CPUS),
        capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        lat[pct] = to_ms(m.group(1), m.group(2))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    if errors or sock_err:
        print(f"  warning: port {port} c={conns}: {errors and errors.group(0)} {sock_err and sock_err.group(0)}",
              file=sys.stderr)
    return rps, lat["50"], lat["99"]


def median_ci(xs):
    """A distribution-free ~95 % interval for the median: order statistics k and n+1-k of
    the sorted sample, k the largest with P(Binomial(n, 1/2) < k) ≤ 2.5 %."""
    n, xs = len(xs), sorted(xs)
    k, acc = 0, 0.0
    for i in range(n + 1):
        acc += math.comb(n, i) / 2 ** n
        if acc > 0.025:
            break
        k = i + 1
    if k < 1:
        return float("nan"), float("nan")
    return xs[k - 1], xs[n - k]


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def summary(xs, fmt="{:.2f}"):
    """Table cells for paired differences or ratios: median | interquartile range | min … max |
    95 % interval of the median (`median_ci`)."""
    f = fmt.format
    q1, q3 = quartiles(xs)
    lo, hi = median_ci(xs)
    return (f"{f(statistics.median(xs))} | {f(q1)} … {f(q3)} | {f(min(xs))} … {f(max(xs))} | "
            f"{f(lo)} … {f(hi)}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    require_wrk()
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--proxy-workers", type=int, default=1)
    ap.add_argument("--dummy-workers", type=int, default=1)
    ap.add_argument("--conns", default="1,64,512")
    ap.add_argument("--isolate", metavar="PROXY_CPUS:OTHER_CPUS",
                    help="pin the proxies to one CPU set and nodes + wrk to another, e.g. 0:1")
    a = ap.parse_args()
    global PROXY_CPUS, OTHER_CPUS
    if a.isolate:
        PROXY_CPUS, OTHER_CPUS = a.isolate.split(":")
    conns = [int(c) for c in a.conns.split(",")]

    procs = []
    try:
        dual, dual_port = dummy("dual", a.dummy_workers)
        pre, pre_port = dummy("prefill", a.dummy_workers)
        dec, dec_port = dummy("decode", a.dummy_workers)
        procs += [dual, pre, dec]
        proxy, proxy_port = start_proxy(
            f"prefill: [\"127.0.0.1:{pre_port}\"]\ndecode: [\"127.0.0.1:{dec_port}\"]\n", a.proxy_workers)
        procs.append(proxy)
        proxy2, proxy2_port = start_proxy(f"dual: [\"127.0.0.1:{dual_port}\"]\n", a.proxy_workers)
        procs.append(proxy2)
        targets = [("direct (dual dummy)", dual_port, dual.pid), ("xpyd dual", proxy2_port, proxy2.pid),
                   ("xpyd 1P+1D", proxy_port, proxy.pid)]
        results = {}
        for c in conns:
            for rep in range(a.repeats):
                # Alternate targets within a repeat so drift in machine load hits both.
                for name, port, pid in targets:
                    c0 = cpu_seconds(pid)
                    rps, p50, p99 = wrk(port, c, a.duration)
                    cpu = cpu_seconds(pid) - c0
                    cpu_per_k = cpu / (rps * a.duration) * 1000 * 1000  # ms per 1000 req
                    results.setdefault((name, c), []).append((rps, p50, p99, cpu_per_k))
                    print(f"  {name:22} c={c:<4} rep {rep}: {rps:9.0f} req/s  p50 {p50:7.3f} ms  "
                          f"p99 {p99:7.3f} ms  cpu {cpu_per_k:6.1f} ms/1k req", file=sys.stderr)
        print()
        print("| target | conns | req/s (median, min–max) | p50 ms | p99 ms | CPU ms per 1k req (the process) |")
        print("|---|---:|---:|---:|---:|---:|")
        for c in conns:
            for name, _, _ in targets:
                r = results[(name, c)]
                rps = [x[0] for x in r]
                print(f"| {name} | {c} | {statistics.median(rps):.0f} ({min(rps):.0f}–{max(rps):.0f}) | "
                      f"{statistics.median(x[1] for x in r):.3f} | {statistics.median(x[2] for x in r):.3f} | "
                      f"{statistics.median(x[3] for x in r):.1f} |")
        print()
        for c in conns:
            d = results[("direct (dual dummy)", c)]
            for name in ("xpyd dual", "xpyd 1P+1D"):
                x = results[(name, c)]
                added = statistics.median(v[1] for v in x) - statistics.median(v[1] for v in d)
                ratio = statistics.median(v[0] for v in x) / statistics.median(v[0] for v in d)
                print(f"- c={c}, {name}: throughput ratio to direct {ratio:.2f}; added p50 latency {added * 1000:.0f} µs")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
