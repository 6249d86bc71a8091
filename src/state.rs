//! What the services share: the reloadable runtime (config, tenants, limiters, issuers), the
//! upstream client, the cache, budgets and metrics; and the per-request context. The live
//! objects are built here from the plain config, at the start and at each reload alike.

pub mod check;
mod issuers;
pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::Instant;

use crate::auth::tenant::{CredentialSource, TenantRegistry};
use crate::auth::Issuer;
use crate::breaker::Breaker;
use crate::cache::VerdictCache;
use crate::config::Config;
use crate::egress::Egress;
use crate::intake::BodyBudget;
use crate::limits::Limits;
use crate::limits::{ClientSlot, ClientSlots};
use crate::metrics::Metrics;
use crate::receipt::Receipts;
use crate::store::{LocalStore, RedisStore, Store};
use crate::upstream::UpstreamClient;
use crate::verdict::{LivenessVerdict, UpstreamClass};

/// The parts of the state a reload replaces, swapped as one: a request takes one snapshot, so
/// the organization key it sends and the upstream it sends it to always come from the same config.
pub struct Runtime {
    pub config: Config,
    /// The issuers of `config.issuers`, with their keys.
    pub issuers: Vec<Issuer>,
    /// The check of every provider answer against the secrets of `config`.
    pub egress: Egress,
    pub tenants: TenantRegistry,
    pub limits: Limits,
    /// The client for `config.upstream` (the same one for the process's life: a reload that
    /// would move the upstream is refused).
    pub upstream: Arc<UpstreamClient>,
    /// The signer of verdict receipts, when `[receipts]` is set.
    pub receipts: Option<Arc<Receipts>>,
}

/// The receipts' signer of a config, its key parsed once here.
fn receipts(config: &Config) -> Result<Option<Arc<Receipts>>, String> {
    match &config.receipts {
        Some(r) => Receipts::new(r)
            .map(|r| Some(Arc::new(r)))
            .map_err(|e| format!("receipts: {e}")),
        None => Ok(None),
    }
}

pub struct AppState {
    runtime: RwLock<Arc<Runtime>>,
    /// Taken for the whole of a reload; what the last one read.
    reloads: Mutex<ReloadMark>,
    pub cache: Arc<VerdictCache>,
    /// Budgets, usage history and, in a fleet, the shared cache level and rate limits: this
    /// process's, or the fleet's (`store.backend = "redis"`).
    pub store: Arc<dyn Store>,
    /// The tenant keys and grants the admin API issued at runtime (kept across reloads).
    pub issued: Arc<crate::issued::Registry>,
    pub breaker: Arc<Breaker>,
    /// The TLS listener's certificate, when there is one (reloaded with the config).
    pub tls: Option<Arc<tls::CertStore>>,
    pub body_budget: BodyBudget,
    /// The pool that converts phones' photos to JPEG (`intake.convert`).
    pub converter: crate::convert::Converter,
    /// The face check's pool (`intake.face`).
    pub faces: crate::face::FaceCheck,
    /// Traces, when `[tracing]` is set (restart-only).
    pub tracer: Option<crate::trace::Tracer>,
    /// Requests in flight per client address behind trusted proxies.
    pub client_slots: Arc<ClientSlots>,
    pub metrics: Metrics,
    /// The client that fetches app-token issuers' JWKS.
    pub http: reqwest::Client,
    /// App tokens verified already, by the BLAKE3 of the token: a token reused for several calls
    /// is verified once (its `exp` is checked again on every use). Emptied by a reload.
    pub verified_tokens: crate::auth::Remembered,
    /// Which organization keys are lapsed (kept across reloads).
    pub org_keys: crate::keys::KeyStates,
    /// What the egress check learnt of the secrets it holds as digests (kept across reloads).
    pub seen: crate::egress::Seen,
    pub shutting_down: AtomicBool,
    /// Upstream calls whose bill is not settled yet (see `Unsettled`).
    pub unsettled: Arc<Unsettled>,
    pub started: Instant,
}

/// Upstream calls started and not yet settled in the store. A fast stop (SIGINT) starts no new
/// call and waits for these before the runtime goes: a call dropped with its runtime would give
/// back a hold the provider may have billed, and a restarted process would admit it again.
#[derive(Debug, Default)]
pub struct Unsettled {
    calls: std::sync::atomic::AtomicUsize,
    stopping: AtomicBool,
    settled: tokio::sync::Notify,
}

/// One call counted in `Unsettled` until it is dropped.
pub struct UnsettledCall(Arc<Unsettled>);

