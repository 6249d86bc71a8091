//! Assembling and running the Pingora server: the client-facing proxy service, the admin
//! service, and a maintenance task (DNS refresh, budget flushes, SIGHUP reloads).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::{L4BufferSettings, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::config::{Config, JwksSource, H2_CONNECTION_WINDOW, H2_SEND_BUFFER, H2_STREAM_WINDOW};
use crate::edge::{EdgeApp, EdgeMetrics, EdgeTls};
use crate::proxy::Gateway;
use crate::state::AppState;

/// Environment lookups kept for reloads (the demo and tests supply their own).
pub type SharedEnv = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Options of the process rather than of the config file.
#[derive(Clone, Default)]
pub struct ProcessOptions {
    /// Take the listening sockets over from a running instance (`serve -u`).
    pub upgrade: bool,
    /// Where the socket hand-over for upgrades happens.
    pub upgrade_sock: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    /// A whole process (not a server inside tests): reload the config on SIGHUP, and once a
    /// graceful stop has closed the listeners, exit as soon as nothing is in flight instead of
    /// waiting out the whole grace period.
    pub whole_process: bool,
    /// The watched files' digest (`watched_digest`) taken right after the config was loaded;
    /// taken when the server is built otherwise. A file changed after it is reloaded.
    pub loaded_digest: Option<blake3::Hash>,
}

/// Re-read the config file and swap it in; an invalid file leaves the old config in force.
/// Every attempt, whatever started it (`trigger`), is counted and leaves an audit line. One at
/// a time (`AppState::reload_turn`): a reload started while another runs waits for it, then
/// reads the files as they are then.
pub fn reload(state: &AppState, env: &SharedEnv, trigger: &str) -> Result<(), String> {
    let mut turn = state.reload_turn();
    // Taken before the files are read, so that a change made while they are read differs from
    // it and the file watch applies that change too.
    turn.reading(watched_digest(&state.runtime().config));
    let outcome = reload_file(state, &turn, env);
    let label = if outcome.is_ok() {
        "applied"
    } else {
        "refused"
    };
    state.metrics.reloads.with_label_values(&[label]).inc();
    tracing::info!(target: "audit", action = "reload", trigger, outcome = label, "reload");
    outcome
}

/// `reload` off the async runtime: it reads files, and may wait for another reload's turn.
pub async fn reload_in_background(
    state: Arc<AppState>,
    env: SharedEnv,
    trigger: &'static str,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || reload(&state, &env, trigger))
        .await
        .unwrap_or_else(|e| Err(format!("the reload stopped: {e}")))
}

fn reload_file(
    state: &AppState,
    turn: &crate::state::ReloadTurn<'_>,
    env: &SharedEnv,
) -> Result<(), String> {
    let path = state
        .runtime()
        .config
        .source
        .clone()
        .ok_or("this gateway was not started from a config file")?;
    let applied = crate::state::check::load(&path, &|n| env(n))
        .map_err(|e| e.to_string())
        .and_then(|cfg| {
            let tenants = cfg.tenants.len();
            // A renewed certificate is read here; a bad one refuses the whole reload, and it
            // is installed only with the config it came with.
            let cert = match (&state.tls, &cfg.tls) {
                (Some(store), Some(_)) => {
                    Some(store.read().map_err(|e| format!("server.tls: {e}"))?)
                }
                _ => None,
            };
            state.reload(turn, cfg)?;
            if let (Some(store), Some(cert)) = (&state.tls, cert) {
                store.install(cert);
            }
            Ok(tenants)
        });
    match applied {
        Ok(tenants) => {
            tracing::info!(config = %path.display(), tenants, "config reloaded");
            Ok(())
        }
        Err(e) => {
            tracing::error!(config = %path.display(), "config reload refused, the old config stays in force: {}", e.replace('\n', " "));
            Err(e)
        }
    }
}

