#!/usr/bin/env python3
"""Where the CPU of one request goes on the whole bench, process by process: the node direct
(wrk + one dual node) and xpyd 1P+1D (wrk + the proxy + a prefill node + a decode node), all
zero-delay xpyd-dummy nodes with one worker and the proxy as `compare --anchors` runs it (two
workers, cache_aware, engine-metric scraping). CPU per request: each process's user + system
time (/proc/PID/stat; wrk's from getrusage of this script's children) over `wrk -t2 -cCONNS
-d4s` with tools/bench/post.lua, divided by wrk's request count. Says what the 1P+1D ratio to
the node direct is made of: the node direct is not CPU-bound (one node thread), 1P+1D takes
what the two cores have left. The proxy's time is also given as its user part.

--floor: the 1P+1D floor (tools/bench/pd_floor.rs, two workers: the six socket operations and
nothing else) takes its turn too, on a prefill and decode node of its own: what the nodes and wrk
cost per request beside a proxy that does nothing but move the bytes.

Usage: tools/bench/cpu_split.py [--bin DIR] [--rounds R] [--conns C] [--floor]
       (DIR: xpyd and xpyd-dummy, default target/release; about 10 s per round, 14 with --floor)
"""
import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline as b  # noqa: E402


def user_seconds(pid):
    """User time of a process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=b.REL)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--floor", action="store_true")
    args = ap.parse_args()
    b.require_wrk()
    procs = []

    def spawn(argv, env=None):
        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=e)
        procs.append(p)
        return p

    def node(mode):
        p = spawn([f"{args.bin}/xpyd-dummy", "--port", "0", "--mode", mode, "--model", b.MODEL, "--workers", "1"],
                  {"PREFILL_DELAY_PER_TOKEN": "0", "DECODE_DELAY_PER_TOKEN": "0"})
        return p, b.wait_listening(p)

    try:
        dual, prefill, decode = node("dual"), node("prefill"), node("decode")
        cfg = f"/tmp/xpyd-cpu-split-{os.getpid()}.yaml"
        with open(cfg, "w") as f:
            f.write(f"model: {b.MODEL}\nhost: 127.0.0.1\nstartup:\n  probe_interval_seconds: 0.1\n"
                    "scheduling: cache_aware\nengine_metrics:\n  enabled: true\n  interval_seconds: 1\n"
                    f"prefill: [\"127.0.0.1:{prefill[1]}\"]\ndecode: [\"127.0.0.1:{decode[1]}\"]\n")
        proxy = spawn([f"{args.bin}/xpyd", "proxy", "-c", cfg, "--port", "0", "--no-pin"])
        port = b.wait_listening(proxy)
        b.wait_ready(port)
        b.wrk(port, args.conns, 1)  # opens the upstream connections
        targets = [("direct", dual[1], [("node", dual[0])]),
                   ("1P+1D", port, [("proxy", proxy), ("prefill", prefill[0]), ("decode", decode[0])])]
        if args.floor:
            if subprocess.run(["cargo", "build", "--release", "-q", "--example", "pd-floor"],
                              cwd=b.ROOT).returncode != 0:
                raise SystemExit("build of the pd-floor example failed")
            fp, fd = node("prefill"), node("decode")
            floor_port = b.free_port()
            floor = spawn([f"{b.ROOT}/target/release/examples/pd-floor", str(floor_port),
                           f"127.0.0.1:{fp[1]}", f"127.0.0.1:{fd[1]}", "2"])
            b.wait_listening(floor)
            b.wait_serving(floor_port)
            b.wrk(floor_port, args.conns, 1)
            targets.append(("floor", floor_port, [("proxy", floor), ("prefill", fp[0]), ("decode", fd[0])]))
        print(f"wrk -t2 -c{args.conns} -d4s; CPU µs per request (user + system)")
        for _ in range(args.rounds):
            for name, p, parts in targets:
                c0 = {n: b.cpu_seconds(q.pid) for n, q in parts}
                u0 = user_seconds(parts[0][1].pid)
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                rps, _, _ = b.wrk(p, args.conns, 4)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                n = rps * 4
                cpu = {k: (b.cpu_seconds(q.pid) - c0[k]) / n * 1e6 for k, q in parts}
                cpu["wrk"] = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n * 1e6
                total = sum(cpu.values())
                user = (user_seconds(parts[0][1].pid) - u0) / n * 1e6
                print(f"{name:7} {rps:8.0f} req/s  "
                      + "  ".join(f"{k} {v:5.2f}" + (f" (user {user:5.2f})" if k == "proxy" else "")
                                  for k, v in cpu.items())
                      + f"  total {total:5.2f} (= {total * rps / 1e6:.2f} cores)  load {os.getloadavg()[0]:.2f}",
                      flush=True)
    finally:
        for p in procs:
            p.kill()
        time.sleep(0.1)


if __name__ == "__main__":
    main()
