#!/usr/bin/env python3
"""Open-loop overload against a running proxy (docs/benchmarks.md, "Admission control
under overload"): streamed completions arrive at a fixed rate for a bounded time whatever
the answers; each records its status, the time to its answer's head, and for a 200 the
time to its first token. Prints one JSON summary. Bounded: rate x duration requests, each
with a timeout.

usage: overload.py HOST:PORT MODEL RATE DURATION_S [MAX_TOKENS] [TIMEOUT_S]
"""
import asyncio
import json
import sys
import time


async def one(host, port, model, max_tokens, timeout, out):
    body = json.dumps({"model": model, "prompt": "overload " * 48, "max_tokens": max_tokens,
                       "stream": True}).encode()
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    t0 = time.monotonic()
    rec = {"status": 0, "head": None, "ttft": None, "total": None}
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
            w.close()
    except TimeoutError:
        rec["status"] = -1
    except OSError:
        rec["status"] = -2
    out.append(rec)


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000, 1)


async def main():
    addr, model, rate, duration = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    max_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 90
    host, port = addr.rsplit(":", 1)
    out, tasks = [], []
    start = time.monotonic()
    n = int(rate * duration)
    for i in range(n):
        # Open loop: each request starts at its time, whatever happened to the others.
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(host, int(port), model, max_tokens, timeout, out)))
    sent_in = time.monotonic() - start
    await asyncio.gather(*tasks)
    ok = [r for r in out if r["status"] == 200]
    rejected = [r for r in out if r["status"] == 429]
    statuses = {}
    for r in out:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    print(json.dumps({
        "requests": n, "sent_in_s": round(sent_in, 2), "wall_s": round(time.monotonic() - start, 2),
        "statuses": statuses,
        "ttft_ms_admitted": {"p50": pct([r["ttft"] for r in ok if r["ttft"]], 50),
                             "p90": pct([r["ttft"] for r in ok if r["ttft"]], 90),
                             "p99": pct([r["ttft"] for r in ok if r["ttft"]], 99),
                             "max": pct([r["ttft"] for r in ok if r["ttft"]], 100)},
        "answer_ms_429": {"p50": pct([r["head"] for r in rejected], 50),
                          "p99": pct([r["head"] for r in rejected], 99),
                          "max": pct([r["head"] for r in rejected], 100)},
    }))


asyncio.run(main())