/// What the watched files hold: the config file, the tenants' files of `tenants_dir` (a file
/// added or removed is a change too), the organization key files, the certificate, the
/// app-token issuers' JWKS files. A
/// content digest, not a time: a Kubernetes ConfigMap update swaps a symlink, and an editor may
/// keep the modification time.
pub fn watched_digest(config: &Config) -> Option<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let tls = config.tls.as_ref();
    let files = [
        config.source.as_ref(),
        tls.map(|t| &t.cert_file),
        tls.map(|t| &t.key_file),
    ];
    let jwks = config.issuers.iter().filter_map(|i| match &i.jwks {
        JwksSource::File(f) => Some(f),
        JwksSource::Url(_) => None,
    });
    // The files of the folder the config file names now (not only the one in force: a reload
    // refused for a broken file in a newly named folder is tried again once it is fixed), as
    // they are now: one added since the config was read is watched too.
    let folder = (config.source.as_deref())
        .and_then(crate::config::tenants_dir::named_by)
        .or_else(|| config.tenants_dir.clone());
    let tenant_files = (folder.as_deref())
        .map(|d| crate::config::tenants_dir::files(d).unwrap_or_default())
        .unwrap_or_default();
    for f in &tenant_files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(b"\0");
    }
    let receipts = config.receipts.as_ref();
    let receipt_files = [
        receipts.and_then(|r| match &r.key {
            crate::config::ReceiptKey::File(f) => Some(f),
            crate::config::ReceiptKey::Pem(_) => None,
        }),
        receipts.and_then(|r| r.listed_jwks_file.as_ref()),
    ];
    for path in files
        .into_iter()
        .flatten()
        .chain(config.upstream.keys.files())
        .chain(jwks)
        .chain(receipt_files.into_iter().flatten())
        .chain(&tenant_files)
    {
        // A file missing for a moment (mid-swap) is a change too; the reload then says why.
        match std::fs::read(path) {
            Ok(bytes) => h.update(&bytes),
            Err(_) => h.update(b"\0missing"),
        };
        h.update(b"\0");
    }
    config.source.as_ref().map(|_| h.finalize())
}

struct Maintenance {
    state: Arc<AppState>,
    env: SharedEnv,
    whole_process: bool,
    pid_file: Option<PathBuf>,
    /// The watched files' digest when the config was loaded. Taken then, not when this service
    /// starts: Pingora starts it after the listeners, and a change made in between would be
    /// taken for the starting state and never applied.
    loaded_digest: Option<blake3::Hash>,
}

/// Wait until no client connection is open, no upstream call is in flight and the shared store
/// has taken every settlement (an answered call's commit: the call was billed, and a commit
/// lost with the process would let its hold expire and give the budget back), for a little
/// while. (Idle kept-alive connections are closed by the proxy a moment after the listeners
/// stop; a connection accepted just before is served first, see `edge::LATE_REQUEST_GRACE`.)
/// Settlements are waited for within the grace period, which started with the stop: a store
/// still down by then loses them, and the log says how many.
async fn drained(state: &AppState) {
    let grace = state.runtime().config.grace_period;
    let give_up = Instant::now() + grace.saturating_sub(Duration::from_millis(500));
    let mut quiet = 0;
    while quiet < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let m = &state.metrics;
        let served = m.connections_open.get() == 0
            && m.inflight.get() == 0
            && m.upstream_inflight.get() == 0;
        let pending = m.store_settles_pending.get();
        if served && pending > 0 && Instant::now() >= give_up {
            tracing::error!(pending, "the shared store did not take these settlements within the grace period ({}); each commit among them is a billed call the budget does not count", humantime::format_duration(grace));
            return;
        }
        if served && pending == 0 {
            quiet += 1;
        } else {
            quiet = 0;
        }
    }
}

