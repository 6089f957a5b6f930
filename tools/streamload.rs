//! `xpyd-streamload`: a streaming load client for the benchmarks. N concurrent streams, R
//! streams one after another on each, each on its own connection; records the time to the
//! first event and every gap between events as they arrive off the socket, and prints one
//! JSON summary. Event-driven: the streams are tasks spread over `--threads` monoio loops
//! (default 2), so 1,000 streams on a 2-core machine measure the proxy, not a thousand
//! client threads. Bounded by N × R and by a 60 s timeout on the connect and on every read.
//!
//! TTFT runs from just before the request's write (the connection is already open; its set-up
//! is reported apart, `connect_ms`) to the read that brought the first `data:` event. All N
//! streams start together (a burst) unless `--ramp-ms D` spreads the N first starts evenly
//! over D ms: with D about one stream's length and R ≥ 2, the later rounds start one by one
//! while about N other streams are in flight (`ttft_steady_ms`: every round but the first).
//! The summary also says what the client itself cost (`cpu_s`: user + system time of this
//! process), so a run can show the client was not the bottleneck. `--dump FILE` writes every
//! stream's send time (ms from the start) and TTFT, one stream a line, to find stalls.

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
    ramp: Duration,
    dump: Option<String>,
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
        ramp: Duration::ZERO,
        dump: None,
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
            "--ramp-ms" => a.ramp = Duration::from_millis(v.parse().map_err(|_| "bad --ramp-ms")?),
            "--dump" => a.dump = Some(v),
            "--driver" => a.driver = v.parse()?,
            _ => return Err(format!("unknown flag {k}")),
        }
    }
    if a.addr.is_empty() {
        return Err("usage: xpyd-streamload --addr HOST:PORT [--path P] [--model M] [--streams N] [--rounds R] [--max-tokens T] [--threads N] [--ramp-ms D] [--dump FILE] [--driver auto|io_uring|epoll]".into());
    }
    Ok(a)
}

/// What one stream measured.
struct Stream {
    /// When the request went out, from the run's start.
    sent: Duration,
    connect: Duration,
    ttft: Duration,
    gaps: Vec<Duration>,
}

/// One stream, or None on failure.
async fn one_stream(a: &Args, body: &[u8], run_start: Instant) -> Option<Stream> {
    let timeout = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut s = monoio::time::timeout(timeout, TcpStream::connect(a.addr.as_str()))
        .await
        .ok()?
        .ok()?;
    let connect = t0.elapsed();
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
    Some(Stream {
        sent: start.saturating_duration_since(run_start),
        connect,
        ttft: events[0] - start,
        gaps: events.windows(2).map(|w| w[1] - w[0]).collect(),
    })
}

/// What one event-loop thread measured, in ms: TTFTs (and those of the rounds after the
/// first), connection set-ups, gaps; and failed streams.
#[derive(Default)]
struct Tally {
    ttfts: Vec<f64>,
    steady: Vec<f64>,
    connects: Vec<f64>,
    gaps: Vec<f64>,
    /// (sent, TTFT) of every stream, for `--dump`.
    each: Vec<(f64, f64)>,
    failed: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the streams `slots` (indices among all threads' streams; each `rounds` times in
/// turn) as tasks of one single-threaded monoio loop, so a thousand streams cost a thousand
/// sockets, not threads. Slot k starts k × ramp / N after the others' common start.
fn run_loop(a: Arc<Args>, body: Arc<Vec<u8>>, slots: Vec<usize>, start: Instant) -> Tally {
    let tally = Rc::new(RefCell::new(Tally::default()));
    let t = tally.clone();
    let (driver, total) = (a.driver, slots.len() * a.rounds);
    let run = xpyd::runtime::block_on(driver, async move {
        let tasks: Vec<_> = slots
            .into_iter()
            .map(|k| {
                let (a, body, t) = (a.clone(), body.clone(), t.clone());
                monoio::spawn(async move {
                    let offset = a.ramp.mul_f64(k as f64 / a.streams.max(1) as f64);
                    if !offset.is_zero() {
                        let at = start + offset;
                        monoio::time::sleep(at.saturating_duration_since(Instant::now())).await;
                    }
                    for round in 0..a.rounds {
                        let r = one_stream(&a, &body, start).await;
                        let mut t = t.borrow_mut();
                        match r {
                            Some(s) => {
                                t.ttfts.push(ms(s.ttft));
                                if round > 0 {
                                    t.steady.push(ms(s.ttft));
                                }
                                t.connects.push(ms(s.connect));
                                t.each.push((ms(s.sent), ms(s.ttft)));
                                t.gaps.extend(s.gaps.iter().map(|d| ms(*d)));
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

/// User + system CPU seconds this process has used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
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

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
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
    // The threads' common start, a little ahead so that every loop is up when it comes.
    let start = t0 + Duration::from_millis(20);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            // Streams dealt round-robin, so each thread's share of a ramp is spread evenly.
            let slots = (i..a.streams).step_by(threads).collect();
            let (a, body) = (a.clone(), body.clone());
            std::thread::spawn(move || run_loop(a, body, slots, start))
        })
        .collect();
    let mut all = Tally::default();
    for h in handles {
        match h.join() {
            Ok(r) => {
                all.ttfts.extend(r.ttfts);
                all.steady.extend(r.steady);
                all.connects.extend(r.connects);
                all.gaps.extend(r.gaps);
                all.each.extend(r.each);
                all.failed += r.failed;
            }
            Err(_) => all.failed += 1,
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let Tally {
        ttfts: mut t,
        steady: mut st,
        connects: mut c,
        gaps: mut g,
        mut each,
        failed: f,
    } = all;
    if let Some(path) = &a.dump {
        each.sort_by(|x, y| x.0.total_cmp(&y.0));
        let text: String = each
            .iter()
            .map(|(s, t)| format!("{s:.3} {t:.3}\n"))
            .collect();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("--dump {path}: {e}");
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "streams": t.len(), "failed": f, "wall_s": wall, "cpu_s": cpu_seconds(),
            "threads": threads, "ramp_ms": ms(a.ramp), "rounds": a.rounds,
            "ttft_ms": {"mean": mean(&t), "p10": pct(&mut t, 0.1), "p50": pct(&mut t, 0.5),
                        "p90": pct(&mut t, 0.9), "p99": pct(&mut t, 0.99)},
            "ttft_steady_ms": {"n": st.len(), "mean": mean(&st), "p50": pct(&mut st, 0.5),
                               "p99": pct(&mut st, 0.99)},
            "connect_ms": {"p50": pct(&mut c, 0.5), "p99": pct(&mut c, 0.99)},
            "gap_ms": {"p50": pct(&mut g, 0.5), "p99": pct(&mut g, 0.99), "p999": pct(&mut g, 0.999)},
        })
    );
}
