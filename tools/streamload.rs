//! `xpyd-streamload`: a streaming load client for the benchmarks. N concurrent streams, R
//! streams one after another on each, each on its own connection; records the time to the
//! first event and every gap between events as they arrive off the socket, and prints one
//! JSON summary. Event-driven: the streams are tasks spread over `--threads` monoio loops
//! (default 2), so 1,000 streams on a 2-core machine measure the proxy, not a thousand
//! client threads. Bounded by N × R and by a 60 s timeout on the connect and on every read.

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xpyd::runtime::Driver;

struct Args {
    addr: String,
    path: String,
    model: String,
    streams: usize,
    rounds: usize,
    max_tokens: usize,
    threads: usize,
    driver: Driver,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        addr: String::new(),
        path: "/v1/completions".into(),
        model: "m".into(),
        streams: 100,
        rounds: 1,
        max_tokens: 128,
        threads: 2,
        driver: Driver::resolve(None)?,
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
            "--threads" => a.threads = v.parse().map_err(|_| "bad --threads")?,
            "--driver" => a.driver = v.parse()?,
            _ => return Err(format!("unknown flag {k}")),
        }
    }
    if a.addr.is_empty() {
        return Err("usage: xpyd-streamload --addr HOST:PORT [--path P] [--model M] [--streams N] [--rounds R] [--max-tokens T] [--threads N] [--driver auto|io_uring|epoll]".into());
    }
    Ok(a)
}

/// One stream: (time to first event, gaps between events), or None on failure.
async fn one_stream(a: &Args, body: &[u8]) -> Option<(Duration, Vec<Duration>)> {
    let timeout = Duration::from_secs(60);
    let mut s = monoio::time::timeout(timeout, TcpStream::connect(a.addr.as_str()))
        .await
        .ok()?
        .ok()?;
    s.set_nodelay(true).ok()?;
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        a.path, a.addr, body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let start = Instant::now();
    let (res, _) = s.write_all(req).await;
    res.ok()?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut events: Vec<Instant> = Vec::with_capacity(a.max_tokens + 4);
    let mut carry: Vec<u8> = Vec::new();
    let mut ok_status = None;
    let mut done = false;
    loop {
        buf.clear();
        let (res, b) = monoio::time::timeout(timeout, s.read(buf)).await.ok()?;
        buf = b;
        let n = res.ok()?;
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

/// What one event-loop thread measured: TTFTs and gaps in ms, and failed streams.
#[derive(Default)]
struct Tally {
    ttfts: Vec<f64>,
    gaps: Vec<f64>,
    failed: usize,
}

/// Runs `streams` concurrent streams (each `rounds` times in turn) as tasks of one
/// single-threaded monoio loop, so a thousand streams cost a thousand sockets, not threads.
fn run_loop(a: Arc<Args>, body: Arc<Vec<u8>>, streams: usize) -> Tally {
    let tally = Rc::new(RefCell::new(Tally::default()));
    let t = tally.clone();
    let (driver, total) = (a.driver, streams * a.rounds);
    let run = xpyd::runtime::block_on(driver, async move {
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let (a, body, t) = (a.clone(), body.clone(), t.clone());
                monoio::spawn(async move {
                    for _ in 0..a.rounds {
                        let r = one_stream(&a, &body).await;
                        let mut t = t.borrow_mut();
                        match r {
                            Some((ttft, g)) => {
                                t.ttfts.push(ttft.as_secs_f64() * 1e3);
                                t.gaps.extend(g.iter().map(|d| d.as_secs_f64() * 1e3));
                            }
                            None => t.failed += 1,
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await;
        }
    });
    if run.is_err() {
        tally.borrow_mut().failed += total;
    }
    tally.take()
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
    let t0 = Instant::now();
    let threads = a.threads.clamp(1, a.streams.max(1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            // Streams split as evenly as the count allows.
            let n = a.streams / threads + usize::from(i < a.streams % threads);
            let (a, body) = (a.clone(), body.clone());
            std::thread::spawn(move || run_loop(a, body, n))
        })
        .collect();
    let (mut t, mut g, mut f) = (Vec::new(), Vec::new(), 0);
    for h in handles {
        match h.join() {
            Ok(r) => {
                t.extend(r.ttfts);
                g.extend(r.gaps);
                f += r.failed;
            }
            Err(_) => f += 1,
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "streams": t.len(), "failed": f, "wall_s": wall,
            "ttft_ms": {"p50": pct(&mut t, 0.5), "p99": pct(&mut t, 0.99)},
            "gap_ms": {"p50": pct(&mut g, 0.5), "p99": pct(&mut g, 0.99), "p999": pct(&mut g, 0.999)},
        })
    );
}