/// One `GET path` to an admin listener, answered within `timeout`: the status code. A plain
/// HTTP/1.0 exchange over a socket, so the health check needs no client library, no shell and
/// no curl in the image.
pub fn probe(admin: std::net::SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split(' ')
        .nth(1)
        .and_then(|code| code.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
}

/// Fail fast and say why when a listener's address is taken: Pingora retries a busy port for
/// about 30 s and then panics in a thread, leaving the process alive and listening on nothing.
pub fn ensure_ports_free(cfg: &Config) -> anyhow::Result<()> {
    let tls = cfg.tls.as_ref().map(|t| ("server.tls.listen", t.listen));
    let plain = cfg.plain_listener.then_some(("server.listen", cfg.listen));
    let admin = Some(("server.admin_listen", cfg.admin_listen));
    for (name, addr) in plain.into_iter().chain(admin).chain(tls) {
        std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({name}): {e}"))?;
    }
    Ok(())
}

/// Take SIGHUP from now on instead of dying of it (its default action): a reload asked for
/// while the process starts, before the maintenance service listens for it, must not stop it.
/// Such an early one may not reload; `server.watch_config` (on by default) still sees a
/// changed file.
pub fn hold_hangups() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map(drop)
        })?;
    Ok(())
}

/// The pid file and upgrade socket of the instance serving `config`, when none is given: in a
/// folder of this user's own (`$XDG_RUNTIME_DIR`, else `liveness-gateway-<uid>` in the
/// temporary folder, made 0700), named after the config file's absolute path, so that two
/// instances of different configs never share one (and an upgrade's new process finds its old
/// one's), and nobody else can put a link where they are written.
pub fn instance_paths(config: &std::path::Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let absolute = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let digest = blake3::hash(absolute.as_os_str().as_encoded_bytes());
    let id = &digest.to_hex()[..12];
    let dir = private_dir()?;
    Ok((
        dir.join(format!("liveness-gateway-{id}.pid")),
        dir.join(format!("liveness-gateway-{id}.sock")),
    ))
}

/// This user's folder for the default pid file and socket: made 0700 if new, refused if it is
/// a link, another user's, or open to others.
fn private_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let uid = std::fs::metadata("/proc/self")?.uid();
    let dir = std::env::temp_dir().join(format!("liveness-gateway-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => return Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => anyhow::bail!("cannot make {}: {e}", dir.display()),
    }
    let m = std::fs::symlink_metadata(&dir)?;
    if !m.is_dir() || m.uid() != uid || m.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "{} is not a folder of this user's alone (a link, another owner, or open to others): give --pid-file and --upgrade-sock",
            dir.display()
        );
    }
    Ok(dir)
}

/// This process's pid file, locked for as long as the process runs: a second gateway given
/// the same file finds the lock and is refused, whatever its binary is called; a file left by
/// a process that is gone is not locked, and is taken. The file is never opened through a
/// link. The new process of an upgrade (`takeover`) writes it while the old one still holds
/// the lock, and takes the lock when the old one lets go.
pub fn hold_pid_file(path: &std::path::Path, takeover: bool) -> anyhow::Result<()> {
    use std::io::{Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot open the pid file {}: {e}", path.display()))?;
    let locked = match file.try_lock() {
        Ok(()) => true,
        Err(std::fs::TryLockError::WouldBlock) if takeover => false,
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            anyhow::bail!(
                "the pid file {} is held by a running gateway (pid {}): give this instance its own --pid-file and --upgrade-sock, or -u to take over from it",
                path.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("cannot lock the pid file {}: {e}", path.display())
        }
    };
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())
        .map_err(|e| anyhow::anyhow!("cannot write the pid file {}: {e}", path.display()))?;
    // The lock lives as long as the file stays open: for the rest of the process.
    std::thread::Builder::new()
        .name("pid-file".into())
        .spawn(move || {
            if !locked {
                let _ = file.lock();
            }
            loop {
                std::thread::park();
            }
        })?;
    Ok(())
}

/// Where `healthcheck -c FILE` asks: the file's `server.admin_listen`, on loopback when it
/// listens on every address. The file is only read, its secrets are not needed.
pub fn admin_probe_address(file: &std::path::Path) -> anyhow::Result<std::net::SocketAddr> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    // Only `server.admin_listen` is read: a running gateway is healthy or not whatever else the
    // file now says (a bad edit is refused by the reload, and the gateway serves on).
    let listen = crate::config::admin_listen_of(&text);
    let mut addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: server.admin_listen {listen:?}: {e}", file.display()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(addr)
}

