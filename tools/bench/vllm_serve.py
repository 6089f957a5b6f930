#!/usr/bin/env python3
"""The real `vllm bench serve` against xpyd, the node direct and the peers, on the same
simulated nodes (docs/benchmarks.md, "The real `vllm bench serve`"). For runs by hand, not
CI: vLLM weighs ~10 GB.

Usage: tools/bench/vllm_serve.py [--rounds 3] [--prompts 200] [--rate 20]
                                 [--input-len 1024] [--output-len 128] [--no-peers]
                                 [--max-concurrency N] [--xpyd-workers N]
       tools/bench/vllm_serve.py --prefix [--rounds 3] [--prompts 400] [--rate 20]

Needs `vllm` in $VLLM_VENV (default /tmp/vllm-bench: `python3 -m venv /tmp/vllm-bench &&
/tmp/vllm-bench/bin/pip install vllm`) and, for the peers, the virtualenv `tools/bench/compare`
installs ($XPYD_PEERS_VENV, default /tmp/xpyd-peers: the Python xpyd-proxy and vllm-router).
The Hugging Face hub is not needed: a small byte-level BPE tokenizer is trained once from the
repo's own text into $XPYD_BENCH_TOKENIZER (default /tmp/xpyd-bench-tokenizer), and both
`vllm bench serve` and every xpyd-dummy use it (`--tokenizer`), so the prompt lengths the
client asks for are the lengths the nodes count.

Nodes: one dual, one prefill, one decode xpyd-dummy (one worker each), realistic delays
(0.1 ms per prompt token, 10 ms per output token). Targets, one at a time, in an order that
rotates every round: the dual node direct, xpyd dual, xpyd 1P+1D, nginx as a plain reverse
proxy of the dual node (`baseline.nginx_conf`, when /usr/sbin/nginx or $NGINX exists), the
Python xpyd-proxy 1P+1D, vllm-router 1P+1D (the last two unless --no-peers). Each round runs the random dataset through `/v1/completions`
(`--backend openai`) and `/v1/chat/completions` (`--backend openai-chat`), every request
streamed, `--ignore-eos`, Poisson arrivals at RATE (fixed seed: every target gets the same
prompts at the same times). Bounded: each `vllm bench serve` has a 300 s timeout; about 25 s
per target and API. Markdown on stdout (median, min–max over the rounds), progress on stderr.

--prefix: where requests go, measured with vLLM's own prefix-heavy dataset
(`--dataset-name prefix_repetition`: 10 shared 2,000-token prefixes, each request one of them
plus a unique 100-token suffix, 32 tokens out), through xpyd in front of 4 dual nodes that
model a loaded engine as `tools/bench/prefix_routing.py` sizes them (a KV cache of 640
16-token blocks, 4 sequences per batch, 0.075 ms per computed prompt token, 15 ms per decode
step + 1 ms per other running sequence, KV events over ZeroMQ). Targets: xpyd `round_robin`,
`cache_aware` and `kv_aware` (from the nodes' KV events, the tokenizer through
`tokenizer_path`), each on fresh nodes (cold caches), with the nodes' prefix-cache hit rate.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import baseline as b  # noqa: E402

VLLM = os.environ.get("VLLM_VENV", "/tmp/vllm-bench")
PEERS = os.environ.get("XPYD_PEERS_VENV", "/tmp/xpyd-peers")
TOKENIZER = os.environ.get("XPYD_BENCH_TOKENIZER", "/tmp/xpyd-bench-tokenizer")
NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")
MODEL = "m"
REAL = {"PREFILL_DELAY_PER_TOKEN": "0.0001", "DECODE_DELAY_PER_TOKEN": "0.01"}
APIS = [("completions", "openai", "/v1/completions"),
        ("chat", "openai-chat", "/v1/chat/completions")]
METRICS = [("median_ttft_ms", "TTFT p50 ms"), ("p99_ttft_ms", "TTFT p99 ms"),
           ("median_tpot_ms", "TPOT p50 ms"), ("p99_itl_ms", "ITL p99 ms"),
           ("output_throughput", "output tok/s")]
procs = []
WORKERS = 0  # xpyd's --workers (0: one per core)


def stop(ps):
    """SIGTERM first: nginx's master then stops its workers (a SIGKILL would orphan them)."""
    for p in ps:
        p.terminate()
    for p in ps:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def tokenizer():
    """A byte-level BPE tokenizer trained on the repo's own text (no hub download)."""
    if os.path.exists(os.path.join(TOKENIZER, "tokenizer.json")):
        return TOKENIZER
    log(f"training a tokenizer into {TOKENIZER} ...")
    code = f"""
import glob
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast
files = glob.glob({b.ROOT!r} + '/docs/*.md') + glob.glob({b.ROOT!r} + '/src/**/*.rs', recursive=True)
tok = Tokenizer(models.BPE(unk_token='<unk>'))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train(files, trainers.BpeTrainer(vocab_size=8000, special_tokens=['<unk>', '<s>', '</s>'],
          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', bos_token='<s>', eos_token='</s>')
t.model_max_length = 131072
t.save_pretrained({TOKENIZER!r})
"""
    subprocess.run([f"{VLLM}/bin/python", "-c", code], check=True)
    return TOKENIZER


