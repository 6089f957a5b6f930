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
    /// Find common mistakes in a config file and print the fixes as a diff.
    FixConfig(FixArgs),
}

#[derive(Args)]
struct FixArgs {
    path: PathBuf,
    /// Apply the fixes (after copying the file to PATH.<timestamp>.bak).
    #[arg(long)]
    write: bool,
    /// Ask on stdin before each ambiguous fix.
    #[arg(long)]
    interactive: bool,
}

#[derive(Args)]
#[command(version, display_name = "xpyd")]
struct ProxyArgs {
    /// Config file (else $XPYD_CONFIG, else ./xpyd.yaml).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Validate PATH, print every problem (or a summary of the topology) and exit.
    #[arg(long, value_name = "PATH")]
    validate_config: Option<PathBuf>,
    /// Write a commented template config (default ./xpyd.yaml) and exit.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "xpyd.yaml")]
    init_config: Option<PathBuf>,
    /// With --init-config: overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// Listen port (overrides the file).
    #[arg(long)]
    port: Option<u16>,
    /// debug, info, warning or error (overrides the file).
    #[arg(long)]
    log_level: Option<String>,
    /// text or json (overrides the file).
    #[arg(long)]
    log_format: Option<String>,
    /// Worker threads, at least 1 (default: one per core).
    #[arg(long, value_parser = at_least_one)]
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
    /// Event loop driver: auto (io_uring, falling back to epoll), io_uring or epoll.
    /// Default from $XPYD_DRIVER, else auto.
    #[arg(long)]
    driver: Option<Driver>,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
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
    Err("no configuration found: looked at -c/--config, the XPYD_CONFIG environment variable, and ./xpyd.yaml; `xpyd proxy --init-config` writes a commented template to ./xpyd.yaml".into())
}

/// The template `--init-config` writes: the documented example config.
const TEMPLATE: &str = include_str!("../examples/proxy.yaml");