/// Remove the pid file, unless another process (the new one of an upgrade) wrote it since.
pub fn remove_pid_file(path: &std::path::Path) {
    let mine =
        std::fs::read_to_string(path).is_ok_and(|s| s.trim() == std::process::id().to_string());
    if mine {
        let _ = std::fs::remove_file(path);
    }
}

/// How often the maintenance task asks the shared store whether it may evict keys (a policy
/// changed with `CONFIG SET` shows within this long) and reads its clock again (an idle
/// replica reads it every second anyway).
const STORE_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Write the budget state (the local state file, or the batched usage counts of the fleet
/// store), saying which file when it fails.
async fn flush_budgets(state: &AppState) {
    if let Err(e) = state.store.flush().await {
        if state.store.fleet().is_some() {
            tracing::warn!(
                "cannot write usage counts to the store (kept in memory for the next try): {e}"
            );
        } else {
            state.metrics.state_write_failures.inc();
            tracing::error!("cannot write the budget state file (counts are kept in memory and written at the next try): {e}");
        }
    }
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let s = &self.state;
        let mut hup = if self.whole_process {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
        } else {
            None
        };
        if s.store.fleet().is_some() {
            // Its own task: a slow round of the checks below must not hold up a renewal, and it
            // goes on through a stop, while settlements are handed over.
            let store = s.store.clone();
            tokio::spawn(async move {
                if let Some(fleet) = store.fleet() {
                    fleet.keep_alive().await;
                }
            });
        }
        // The runtime keys and grants: read now, then whenever another replica (or the admin
        // API here) changes them.
        let issued = s.issued.clone();
        tokio::spawn(async move { issued.keep_current().await });
        // Webhooks: what happened, once across the fleet, delivered until taken.
        tokio::spawn(crate::notify::Notifier::new(s.clone()).run());
        let mut next_resolve = Instant::now();
        let mut next_forget = Instant::now();
        let mut next_store_check = Instant::now();
        loop {
            let rt = s.runtime();
            // Compared with what the last reload read, whatever started it (before any, with
            // what the process loaded): refused or applied, that content has had its chance,
            // and the next change triggers the next reload. Not while a reload runs.
            let last_read = s.last_reload().map(|m| {
                if m.tried > 0 {
                    m.read
                } else {
                    self.loaded_digest
                }
            });
            if let Some(last_read) = last_read.filter(|_| rt.config.watch_config) {
                if watched_digest(&rt.config) != last_read {
                    let _ = reload_in_background(s.clone(), self.env.clone(), "file change").await;
                    continue;
                }
            }
            if Instant::now() >= next_resolve {
                if let Err(e) = rt.upstream.resolve().await {
                    tracing::warn!(host = %rt.config.upstream.host, "cannot resolve the upstream host: {e}");
                }
                next_resolve = Instant::now() + rt.config.upstream.resolve_interval;
            }
            for issuer in &rt.issuers {
                let (state, id) = (s.clone(), issuer.id.clone());
                issuer.keys.refresh_if_due(&s.http, move |outcome| {
                    state.metrics.jwks_fetched(&id, outcome.as_str());
                });
            }
            if Instant::now() >= next_forget {
                rt.limits.forget_idle_subjects();
                next_forget = Instant::now() + Duration::from_secs(60);
            }
            flush_budgets(s).await;
            if let Some(fleet) = s
                .store
                .fleet()
                .filter(|_| Instant::now() >= next_store_check)
            {
                let upstream = &rt.config.upstream;
                fleet.check(&upstream.fingerprint, &upstream.endpoint).await;
                next_store_check = Instant::now() + STORE_CHECK_EVERY;
            }
            let tick = rt.config.budgets.flush_interval.min(Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(tick) => {}
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    let _ = reload_in_background(s.clone(), self.env.clone(), "SIGHUP").await;
                }
            }
        }
        s.shutting_down.store(true, Ordering::Release);
        flush_budgets(s).await;
        if self.whole_process {
            drained(s).await;
            flush_budgets(s).await;
            // The last flush: a process that finds itself the last on a shared state file adds
            // the journal's counts to it (the other one of an upgrade may have stopped first).
            let store = s.store.clone();
            match tokio::task::spawn_blocking(move || store.flush_at_exit()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    s.metrics.state_write_failures.inc();
                    tracing::error!("cannot write the budget state file at exit: {e}");
                }
                Err(e) => tracing::error!("the last flush failed: {e}"),
            }
            if let Some(p) = &self.pid_file {
                remove_pid_file(p);
            }
            tracing::info!("nothing in flight: stopped");
            std::process::exit(0);
        }
    }
}

