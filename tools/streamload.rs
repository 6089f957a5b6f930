//! `xpyd-streamload`: a streaming load client for the benchmarks. N concurrent streams
//! (one thread each), R streams per thread, each on its own connection; records the time to
//! the first event and every gap between events as they arrive off the socket, and prints
//! one JSON summary. Bounded by N × R and by a per-stream timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    addr: String,
    path: String,
    model: String,
    streams: usize,
    rounds: usize,
    max_tokens: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addr: String::new(),
        path: "/v1/completions".into(),
        model: "m".into(),
        streams: 100,
        rounds: 1,
        max_tokens: 128,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--addr" => a.addr = v,
            "--path" => a.path = v,
            "--model" => a.model = v,
            "--streams" => a.streams = v.parse().map_err(|_| "bad --streams")?,
            "--rounds" => a.rounds = v.parse().map_err(|_| "bad --rounds")?,
            "--max-tokens" => a.max_tokens = v.parse().map_err(|_| "bad --max-tokens")?,
            _ => return Err(format!("unknown flag {k}")),
        }
    }
    if a.addr.is_empty() {
        return Err("usage: xpyd-streamload --addr HOST:PORT [--path P] [--model M] [--streams N] [--rounds R] [--max-tokens T]".into());
    }
    Ok(a)
}

/// One stream: (time to first event, gaps between events), or None on failure.
fn one_stream(a: &Args, body: &[u8]) -> Option<(Duration, Vec<Duration>)> {
    let mut s = TcpStream::connect(&a.addr).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        a.path, a.addr, body.len()
    );
    let start = Instant::now();
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut events: Vec<Instant> = Vec::with_capacity(a.max_tokens + 4);
    let mut carry: Vec<u8> = Vec::new();
    let mut ok_status = None;
    let mut done = false;
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        let now = Instant::now();
        carry.extend_from_slice(&buf[..n]);
        if ok_status.is_none() && carry.len() >= 12 {
            ok_status = Some(&carry[9..12] == b"200");
        }
        // Count event starts in what arrived (keep a short tail for split markers).
        let mut i = 0;
        while let Some(p) = find(&carry[i..], b"data: ") {
            let at = i + p;
            if carry[at..].starts_with(b"data: [DONE]") {
                done = true;
            } else {
                events.push(now);
            }
            i = at + 6;
        }
        let keep = carry.len().saturating_sub(5).max(i);
        carry.drain(..keep.min(carry.len()));
    }
    if ok_status != Some(true) || !done || events.is_empty() {
        return None;
    }
    let ttft = events[0] - start;
    let gaps = events.windows(2).map(|w| w[1] - w[0]).collect();
    Some((ttft, gaps))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let a = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let body = Arc::new(
        serde_json::to_vec(&serde_json::json!({
            "model": a.model, "prompt": "The quick brown fox jumps over the lazy dog",
            "max_tokens": a.max_tokens, "stream": true, "ignore_eos": true,
        }))
        .unwrap_or_default(),
    );
    let ttfts = Arc::new(Mutex::new(Vec::new()));
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(0usize));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..a.streams)
        .map(|_| {
            let (a, body, ttfts, gaps, failed) = (
                a.clone(),
                body.clone(),
                ttfts.clone(),
                gaps.clone(),
                failed.clone(),
            );
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    for _ in 0..a.rounds {
                        match one_stream(&a, &body) {
                            Some((t, g)) => {
                                if let Ok(mut v) = ttfts.lock() {
                                    v.push(t.as_secs_f64() * 1e3);
                                }
                                if let Ok(mut v) = gaps.lock() {
                                    v.extend(g.iter().map(|d| d.as_secs_f64() * 1e3));
                                }
                            }
                            None => {
                                if let Ok(mut f) = failed.lock() {
                                    *f += 1;
                                }
                            }
                        }
                    }
                })
                .expect("thread")
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut t = ttfts.lock().map(|v| v.clone()).unwrap_or_default();
    let mut g = gaps.lock().map(|v| v.clone()).unwrap_or_default();
    let f = failed.lock().map(|f| *f).unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "streams": t.len(), "failed": f, "wall_s": wall,
            "ttft_ms": {"p50": pct(&mut t, 0.5), "p99": pct(&mut t, 0.99)},
            "gap_ms": {"p50": pct(&mut g, 0.5), "p99": pct(&mut g, 0.99), "p999": pct(&mut g, 0.999)},
        })
    );
}
