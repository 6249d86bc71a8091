//! The metrics of every request (counted as its answer is written) and its structured log line
//! (written in Pingora's `logging` phase, which also runs for requests answered in
//! `request_filter`). Tenants are named by id; keys, images and the organization key never reach
//! this code.

use pingora::proxy::Session;

use crate::config::LogFormat;
use crate::error::GatewayError;
use crate::state::{AppState, RequestCtx};
use crate::tenant::UNKNOWN_TENANT;

/// Install the process-wide subscriber (`RUST_LOG` filters; default `info`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Count a request in the metrics. Called just before its answer is written, so that a client
/// holding its answer also finds it counted (usage endpoint, metrics).
pub fn count(state: &AppState, ctx: &RequestCtx) {
    let m = &state.metrics;
    let tenant = ctx.tenant.as_deref().unwrap_or(UNKNOWN_TENANT);
    let outcome = ctx.outcome();
    m.requests.with_label_values(&[tenant, outcome]).inc();
    m.request_duration
        .with_label_values(&[outcome])
        .observe(ctx.started.elapsed().as_secs_f64());

    if let Some(v) = &ctx.verdict {
        let source = if ctx.upstream_called {
            "upstream"
        } else {
            "cache"
        };
        let result = if v.result { "pass" } else { "fail" };
        m.liveness_results
            .with_label_values(&[tenant, result, source])
            .inc();
        if let (true, Some(p)) = (ctx.upstream_called, v.prediction) {
            m.prediction.with_label_values(&[tenant]).observe(p);
        }
        if !v.result {
            let kind = v.failure_type.map(|f| f.as_str()).unwrap_or("OTHER");
            m.failures.with_label_values(&[tenant, kind]).inc();
        }
    }
    let lookup = match ctx.cache {
        Some("HIT") => Some("hit"),
        Some("COALESCED") => Some("coalesced"),
        Some("MISS") => Some("miss"),
        _ => None,
    };
    if let Some(r) = lookup {
        m.cache_lookups.with_label_values(&[tenant, r]).inc();
    }
    match &ctx.error {
        Some(GatewayError::RateLimited { .. }) => {
            m.rate_limited.with_label_values(&[tenant, "rate"]).inc()
        }
        Some(GatewayError::BudgetExhausted { .. }) => {
            m.rate_limited.with_label_values(&[tenant, "budget"]).inc()
        }
        Some(GatewayError::Overloaded) => m
            .rate_limited
            .with_label_values(&[tenant, "overloaded"])
            .inc(),
        Some(e) if e.is_rejection() => m.rejected.with_label_values(&[tenant, e.code()]).inc(),
        _ => {}
    }
}

/// The access log line, once the request is over.
pub fn log_line(session: &Session, err: Option<&pingora::Error>, ctx: &RequestCtx) {
    let v = ctx.verdict.as_ref();
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        tenant = ctx.tenant.as_deref().unwrap_or(UNKNOWN_TENANT),
        method = %session.req_header().method,
        path = session.req_header().uri.path(),
        status = ctx.status,
        outcome = ctx.outcome(),
        code = ctx.error.as_ref().map(|e| e.code()),
        cache = ctx.cache,
        upstream_status = ctx.upstream_status,
        upstream_class = ctx.upstream_class.map(|c| c.as_str()),
        result = v.map(|v| v.result),
        prediction = v.and_then(|v| v.prediction),
        image_bytes = ctx.image_bytes,
        upstream_ms = ctx.upstream_ms,
        total_ms = ctx.started.elapsed().as_millis() as u64,
        error = err.map(|e| e.etype().as_str()),
        "request"
    );
}