fn run_proxy(args: ProxyArgs) -> Result<(), String> {
    if let Some(path) = args.init_config {
        if path.exists() && !args.force {
            return Err(format!(
                "{} exists; use --force to overwrite it",
                path.display()
            ));
        }
        std::fs::write(&path, TEMPLATE)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    let overrides = xpyd::config::Overrides {
        port: args.port,
        log_level: args.log_level.map(|l| l.parse::<Level>()).transpose()?,
        log_format: args
            .log_format
            .map(|f| f.parse::<xpyd::log::Format>())
            .transpose()?,
        workers: args.workers,
    };
    if let Some(path) = args.validate_config {
        // With the command line's overrides: the summary says what `proxy` would run.
        let cfg = Config::load(&path)
            .map_err(|e| format!("{} is invalid:\n{e}", path.display()))?
            .with_overrides(overrides);
        // 1.2's line first: scripts written for the Python proxy grep it.
        let mut report = format!(
            "Config is valid: {p}\n{p} is valid\n{}",
            cfg.summary(),
            p = path.display()
        );
        for w in &cfg.warnings {
            report.push_str(&format!("warning: {w}\n"));
        }
        // A reader that stops early (`| head -1`, `| grep -q`) is not an error.
        use std::io::Write;
        let _ = std::io::stdout().lock().write_all(report.as_bytes());
        return Ok(());
    }
    let path = resolve_config_path(args.config)?;
    let cfg = Config::load(&path)
        .map_err(|e| format!("{} is invalid:\n{e}", path.display()))?
        .with_overrides(overrides);
    xpyd::log::set_level(cfg.log_level);
    xpyd::log::set_format(cfg.log_format);
    for w in &cfg.warnings {
        xpyd::warn!("{}: {w}", path.display());
    }
    // Before any thread starts, so that every thread inherits the mask.
    xpyd::proxy::block_shutdown_signals();
    let driver = Driver::resolve(args.driver)?;
    let workers = cfg.workers.unwrap_or_else(runtime::default_workers);
    let handle = xpyd::proxy::start(
        &cfg,
        xpyd::proxy::RunOptions {
            workers,
            driver,
            pin: !args.no_pin,
        },
    )
    .map_err(|e| format!("cannot start the proxy on {}:{}: {e}", cfg.host, cfg.port))?;
    let line = format!(
        "xpyd {} listening on http://{} (workers: {workers}, driver: {})",
        xpyd::VERSION,
        handle.addr,
        driver.effective()
    );
    // On stdout (scripts and tests read the address from it), in the log's format.
    println!("{}", xpyd::log::startup_line(&line));
    handle.wait_for_shutdown();
    Ok(())
}

fn fix_config(a: FixArgs) -> Result<(), String> {
    use std::io::{BufRead, Write};
    use xpyd::config::fix;
    let text = std::fs::read_to_string(&a.path)
        .map_err(|e| format!("cannot read {}: {e}", a.path.display()))?;
    let stdin = std::io::stdin();
    let mut answers = stdin.lock().lines();
    let mut ask = |prompt: &str| {
        print!("  {prompt}: ");
        let _ = std::io::stdout().flush();
        let answer = answers.next().and_then(Result::ok).unwrap_or_default();
        answer.trim().to_string()
    };
    let show = |f: &fix::Fix| {
        println!("line {}: {}", f.line, f.reason);
        match f.after.as_ref().or(f.certain.as_ref()) {
            Some(after) => {
                for l in fix::diff_lines(&f.before, after) {
                    println!("{l}");
                }
            }
            None => {
                for l in &f.before {
                    println!("- {l}");
                }
            }
        }
    };
    // Line fixes first; the format merge works on their result.
    let mut fixes = fix::find_fixes(&text);
    for f in fixes.iter_mut() {
        show(f);
        match (f.after.is_some(), f.question) {
            (true, _) => {}
            (false, Some(_)) if !a.interactive => {
                f.after = f.certain.clone();
                let what = if f.after.is_some() {
                    "the ambiguous part"
                } else {
                    "ambiguous"
                };
                println!("  ({what}: fix by hand, or run with --interactive)")
            }
            (false, Some(fix::Question::Port)) => {
                let answer = ask("port to add (empty: leave the addresses as they are)");
                let base = f.certain.clone().unwrap_or_else(|| f.before.clone());
                match answer.parse::<u16>() {
                    Ok(port) => {
                        let after: Vec<String> =
                            base.iter().map(|l| fix::with_port(l, port)).collect();
                        for l in &after {
                            println!("+ {l}");
                        }
                        f.after = Some(after);
                    }
                    Err(_) => {
                        f.after = f.certain.clone();
                        println!("  (addresses left as they are)")
                    }
                }
            }
            (false, _) => println!("  (fix by hand)"),
        }
    }
    let mut fixed = fix::apply(&text, &fixes);
    let mut merge = fix::merge_formats(&fixed, None);
    if let Some(m) = &merge {
        show(m);
        if m.question == Some(fix::Question::ModelName) && a.interactive {
            let name = ask("model name for the legacy instances (empty: leave them)");
            if !name.is_empty() {
                merge = fix::merge_formats(&fixed, Some(&name));
                if let Some(named) = &merge {
                    show(named);
                }
            }
        }
    }
    match &merge {
        Some(m) if m.after.is_some() => fixed = fix::apply(&fixed, std::slice::from_ref(m)),
        Some(m) if m.question.is_some() && !a.interactive => {
            println!("  (ambiguous: fix by hand, or run with --interactive)")
        }
        Some(_) => println!("  (fix by hand)"),
        None => {}
    }
    if fixes.is_empty() && merge.is_none() {
        println!("{}: nothing to fix", a.path.display());
        return Ok(());
    }
    if a.write && fixed != text {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let backup = PathBuf::from(format!("{}.{stamp}.bak", a.path.display()));
        std::fs::copy(&a.path, &backup)
            .map_err(|e| format!("cannot back up to {}: {e}", backup.display()))?;
        std::fs::write(&a.path, fixed)
            .map_err(|e| format!("cannot write {}: {e}", a.path.display()))?;
        println!("wrote {} (backup: {})", a.path.display(), backup.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Proxy(a) => run_proxy(a),
        Command::Demo(a) => Driver::resolve(a.driver).and_then(|d| xpyd::demo::run(a.port, d)),
        Command::FixConfig(a) => fix_config(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
