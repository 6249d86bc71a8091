//! One structured line and the metrics for every request, written in Pingora's `logging` phase
//! (which runs for requests answered in `request_filter` too). Tenants are named by id; keys,
//! images and the organization key never reach this code.

use pingora::proxy::Session;

use crate::config::LogFormat;
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

pub fn record(
    state: &AppState,
    session: &Session,
    err: Option<&pingora::Error>,
    ctx: &mut RequestCtx,
) {
    let m = &state.metrics;
    let tenant = ctx.tenant.as_deref().unwrap_or(UNKNOWN_TENANT);
    let outcome = ctx.outcome();
    let elapsed = ctx.started.elapsed();
    let path = session.req_header().uri.path();
    // Unknown paths are counted but not labelled by path.
    m.requests.with_label_values(&[tenant, outcome]).inc();
    m.request_duration
        .with_label_values(&[outcome])
        .observe(elapsed.as_secs_f64());

    if let Some(v) = &ctx.verdict {
        let source = if ctx.upstream_called {
            "upstream"
        } else {
            "cache"
        };
        m.liveness_results
            .with_label_values(&[tenant, if v.result { "pass" } else { "fail" }, source])
            .inc();
        if ctx.upstream_called {
            if let Some(p) = v.prediction {
                m.prediction.with_label_values(&[tenant]).observe(p);
            }
        }
        if !v.result {
            let kind = v.failure_type.map(|f| f.as_str()).unwrap_or("OTHER");
            m.failures.with_label_values(&[tenant, kind]).inc();
        }
    }
    if let Some(c) = ctx.cache {
        let result = match c {
            "HIT" => Some("hit"),
            "COALESCED" => Some("coalesced"),
            "MISS" => Some("miss"),
            _ => None,
        };
        if let Some(r) = result {
            m.cache_lookups.with_label_values(&[tenant, r]).inc();
        }
    }
    if let Some(e) = &ctx.error {
        use crate::error::GatewayError as E;
        match e {
            E::RateLimited { .. } => m.rate_limited.with_label_values(&[tenant, "rate"]).inc(),
            E::BudgetExhausted { .. } => {
                m.rate_limited.with_label_values(&[tenant, "budget"]).inc()
            }
            E::Overloaded => m
                .rate_limited
                .with_label_values(&[tenant, "overloaded"])
                .inc(),
            e if e.is_rejection() => m.rejected.with_label_values(&[tenant, e.code()]).inc(),
            _ => {}
        }
    }

    let v = ctx.verdict.as_ref();
    tracing::info!(
        target: "access",
        request_id = %ctx.request_id,
        tenant,
        method = %session.req_header().method,
        path,
        status = ctx.status,
        outcome,
        code = ctx.error.as_ref().map(|e| e.code()),
        cache = ctx.cache,
        upstream_status = ctx.upstream_status,
        upstream_class = ctx.upstream_class.map(|c| c.as_str()),
        result = v.map(|v| v.result),
        prediction = v.and_then(|v| v.prediction),
        image_bytes = ctx.image_bytes,
        upstream_ms = ctx.upstream_ms,
        total_ms = elapsed.as_millis() as u64,
        error = err.map(|e| e.etype().as_str()),
        "request"
    );
}
