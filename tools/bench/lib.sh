# Shell helpers shared by the bench scripts (sourced, not run).

port_of() { # waits for "listening on http://ADDR" in $1; prints ADDR
  for _ in $(seq 1 600); do
    local a; a=$(grep -o 'http://[0-9.:]*' "$1" 2>/dev/null | head -1 || true)
    [ -n "$a" ] && { echo "${a#http://}"; return; }
    sleep 0.1
  done
  echo "no address in $1" >&2; exit 1
}

wait_healthy() { # waits until http://$1/health answers 200 (the proxy has healthy nodes)
  for _ in $(seq 1 300); do
    curl -sf -o /dev/null "http://$1/health" && return
    sleep 0.1
  done
  echo "http://$1/health did not answer 200 within 30 s" >&2; exit 1
}

countable() { # $1: a proxy binary; stops unless callgrind and footprint can count inside its tasks
  # They collect inside `monoio::task::raw::poll` (--toggle-collect). In a binary laid out again
  # by BOLT, its functions moved and split into fragments, that count came out at half the
  # whole-process one, with no other sign (docs/benchmarks.md, "The profile build again").
  if readelf -S "$1" 2>/dev/null | grep -q '\.note\.bolt_info'; then
    echo "$1 was laid out by BOLT: counts inside monoio::task::raw::poll would be short" >&2
    exit 1
  fi
}