/// What a call needs past the upstream chain's deadline to be settled in the store.
const SETTLE_MARGIN: Duration = Duration::from_secs(2);

/// The signals of a whole process, as Pingora's own watcher reads them (SIGINT fast, SIGQUIT
/// upgrade, SIGTERM graceful), except that SIGTERM first keeps serving for
/// `server.shutdown_delay` with `/readyz` at 503: behind a Kubernetes Service or a load balancer,
/// clients keep arriving for a few seconds after the signal, and they must not be refused.
pub struct ProcessSignals {
    pub state: Arc<AppState>,
}

#[async_trait]
impl ShutdownSignalWatch for ProcessSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot listen for signals; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => {
                // Before Pingora hands the sockets over: the new process's first request must
                // see this one's calls.
                let state = self.state.clone();
                let _ = tokio::task::spawn_blocking(move || state.store.upgrading()).await;
                ShutdownSignal::GracefulUpgrade
            }
            _ = int.recv() => {
                // Fast, but not at the cost of a bill: the calls at the provider are settled
                // first (within the chain's own deadline), and no new one starts.
                self.state.shutting_down.store(true, Ordering::Release);
                let bound = self.state.runtime().config.upstream.total_timeout + SETTLE_MARGIN;
                let under_way = self.state.unsettled.under_way();
                if under_way > 0 {
                    tracing::info!(calls = under_way, "SIGINT: stopping once the calls at the provider are settled");
                }
                if !self.state.unsettled.stop(bound).await {
                    tracing::warn!(calls = self.state.unsettled.under_way(), "SIGINT: calls still unsettled after the upstream deadline; stopping");
                }
                // The shared store takes commits in the background: those too; and the answers
                // of the settled calls are written to their clients.
                let give_up = Instant::now() + SETTLE_MARGIN;
                let m = &self.state.metrics;
                while (m.store_settles_pending.get() > 0 || m.inflight.get() > 0)
                    && Instant::now() < give_up
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let pending = m.store_settles_pending.get();
                if pending > 0 {
                    tracing::error!(pending, "SIGINT: the shared store did not take these settlements; each commit among them is a billed call the budget does not count");
                }
                ShutdownSignal::FastShutdown
            }
            _ = term.recv() => {
                let delay = self.state.runtime().config.shutdown_delay;
                self.state.shutting_down.store(true, Ordering::Release);
                tracing::info!(delay = %humantime::format_duration(delay), "SIGTERM: not ready any more, still serving until the delay ends");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => ShutdownSignal::GracefulTerminate,
                    // A second SIGTERM or a SIGINT cuts the delay short.
                    _ = term.recv() => ShutdownSignal::GracefulTerminate,
                    _ = int.recv() => ShutdownSignal::FastShutdown,
                }
            }
        }
    }
}