impl Drop for UnsettledCall {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

impl Unsettled {
    /// A new call, or `None` once a fast stop has begun.
    pub fn start(self: &Arc<Self>) -> Option<UnsettledCall> {
        self.calls.fetch_add(1, Ordering::AcqRel);
        let call = UnsettledCall(self.clone());
        (!self.stopping.load(Ordering::Acquire)).then_some(call)
    }

    /// Start no new call, and wait up to `bound` for those under way to be settled: true when
    /// they all were.
    pub async fn stop(&self, bound: std::time::Duration) -> bool {
        self.stopping.store(true, Ordering::Release);
        let settled = async {
            loop {
                let notified = self.settled.notified();
                if self.calls.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(bound, settled).await.is_ok()
    }

    pub fn under_way(&self) -> usize {
        self.calls.load(Ordering::Acquire)
    }
}

impl AppState {
    pub fn new(config: Config) -> anyhow::Result<Arc<AppState>> {
        let issuers = issuers::build(&config, &[]).map_err(anyhow::Error::msg)?;
        let receipts = receipts(&config).map_err(anyhow::Error::msg)?;
        let upstream = Arc::new(UpstreamClient::new(
            config.upstream.clone(),
            config.limits.max_concurrent_upstream.max(16),
        ));
        let cache = VerdictCache::new(&config.cache);
        let metrics = Metrics::new()?;
        metrics.init_token_failures(crate::auth::TokenError::ALL.iter().map(|r| r.as_str()));
        let store: Arc<dyn Store> = if config.store.is_shared() {
            Arc::new(RedisStore::new(
                config.store.clone(),
                config.cache.verdict_life(),
                config.budgets.calendar,
                &metrics,
            ))
        } else {
            LocalStore::open_in(config.budgets.state_file.clone(), config.budgets.calendar)?
        };
        let org_keys = crate::keys::KeyStates::new(metrics.org_key_lapsed.clone());
        let breaker = Arc::new(Breaker::new(
            config.breaker.clone(),
            metrics.circuit_state.clone(),
            metrics.circuit_transitions.clone(),
        ));
        let tls = match &config.tls {
            Some(t) => Some(
                tls::CertStore::open(
                    &t.cert_file,
                    &t.key_file,
                    metrics
                        .tls_certificate_expiry
                        .with_label_values::<&str>(&[]),
                )
                .map_err(|e| anyhow::anyhow!("server.tls: {e}"))?,
            ),
            None => None,
        };
        let body_budget = BodyBudget::new(
            config.intake.max_buffered_bytes,
            config.intake.max_unauthenticated_buffered_bytes,
        );
        let converter = crate::convert::Converter::new(&config.intake);
        let faces = crate::face::FaceCheck::new(&config.intake.face);
        let http = reqwest::Client::builder()
            .user_agent(concat!("liveness-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        let tracer = match &config.tracing {
            Some(t) => Some(crate::trace::Tracer::start(
                t,
                metrics.trace_spans_dropped.clone(),
            )?),
            None => None,
        };
        let seen = crate::egress::Seen::default();
        let runtime = Runtime {
            issuers,
            tenants: TenantRegistry::new(config.tenants.clone()),
            limits: Limits::new(&config.tenants, &config.limits)
                .sharing(store.fleet().map(|f| f.rates())),
            egress: Egress::of(&config, metrics.upstream_secret_echo.clone(), &seen),
            upstream,
            receipts,
            config,
        };
        let state = Arc::new(AppState {
            runtime: RwLock::new(Arc::new(runtime)),
            reloads: Mutex::default(),
            cache,
            issued: Arc::new(crate::issued::Registry::new(store.clone())),
            store,
            breaker,
            tls,
            body_budget,
            converter,
            faces,
            tracer,
            client_slots: Arc::default(),
            metrics,
            http,
            verified_tokens: crate::auth::Remembered::default(),
            org_keys,
            seen,
            shutting_down: AtomicBool::new(false),
            unsettled: Arc::default(),
            started: Instant::now(),
        });
        state.show(&state.runtime().config);
        Ok(state)
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The series of every tenant and organization key of `config`, at zero before their first
    /// request, and only the keys it has in the lapse gauge.
    fn show(&self, config: &Config) {
        for t in &config.tenants {
            self.metrics.init_tenant(&t.id);
        }
        for id in config.upstream.keys.ids() {
            self.metrics.init_org_key(id);
        }
        self.org_keys.register(config.upstream.keys.ids());
    }

    /// The turn of one reload. Reloads run one at a time, whatever starts them (SIGHUP, the
    /// admin API, the file watch), and a reload reads the files only once it has its turn: the
    /// last one to run has read the newest files, and none can swap in what it read before
    /// another one read and applied something newer.
    pub fn reload_turn(&self) -> ReloadTurn<'_> {
        ReloadTurn(self.reloads.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// What the last reload read; `None` while one is running.
    pub fn last_reload(&self) -> Option<ReloadMark> {
        match self.reloads.try_lock() {
            Ok(mark) => Some(*mark),
            Err(TryLockError::Poisoned(p)) => Some(*p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Swap in a new config, completely or not at all: a config that changes a setting only a
    /// restart can change is refused, naming every such setting (see
    /// `Config::restart_only_changes`). Limiters of unchanged tenants, the global pace and the
    /// concurrency slots are kept, so a reload hands out no fresh burst. Only in a reload's
    /// turn, which `config` was read in.
    pub fn reload(&self, _turn: &ReloadTurn<'_>, config: Config) -> Result<(), String> {
        let old = self.runtime();
        let fixed = old.config.restart_only_changes(&config);
        if !fixed.is_empty() {
            return Err(format!(
                "these settings need a restart, so nothing was reloaded: {}",
                fixed.join(", ")
            ));
        }
        let issuers = issuers::build(&config, &old.issuers)?;
        let receipts = receipts(&config)?;
        let limits = Limits::rebuild(&config.tenants, &config.limits, Some(&old.limits));
        self.show(&config);
        let runtime = Runtime {
            issuers,
            tenants: TenantRegistry::new(config.tenants.clone()),
            limits,
            egress: Egress::of(
                &config,
                self.metrics.upstream_secret_echo.clone(),
                &self.seen,
            ),
            upstream: old.upstream.clone(),
            receipts,
            config,
        };
        *self.runtime.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(runtime);
        // An issuer's rules may have changed: every token is verified again.
        self.verified_tokens.clear();
        Ok(())
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// What the reloads so far have read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadMark {
    /// Reloads tried (applied or refused).
    pub tried: u64,
    /// The watched files' digest (`server::watched_digest`) as the last one began to read them.
    pub read: Option<blake3::Hash>,
}

/// A reload's turn (`AppState::reload_turn`): no other reload runs while it is held.
pub struct ReloadTurn<'a>(MutexGuard<'a, ReloadMark>);

impl ReloadTurn<'_> {
    /// Note that this reload is reading the files whose digest is `read`.
    pub fn reading(&mut self, read: Option<blake3::Hash>) {
        self.0.tried += 1;
        self.0.read = read;
    }
}

/// Everything the log line and the metrics need to know about one request: a few facts of its
/// own, then one record for each thing a step learns, in the order a request meets them.
pub struct RequestCtx {
    pub request_id: String,
    /// The path holds a secret of the gateway's (a client's own key typed into the URL): the log
    /// does not show it.
    pub path_withheld: bool,
    pub started: Instant,
    /// The request's `Origin` (a browser's), and whether CORS headers go on the answer.
    pub cors: crate::cors::CorsVerdict,
    /// Counts the request in flight for as long as it lives.
    pub inflight: Option<crate::metrics::GaugeGuard>,
    /// Who asks (the edge and admission).
    pub caller: Caller,
    /// The upload as it was read.
    pub upload: UploadRead,
    /// The provider call the answer came from.
    pub call: CallRecord,
    /// What the client is answered.
    pub answer: AnswerRecord,
    /// The request's trace, when `[tracing]` is set.
    pub trace: Option<crate::trace::RequestTrace>,
}

/// Who asks: the client's address and the credentials admission took.
#[derive(Default)]
pub struct Caller {
    /// The client's address (from `X-Forwarded-For` when the peer is a trusted proxy).
    pub client: Option<std::net::IpAddr>,
    /// This request's place among its client's requests in flight (behind a trusted proxy).
    pub client_slot: Option<ClientSlot>,
    pub tenant: Option<String>,
    pub credential: Option<CredentialSource>,
    /// The app token's subject, as its keyed hash (never the subject itself).
    pub subject: Option<String>,
}

/// The upload as it was read.
#[derive(Default)]
pub struct UploadRead {
    /// The image's size in bytes.
    pub bytes: usize,
    /// The whole body was read.
    pub done: bool,
    /// A `100 Continue` went out: a client that asked for it is sending its body.
    pub continued: bool,
    /// What the face check found in it (`intake.face`), when one ran.
    pub face: Option<&'static str>,
}

/// The provider call an answer came from: this request's own (`led`), or the one it was
/// answered from.
#[derive(Default)]
pub struct CallRecord {
    /// This request led the call.
    pub led: bool,
    /// The id of the organization key this request's call went out with.
    pub org_key: Option<String>,
    /// What this request's call costs (`billed`, `uncertain`, `not_billed`).
    pub billing: Option<&'static str>,
    pub status: Option<u16>,
    pub class: Option<UpstreamClass>,
    pub ms: Option<u64>,
}

/// What the client is answered.
#[derive(Default)]
pub struct AnswerRecord {
    /// The status written (0: none yet).
    pub status: u16,
    pub error: Option<crate::error::GatewayError>,
    /// `HIT`, `MISS`, `COALESCED` and the like.
    pub cache: Option<&'static str>,
    pub verdict: Option<LivenessVerdict>,
    /// The provider's session id of the verdict answered (the original call's, for a hit).
    pub session_id: Option<String>,
    /// The rate-limit headers the answer carries.
    pub rate_headers: Vec<(&'static str, String)>,
    /// The outcome of an answer that is not a liveness answer: `keys` (the receipts' JWKS),
    /// `preflight` (a browser's CORS preflight), `usage` (a tenant's own usage).
    pub served: Option<&'static str>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            request_id: String::new(),
            path_withheld: false,
            started: Instant::now(),
            cors: Default::default(),
            inflight: None,
            caller: Caller::default(),
            upload: UploadRead::default(),
            call: CallRecord::default(),
            answer: AnswerRecord::default(),
            trace: None,
        }
    }

    /// The bounded `outcome` label.
    pub fn outcome(&self) -> &'static str {
        use crate::error::GatewayError as E;
        if let (None, Some(served)) = (&self.answer.error, self.answer.served) {
            return served;
        }
        match (&self.answer.error, &self.answer.verdict) {
            (None, Some(v)) if v.result => "pass",
            (None, Some(_)) => "fail",
            (None, None) if self.answer.status == 0 => "aborted",
            (None, None) => "upstream_error",
            (Some(e), _) => match e {
                E::NotFound | E::MethodNotAllowed => "not_found",
                E::MissingCredentials
                | E::InvalidCredentials
                | E::MalformedCredentials
                | E::TenantDisabled
                | E::KeyExpired
                | E::HeaderCredentialsRequired
                | E::OriginNotAllowed => "unauthenticated",
                E::RateLimited { .. }
                | E::SubjectRateLimited { .. }
                | E::TooManyFailedAttempts { .. } => "rate_limited",
                E::BudgetExhausted { .. } | E::SubjectBudgetExhausted { .. } => "budget_exhausted",
                E::Overloaded(_) | E::TooManyConnections => "overloaded",
                E::CircuitOpen { .. } => "circuit_open",
                E::StoreUnavailable { .. } => "store_unavailable",
                E::UpstreamUnreachable
                | E::UpstreamInvalid
                | E::UpstreamSecretEcho
                | E::UpstreamTimeout
                | E::UpstreamFailed { .. } => "gateway_error",
                E::Internal => "internal_error",
                e if e.is_rejection() => "rejected",
                // What is not named above goes by its status: a token refused is an
                // unauthenticated request, never a gateway's error.
                e => match e.status().as_u16() {
                    401 | 403 => "unauthenticated",
                    429 => "rate_limited",
                    400..=499 => "rejected",
                    // A dependency other than the provider or the store (an issuer's JWKS).
                    503 => "gateway_error",
                    _ => "internal_error",
                },
            },
        }
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
}

#[cfg(test)]
mod tests {
    use super::RequestCtx;
    use crate::error::{self, GatewayError};

    /// Every error a request can end with has an outcome of its own kind: only a bug of the
    /// gateway's is an internal error (a user's limit counted as one would page an operator).
    #[test]
    fn every_error_has_the_outcome_of_its_kind() {
        for e in error::catalogue() {
            let status = e.status().as_u16();
            let code = e.code();
            let mut ctx = RequestCtx::new();
            ctx.answer.error = Some(e);
            let outcome = ctx.outcome();
            let expected: &[&str] = match status {
                401 | 403 => &["unauthenticated"],
                429 => &["rate_limited", "budget_exhausted", "overloaded"],
                404 | 405 => &["not_found"],
                500 => &["internal_error"],
                502 | 504 => &["gateway_error"],
                503 => &[
                    "overloaded",
                    "circuit_open",
                    "store_unavailable",
                    "gateway_error",
                ],
                _ => &["rejected"],
            };
            assert!(
                expected.contains(&outcome),
                "{code} ({status}) has the outcome {outcome}"
            );
        }
    }

    #[test]
    fn a_users_limits_are_limits() {
        let outcome = |e: GatewayError| {
            let mut ctx = RequestCtx::new();
            ctx.answer.error = Some(e);
            ctx.outcome()
        };
        let secs = 1;
        assert_eq!(
            outcome(GatewayError::TooManyFailedAttempts {
                retry_after_secs: secs
            }),
            "rate_limited"
        );
        assert_eq!(
            outcome(GatewayError::SubjectBudgetExhausted {
                retry_after_secs: secs
            }),
            "budget_exhausted"
        );
    }
}
