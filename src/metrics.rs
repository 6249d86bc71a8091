//! Prometheus metrics, prefix `liveness_gateway_`, in a registry of our own served by the admin
//! listener. Every label takes values from a closed set: `tenant` is a configured id or `unknown`.

mod openmetrics;

pub use openmetrics::Exemplars;

use crate::verdict::{FailureType, UpstreamClass};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// How the drain after an early answer ended: the `outcome` of
/// `liveness_gateway_early_answer_drains_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// The client sent the rest of its body: the stream, or the connection, ends normally.
    Complete,
    /// The client closed or reset first.
    ClientClosed,
    /// More than `intake.drain_max_bytes`, sent or declared.
    ByteLimit,
    /// Not over within `intake.drain_timeout`.
    TimeLimit,
    /// Not begun: the body budget had no room for the drain's read buffer (HTTP/1.1).
    NoRoom,
}

impl DrainEnd {
    pub const ALL: [DrainEnd; 5] = [
        DrainEnd::Complete,
        DrainEnd::ClientClosed,
        DrainEnd::ByteLimit,
        DrainEnd::TimeLimit,
        DrainEnd::NoRoom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DrainEnd::Complete => "complete",
            DrainEnd::ClientClosed => "client_closed",
            DrainEnd::ByteLimit => "byte_limit",
            DrainEnd::TimeLimit => "time_limit",
            DrainEnd::NoRoom => "no_room",
        }
    }
}

pub use openmetrics::{wants_openmetrics, CONTENT_TYPE as OPENMETRICS};

/// What a face check found (`face_checks_total{outcome}`, see `crate::face::Outcome`).
pub const FACE_OUTCOMES: [&str; 6] = [
    "face",
    "no_face",
    "several_faces",
    "face_too_small",
    "skipped",
    "unreadable",
];

/// How a conversion to JPEG ends (`conversions_total{outcome}`): `converted`; `unreadable` (not a
/// picture its decoder can read: `400 image_unreadable`); `too_large` (over the intake's pixel
/// bounds once decoded); `overloaded` (no room in the queue) and `timeout` (`503 overloaded`).
pub const CONVERSION_OUTCOMES: [&str; 5] = [
    "converted",
    "unreadable",
    "too_large",
    "overloaded",
    "timeout",
];

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub liveness_results: IntCounterVec,
    pub prediction: HistogramVec,
    pub failures: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: Histogram,
    pub cache_lookups: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub rate_limited: IntCounterVec,
    pub rejected: IntCounterVec,
    pub budget_remaining: IntGaugeVec,
    pub budget_limit: IntGaugeVec,
    pub inflight: IntGauge,
    pub upstream_inflight: IntGauge,
    pub store_settles_pending: IntGauge,
    pub billable_calls: IntCounterVec,
    pub upstream_uncertain: IntCounterVec,
    pub billed_without_verdict: IntCounterVec,
    pub replay_suspected: IntCounterVec,
    /// Events raised for the webhooks (once across the fleet), by type.
    pub notify_events: IntCounterVec,
    /// Webhook deliveries by webhook, event type and outcome.
    pub webhook_deliveries: IntCounterVec,
    pub failed_attempt_limits: IntCounterVec,
    pub conversions: IntCounterVec,
    pub face_checks: IntCounterVec,
    pub trace_spans_dropped: prometheus::IntCounter,
    /// The traces of recent requests in the latency histograms' buckets (OpenMetrics).
    pub exemplars: Exemplars,
    pub state_write_failures: prometheus::IntCounter,
    pub upstream_secret_echo: prometheus::IntCounter,
    pub circuit_state: IntGaugeVec,
    pub circuit_transitions: IntCounterVec,
    pub connections_open: IntGauge,
    pub connections_refused: IntCounterVec,
    pub connections_cut: IntCounterVec,
    pub early_answer_drains: IntCounterVec,
    pub admin_connections_open: IntGauge,
    pub admin_connections_refused: IntCounterVec,
    pub admin_connections_cut: IntCounterVec,
    pub reloads: IntCounterVec,
    pub store_duration: HistogramVec,
    pub store_errors: IntCounterVec,
    pub store_up: IntGauge,
    pub store_may_evict: IntGauge,
    pub store_prefix_shared: IntGauge,
    pub store_clock_offset: prometheus::Gauge,
    /// No labels; absent without a TLS listener (a vector, so that nothing is exported unset).
    pub tls_certificate_expiry: IntGaugeVec,
    pub org_key_lapsed: IntGaugeVec,
    pub org_key_failovers: IntCounterVec,
    pub auth_token_failures: IntCounterVec,
    pub auth_tokens_verified: IntCounterVec,
    pub jwks_fetches: IntCounterVec,
    pub store_fallbacks: IntCounterVec,
    pub late_commits: prometheus::IntCounter,
}

