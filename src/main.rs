use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use liveness_gateway::config::{self, Config};
use liveness_gateway::server::{self, ProcessOptions, SharedEnv};
use liveness_gateway::{auth::tenant, logging, state};

#[derive(Parser)]
#[command(
    name = "liveness-gateway",
    version,
    about = "A gateway in front of the kyc.biometric.kz Liveness Short API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Validate config files; print every problem; exit non-zero on any.
    CheckConfig(CheckConfigArgs),
    /// Tenant keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// App tokens for trials and tests: a signing key with its JWKS, and tokens signed with it.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Ask a running gateway's admin listener whether it is up (exit 0) or not (exit 1): for
    /// container health checks, where there is no shell and no curl.
    Healthcheck(HealthcheckArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// Take the listening sockets over from the running instance (zero-downtime upgrade).
    #[arg(short, long)]
    upgrade: bool,
    /// Socket used for the hand-over during an upgrade. Default: one of this config file's own
    /// in the temporary folder (`liveness-gateway-<id>.sock`, the id derived from the file's
    /// path), so that two instances never share one.
    #[arg(long, value_name = "PATH")]
    upgrade_sock: Option<PathBuf>,
    /// This process's pid file; one that a running gateway holds is refused (unless `-u`).
    /// Default: the config file's own in the temporary folder (`liveness-gateway-<id>.pid`).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
}

#[derive(Args)]
struct CheckConfigArgs {
    #[arg(short, long = "config", value_name = "FILE", required = true)]
    configs: Vec<PathBuf>,
    /// Check only the file, not that the secrets it names are present in this environment.
    #[arg(long)]
    offline: bool,
    /// A container's memory limit (bytes, or Ki, Mi, Gi): refuse a config that may hold
    /// more (request bodies, cache, connections and the process itself).
    #[arg(long, value_name = "SIZE", value_parser = config::memory::parse_size)]
    memory_limit: Option<u64>,
}

