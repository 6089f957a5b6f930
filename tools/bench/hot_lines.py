#!/usr/bin/env python3
"""The code one request walks, from a callgrind profile taken with `--dump-instr=yes`
(`tools/bench/callgrind --hot-lines`): the instruction addresses executed at least once per two
requests, the distinct 64-byte lines they lie on (what the first-level instruction cache must
hold for a request, and fetch again after the kernel evicted it), how densely those lines are
used, and the functions with the most of them (docs/benchmarks.md, "The code and data a request
touches").

Usage: tools/bench/hot_lines.py PROFILE REQUESTS [TOP]
"""
import collections
import re
import sys


def self_costs(path):
    """Self Ir per instruction address, and each address's function name."""
    names, cost, fn_of = {}, collections.Counter(), {}
    fn, addr, call = None, 0, False
    name_re = re.compile(r"c?fn=\((\d+)\)(?: (.*))?")
    for line in open(path):
        if line.startswith(("fn=", "cfn=")):
            m = name_re.match(line.rstrip("\n"))
            if m:
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                if line.startswith("fn="):
                    fn = m.group(1)
            continue
        if line.startswith("calls="):
            call = True  # the next cost line is the call's inclusive cost: not self
            continue
        first = line[:1]
        if not (first.isdigit() or first in "+-*" or line.startswith("0x")):
            continue
        parts = line.split()
        a = parts[0]
        if a.startswith("0x"):
            addr = int(a, 16)
        elif a[0] in "+-":
            d = int(a[1:], 16) if a[1:].startswith("0x") else int(a[1:])
            addr = addr + d if a[0] == "+" else addr - d
        elif a != "*":
            addr = int(a, 16)
        if call:
            call = False
            continue
        if len(parts) >= 2:
            cost[addr] += int(parts[-1])
            fn_of[addr] = fn
    return cost, {a: names.get(f, f) for a, f in fn_of.items()}


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    cost, fn_of = self_costs(path)
    hot = [a for a, c in cost.items() if c >= requests / 2]
    lines = collections.Counter(a >> 6 for a in hot)
    per_fn = collections.defaultdict(set)
    for a in hot:
        per_fn[fn_of[a]].add(a >> 6)
    print(f"hot instructions (executed at least once per two requests): {len(hot)} on {len(lines)} "
          f"distinct 64-byte lines ({len(lines) * 64 / 1024:.1f} KiB), "
          f"{len(hot) / max(len(lines), 1):.1f} per line")
    for f, ls in sorted(per_fn.items(), key=lambda kv: -len(kv[1]))[:top]:
        print(f"{len(ls):6d}  {f}")


if __name__ == "__main__":
    main()