/// Build the server with its three services. The caller runs it.
pub fn build(
    config: Config,
    env: SharedEnv,
    opts: &ProcessOptions,
) -> anyhow::Result<(Server, Arc<AppState>)> {
    let mut server = pingora_server(&config, opts);
    let listen = config.listen.to_string();
    let admin_listen = config.admin_listen.to_string();
    let state = AppState::new(config)?;
    let clients = client_service(&server, &state, &listen)?;
    let admin = admin_service(&state, env.clone(), &admin_listen);
    let maintenance = background_service(
        "maintenance",
        Maintenance {
            state: state.clone(),
            env,
            whole_process: opts.whole_process,
            pid_file: opts.pid_file.clone(),
            loaded_digest: opts
                .loaded_digest
                .or_else(|| watched_digest(&state.runtime().config)),
        },
    );
    server.add_service(clients);
    server.add_service(admin);
    server.add_service(maintenance);
    Ok((server, state))
}

/// Pingora's server: its threads, grace period, upgrade socket and pid file.
fn pingora_server(config: &Config, opts: &ProcessOptions) -> Server {
    let mut conf = ServerConf {
        threads: config.threads,
        ..Default::default()
    };
    conf.grace_period_seconds = Some(config.grace_period.as_secs().max(1));
    conf.graceful_shutdown_timeout_seconds = Some(5);
    if let Some(p) = &opts.upgrade_sock {
        conf.upgrade_sock = p.display().to_string();
    }
    if let Some(p) = &opts.pid_file {
        conf.pid_file = p.display().to_string();
    }
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    server
}

/// The clients' listeners (plain, TLS, or both) behind the edge: the gateway's route over
/// HTTP/1.1, HTTP/2 and h2c.
fn client_service(
    server: &Server,
    state: &Arc<AppState>,
    listen: &str,
) -> anyhow::Result<Service<EdgeApp<HttpProxy<Gateway>>>> {
    let mut proxy = pingora::proxy::http_proxy(
        &server.configuration,
        Gateway {
            state: state.clone(),
        },
    );
    let edge_cfg = state.runtime().config.edge.clone();
    // HTTP/2: Pingora's bounded defaults, with the stream cap and the head limit of `[server]`.
    // Until its first request the edge holds a connection to its deadlines (idle
    // `keepalive_timeout`, a head begun `header_timeout`). Pingora's idle timer cannot tell a
    // header block under way from silence, so it runs `header_timeout` longer: a head begun at
    // the end of the idle window has its whole time, and the edge cuts it (counted) first.
    // Between later requests that timer closes a connection with no stream open.
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_concurrent_streams(edge_cfg.h2_max_streams);
    h2.max_header_list_size(u32::try_from(edge_cfg.max_header_bytes).unwrap_or(u32::MAX));
    h2.initial_window_size(H2_STREAM_WINDOW);
    h2.initial_connection_window_size(H2_CONNECTION_WINDOW);
    // What a stream may have queued unsent: a request ends when its answer is queued, and the
    // rest must reach a slow client before the idle timer (`keepalive_timeout` +
    // `header_timeout`) closes the connection, at the rate a piece of `proxy::send_body` needs.
    h2.max_send_buffer_size(H2_SEND_BUFFER);
    proxy.h2_options = Some(h2);
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2c = edge_cfg.h2c;
    options.h2_idle_timeout = Some(edge_cfg.keepalive_timeout + edge_cfg.header_timeout);
    proxy.server_options = Some(options);
    let edge_metrics = EdgeMetrics {
        open: state.metrics.connections_open.clone(),
        refused: state.metrics.connections_refused.clone(),
        cut: state.metrics.connections_cut.clone(),
    };
    // The TLS listener is a TCP listener to Pingora: the edge does its handshakes, so that a
    // connection is admitted and given its deadline at its accept, handshake included.
    let tls = match (&state.runtime().config.tls, &state.tls) {
        (Some(t), Some(store)) => {
            // Paths empty: the certificate comes from the store, so a reload can replace it.
            let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")?;
            settings.set_cert_resolver(store.clone());
            settings.enable_h2();
            Some(EdgeTls {
                listen: t.listen,
                acceptor: settings.build(),
            })
        }
        _ => None,
    };
    let tls_listen = tls.as_ref().map(|t| t.listen);
    let edge = EdgeApp::new(proxy, edge_cfg, edge_metrics, tls);
    let mut proxy = Service::new("liveness-gateway".to_string(), edge);
    // No read buffer under Pingora's HTTP/1 reader: with its default 64 KiB one, every body
    // byte was copied once more (socket, then that buffer, then Pingora's body buffer), and each
    // keep-alive connection held the 64 KiB for its life (16 MiB at 256 connections; measured
    // with heaptrack, see benches/README.md). Pingora reads headers into its own buffer anyway.
    if state.runtime().config.plain_listener {
        proxy.add_listener(
            ListenerConfig::tcp(listen)
                .l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE)),
        );
    }
    if let Some(tls_listen) = tls_listen {
        proxy.add_listener(ListenerConfig::tcp(tls_listen.to_string()).l4_buffer(
            L4BufferSettings::new(TLS_READ_BUFFER, DEFAULT_L4_WRITE_BUFFER_SIZE),
        ));
    }
    Ok(proxy)
}

