//! The `xpyd` command line.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use xpyd::config::Config;
use xpyd::log::Level;
use xpyd::runtime::{self, Driver};

#[derive(Parser)]
#[command(
    name = "xpyd",
    version,
    about = "Thread-per-core io_uring proxy for disaggregated LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Proxy(ProxyArgs),
    /// Start simulated prefill and decode nodes and the proxy in front of them, send a real
    /// request through, and keep serving until Ctrl-C.
    Demo(DemoArgs),
}

#[derive(Args)]
struct ProxyArgs {
    /// Config file (else $XPYD_CONFIG, else ./xpyd.yaml).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Listen port (overrides the file).
    #[arg(long)]
    port: Option<u16>,
    /// debug, info, warning or error (overrides the file).
    #[arg(long)]
    log_level: Option<String>,
    /// text or json (overrides the file).
    #[arg(long)]
    log_format: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Event loop driver: auto (io_uring, falling back to epoll), io_uring or epoll.
    /// Default from $XPYD_DRIVER, else auto.
    #[arg(long)]
    driver: Option<Driver>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Port of the proxy.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[arg(long)]
    driver: Option<Driver>,
}

fn resolve_config_path(flag: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = flag {
        return Ok(p);
    }
    if let Ok(p) = std::env::var("XPYD_CONFIG") {
        if !p.is_empty() {
            return Ok(PathBuf::from(p));
        }
    }
    let local = PathBuf::from("xpyd.yaml");
    if local.exists() {
        return Ok(local);
    }
    Err("no configuration found: looked at -c/--config, the XPYD_CONFIG environment variable, and ./xpyd.yaml".into())
}

fn run_proxy(args: ProxyArgs) -> Result<(), String> {
    let path = resolve_config_path(args.config)?;
    let mut cfg = Config::load(&path)
        .map_err(|e| format!("invalid configuration {}:\n{e}", path.display()))?;
    if let Some(p) = args.port {
        cfg.port = p;
    }
    if let Some(l) = args.log_level {
        cfg.log_level = l.parse::<Level>()?;
    }
    if let Some(f) = args.log_format {
        cfg.log_format = f.parse::<xpyd::log::Format>()?;
    }
    xpyd::log::set_level(cfg.log_level);
    xpyd::log::set_format(cfg.log_format);
    // Before any thread starts, so that every thread inherits the mask.
    xpyd::proxy::block_shutdown_signals();
    let driver = Driver::resolve(args.driver)?;
    let workers = args
        .workers
        .or(cfg.workers)
        .unwrap_or_else(runtime::default_workers);
    let handle = xpyd::proxy::start(
        &cfg,
        xpyd::proxy::RunOptions {
            workers,
            driver,
            pin: !args.no_pin,
        },
    )
    .map_err(|e| format!("cannot start the proxy on {}:{}: {e}", cfg.host, cfg.port))?;
    println!(
        "xpyd {} listening on http://{} (workers: {workers}, driver: {})",
        xpyd::VERSION,
        handle.addr,
        driver.effective()
    );
    handle.wait_for_shutdown();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Proxy(a) => run_proxy(a),
        Command::Demo(a) => Driver::resolve(a.driver).and_then(|d| xpyd::demo::run(a.port, d)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
