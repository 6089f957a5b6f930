"""A vLLM-shaped node for routing tests: /health, /v1/models, a /metrics page whose queue
numbers come from the command line (as a loaded vLLM engine reports them), and completions
that it counts (GET /stats). Prints `listening on http://HOST:PORT` first, like xpyd-dummy.

usage: busy_node.py MODEL RUNNING WAITING KV_USAGE [METRICS]

METRICS: `ok` (default); `garbage` (a /metrics page that is not an exposition); `hang`
(/metrics never answers: the scraper's timeout must fire).
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL, RUNNING, WAITING, KV = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
METRICS = sys.argv[5] if len(sys.argv) > 5 else "ok"
served = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, ctype="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.answer(200, "{}")
        elif self.path == "/v1/models":
            self.answer(200, json.dumps({"object": "list", "data": [
                {"id": MODEL, "object": "model", "max_model_len": 100000}]}))
        elif self.path == "/metrics" and METRICS == "hang":
            time.sleep(3600)
        elif self.path == "/metrics" and METRICS == "garbage":
            self.answer(200, "vllm:num_requests_waiting{{{ not a sample\n\x00\xff", "text/plain")
        elif self.path == "/metrics":
            labels = f'engine="0",model_name="{MODEL}"'
            self.answer(200, "\n".join([
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{labels}}} {RUNNING}",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{labels}}} {WAITING}",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{{{labels}}} {KV}",
                ""]), "text/plain; version=0.0.4")
        elif self.path == "/stats":
            self.answer(200, json.dumps({"requests": served}))
        else:
            self.answer(404, "{}")

    def do_POST(self):
        global served
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        served += 1
        self.answer(200, json.dumps({
            "id": "cmpl-busy", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"busy node listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
