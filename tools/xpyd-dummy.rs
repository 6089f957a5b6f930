//! `xpyd-dummy`: a simulated vLLM node for tests, load tests and the demo (docs/cli.md).

use clap::Parser;
use std::process::ExitCode;
use xpyd::dummy::{self, DummyOptions, Mode};
use xpyd::runtime::Driver;

#[derive(Parser)]
#[command(
    name = "xpyd-dummy",
    version,
    about = "Simulated vLLM node (prefill, decode or dual)"
)]
struct Args {
    #[arg(long)]
    port: u16,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    model: String,
    /// Listen address (loopback by default; 0.0.0.0 to be reachable from other hosts).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 131072)]
    max_model_len: usize,
    /// Seconds per prompt token (prefill and dual modes).
    #[arg(long, env = "PREFILL_DELAY_PER_TOKEN", default_value_t = 0.001)]
    prefill_delay_per_token: f64,
    /// Seconds per generated token.
    #[arg(long, env = "DECODE_DELAY_PER_TOKEN", default_value_t = 0.01)]
    decode_delay_per_token: f64,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Event loop driver: auto (io_uring, falling back to epoll), io_uring or epoll.
    /// Default from $XPYD_DRIVER, else auto.
    #[arg(long)]
    driver: Option<Driver>,
    /// Fraction (0..1) of inference requests answered with HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Close the connection after this many streamed tokens (non-streamed: after half the body).
    #[arg(long)]
    drop_mid_stream: Option<usize>,
    /// Wait this many milliseconds before answering each inference request.
    #[arg(long, default_value_t = 0)]
    stall_ms: u64,
    /// Keep the last N inference requests for GET /debug/requests.
    #[arg(long, default_value_t = 0)]
    record_requests: usize,
    /// Decode mode: reject requests that carry no kv_transfer_params.
    #[arg(long)]
    require_kv_params: bool,
    #[arg(long, default_value = "warning")]
    log_level: String,
}

fn main() -> ExitCode {
    let a = Args::parse();
    match a.log_level.parse() {
        Ok(l) => xpyd::log::set_level(l),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !(0.0..=1.0).contains(&a.fail_rate) {
        eprintln!("error: --fail-rate must be between 0 and 1");
        return ExitCode::FAILURE;
    }
    if a.prefill_delay_per_token < 0.0 || a.decode_delay_per_token < 0.0 {
        eprintln!("error: delays must not be negative");
        return ExitCode::FAILURE;
    }
    let driver = match Driver::resolve(a.driver) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = DummyOptions {
        host: a.host,
        port: a.port,
        mode: a.mode,
        model: a.model,
        max_model_len: a.max_model_len,
        prefill_delay_per_token: a.prefill_delay_per_token,
        decode_delay_per_token: a.decode_delay_per_token,
        workers: a.workers.unwrap_or_else(xpyd::runtime::default_workers),
        driver,
        fail_rate: a.fail_rate,
        drop_mid_stream: a.drop_mid_stream,
        stall_ms: a.stall_ms,
        record_requests: a.record_requests,
        require_kv_params: a.require_kv_params,
    };
    let mode = opts.mode;
    match dummy::start(opts) {
        Ok(h) => {
            println!(
                "xpyd-dummy listening on http://{} (mode: {mode:?}, driver: {})",
                h.addr,
                driver.effective()
            );
            h.join();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot start xpyd-dummy: {e}");
            ExitCode::FAILURE
        }
    }
}