def spawn(args, env=None, stdout=subprocess.DEVNULL):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.Popen(args, stdout=stdout, stderr=subprocess.DEVNULL, env=e)
    procs.append(p)
    return p


def node(mode, tok):
    p = spawn([f"{b.REL}/xpyd-dummy", "--port", "0", "--mode", mode, "--model", MODEL,
               "--workers", "1", "--tokenizer", tok], REAL, subprocess.PIPE)
    return f"127.0.0.1:{b.wait_listening(p)}"


def start_xpyd(config):
    """xpyd on configuration text `config`, listening: (process, port)."""
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(config)
    cfg.close()
    args = [f"{b.REL}/xpyd", "proxy", "-c", cfg.name, "--port", "0", "--no-pin"]
    if WORKERS:
        args += ["--workers", str(WORKERS)]
    p = spawn(args, stdout=subprocess.PIPE)
    return p, b.wait_listening(p)


def xpyd(roles):
    return start_xpyd(f"model: {MODEL}\n" + "".join(f"{k}: [\"{v}\"]\n" for k, v in roles.items()))


def nginx(node_addr):
    """nginx as a plain reverse proxy of the dual node (the efficiency bar for the dual path)."""
    tmp = tempfile.mkdtemp(prefix="xpyd-vllm-serve-nginx-")
    port = b.free_port()
    return spawn(b.nginx_command(NGINX, node_addr, port, tmp)), port


def python_xpyd(prefill, decode):
    port = b.free_port()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    cfg.write(b.python_xpyd_config(MODEL, port, [prefill], [decode]))
    cfg.close()
    return spawn([f"{PEERS}/bin/xpyd", "proxy", "-c", cfg.name]), port


def vllm_router(prefill, decode):
    port = b.free_port()
    return spawn(b.vllm_router_args(PEERS, port, [prefill], [decode])), port


def bench(port, api, tok, a, out, dataset=None):
    _, backend, endpoint = api
    dataset = dataset or ["--dataset-name", "random", "--random-input-len", str(a.input_len),
                          "--random-output-len", str(a.output_len)]
    args = [f"{VLLM}/bin/vllm", "bench", "serve", "--backend", backend, "--endpoint", endpoint,
            "--base-url", f"http://127.0.0.1:{port}", "--model", MODEL, "--tokenizer", tok,
            *dataset, "--num-prompts", str(a.prompts),
            "--request-rate", str(a.rate), "--seed", "0",
            *(["--max-concurrency", str(a.max_concurrency)] if a.max_concurrency else []),
            "--ignore-eos", "--disable-tqdm",
            "--save-result", "--result-dir", os.path.dirname(out),
            "--result-filename", os.path.basename(out)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd="/tmp")
    if r.returncode != 0 or not os.path.exists(out):
        log(r.stdout[-2000:], r.stderr[-2000:])
        raise SystemExit(f"vllm bench serve failed against port {port}")
    mismatch = [line for line in r.stdout.splitlines() if "mismatch" in line]
    res = json.load(open(out))
    res["mismatch"] = mismatch
    return res


