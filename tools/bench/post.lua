-- wrk script: POST a small non-streaming completion (the proxy-overhead workload).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench-model","prompt":"The quick brown fox jumps over the lazy dog","max_tokens":8}'
