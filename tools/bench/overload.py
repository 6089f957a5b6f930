#!/usr/bin/env python3
"""Open-loop overload against a running proxy (docs/benchmarks.md, "Admission control
under overload"): streamed completions arrive at a fixed rate for a bounded time whatever
the answers; each records its status, the time to its answer's head, and for a 200 the
time to its first token. Prints one JSON summary. Bounded: rate x duration requests, each
with a timeout (a request past it counts as timed out, status -1).

With --closed C it is a closed loop instead: C clients each send their next request when
the previous one ended, for DURATION_S; `completed_per_s` is then the capacity of what is
behind HOST:PORT (requests finished within the duration, per second).

usage: overload.py HOST:PORT MODEL RATE DURATION_S [MAX_TOKENS] [TIMEOUT_S]
                   [--key API_KEY] [--closed C]
"""
import argparse
import asyncio
import json
import time


async def one(host, port, model, max_tokens, timeout, key, out):
    body = json.dumps({"model": model, "prompt": "overload " * 48, "max_tokens": max_tokens,
                       "stream": True}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"{auth}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    t0 = time.monotonic()
    rec = {"status": 0, "head": None, "ttft": None, "total": None, "start": t0}
    w = None
    try:
        async with asyncio.timeout(timeout):
            r, w = await asyncio.open_connection(host, port)
            w.write(req)
            await w.drain()
            line = await r.readline()
            rec["head"] = time.monotonic() - t0
            rec["status"] = int(line.split()[1]) if line else 0
            while (await r.readline()) not in (b"\r\n", b""):
                pass
            if rec["status"] == 200:
                while True:
                    chunk = await r.read(65536)
                    if not chunk:
                        break
                    if rec["ttft"] is None and b"data: " in chunk:
                        rec["ttft"] = time.monotonic() - t0
            rec["total"] = time.monotonic() - t0
    except TimeoutError:
        rec["status"] = -1
    except (OSError, ValueError, IndexError):
        rec["status"] = -2
    finally:
        if w is not None:
            w.close()
    out.append(rec)
    return rec


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000, 1)


def summary(out, n, start, sent_in):
    ok = [r for r in out if r["status"] == 200]
    rejected = [r for r in out if r["status"] == 429]
    statuses = {}
    for r in out:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    ttft = [r["ttft"] for r in ok if r["ttft"]]
    heads = [r["head"] for r in rejected]
    return {
        "requests": n, "sent_in_s": round(sent_in, 2), "wall_s": round(time.monotonic() - start, 2),
        "statuses": statuses, "timed_out": statuses.get("-1", 0),
        "ttft_ms_admitted": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99),
                             "max": pct(ttft, 100)},
        "answer_ms_429": {"p50": pct(heads, 50), "p99": pct(heads, 99), "max": pct(heads, 100),
                          "within_10ms": sum(1 for h in heads if h <= 0.010)},
    }


async def open_loop(a, host, port):
    out, tasks = [], []
    start = time.monotonic()
    n = int(a.rate * a.duration)
    for i in range(n):
        # Open loop: each request starts at its time, whatever happened to the others.
        delay = start + i / a.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(
            one(host, port, a.model, a.max_tokens, a.timeout, a.key, out)))
    sent_in = time.monotonic() - start
    await asyncio.gather(*tasks)
    return summary(out, n, start, sent_in)


async def closed_loop(a, host, port):
    out = []
    start = time.monotonic()
    end = start + a.duration

    async def client():
        while time.monotonic() < end:
            await one(host, port, a.model, a.max_tokens, a.timeout, a.key, out)

    await asyncio.gather(*(client() for _ in range(a.closed)))
    s = summary(out, len(out), start, a.duration)
    done = [r for r in out if r["status"] == 200 and r["start"] + r["total"] <= end]
    s["clients"] = a.closed
    s["completed_per_s"] = round(len(done) / a.duration, 2)
    return s


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("addr")
    p.add_argument("model")
    p.add_argument("rate", type=float)
    p.add_argument("duration", type=float)
    p.add_argument("max_tokens", type=int, nargs="?", default=16)
    p.add_argument("timeout", type=float, nargs="?", default=90)
    p.add_argument("--key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--closed", type=int, help="closed loop with this many clients (RATE unused)")
    a = p.parse_args()
    host, port = a.addr.rsplit(":", 1)
    run = closed_loop if a.closed else open_loop
    print(json.dumps(asyncio.run(run(a, host, int(port)))))


main()