def prefix_nodes(tok):
    """4 fresh dual nodes with the engine model: [(addr, kv_port)]."""
    out = []
    for _ in range(4):
        kv = b.free_port()
        p = spawn([f"{b.REL}/xpyd-dummy", "--port", "0", "--mode", "dual", "--model", MODEL,
                   "--workers", "1", "--tokenizer", tok, "--max-num-seqs", "4",
                   "--kv-cache-blocks", "640", "--block-size", "16",
                   "--prefill-delay-per-token", "0.000075", "--decode-delay-per-token", "0.015",
                   "--decode-delay-per-seq", "0.001", "--kv-events-endpoint", f"tcp://*:{kv}"],
                  stdout=subprocess.PIPE)
        out.append((f"127.0.0.1:{b.wait_listening(p)}", kv))
    return out


def cache_counts(addrs):
    """The nodes' prefix-cache hits and queries so far, summed: one /metrics read per node."""
    hits = queries = 0.0
    for addr in addrs:
        text = subprocess.run(["curl", "-s", "-m", "5", f"http://{addr}/metrics"],
                              capture_output=True, text=True).stdout
        for line in text.splitlines():
            name = line.split(" ", 1)[0].split("{", 1)[0]
            if name == "vllm:prefix_cache_hits_total":
                hits += float(line.rsplit(" ", 1)[1])
            elif name == "vllm:prefix_cache_queries_total":
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def prefix_main(a, tok):
    # xpyd reads model `m`'s tokenizer from <tokenizer_path>/m/.
    root = tempfile.mkdtemp()
    os.symlink(tok, os.path.join(root, MODEL))
    results = {}
    policies = ["round_robin", "cache_aware", "kv_aware"]
    work = tempfile.mkdtemp()
    for r in range(a.rounds):
        for policy in policies[r % 3:] + policies[:r % 3]:
            log(f"round {r + 1}: xpyd {policy}")
            first = len(procs)
            nodes = prefix_nodes(tok)
            lines = [f"model: {MODEL}", f"tokenizer_path: \"{root}\"", f"scheduling: {policy}",
                     "engine_metrics:", "  enabled: true", "  interval_seconds: 0.5",
                     "kv_events:", "  endpoints:",
                     *[f'    "{addr}": "tcp://127.0.0.1:{kv}"' for addr, kv in nodes],
                     f"dual: [{', '.join(json.dumps(addr) for addr, _ in nodes)}]"]
            _, port = start_xpyd("\n".join(lines) + "\n")
            b.wait_serving(port, MODEL)
            addrs = [addr for addr, _ in nodes]
            hits0, queries0 = cache_counts(addrs)
            out = os.path.join(work, f"p{r}-{policy}.json")
            res = bench(port, ("completions", "openai", "/v1/completions"), tok, a, out, [
                "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "2000",
                "--prefix-repetition-suffix-len", "100", "--prefix-repetition-num-prefixes", "10",
                "--prefix-repetition-output-len", "32"])
            hits, queries = cache_counts(addrs)
            hits, queries = hits - hits0, queries - queries0
            res["hit_rate"] = hits / queries if queries else 0.0
            results.setdefault(policy, []).append(res)
            stop(procs[first:])
    print(f"`vllm bench serve --dataset-name prefix_repetition` (10 prefixes of 2,000 tokens, "
          f"100-token suffixes, 32 out), {a.prompts} prompts at {a.rate:g} req/s (Poisson, seed 0), "
          f"streamed; xpyd in front of 4 dual nodes with the engine model; {a.rounds} rounds, "
          f"median (min–max), fresh nodes each run.\n")
    cols = [("median_ttft_ms", "TTFT p50 ms"), ("mean_ttft_ms", "TTFT mean ms"),
            ("p99_ttft_ms", "TTFT p99 ms"), ("median_tpot_ms", "TPOT p50 ms"),
            ("hit_rate", "prefix-cache hit rate")]
    print("| xpyd scheduling | completed | failed | " + " | ".join(h for _, h in cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    for policy in policies:
        rs = results[policy]
        cells = [f"{sum(x['completed'] for x in rs)}", f"{sum(x['failed'] for x in rs)}"]
        for key, _ in cols:
            xs = [x[key] for x in rs]
            cells.append(f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})")
        print(f"| {policy} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=None, help="default 200, 400 with --prefix")
    ap.add_argument("--rate", type=float, default=20, help="requests per second (inf: all at once)")
    ap.add_argument("--max-concurrency", type=int, default=0, help="vllm's cap on requests in flight")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--prefix", action="store_true")
    ap.add_argument("--xpyd-workers", type=int, default=0, help="xpyd's --workers (default: one per core)")
    a = ap.parse_args()
    # A SIGTERM (a timeout, `kill`) ends the run through `finally`, which stops the targets.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global WORKERS
    WORKERS = a.xpyd_workers
    a.rounds = max(1, min(a.rounds, 10))
    a.prompts = max(1, min(a.prompts or (400 if a.prefix else 200), 2000))
    if not os.path.exists(f"{VLLM}/bin/vllm"):
        raise SystemExit(f"no vllm in {VLLM} (see the usage above)")
    tok = tokenizer()
    if a.prefix:
        try:
            prefix_main(a, tok)
        finally:
            stop(procs)
        return
    dual, pre, dec = node("dual", tok), node("prefill", tok), node("decode", tok)
    targets = {
        "direct (dual node)": (None, int(dual.rsplit(":", 1)[1])),
        "xpyd dual": xpyd({"dual": dual}),
        "xpyd 1P+1D": xpyd({"prefill": pre, "decode": dec}),
    }
    if os.path.exists(NGINX):
        targets["nginx dual"] = nginx(dual)
    if not a.no_peers:
        targets["Python xpyd-proxy 1P+1D"] = python_xpyd(pre, dec)
        targets["vllm-router 1P+1D"] = vllm_router(pre, dec)
    for _, port in targets.values():
        b.wait_serving(port, MODEL)
    names = list(targets)
    res = {}  # (target, api) -> [result per round]
    work = tempfile.mkdtemp()
    try:
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                for api in APIS:
                    log(f"round {r + 1}: {name}, {api[0]}")
                    out = os.path.join(work, f"r{r}-{names.index(name)}-{api[0]}.json")
                    res.setdefault((name, api[0]), []).append(bench(targets[name][1], api, tok, a, out))
    finally:
        stop(procs)
    print(f"`vllm bench serve`, random dataset, {a.input_len} tokens in, {a.output_len} out, "
          f"{a.prompts} prompts at {a.rate:g} req/s (Poisson, seed 0), streamed, --ignore-eos; "
          f"{a.rounds} rounds, median (min–max); nodes: 0.1 ms per prompt token, 10 ms per "
          f"output token.\n")
    med = lambda xs: statistics.median(xs)  # noqa: E731
    for api, _, endpoint in APIS:
        print(f"`{endpoint}`:\n")
        print("| target | completed | failed | " + " | ".join(h for _, h in METRICS)
              + " | TTFT p50 added ms |")
        print("|---|---:|---:|" + "---:|" * (len(METRICS) + 1))
        direct = med([x["median_ttft_ms"] for x in res[(names[0], api)]])
        for name in names:
            rs = res[(name, api)]
            cells = [f"{sum(x['completed'] for x in rs)}", f"{sum(x['failed'] for x in rs)}"]
            for key, _ in METRICS:
                xs = [x[key] for x in rs]
                cells.append(f"{med(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})")
            added = med([x["median_ttft_ms"] for x in rs]) - direct
            cells.append("—" if name == names[0] else f"{added:+.2f}")
            print(f"| {name} | " + " | ".join(cells) + " |")
            for x in rs:
                for line in x["mismatch"]:
                    log(f"{name}: {line}")
        print()


if __name__ == "__main__":
    main()
