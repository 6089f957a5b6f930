#!/usr/bin/env python3
"""Metrics recording on vs. off: two xpyd (dual, zero-delay node) that differ only in
`metrics.enabled`, loaded alternately by wrk at 512 connections; prints median req/s and
p50/p99 of each and their ratio.

Usage: python3 tools/bench/metrics_overhead.py [--duration 8] [--repeats 5] [--conns 512]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline as b  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--conns", type=int, default=512)
    a = ap.parse_args()
    procs = []
    try:
        dual, dual_port = b.dummy("dual", 1)
        procs.append(dual)
        targets = []
        for enabled in ("true", "false"):
            p, port = b.start_proxy(
                f"dual: [\"127.0.0.1:{dual_port}\"]\nmetrics:\n  enabled: {enabled}\n", 1)
            procs.append(p)
            targets.append((f"metrics {'on' if enabled == 'true' else 'off'}", port))
        res = {}
        for rep in range(a.repeats):
            for name, port in targets:
                r = b.wrk(port, a.conns, a.duration)
                res.setdefault(name, []).append(r)
                print(f"  {name} rep {rep}: {r[0]:.0f} req/s p50 {r[1]:.3f} ms p99 {r[2]:.3f} ms", file=sys.stderr)
        print("| target | req/s (median, min–max) | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|")
        for name, _ in targets:
            r = res[name]
            rps = [x[0] for x in r]
            print(f"| {name} | {statistics.median(rps):.0f} ({min(rps):.0f}–{max(rps):.0f}) | "
                  f"{statistics.median(x[1] for x in r):.3f} | {statistics.median(x[2] for x in r):.3f} |")
        on = statistics.median(x[0] for x in res["metrics on"])
        off = statistics.median(x[0] for x in res["metrics off"])
        print(f"\nmetrics on / off throughput: {on / off:.3f}")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