#[derive(Args)]
struct HealthcheckArgs {
    /// The config file whose admin listener to ask (`server.admin_listen`; a listener on every
    /// address is asked on loopback).
    #[arg(short, long, value_name = "FILE", conflicts_with = "admin")]
    config: Option<PathBuf>,
    /// The admin listener's address, instead of a config file's (127.0.0.1:9464 without either).
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Ask `/readyz` (ready to take traffic) instead of `/healthz` (the process is up).
    #[arg(long)]
    ready: bool,
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    timeout_ms: u64,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// A new random tenant key: the secret on stderr (or in --key-file), the config lines on stdout.
    New {
        #[arg(long, value_name = "ID")]
        tenant: Option<String>,
        /// Write the secret to this file (created with mode 0600) instead of stderr.
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
    /// The SHA-256 digest of a key read from standard input, for `key_sha256`.
    Hash,
    /// Issue a key to a tenant at runtime (admin API): the secret alone on stdout.
    Create {
        #[command(flatten)]
        api: AdminApiArgs,
        #[arg(long, value_name = "ID")]
        tenant: String,
        #[arg(long)]
        label: Option<String>,
        /// How long it stays valid (`90d`, `12h`); without it, until revoked.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// A tenant's keys, from the config and issued at runtime (admin API); never a secret.
    List {
        #[command(flatten)]
        api: AdminApiArgs,
        #[arg(long, value_name = "ID")]
        tenant: String,
        /// The admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A new secret for a runtime key, under the same key id (admin API): the secret alone on
    /// stdout; the old one stays valid for --grace.
    Rotate {
        #[command(flatten)]
        api: AdminApiArgs,
        #[arg(long, value_name = "ID")]
        tenant: String,
        #[arg(long, value_name = "KEY_ID")]
        key_id: String,
        /// How long the replaced secret stays valid (`24h`); none by default.
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
        /// A new expiry from now; without it, the key keeps its own.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// Revoke a runtime key (admin API): refused on every replica within a second.
    Revoke {
        #[command(flatten)]
        api: AdminApiArgs,
        #[arg(long, value_name = "ID")]
        tenant: String,
        #[arg(long, value_name = "KEY_ID")]
        key_id: String,
    },
}

/// Where the admin API is.
#[derive(Args)]
struct AdminApiArgs {
    /// The admin listener's URL.
    #[arg(
        long,
        value_name = "URL",
        env = "LIVENESS_GATEWAY_ADMIN_URL",
        default_value = "http://127.0.0.1:9464"
    )]
    admin_url: url::Url,
    /// The admin token (`server.admin_token_env`'s value). Prefer the variable: a flag is seen
    /// by every user of the host in the process list.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "LIVENESS_GATEWAY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
}

impl AdminApiArgs {
    fn api(self) -> liveness_gateway::admin::client::AdminApi {
        let mut url = self.admin_url;
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        liveness_gateway::admin::client::AdminApi {
            url,
            token: self.admin_token.filter(|t| !t.is_empty()),
        }
    }
}

#[derive(Subcommand)]
enum TokensCommand {
    /// A new private key (written to --key-file, mode 0600) and its JWKS on stdout, for
    /// `[[auth.issuers]] jwks_file`.
    Keygen {
        #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA"])]
        alg: String,
        #[arg(long, default_value = "key-1")]
        kid: String,
        #[arg(long, value_name = "PATH")]
        key_file: PathBuf,
    },
    /// A token signed with a key made by `keygen`, on stdout.
    Mint(MintArgs),
}

#[derive(Args)]
struct MintArgs {
    #[arg(long, value_name = "PATH")]
    key_file: PathBuf,
    #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA"])]
    alg: String,
    #[arg(long, default_value = "key-1")]
    kid: String,
    #[arg(long)]
    iss: String,
    #[arg(long)]
    aud: String,
    #[arg(long)]
    sub: String,
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Give it a `jti` (needed by single-use issuers).
    #[arg(long)]
    jti: bool,
    /// Bind it to one attempt: its `nonce` claim, carried into the verdict's receipt.
    #[arg(long)]
    nonce: Option<String>,
    /// Print this many tokens, one a line, each with a `jti` of its own (for load tests).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    count: u32,
}

/// Write a secret to a new file only its owner can read.
fn write_secret(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    writeln!(f, "{secret}")?;
    Ok(())
}

// Measured with the load harness: glibc's allocator returned the large per-request body buffers to
// the kernel with madvise on about every other request; mimalloc keeps them in its per-thread
// pages. The price is memory: with 256 uploads in flight and the cache off, mimalloc's peak RSS
// was about 20 MiB above glibc's, which the 128 MiB target still allows (benches/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| with_moved_hint(e).exit());
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The subcommands that are in `liveness-gateway-dev`: clap refuses them, and says where they are.
fn with_moved_hint(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(sub)) = e.get(ContextKind::InvalidSubcommand) else {
        return e;
    };
    if !["demo", "emulator"].contains(&sub.as_str()) {
        return e;
    }
    let tip = format!("the {sub} is in the development binary: `liveness-gateway-dev {sub}`");
    let mut tips = match e.get(ContextKind::Suggested) {
        Some(ContextValue::StyledStrs(tips)) => tips.clone(),
        _ => Vec::new(),
    };
    tips.push(tip.into());
    e.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    e
}

fn process_env() -> SharedEnv {
    Arc::new(config::process_env)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => check_config(args),
        Command::Keys {
            command: KeysCommand::New { tenant, key_file },
        } => keys_new(tenant, key_file),
        Command::Keys {
            command: KeysCommand::Hash,
        } => keys_hash(),
        Command::Keys { command } => keys_admin(command),
        Command::Tokens {
            command: TokensCommand::Keygen { alg, kid, key_file },
        } => tokens_keygen(&alg, &kid, &key_file),
        Command::Tokens {
            command: TokensCommand::Mint(args),
        } => tokens_mint(args),
        Command::Healthcheck(args) => healthcheck(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let env = process_env();
    // The watched files' digest is taken between two reads, and the second read is the one
    // served: a change made while the first was read (a large tenants folder takes a while)
    // is in the second, or, made after the digest, is a change the watch applies once up.
    let first = state::check::load(&args.config, &|n| env(n))?;
    let loaded_digest = server::watched_digest(&first);
    drop(first);
    let cfg = state::check::load(&args.config, &|n| env(n))?;
    let issues = cfg.process_issues();
    if !issues.is_empty() {
        anyhow::bail!("{}", config::ConfigErrors(issues));
    }
    if !args.upgrade {
        server::ensure_ports_free(&cfg)?;
    }
    logging::init(cfg.log_format);
    tracing::info!(listen = %cfg.listen, admin = %cfg.admin_listen, upstream = %cfg.upstream.host, tenants = cfg.tenants.len(), "starting");
    server::hold_hangups()?;
    let (pid_file, upgrade_sock) = match (args.pid_file, args.upgrade_sock) {
        (Some(p), Some(s)) => (p, s),
        (p, s) => {
            let (dp, ds) = server::instance_paths(&args.config)?;
            (p.unwrap_or(dp), s.unwrap_or(ds))
        }
    };
    // Written for the upgrade steps (`kill -QUIT $(cat …)`), and held.
    server::hold_pid_file(&pid_file, args.upgrade)?;
    tracing::info!(pid_file = %pid_file.display(), upgrade_sock = %upgrade_sock.display(), "this instance's files");
    let opts = ProcessOptions {
        upgrade: args.upgrade,
        upgrade_sock: Some(upgrade_sock),
        pid_file: Some(pid_file.clone()),
        whole_process: true,
        loaded_digest,
    };
    for w in cfg.warnings() {
        tracing::warn!("config: {w}");
    }
    let (server, state) = server::build(cfg, env, &opts)?;
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(server::ProcessSignals {
            state: state.clone(),
        }),
    });
    state
        .store
        .flush_at_exit()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    server::remove_pid_file(&pid_file);
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn check_config(args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for path in &args.configs {
        failed |= !check_one(path, args.offline, args.memory_limit);
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Check one config file and print what was found; whether it passed.
fn check_one(path: &Path, offline: bool, memory_limit: Option<u64>) -> bool {
    let checked = if offline {
        Config::check_offline(path)
    } else {
        state::check::load(path, &config::process_env)
    };
    let c = match checked {
        Ok(c) => c,
        Err(e) => {
            println!("{}: {e}", path.display());
            return false;
        }
    };
    let mut issues = c.process_issues();
    issues.extend(memory_limit.and_then(|limit| over_memory_limit(&c, limit)));
    if !issues.is_empty() {
        println!("{}: {}", path.display(), config::ConfigErrors(issues));
        return false;
    }
    println!(
        "{}: ok ({} tenants, upstream {}://{}:{})",
        path.display(),
        c.tenants.len(),
        if c.upstream.tls { "https" } else { "http" },
        c.upstream.host,
        c.upstream.port
    );
    if let Some(limit) = memory_limit {
        println!(
            "{}: memory: {}, within {} MiB",
            path.display(),
            config::memory::MemoryBound::of(&c).describe(),
            limit / (1024 * 1024)
        );
    }
    let files = if offline {
        Vec::new()
    } else {
        state::check::file_warnings(&c)
    };
    for w in c.warnings().into_iter().chain(files) {
        println!("{}: warning: {w}", path.display());
    }
    if !offline && c.store.is_shared() {
        for w in liveness_gateway::store::RedisStore::probe_config(&c, Duration::from_secs(5)) {
            println!("{}: warning: store: {w}", path.display());
        }
    }
    true
}

/// The problem of a config whose process may hold more than a container's memory limit.
fn over_memory_limit(c: &Config, limit: u64) -> Option<config::ConfigIssue> {
    let bound = config::memory::MemoryBound::of(c);
    (bound.total() > limit).then(|| config::ConfigIssue {
        path: "memory".into(),
        message: format!(
            "the process may hold {}, over the limit of {} MiB: lower intake.max_buffered_bytes, cache.max_bytes or server.max_connections, or raise the limit",
            bound.describe(),
            limit / (1024 * 1024)
        ),
    })
}

fn keys_new(id: Option<String>, key_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let id = id.unwrap_or_else(|| "new-tenant".into());
    if let Err(e) = config::check_id(&id) {
        anyhow::bail!("--tenant {id:?}: {e}");
    }
    let key = tenant::new_key();
    let digest = config::key_digest_hex(&key);
    // The secret never goes to stdout, so `keys new >> gateway.toml` adds only the
    // tenant's lines.
    match key_file {
        Some(path) => {
            write_secret(&path, &key)?;
            eprintln!("key written to {} (mode 0600); give it to the tenant, it is not stored anywhere else", path.display());
        }
        None => {
            eprintln!("key (give this to the tenant; it is not stored anywhere): {key}")
        }
    }
    println!("[[tenants]]");
    println!("id = \"{id}\"");
    println!("key_sha256 = [\"{digest}\"]");
    Ok(ExitCode::SUCCESS)
}

fn keys_hash() -> anyhow::Result<ExitCode> {
    let mut key = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut key)?;
    let key = key.trim();
    if key.is_empty() {
        anyhow::bail!("no key on standard input");
    }
    println!("{}", config::key_digest_hex(key));
    Ok(ExitCode::SUCCESS)
}

fn tokens_keygen(alg: &str, kid: &str, key_file: &Path) -> anyhow::Result<ExitCode> {
    let (key, jwks) =
        liveness_gateway::auth::tools::keygen(alg, kid).map_err(anyhow::Error::msg)?;
    write_secret(key_file, key.trim_end())?;
    eprintln!(
        "private key written to {} (mode 0600); the JWKS for jwks_file follows",
        key_file.display()
    );
    println!("{}", serde_json::to_string_pretty(&jwks)?);
    Ok(ExitCode::SUCCESS)
}

fn tokens_mint(args: MintArgs) -> anyhow::Result<ExitCode> {
    let key = std::fs::read_to_string(&args.key_file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.key_file.display()))?;
    let m = liveness_gateway::auth::tools::Mint {
        alg: &args.alg,
        kid: &args.kid,
        issuer: &args.iss,
        audience: &args.aud,
        subject: &args.sub,
        ttl: args.ttl,
        jti: args.jti || args.count > 1,
        nonce: args.nonce.as_deref(),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for _ in 0..args.count {
        let token = liveness_gateway::auth::tools::mint(&key, &m).map_err(anyhow::Error::msg)?;
        std::io::Write::write_all(&mut out, format!("{token}\n").as_bytes())?;
    }
    std::io::Write::flush(&mut out)?;
    Ok(ExitCode::SUCCESS)
}

/// `keys create|list|rotate|revoke`: a call of the admin API.
fn keys_admin(command: KeysCommand) -> anyhow::Result<ExitCode> {
    use serde_json::json;
    // Checked before they go into a path: `../other/keys/…` must not reach another tenant.
    let check = |tenant: &str, key_id: Option<&str>| -> anyhow::Result<()> {
        config::check_id(tenant).map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
        if let Some(k) = key_id {
            let config_id = k
                .strip_prefix("config-")
                .is_some_and(liveness_gateway::issued::is_key_id);
            if !liveness_gateway::issued::is_key_id(k) && !config_id {
                anyhow::bail!("--key-id: a key id is 12 hex digits (keys list shows them)");
            }
        }
        Ok(())
    };
    match &command {
        KeysCommand::Create { tenant, .. } | KeysCommand::List { tenant, .. } => {
            check(tenant, None)?
        }
        KeysCommand::Rotate { tenant, key_id, .. } | KeysCommand::Revoke { tenant, key_id, .. } => {
            check(tenant, Some(key_id))?
        }
        KeysCommand::New { .. } | KeysCommand::Hash => {}
    }
    let tenant_path = |t: &str| format!("admin/tenants/{t}/keys");
    let (api, method, path, body, secret) = match command {
        KeysCommand::Create {
            api,
            tenant,
            label,
            expires_in,
        } => (
            api,
            "POST",
            tenant_path(&tenant),
            Some(json!({ "label": label, "expires_in": expires_in })),
            true,
        ),
        KeysCommand::List { api, tenant, json } => {
            let answer = api.api().call("GET", &tenant_path(&tenant), None)?;
            if answer.status != 200 {
                eprintln!("{}", answer.refusal());
                return Ok(ExitCode::FAILURE);
            }
            match json {
                true => println!("{}", answer.body),
                false => print!(
                    "{}",
                    liveness_gateway::admin::client::keys_table(&answer.body)
                ),
            }
            return Ok(ExitCode::SUCCESS);
        }
        KeysCommand::Rotate {
            api,
            tenant,
            key_id,
            grace,
            expires_in,
        } => (
            api,
            "POST",
            format!("{}/{key_id}/rotate", tenant_path(&tenant)),
            Some(json!({ "grace": grace, "expires_in": expires_in })),
            true,
        ),
        KeysCommand::Revoke {
            api,
            tenant,
            key_id,
        } => (
            api,
            "DELETE",
            format!("{}/{key_id}", tenant_path(&tenant)),
            None,
            false,
        ),
        KeysCommand::New { .. } | KeysCommand::Hash => {
            anyhow::bail!("not a command of the admin API")
        }
    };
    let answer = api.api().call(method, &path, body)?;
    if !(200..300).contains(&answer.status) {
        eprintln!("{}", answer.refusal());
        return Ok(ExitCode::FAILURE);
    }
    let text = |k: &str| answer.body.get(k).and_then(|v| v.as_str()).unwrap_or("-");
    if secret {
        println!("{}", text("key"));
        eprintln!(
            "key id {} of tenant {}; expires: {}; the replaced secret valid until: {}",
            text("key_id"),
            text("tenant"),
            text("expires_at"),
            text("previous_valid_until"),
        );
    } else {
        eprintln!(
            "revoked key {} of tenant {}",
            text("key_id"),
            text("tenant")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let admin = match (args.admin, &args.config) {
        (Some(a), _) => a,
        (None, Some(file)) => server::admin_probe_address(file)?,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 9464)),
    };
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    match server::probe(admin, path, timeout) {
        Ok(200) => Ok(ExitCode::SUCCESS),
        Ok(status) => {
            eprintln!("{path} on {admin}: HTTP {status}");
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{path} on {admin}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