/// The store's operations (the `op` label).
pub const STORE_OPS: [&str; 8] = [
    "connect", "rate", "claim", "settle", "counts", "usage", "history", "check",
];

/// Every value of the `outcome` label (see `RequestCtx::outcome`).
pub const OUTCOMES: [&str; 17] = [
    "pass",
    "fail",
    "upstream_error",
    "rejected",
    "unauthenticated",
    "rate_limited",
    "budget_exhausted",
    "overloaded",
    "circuit_open",
    "store_unavailable",
    "gateway_error",
    "not_found",
    "internal_error",
    "aborted",
    "keys",
    "preflight",
    "usage",
];

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn name(n: &str) -> String {
    format!("liveness_gateway_{n}")
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        // CPU, memory, descriptors and threads of this process (`process_*`, the usual names).
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let counter = |n: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name(n), help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let requests = counter(
            "requests_total",
            "Requests answered, by tenant and outcome.",
            &["tenant", "outcome"],
        )?;
        let liveness_results = counter(
            "liveness_results_total",
            "Liveness verdicts answered, by result (pass|fail) and source (upstream|cache).",
            &["tenant", "result", "source"],
        )?;
        let failures = counter(
            "liveness_failures_total",
            "Failed verdicts by failure_reason.type.",
            &["tenant", "type"],
        )?;
        let upstream_requests = counter(
            "upstream_requests_total",
            "Upstream exchanges by HTTP status class, error class and organization key id.",
            &["status_class", "error", "org_key"],
        )?;
        let cache_lookups = counter(
            "cache_lookups_total",
            "Cache lookups by result (hit|miss|coalesced).",
            &["tenant", "result"],
        )?;
        let rate_limited = counter(
            "rate_limited_total",
            "Requests refused by a limit, by reason (rate|budget|overloaded).",
            &["tenant", "reason"],
        )?;
        let rejected = counter(
            "rejected_total",
            "Uploads refused before any upstream call, by reason (the error code).",
            &["tenant", "reason"],
        )?;
        let billable_calls = counter(
            "billable_calls_total",
            "Calls counted against the tenant's budget: the whole request reached the provider and its answer was not a documented refusal.",
            &["tenant"],
        )?;
        let upstream_uncertain = counter(
            "upstream_uncertain_total",
            "Billable calls whose outcome cannot be known: the whole request was written and no answer told whether the provider billed it (counted against the budget all the same), by organization key.",
            &["org_key"],
        )?;
        let billed_without_verdict = counter(
            "billed_without_verdict_total",
            "Billable calls that brought no verdict back (connection lost after sending, timeout, invalid or 5xx answer), by upstream error class.",
            &["class"],
        )?;
        let replay_suspected = counter(
            "replay_suspected_total",
            "Uploads whose exact image had already passed for another tenant: a captured selfie replayed, or a test photo shared between teams.",
            &["tenant"],
        )?;
        let notify_events = counter(
            "notify_events_total",
            "Events raised for the webhooks ([[notify.webhooks]]), each once across the fleet, by type.",
            &["event"],
        )?;
        // At zero from the start: every event's rate reads 0, not nothing, until one happens.
        for event in crate::config::notify::EVENTS {
            notify_events.with_label_values(&[event]);
        }
        let webhook_deliveries = counter(
            "webhook_deliveries_total",
            "Webhook delivery attempts by webhook, event type and outcome: delivered, failed (tried again later), gave_up (24 hours of failures), dropped (the webhook left the config).",
            &["webhook", "event", "outcome"],
        )?;
        let failed_attempt_limits = counter(
            "failed_attempt_limits_total",
            "Requests refused because their user (an app token's subject) had reached the day's max_failed_attempts.",
            &["tenant"],
        )?;
        let conversions = counter(
            "conversions_total",
            "Photos converted to JPEG before a call (HEIC, WebP), by format and outcome.",
            &["from", "outcome"],
        )?;
        let face_checks = counter(
            "face_checks_total",
            "Face checks before a call (intake.face), by tenant and outcome: face, no_face, several_faces, face_too_small, skipped, unreadable.",
            &["tenant", "outcome"],
        )?;
        let trace_spans_dropped = prometheus::IntCounter::new(
            name("trace_spans_dropped_total"),
            "Spans that never reached the trace collector: its queue was full, or it did not take their batch in time.",
        )?;
        registry.register(Box::new(trace_spans_dropped.clone()))?;
        let state_write_failures = prometheus::IntCounter::new(
            name("state_write_failures_total"),
            "Failed writes of the budget state file (counts stay in memory and the write is retried).",
        )?;
        registry.register(Box::new(state_write_failures.clone()))?;
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                name("store_command_duration_seconds"),
                "Round trips to the shared store (fleet mode), by operation.",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["op"],
        )?;
        registry.register(Box::new(store_duration.clone()))?;
        let store_errors = counter(
            "store_errors_total",
            "Store commands that failed, timed out, or were refused unsent while the store counted as down, by operation (fleet mode).",
            &["op"],
        )?;
        let auth_token_failures = counter(
            "auth_token_failures_total",
            "App tokens refused, by reason (malformed|signature|expired|not_yet_valid|issuer|audience|algorithm|unknown_kid|lifetime).",
            &["reason"],
        )?;
        let auth_tokens_verified = counter(
            "auth_tokens_verified_total",
            "App tokens accepted, by issuer id.",
            &["issuer"],
        )?;
        let jwks_fetches = counter(
            "auth_jwks_fetches_total",
            "Fetches of an issuer's JWKS URL, by issuer id and outcome (ok|failed|too_large).",
            &["issuer", "outcome"],
        )?;
        let org_key_failovers = counter(
            "org_key_failovers_total",
            "Uploads sent again with a fallback key because the provider refused this key's subscription (by id).",
            &["org_key"],
        )?;
        let org_key_lapsed = IntGaugeVec::new(
            Opts::new(
                name("org_key_lapsed"),
                "1 while the provider refuses the subscription of this organization key (by id).",
            ),
            &["org_key"],
        )?;
        registry.register(Box::new(org_key_lapsed.clone()))?;
        let store_up = IntGauge::new(
            name("store_up"),
            "1 while the shared store answers (fleet mode; always 1 with the local store).",
        )?;
        registry.register(Box::new(store_up.clone()))?;
        let store_may_evict = IntGauge::new(
            name("store_may_evict"),
            "1 when the shared store may evict keys when its memory is full (maxmemory set, a policy other than noeviction): budget counts, holds and locks could vanish and a budget be overshot. 0 when it cannot (always with the local store), -1 while not known (INFO refused, or not asked yet).",
        )?;
        registry.register(Box::new(store_may_evict.clone()))?;
        let store_prefix_shared = IntGauge::new(
            name("store_prefix_shared"),
            "Other deployments (other provider endpoints) seen using this key prefix on the shared store in the last minute: budgets, rate limits and usage history are shared with them (fleet mode; 0 with the local store).",
        )?;
        registry.register(Box::new(store_prefix_shared.clone()))?;
        let store_clock_offset = prometheus::Gauge::new(
            name("store_clock_offset_seconds"),
            "The shared store's clock minus this host's, in seconds, as last measured (fleet mode; 0 with the local store). Budget days and months follow the store's clock.",
        )?;
        registry.register(Box::new(store_clock_offset.clone()))?;
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                name("tls_certificate_expiry_timestamp_seconds"),
                "When the chain the TLS listener presents stops working: the notAfter of its first certificate to expire, in Unix seconds (only with [server.tls]).",
            ),
            &[],
        )?;
        registry.register(Box::new(tls_certificate_expiry.clone()))?;
        let store_fallbacks = counter(
            "store_fallbacks_total",
            "What the gateway did instead while the store was down: rate_limit (the local limiter), cache (local cache and single-flight), budget_refused (503 store_unavailable), unbudgeted_served (a tenant without a budget served), usage_unrecorded (a billable call not added to the shared history), verdict_replaced (a shared verdict it could not read, replaced by a call).",
            &["what"],
        )?;
        let late_commits = prometheus::IntCounter::new(
            name("budget_late_commits_total"),
            "Billable calls committed after their budget hold had lapsed (their replica was cut off from the store, alone, for a lease): counted all the same.",
        )?;
        registry.register(Box::new(late_commits.clone()))?;
        let upstream_secret_echo = prometheus::IntCounter::new(
            name("upstream_secret_echo_total"),
            "Provider answers that contained the organization key: dropped, never forwarded nor cached.",
        )?;
        registry.register(Box::new(upstream_secret_echo.clone()))?;
        let connections_refused = counter(
            "connections_refused_total",
            "Client connections closed at once because a cap was reached (max_connections|max_connections_per_ip).",
            &["reason"],
        )?;
        let connections_cut = counter(
            "connections_cut_total",
            "Client connections cut by the edge (header_timeout|header_too_large|idle_timeout|tls_handshake_timeout).",
            &["reason"],
        )?;
        let admin_connections_refused = counter(
            "admin_connections_refused_total",
            "Admin listener connections closed at once because a cap was reached (max_connections|max_connections_per_ip).",
            &["reason"],
        )?;
        let admin_connections_cut = counter(
            "admin_connections_cut_total",
            "Admin listener connections cut by the edge (header_timeout|header_too_large|idle_timeout).",
            &["reason"],
        )?;
        let early_answer_drains = counter(
            "early_answer_drains_total",
            "Bodies read and thrown away after an answer given before they were read, by how the drain ended (complete|client_closed|byte_limit|time_limit|no_room).",
            &["outcome"],
        )?;
        let reloads = counter(
            "reloads_total",
            "Config reloads (SIGHUP or /admin/reload), by outcome (applied|refused).",
            &["outcome"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                name("build_info"),
                "Always 1; the version of the running binary.",
            ),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let circuit_transitions = counter(
            "circuit_transitions_total",
            "Circuit breaker transitions, by the state entered (closed|open|half_open).",
            &["to"],
        )?;

        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                name("request_duration_seconds"),
                "Time from request to answer, by outcome.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let prediction = HistogramVec::new(
            HistogramOpts::new(
                name("liveness_prediction"),
                "Prediction values of verdicts from the provider.",
            )
            .buckets((1..=20).map(|i| f64::from(i) / 20.0).collect()),
            &["tenant"],
        )?;
        registry.register(Box::new(prediction.clone()))?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                name("upstream_duration_seconds"),
                "Duration of upstream calls.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(upstream_duration.clone()))?;

        let gauge = |n: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name(n), help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let cache_entries = gauge("cache_entries", "Verdicts in the cache.")?;
        let cache_bytes = gauge("cache_bytes", "Weighed size of the cache in bytes.")?;
        let inflight = gauge("inflight_requests", "Liveness requests being handled.")?;
        let upstream_inflight = gauge("upstream_inflight", "Upstream calls in flight.")?;
        let store_settles_pending = gauge(
            "store_settles_pending",
            "Answered calls whose commit or release the shared store has not taken yet (fleet mode): a stop waits for them.",
        )?;
        let connections_open = gauge("connections_open", "Client connections open.")?;
        let admin_connections_open =
            gauge("admin_connections_open", "Admin listener connections open.")?;
        let budget_remaining = IntGaugeVec::new(
            Opts::new(
                name("budget_remaining"),
                "Billable calls left in the current period (only for tenants with a budget).",
            ),
            &["tenant", "period"],
        )?;
        registry.register(Box::new(budget_remaining.clone()))?;
        let budget_limit = IntGaugeVec::new(
            Opts::new(
                name("budget_limit"),
                "Billable calls allowed in the period (only for tenants with a budget).",
            ),
            &["tenant", "period"],
        )?;
        registry.register(Box::new(budget_limit.clone()))?;
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                name("circuit_state"),
                "The circuit breaker's state: 1 for the current one (closed|open|half_open), 0 for the others.",
            ),
            &["state"],
        )?;
        registry.register(Box::new(circuit_state.clone()))?;

        let metrics = Metrics {
            registry,
            requests,
            request_duration,
            liveness_results,
            prediction,
            failures,
            upstream_requests,
            upstream_duration,
            cache_lookups,
            cache_entries,
            cache_bytes,
            rate_limited,
            rejected,
            budget_remaining,
            budget_limit,
            inflight,
            upstream_inflight,
            store_settles_pending,
            billable_calls,
            upstream_uncertain,
            billed_without_verdict,
            replay_suspected,
            notify_events,
            webhook_deliveries,
            failed_attempt_limits,
            conversions,
            face_checks,
            trace_spans_dropped,
            exemplars: Exemplars::default(),
            state_write_failures,
            upstream_secret_echo,
            circuit_state,
            circuit_transitions,
            connections_open,
            connections_refused,
            connections_cut,
            early_answer_drains,
            admin_connections_open,
            admin_connections_refused,
            admin_connections_cut,
            reloads,
            store_duration,
            store_errors,
            store_up,
            store_may_evict,
            store_prefix_shared,
            store_clock_offset,
            tls_certificate_expiry,
            org_key_lapsed,
            org_key_failovers,
            auth_token_failures,
            auth_tokens_verified,
            jwks_fetches,
            store_fallbacks,
            late_commits,
        };
        metrics.init_global();
        metrics.init_tenant(crate::config::UNKNOWN_TENANT);
        Ok(metrics)
    }

    /// Create every series a tenant can have, at zero, so that `rate()` works from the first
    /// scrape and dashboards show zeros rather than gaps. All label values are bounded sets.
    pub fn init_tenant(&self, tenant: &str) {
        for outcome in OUTCOMES {
            self.requests.with_label_values(&[tenant, outcome]);
        }
        for result in ["pass", "fail"] {
            for source in ["upstream", "cache"] {
                self.liveness_results
                    .with_label_values(&[tenant, result, source]);
            }
        }
        for f in FailureType::ALL {
            self.failures.with_label_values(&[tenant, f.as_str()]);
        }
        for r in ["hit", "miss", "coalesced"] {
            self.cache_lookups.with_label_values(&[tenant, r]);
        }
        for r in ["rate", "budget", "overloaded"] {
            self.rate_limited.with_label_values(&[tenant, r]);
        }
        self.prediction.with_label_values(&[tenant]);
        self.billable_calls.with_label_values(&[tenant]);
        self.replay_suspected.with_label_values(&[tenant]);
        self.failed_attempt_limits.with_label_values(&[tenant]);
        for outcome in FACE_OUTCOMES {
            self.face_checks.with_label_values(&[tenant, outcome]);
        }
    }

    fn init_global(&self) {
        for from in ["heic", "webp"] {
            for outcome in CONVERSION_OUTCOMES {
                self.conversions.with_label_values(&[from, outcome]);
            }
        }
        for r in ["max_connections", "max_connections_per_ip"] {
            self.connections_refused.with_label_values(&[r]);
            self.admin_connections_refused.with_label_values(&[r]);
        }
        for o in ["applied", "refused"] {
            self.reloads.with_label_values(&[o]);
        }
        for op in STORE_OPS {
            self.store_duration.with_label_values(&[op]);
            self.store_errors.with_label_values(&[op]);
        }
        for w in [
            "rate_limit",
            "cache",
            "budget_refused",
            "unbudgeted_served",
            "usage_unrecorded",
            "verdict_replaced",
        ] {
            self.store_fallbacks.with_label_values(&[w]);
        }
        self.store_up.set(1);
        for r in ["header_timeout", "header_too_large", "idle_timeout"] {
            self.connections_cut.with_label_values(&[r]);
            self.admin_connections_cut.with_label_values(&[r]);
        }
        for r in ["tls_handshake_timeout", "send_timeout"] {
            self.connections_cut.with_label_values(&[r]);
        }
        for outcome in OUTCOMES {
            self.request_duration.with_label_values(&[outcome]);
        }
        for end in DrainEnd::ALL {
            self.early_answer_drains.with_label_values(&[end.as_str()]);
        }
        for class in UpstreamClass::ALL {
            if class != UpstreamClass::Ok && !class.is_unbilled_refusal() {
                self.billed_without_verdict
                    .with_label_values(&[class.as_str()]);
            }
        }
    }

    /// One fetch of an issuer's JWKS, by its outcome (`auth::Fetched`).
    pub fn jwks_fetched(&self, issuer: &str, outcome: &str) {
        self.jwks_fetches
            .with_label_values(&[issuer, outcome])
            .inc();
    }

    /// The series of refused tokens, at zero before the first, one per reason (the reasons are
    /// `auth`'s, which registers them).
    pub fn init_token_failures<'a>(&self, reasons: impl IntoIterator<Item = &'a str>) {
        for reason in reasons {
            self.auth_token_failures.with_label_values(&[reason]);
        }
    }

    /// The series of one organization key, at zero before its first call.
    pub fn init_org_key(&self, id: &str) {
        self.org_key_failovers.with_label_values(&[id]);
        self.upstream_uncertain.with_label_values(&[id]);
        for class in UpstreamClass::ALL {
            let status_class = match class {
                UpstreamClass::Ok => "2xx",
                UpstreamClass::ServerError => "5xx",
                UpstreamClass::Timeout
                | UpstreamClass::Connect
                | UpstreamClass::ConnectionLost
                | UpstreamClass::InvalidResponse => "none",
                _ => "4xx",
            };
            self.upstream_requests
                .with_label_values(&[status_class, class.as_str(), id]);
        }
    }

    /// Text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// The OpenMetrics text format, with exemplars (what Prometheus asks for when it scrapes).
    pub fn render_openmetrics(&self) -> Vec<u8> {
        openmetrics::encode(&self.registry.gather(), &self.exemplars)
    }

    /// A traced request's latency, as an exemplar of `request_duration_seconds{outcome}`.
    pub fn request_exemplar(
        &self,
        outcome: &'static str,
        secs: f64,
        trace_id: [u8; 16],
        span_id: [u8; 8],
    ) {
        let metric = "liveness_gateway_request_duration_seconds";
        let buckets = LATENCY_BUCKETS;
        (self.exemplars).note(metric, outcome, buckets, secs, trace_id, span_id);
    }

    /// A traced provider call's duration, as an exemplar of `upstream_duration_seconds`.
    pub fn upstream_exemplar(&self, secs: f64, trace_id: [u8; 16], span_id: [u8; 8]) {
        let metric = "liveness_gateway_upstream_duration_seconds";
        (self.exemplars).note(metric, "", LATENCY_BUCKETS, secs, trace_id, span_id);
    }
}

/// Decrements a gauge when dropped.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(g: &IntGauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
