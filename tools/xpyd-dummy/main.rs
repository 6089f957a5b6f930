//! `xpyd-dummy`: a simulated vLLM node for tests, load tests and the demo. Its ZeroMQ KV
//! events and Hugging Face tokenizer live here, in the binary, so that the proxy binary
//! (which embeds the simulator for `xpyd demo`) links neither (docs/architecture.md).

mod hf_tokenizer;
mod kv_publisher;

use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use xpyd::config::Role;
use xpyd::dummy::{self, DummyOptions};
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
    mode: Role,
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
    /// Go silent for 60 s after this many streamed tokens (the connection stays open).
    #[arg(long)]
    pause_mid_stream: Option<usize>,
    /// Wait this many milliseconds before answering each inference request.
    #[arg(long, default_value_t = 0)]
    stall_ms: u64,
    /// Keep the last N inference requests for GET /debug/requests.
    #[arg(long, default_value_t = 0)]
    record_requests: usize,
    /// Decode mode: reject requests that carry no kv_transfer_params.
    #[arg(long)]
    require_kv_params: bool,
    /// Seconds each decode step gains per other running sequence (batch slowdown).
    #[arg(long, default_value_t = 0.0)]
    decode_delay_per_seq: f64,
    /// Requests running at once (0: unlimited); later ones wait in FIFO order.
    #[arg(long, default_value_t = 0)]
    max_num_seqs: usize,
    /// KV-cache size in blocks (0: no KV-cache model, no prefix caching, no KV events).
    #[arg(long, default_value_t = 0)]
    kv_cache_blocks: usize,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Do not keep computed blocks for reuse (vLLM's flag).
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// A Hugging Face tokenizer.json (or a folder holding one); default: built-in tokenizer.
    #[arg(long)]
    tokenizer: Option<String>,
    /// Publish KV-cache events on this ZeroMQ PUB endpoint (e.g. tcp://*:5557; a `*` port
    /// binds a free one, and the start-up line names it).
    #[arg(long)]
    kv_events_endpoint: Option<String>,
    /// Topic frame of every KV-event message.
    #[arg(long, default_value = "")]
    kv_events_topic: String,
    /// ZeroMQ ROUTER endpoint answering replay requests (e.g. tcp://*:5558).
    #[arg(long)]
    kv_events_replay_endpoint: Option<String>,
    /// Batches kept for replay.
    #[arg(long, default_value_t = 10_000)]
    kv_events_buffer_steps: usize,
    /// msgspec layout of the events: tagged maps (vLLM 0.33), tagged arrays (older), or a
    /// positional batch of tagged-map events (some releases; vllm-router reads it).
    #[arg(long, value_enum, default_value = "map")]
    kv_events_format: kv_publisher::Format,
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
    if a.prefill_delay_per_token < 0.0
        || a.decode_delay_per_token < 0.0
        || a.decode_delay_per_seq < 0.0
    {
        eprintln!("error: delays must not be negative");
        return ExitCode::FAILURE;
    }
    if a.block_size == 0 {
        eprintln!("error: --block-size must be at least 1");
        return ExitCode::FAILURE;
    }
    if a.kv_events_endpoint.is_some() && a.kv_cache_blocks == 0 {
        eprintln!(
            "error: --kv-events-endpoint needs a KV cache to report on: set --kv-cache-blocks"
        );
        return ExitCode::FAILURE;
    }
    let tokenizer = match a.tokenizer.as_deref().map(hf_tokenizer::HfTokenizer::load) {
        None => None,
        Some(Ok(t)) => Some(Arc::new(t) as Arc<dyn xpyd::dummy::engine::Tokenize>),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut kv_endpoint = None;
    let kv_events = match a.kv_events_endpoint.clone().map(|endpoint| {
        kv_publisher::start(kv_publisher::Config {
            endpoint,
            replay_endpoint: a.kv_events_replay_endpoint.clone(),
            topic: a.kv_events_topic.clone(),
            format: a.kv_events_format,
            buffer_steps: a.kv_events_buffer_steps,
        })
    }) {
        None => None,
        Some(Ok(s)) => {
            kv_endpoint = Some(s.endpoint.clone());
            Some(s as Arc<dyn xpyd::dummy::kv_events::KvEventSink>)
        }
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
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
        pause_mid_stream: a.pause_mid_stream,
        stall_ms: a.stall_ms,
        record_requests: a.record_requests,
        require_kv_params: a.require_kv_params,
        decode_delay_per_seq: a.decode_delay_per_seq,
        max_num_seqs: a.max_num_seqs,
        kv_cache_blocks: a.kv_cache_blocks,
        block_size: a.block_size,
        prefix_caching: !a.no_enable_prefix_caching,
        // vLLM seeds its first block's parent hash from PYTHONHASHSEED when set.
        hash_seed: std::env::var("PYTHONHASHSEED")
            .unwrap_or_else(|_| xpyd::dummy::block_hash::DEFAULT_SEED.into()),
        tokenizer,
        kv_events,
    };
    let mode = opts.mode;
    match dummy::start(opts) {
        Ok(h) => {
            let events = kv_endpoint.map_or(String::new(), |e| format!(", kv events: {e}"));
            println!(
                "xpyd-dummy listening on http://{} (mode: {mode:?}, driver: {}{events})",
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
