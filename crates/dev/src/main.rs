use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use liveness_gateway::config::LogFormat;
use liveness_gateway::logging;
use liveness_gateway_dev::demo;
use liveness_gateway_dev::emulator::{self, EmulatorConfig, Fault};

#[derive(Parser)]
#[command(
    name = "liveness-gateway-dev",
    version,
    about = "The liveness gateway's offline demo and its upstream emulator (never for production)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway and the upstream emulator together, offline, with config/demo.toml.
    Demo(DemoArgs),
    /// Run only the upstream emulator.
    Emulator(EmulatorArgs),
}

#[derive(Args)]
struct DemoArgs {
    #[arg(short, long, value_name = "FILE", default_value = demo::CONFIG_PATH)]
    config: PathBuf,
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    emulator_listen: SocketAddr,
    /// Where the browser client (`examples/web/index.html`) is served: an origin of its own,
    /// which the demo adds to `cors.allowed_origins`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8082")]
    web_listen: SocketAddr,
    /// Keep the budgets and usage of earlier runs (the config's `budgets.state_file`); by
    /// default each run starts with none.
    #[arg(long)]
    keep_state: bool,
}

#[derive(Args)]
struct EmulatorArgs {
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Environment variable holding the organization key the emulator accepts.
    #[arg(long, value_name = "VAR", default_value = "LIVENESS_ORG_API_KEY")]
    api_key_env: String,
    /// File holding that key instead (takes precedence over --api-key-env).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Another key it accepts, as ID=VAR (the variable holding it); repeat for more. Each
    /// has its own subscription state (`POST /__emulator/fault?mode=…&key_id=ID`).
    #[arg(long = "key", value_name = "ID=VAR")]
    more_keys: Vec<String>,
    #[arg(long, value_name = "MS", default_value_t = 0)]
    latency_ms: u64,
    /// One of: none, hang, server_error, reset, invalid_json, no_subscription, subscription_not_started, no_active_subscription, no_access, service_unavailable.
    #[arg(long, default_value = "none")]
    fault: String,
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

// The demo runs the gateway in this process: with the allocator of the production binary, so
// that it behaves as that one does (see src/main.rs of the gateway).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let ran = match Cli::parse().command {
        Command::Demo(args) => demo::run(demo::Options {
            config: args.config,
            listen: args.listen,
            admin_listen: args.admin_listen,
            emulator_listen: args.emulator_listen,
            web_listen: args.web_listen,
            keep_state: args.keep_state,
        }),
        Command::Emulator(args) => run_emulator(args),
    };
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The emulator until Ctrl-C or SIGTERM.
fn run_emulator(args: EmulatorArgs) -> anyhow::Result<()> {
    logging::init(LogFormat::Text);
    let api_key = org_key(&args)?;
    let more_keys = more_keys(&args.more_keys)?;
    let fault = Fault::parse(&args.fault)
        .ok_or_else(|| anyhow::anyhow!("--fault must be one of {}", Fault::NAMES.join(", ")))?;
    let tls = args.tls_cert.zip(args.tls_key);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let emu = emulator::spawn(EmulatorConfig {
        listen: args.listen,
        api_key,
        more_keys,
        latency: Duration::from_millis(args.latency_ms),
        fault,
        tls,
    })
    .map_err(|e| anyhow::anyhow!("{e} (move it with --listen)"))?;
    println!("emulator listening on {scheme}://{}", emu.addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! { r = tokio::signal::ctrl_c() => r, _ = term.recv() => Ok(()) }
    })?;
    Ok(())
}

/// The organization key the emulator accepts: from `--api-key-file`, or the variable named by
/// `--api-key-env`.
fn org_key(args: &EmulatorArgs) -> anyhow::Result<String> {
    match &args.api_key_file {
        Some(f) => std::fs::read_to_string(f)
            .map(|k| k.trim().to_string())
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display())),
        None => std::env::var(&args.api_key_env).map_err(|_| {
            anyhow::anyhow!(
                "set {} to the organization key the emulator should accept",
                args.api_key_env
            )
        }),
    }
}

/// `--key ID=VAR` options as (id, key) pairs.
fn more_keys(options: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    options
        .iter()
        .map(|kv| {
            let (id, var) = kv
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--key {kv}: write it as ID=VAR"))?;
            let value =
                std::env::var(var).map_err(|_| anyhow::anyhow!("--key {id}: {var} is not set"))?;
            Ok((id.to_string(), value.trim().to_string()))
        })
        .collect()
}
