//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/admin/usage`, `/admin/cache`,
//! `/admin/reload`. It binds to loopback by default; `/admin/*` asks for the admin token when one
//! is configured, and so does `/metrics` (tenant ids, budgets) when the listener is not on
//! loopback. The probes stay open: load balancers and kubelets send no token.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::state::AppState;

pub struct Admin {
    pub state: Arc<AppState>,
    /// Re-reads the config file and swaps it in; set by the server.
    pub reload: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .header("Cache-Control", "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Vec<u8>> {
    respond(status, "application/json", v.to_string().into_bytes())
}

fn error(status: StatusCode, code: &str, detail: &str) -> Response<Vec<u8>> {
    json_reply(status, json!({ "detail": detail, "code": code }))
}

impl Admin {
    /// Publish the gauges that are read rather than counted.
    pub async fn refresh_gauges(&self) {
        let s = &self.state;
        s.cache.sync().await;
        s.metrics.cache_entries.set(s.cache.entries() as i64);
        s.metrics.cache_bytes.set(s.cache.bytes() as i64);
        let rt = s.runtime();
        let now = Utc::now();
        for t in rt.tenants.ids() {
            let Some(cfg) = rt.tenants.get(t) else {
                continue;
            };
            let c = s.budgets.counts(t, now);
            for (period, limit, used) in [
                ("daily", cfg.daily_budget, c.day_used),
                ("monthly", cfg.monthly_budget, c.month_used),
            ] {
                if let Some(limit) = limit {
                    s.metrics
                        .budget_limit
                        .with_label_values(&[t, period])
                        .set(limit as i64);
                    s.metrics
                        .budget_remaining
                        .with_label_values(&[t, period])
                        .set(limit.saturating_sub(used) as i64);
                }
            }
        }
    }

    fn usage(&self) -> serde_json::Value {
        let s = &self.state;
        let rt = s.runtime();
        let now = Utc::now();
        let counter = |vec: &prometheus::IntCounterVec, labels: &[&str]| {
            vec.get_metric_with_label_values(labels)
                .map(|c| c.get())
                .unwrap_or(0)
        };
        let tenants: Vec<_> = rt
            .tenants
            .ids()
            .filter_map(|id| rt.tenants.get(id))
            .map(|t| {
                let c = s.budgets.counts(&t.id, now);
                let period = |limit: Option<u64>, used: u64, key: &str, resets_in: u64| {
                    json!({
                        "period": key,
                        "limit": limit,
                        "used": used,
                        "remaining": limit.map(|l| l.saturating_sub(used)),
                        "resets_in_seconds": resets_in,
                    })
                };
                json!({
                    "tenant": t.id,
                    "disabled": t.disabled,
                    "rate_per_second": t.rate_per_second,
                    "burst": t.burst,
                    "daily": period(t.daily_budget, c.day_used, &c.day, crate::budget::secs_to_next_day(now)),
                    "monthly": period(t.monthly_budget, c.month_used, &c.month, crate::budget::secs_to_next_month(now)),
                    "rate_limited": counter(&s.metrics.rate_limited, &[&t.id, "rate"]),
                    "budget_refused": counter(&s.metrics.rate_limited, &[&t.id, "budget"]),
                    "cache_hits_saved": counter(&s.metrics.cache_lookups, &[&t.id, "hit"]) + counter(&s.metrics.cache_lookups, &[&t.id, "coalesced"]),
                })
            })
            .collect();
        json!({ "tenants": tenants })
    }

    /// Whether this path needs the token: `/admin/*` always (when one is set), `/metrics` when
    /// the listener is reachable from other hosts.
    fn guarded(&self, path: &str) -> bool {
        path.starts_with("/admin/")
            || (path == "/metrics" && !self.state.runtime().config.admin_listen.ip().is_loopback())
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let rt = self.state.runtime();
        let Some(token) = &rt.config.admin_token else {
            return true;
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        token.matches(presented)
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        if self.guarded(&path) && !self.authorized(session) {
            return error(
                StatusCode::UNAUTHORIZED,
                "admin_unauthorized",
                "the admin token is missing or wrong",
            );
        }
        let s = &self.state;
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => json_reply(StatusCode::OK, json!({ "status": "ok" })),
            ("GET", "/readyz") => {
                let resolved = s.upstream.address().is_some();
                let shutting_down = s.is_shutting_down();
                let ready = resolved && !shutting_down;
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json_reply(
                    status,
                    json!({ "ready": ready, "config_loaded": true, "upstream_resolved": resolved, "shutting_down": shutting_down }),
                )
            }
            ("GET", "/metrics") => {
                self.refresh_gauges().await;
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    s.metrics.render(),
                )
            }
            ("GET", "/admin/usage") => json_reply(StatusCode::OK, self.usage()),
            ("GET", "/admin/cache") => {
                s.cache.sync().await;
                json_reply(
                    StatusCode::OK,
                    json!({ "enabled": s.cache.enabled(), "entries": s.cache.entries(), "bytes": s.cache.bytes(), "hit_ratio": s.cache.hit_ratio() }),
                )
            }
            ("DELETE", "/admin/cache") => {
                let tenant = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("tenant="))
                    .map(str::to_string);
                if let Some(t) = &tenant {
                    if s.runtime().tenants.get(t).is_none() {
                        return error(
                            StatusCode::NOT_FOUND,
                            "unknown_tenant",
                            "no tenant with that id",
                        );
                    }
                }
                match s.cache.purge(tenant.as_deref()).await {
                    Ok(()) => json_reply(
                        StatusCode::OK,
                        json!({ "purged": tenant.unwrap_or_else(|| "all".into()), "entries": s.cache.entries() }),
                    ),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "purge_failed", &e),
                }
            }
            ("POST", "/admin/reload") => match (self.reload)() {
                Ok(()) => json_reply(StatusCode::OK, json!({ "reloaded": true })),
                Err(e) => error(StatusCode::BAD_REQUEST, "invalid_config", &e),
            },
            (
                _,
                "/healthz" | "/readyz" | "/metrics" | "/admin/usage" | "/admin/cache"
                | "/admin/reload",
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            ),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no route for this path"),
        }
    }
}
