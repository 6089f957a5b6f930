//! `xpyd demo`: the proxy's main job on an embedded default — a simulated prefill node and
//! decode node in-process, the proxy in front, one streamed and one plain request through it.

use crate::config::Config;
use crate::config::Role;
use crate::dummy::{self, DummyOptions};
use crate::http::blocking;
use crate::runtime::Driver;
use std::io::Write;
use std::time::{Duration, Instant};

pub const DEMO_MODEL: &str = "xpyd-demo";

pub fn run(port: u16, driver: Driver) -> Result<(), String> {
    crate::proxy::block_shutdown_signals();
    let node = |mode: Role| {
        let mut o = DummyOptions::new(mode, DEMO_MODEL);
        o.prefill_delay_per_token = 0.0005;
        o.decode_delay_per_token = 0.02;
        o.driver = driver;
        dummy::start(o).map_err(|e| format!("cannot start the simulated {mode:?} node: {e}"))
    };
    let prefill = node(Role::Prefill)?;
    let decode = node(Role::Decode)?;
    let yaml = format!(
        "model: {DEMO_MODEL}\nhost: 127.0.0.1\nport: {port}\nprefill: [\"{}\"]\ndecode: [\"{}\"]\nstartup:\n  probe_interval_seconds: 0.2\n",
        prefill.addr, decode.addr
    );
    let cfg = Config::from_yaml(&yaml).map_err(|e| format!("demo config: {e}"))?;
    let workers = crate::runtime::default_workers();
    let proxy = crate::proxy::start(
        &cfg,
        crate::proxy::RunOptions {
            workers,
            driver,
            pin: false,
        },
    )
    .map_err(|e| format!("cannot start the proxy on 127.0.0.1:{port}: {e} (try --port)"))?;
    let addr = proxy.addr.to_string();
    println!("xpyd demo: prefill node {} -> decode node {} behind the proxy on http://{addr} ({workers} workers, {})",
        prefill.addr, decode.addr, driver.effective());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.shared.is_ready() {
        if Instant::now() > deadline {
            return Err("the simulated nodes did not become healthy within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let t = Duration::from_secs(30);
    println!("\n$ POST /v1/completions (stream: true, 12 tokens)");
    let body = format!(
        r#"{{"model":"{DEMO_MODEL}","prompt":"Disaggregated serving splits prefill from decode","max_tokens":12,"stream":true}}"#
    );
    let mut out = std::io::stdout();
    let r = blocking::request(
        &addr,
        "POST",
        "/v1/completions",
        Some(body.as_bytes()),
        t,
        |piece| {
            let _ = out.write_all(piece);
            let _ = out.flush();
        },
    )
    .map_err(|e| format!("streaming request failed: {e}"))?;
    if r.status != 200 {
        return Err(format!("streaming request answered {}", r.status));
    }
    println!("$ POST /v1/chat/completions (stream: false)");
    let body = format!(
        r#"{{"model":"{DEMO_MODEL}","messages":[{{"role":"user","content":"Say hello"}}],"max_tokens":8}}"#
    );
    let r = blocking::request(
        &addr,
        "POST",
        "/v1/chat/completions",
        Some(body.as_bytes()),
        t,
        |_| {},
    )
    .map_err(|e| format!("request failed: {e}"))?;
    println!("{} {}\n", r.status, String::from_utf8_lossy(&r.body));

    println!("Send your own:");
    println!("  curl -N http://{addr}/v1/completions -H 'Content-Type: application/json' \\");
    println!("       -d '{{\"model\":\"{DEMO_MODEL}\",\"prompt\":\"hello\",\"max_tokens\":16,\"stream\":true}}'");
    println!("  python3 -c \"from openai import OpenAI; c = OpenAI(base_url='http://{addr}/v1', api_key='x'); print(c.completions.create(model='{DEMO_MODEL}', prompt='hello', max_tokens=16).choices[0].text)\"");
    println!("\nServing until Ctrl-C.");
    proxy.wait_for_shutdown();
    Ok(())
}