/// The admin listener: probes, metrics and the admin API, behind its own edge.
fn admin_service(
    state: &Arc<AppState>,
    env: SharedEnv,
    admin_listen: &str,
) -> Service<EdgeApp<HttpServer<Admin>>> {
    let reload_state = state.clone();
    let admin = Admin {
        state: state.clone(),
        reload: Arc::new(move || reload(&reload_state, &env, "admin")),
    };
    let admin_metrics = EdgeMetrics {
        open: state.metrics.admin_connections_open.clone(),
        refused: state.metrics.admin_connections_refused.clone(),
        cut: state.metrics.admin_connections_cut.clone(),
    };
    let admin_edge = EdgeApp::new(
        HttpServer::new_app(admin),
        state.runtime().config.admin_edge.clone(),
        admin_metrics,
        None,
    );
    let mut admin_service = Service::new("admin".to_string(), admin_edge);
    admin_service.add_tcp(admin_listen);
    admin_service
}

/// The read buffer under a TLS connection: rustls reads the socket 4 KiB at a time, so without
/// one a 68 KB upload took 17 reads (benches/README.md, "TLS and HTTP/2").
const TLS_READ_BUFFER: usize = 16 * 1024;

struct ChannelSignal(tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<ShutdownSignal>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        self.0
            .lock()
            .await
            .recv()
            .await
            .unwrap_or(ShutdownSignal::FastShutdown)
    }
}

/// A gateway running on a thread of this process, stopped by its handle (for tests and the demo).
pub struct RunningGateway {
    pub state: Arc<AppState>,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: tokio::sync::mpsc::UnboundedSender<ShutdownSignal>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningGateway {
    /// Start and wait until every listener accepts connections.
    pub fn start(config: Config, env: SharedEnv) -> anyhow::Result<RunningGateway> {
        // The listener clients reach: the plain one, or the TLS one when it stands alone.
        let addr = match (&config.tls, config.plain_listener) {
            (Some(t), false) => t.listen,
            _ => config.listen,
        };
        let admin_addr = config.admin_listen;
        let mut listeners = vec![addr, admin_addr];
        listeners.extend(config.tls.as_ref().map(|t| t.listen));
        let (server, state) = build(config, env, &ProcessOptions::default())?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("gateway".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(ChannelSignal(tokio::sync::Mutex::new(rx))),
                });
            })?;
        let gw = RunningGateway {
            state,
            addr,
            admin_addr,
            stop: tx,
            thread: Some(thread),
        };
        let until = Instant::now() + Duration::from_secs(10);
        while listeners
            .iter()
            .any(|a| std::net::TcpStream::connect(a).is_err())
        {
            if Instant::now() > until {
                anyhow::bail!("the gateway did not start listening on {listeners:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(gw)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Graceful stop: in-flight requests finish within the grace period.
    pub fn stop_gracefully(mut self) {
        let _ = self.stop.send(ShutdownSignal::GracefulTerminate);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.state.store.flush_at_exit();
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        let _ = self.stop.send(ShutdownSignal::FastShutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.state.store.flush_at_exit();
    }
}
