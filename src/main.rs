use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use liveness_gateway::config::{self, Config};
use liveness_gateway::server::{self, ProcessOptions, SharedEnv};
use liveness_gateway::{logging, tenant};

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
    Serve {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Take the listening sockets over from the running instance (zero-downtime upgrade).
        #[arg(short, long)]
        upgrade: bool,
        /// Socket used for the hand-over during an upgrade.
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/tmp/liveness-gateway-upgrade.sock"
        )]
        upgrade_sock: PathBuf,
        #[arg(long, value_name = "PATH", default_value = "/tmp/liveness-gateway.pid")]
        pid_file: PathBuf,
    },
    /// Validate config files; print every problem; exit non-zero on any.
    CheckConfig {
        #[arg(short, long = "config", value_name = "FILE", required = true)]
        configs: Vec<PathBuf>,
        /// Check only the file, not that the secrets it names are present in this environment.
        #[arg(long)]
        offline: bool,
        /// A container's memory limit (bytes, or Ki, Mi, Gi): refuse a config that may hold
        /// more (request bodies, cache, connections and the process itself).
        #[arg(long, value_name = "SIZE", value_parser = config::memory::parse_size)]
        memory_limit: Option<u64>,
    },
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
    Healthcheck {
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
        admin: SocketAddr,
        /// Ask `/readyz` (ready to take traffic) instead of `/healthz` (the process is up).
        #[arg(long)]
        ready: bool,
        #[arg(long, value_name = "MS", default_value_t = 2000)]
        timeout_ms: u64,
    },
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
    Mint {
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
        /// Print this many tokens, one a line, each with a `jti` of its own (for load tests).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        count: u32,
    },
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
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn process_env() -> SharedEnv {
    Arc::new(config::process_env)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            upgrade,
            upgrade_sock,
            pid_file,
        } => {
            let env = process_env();
            let cfg = Config::load(&config, &|n| env(n))?;
            let loaded_digest = server::watched_digest(&cfg);
            let issues = cfg.process_issues(false);
            if !issues.is_empty() {
                anyhow::bail!("{}", config::ConfigErrors(issues));
            }
            if !upgrade {
                // Fail fast and say why: Pingora retries a busy port for about 30 s and then
                // panics in a thread, leaving the process alive and listening on nothing.
                let tls = cfg.tls.as_ref().map(|t| ("server.tls.listen", t.listen));
                let plain = cfg.plain_listener.then_some(("server.listen", cfg.listen));
                let admin = Some(("server.admin_listen", cfg.admin_listen));
                for (name, addr) in plain.into_iter().chain(admin).chain(tls) {
                    std::net::TcpListener::bind(addr)
                        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({name}): {e}"))?;
                }
            }
            logging::init(cfg.log_format);
            tracing::info!(listen = %cfg.listen, admin = %cfg.admin_listen, upstream = %cfg.upstream.host, tenants = cfg.tenants.len(), "starting");
            server::hold_hangups()?;
            server::write_pid_file(&pid_file)?;
            let opts = ProcessOptions {
                upgrade,
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
        Command::CheckConfig {
            configs,
            offline,
            memory_limit,
        } => {
            let mut failed = false;
            for path in &configs {
                let checked = if offline {
                    Config::check_offline(path)
                } else {
                    Config::load(path, &config::process_env)
                };
                let issues = |c: &Config| {
                    let mut issues = c.process_issues(offline);
                    let bound = config::memory::MemoryBound::of(c);
                    if let Some(limit) = memory_limit.filter(|l| bound.total() > *l) {
                        issues.push(config::ConfigIssue {
                            path: "memory".into(),
                            message: format!(
                                "the process may hold {}, over the limit of {} MiB: lower intake.max_buffered_bytes, cache.max_bytes or server.max_connections, or raise the limit",
                                bound.describe(),
                                limit / (1024 * 1024)
                            ),
                        });
                    }
                    issues
                };
                match checked {
                    Ok(c) if !issues(&c).is_empty() => {
                        failed = true;
                        println!("{}: {}", path.display(), config::ConfigErrors(issues(&c)));
                    }
                    Ok(c) => {
                        println!(
                            "{}: ok ({} tenants, upstream {}://{}:{})",
                            path.display(),
                            c.tenants.len(),
                            if c.upstream.tls { "https" } else { "http" },
                            c.upstream.host,
                            c.upstream.port
                        );
                        let files = if offline {
                            Vec::new()
                        } else {
                            c.file_warnings()
                        };
                        if let Some(limit) = memory_limit {
                            println!(
                                "{}: memory: {}, within {} MiB",
                                path.display(),
                                config::memory::MemoryBound::of(&c).describe(),
                                limit / (1024 * 1024)
                            );
                        }
                        for w in c.warnings().into_iter().chain(files) {
                            println!("{}: warning: {w}", path.display());
                        }
                        if !offline && c.store.is_shared() {
                            for w in probe_store(&c) {
                                println!("{}: warning: store: {w}", path.display());
                            }
                        }
                    }
                    Err(e) => {
                        failed = true;
                        println!("{}: {e}", path.display());
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Keys {
            command:
                KeysCommand::New {
                    tenant: id,
                    key_file,
                },
        } => {
            let id = id.unwrap_or_else(|| "new-tenant".into());
            if let Err(e) = tenant::check_id(&id) {
                anyhow::bail!("--tenant {id:?}: {e}");
            }
            let key = tenant::new_key();
            let digest = tenant::key_digest_hex(&key);
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
        Command::Healthcheck {
            admin,
            ready,
            timeout_ms,
        } => {
            let path = if ready { "/readyz" } else { "/healthz" };
            let timeout = std::time::Duration::from_millis(timeout_ms.max(1));
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
        Command::Tokens {
            command: TokensCommand::Keygen { alg, kid, key_file },
        } => {
            let (key, jwks) =
                liveness_gateway::auth::tools::keygen(&alg, &kid).map_err(anyhow::Error::msg)?;
            write_secret(&key_file, key.trim_end())?;
            eprintln!(
                "private key written to {} (mode 0600); the JWKS for jwks_file follows",
                key_file.display()
            );
            println!("{}", serde_json::to_string_pretty(&jwks)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokens {
            command:
                TokensCommand::Mint {
                    key_file,
                    alg,
                    kid,
                    iss,
                    aud,
                    sub,
                    ttl,
                    jti,
                    count,
                },
        } => {
            let key = std::fs::read_to_string(&key_file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
            let m = liveness_gateway::auth::tools::Mint {
                alg: &alg,
                kid: &kid,
                issuer: &iss,
                audience: &aud,
                subject: &sub,
                ttl,
                jti: jti || count > 1,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for _ in 0..count {
                let token =
                    liveness_gateway::auth::tools::mint(&key, &m).map_err(anyhow::Error::msg)?;
                std::io::Write::write_all(&mut out, format!("{token}\n").as_bytes())?;
            }
            std::io::Write::flush(&mut out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys {
            command: KeysCommand::Hash,
        } => {
            let mut key = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut key)?;
            let key = key.trim();
            if key.is_empty() {
                anyhow::bail!("no key on standard input");
            }
            println!("{}", tenant::key_digest_hex(key));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Ask the shared store what `check-config` reports about it (see `RedisStore::probe`), within
/// a few seconds.
fn probe_store(c: &Config) -> Vec<String> {
    let asked = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            let metrics = liveness_gateway::metrics::Metrics::new().map_err(|e| e.to_string())?;
            let store = liveness_gateway::store::RedisStore::new(
                c.store.clone(),
                c.cache.verdict_life(),
                c.budgets.calendar,
                &metrics,
            );
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), store.probe(&c.upstream.fingerprint))
                    .await
                    .map_err(|_| "it did not answer within 5 s".to_string())
            })
        });
    asked.unwrap_or_else(|e| vec![e])
}
