//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/admin/usage`, `/admin/subjects`
//! (and its reset), `/admin/cache`, `/admin/reload`. It binds to loopback by default; `/admin/*` asks for the
//! admin token when one is configured, and so does `/metrics` (tenant ids, budgets) when the
//! listener is not on loopback. The probes stay open: load balancers and kubelets send no token.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{Datelike, NaiveDate};
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
use pingora::http::RequestHeader;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::error::GatewayError;
use crate::state::AppState;
use crate::store::{DayUsage, StoreError};
use crate::usage::{self, format_cost, history_csv, Pricing};

pub mod client;
mod keys;

/// The longest history one export covers.
const MAX_HISTORY_DAYS: i64 = 800;

/// The `from`/`to` of a history export: the current month so far by default; `from` not after
/// `to`, at most `MAX_HISTORY_DAYS` days.
fn history_range(
    from: Option<&str>,
    to: Option<&str>,
    today: NaiveDate,
) -> Result<(NaiveDate, NaiveDate), String> {
    let parse = |v: Option<&str>, default: NaiveDate, name: &str| match v {
        None => Ok(default),
        Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| format!("{name} must be a date like 2026-11-25")),
    };
    let to = parse(to, today, "to")?;
    let from = parse(from, to.with_day(1).unwrap_or(to), "from")?;
    if from > to {
        return Err("from is after to".into());
    }
    if (to - from).num_days() >= MAX_HISTORY_DAYS {
        return Err(format!("at most {MAX_HISTORY_DAYS} days at once"));
    }
    Ok((from, to))
}

/// Whether a web page could have had a browser send this request, and so the refusal to give.
///
/// The admin API is for operators' tools (curl, Prometheus, probes), never for pages; yet a
/// browser on an operator's machine sends what any page asks of it, from where the operator
/// sits: to a loopback or private admin listener, or to one forwarded to that machine. So,
/// with or without a token:
/// - A `Host` (or absolute target, or HTTP/2 authority) naming the listener by a DNS name other
///   than `localhost` and `server.admin_hosts` is refused: a DNS-rebinding page reaches the
///   listener under its own name, and to the browser the listener is then that page's own
///   origin, free to read and post. An IP address needs no listing: the browser dials the
///   address a page's origin names, so no other site's page can present it.
/// - `Sec-Fetch-Site` other than `same-origin` and `none` (another port of the same host is
///   `same-site`) is refused, except for a navigation that only reads (a link opened in a tab).
/// - Any method but GET and HEAD is refused with an `Origin` that is not the listener as
///   addressed, and with a body type a form can send without asking (`text/plain`, urlencoded,
///   multipart): over plain HTTP to another host than loopback, browsers send no
///   `Sec-Fetch-Site`, but these still.
fn browser_refusal(req: &RequestHeader, names: &[String]) -> Option<GatewayError> {
    let text = |name: header::HeaderName| {
        req.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{fffd}"))
    };
    // Pingora refuses two `Host` fields, or one that differs from an absolute target's (which
    // it keeps out of `uri`); HTTP/2 has the authority in `uri`.
    let target = match raw_target_authority(req.raw_path()) {
        RawTargetAuthority::Absolute { authority, .. } => {
            Some(std::str::from_utf8(authority).unwrap_or("\u{fffd}"))
        }
        _ => None,
    };
    let addressed = text(header::HOST)
        .or(target)
        .or(req.uri.authority().map(|a| a.as_str()));
    let addressed = match addressed.map(listener_as_addressed) {
        Some(None) => return Some(GatewayError::AdminHostNotAllowed),
        Some(Some(url)) if !answers(&url, names) => return Some(GatewayError::AdminHostNotAllowed),
        a => a.flatten(),
    };
    let safe = matches!(req.method, http::Method::GET | http::Method::HEAD);
    let navigation =
        safe && text(header::HeaderName::from_static("sec-fetch-mode")) == Some("navigate");
    let site = text(header::HeaderName::from_static("sec-fetch-site"));
    if site.is_some_and(|s| s != "same-origin" && s != "none") && !navigation {
        return Some(GatewayError::AdminCrossSite {
            reason: "a page of another site sent it (Sec-Fetch-Site)",
        });
    }
    if safe {
        return None;
    }
    if let Some(origin) = text(header::ORIGIN) {
        let same = addressed
            .is_some_and(|a| url::Url::parse(origin).is_ok_and(|o| o.origin() == a.origin()));
        if !same {
            return Some(GatewayError::AdminCrossSite {
                reason: "a page of another origin sent it (Origin)",
            });
        }
    }
    let form = req.headers.get_all(header::CONTENT_TYPE).iter().any(|v| {
        let essence = v.to_str().unwrap_or("").split(';').next().unwrap_or("");
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ]
        .iter()
        .any(|t| essence.trim().eq_ignore_ascii_case(t))
    });
    form.then_some(GatewayError::AdminCrossSite {
        reason: "a form can send this Content-Type from any page: send no body, or a JSON one",
    })
}

/// The listener as a request addresses it (`Host`), as a browser would parse it: `None` for
/// anything but a host and an optional port.
fn listener_as_addressed(authority: &str) -> Option<url::Url> {
    let url = url::Url::parse(&format!("http://{authority}/")).ok()?;
    let plain = url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none();
    plain.then_some(url)
}

/// Whether the admin listener answers to this name: any IP address, `localhost`, and the
/// configured names.
fn answers(url: &url::Url, names: &[String]) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) => true,
        Some(url::Host::Domain(d)) => d == "localhost" || names.iter().any(|n| n == d),
        None => false,
    }
}

pub struct Admin {
    pub state: Arc<AppState>,
    /// Re-reads the config file and swaps it in (blocking); set by the server.
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

/// A `tenant` parameter naming no configured tenant.
struct UnknownTenant;

impl UnknownTenant {
    fn answer(self) -> Response<Vec<u8>> {
        error(
            StatusCode::NOT_FOUND,
            "unknown_tenant",
            "no tenant with that id",
        )
    }
}

/// The value of `name` in a query string, percent-decoding not needed (ids are plain ASCII).
/// A query parameter's value, percent-decoded (`+` stays a `+`). The query was checked by
/// `check_query` before any route reads it.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (decoded(k).as_deref() == Some(name)).then(|| decoded(v))?
    })
}

fn decoded(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let escapes_whole = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_whole {
        return None;
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The one check of every admin query: each name and value percent-decodes to UTF-8, and no
/// name comes twice (which of two values a route read would be a guess).
fn check_query(query: &str) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        // What was sent is not repeated: a query may carry what should not have been put there.
        let (Some(name), Some(_)) = (decoded(k), decoded(v)) else {
            return Err("a query parameter is not percent-encoded UTF-8".into());
        };
        if !seen.insert(name) {
            return Err("a query parameter is given twice".into());
        }
    }
    Ok(())
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Vec<u8>> {
    respond(status, "application/json", v.to_string().into_bytes())
}

fn error(status: StatusCode, code: &str, detail: &str) -> Response<Vec<u8>> {
    let mut body = json!({ "detail": detail, "code": code });
    if let Some(hint) = hint(code) {
        body["hint"] = hint.into();
    }
    json_reply(status, body)
}

/// What an admin client can do about a refusal, where the code alone does not say.
fn hint(code: &str) -> Option<&'static str> {
    Some(match code {
        "not_found" => "the admin routes: GET /healthz, /readyz, /metrics, /admin/usage, /admin/subjects, /admin/cache, /admin/tenants/{id}/keys, /.well-known/jwks.json; POST /admin/usage/adjust, /admin/usage/grant, /admin/subjects/reset, /admin/reload, /admin/tenants/{id}/keys, /admin/tenants/{id}/keys/{key_id}/rotate; DELETE /admin/cache, /admin/usage/grant, /admin/tenants/{id}/keys/{key_id}",
        "method_not_allowed" => "see the routes and their methods in docs/operations.md",
        "admin_unauthorized" => "send Authorization: Bearer <the token in server.admin_token_env>",
        "unknown_tenant" => "name a tenant id of the config (GET /admin/usage lists them)",
        "unknown_key" => "GET /admin/tenants/{id}/keys lists the tenant's keys and their ids",
        "unknown_grant" => "GET /admin/usage?tenant=ID lists the tenant's grants and their ids",
        "key_in_config" => "keys declared in the config are changed there: edit key_sha256 and reload",
        "store_not_durable" => "set budgets.state_file (one host) or store.backend = \"redis\" (a fleet), then restart",
        "no_budget" => "give the tenant a daily_budget or monthly_budget first",
        "conflict" => "retry: another change of the same record came first",
        "too_many_secrets" => "rotate with a shorter grace (\"0s\" ends the older secrets), or wait for a grace to end",
        "invalid_body" | "body_too_large" => "see the admin API's bodies in docs/operations.md",
        "store_unavailable" => "retry once the store answers; nothing was changed",
        "invalid_config" => "fix the file (liveness-gateway check-config -c FILE lists every problem) and reload again; the config in force is unchanged",
        "purge_failed" => "retry; the entries not purged expire with their TTL",
        "internal_error" => "retry; if it persists, the gateway's log has the cause",
        "invalid_query" | "invalid_adjustment" | "invalid_range" => {
            "see the parameters in docs/operations.md"
        }
        _ => return None,
    })
}

impl Admin {
    /// Publish the gauges that are read rather than counted.
    pub async fn refresh_gauges(&self) {
        let s = &self.state;
        s.cache.sync().await;
        s.metrics.cache_entries.set(s.cache.entries() as i64);
        s.metrics.cache_bytes.set(s.cache.bytes() as i64);
        let rt = s.runtime();
        let now = self.state.store.now();
        for t in rt.tenants.ids() {
            let Some(cfg) = rt.tenants.get(t) else {
                continue;
            };
            if cfg.daily_budget.is_none() && cfg.monthly_budget.is_none() {
                continue;
            }
            // A store that cannot be read leaves the gauges as they were.
            let Ok(c) = s.store.counts(t, now).await else {
                continue;
            };
            let budget = s.issued.budget(cfg);
            for (period, limit, used) in [
                ("daily", budget.daily, c.day_used),
                ("monthly", budget.monthly, c.month_used),
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

    /// `GET /admin/usage`: each tenant's limits and current periods (`?tenant=ID` for one); with
    /// `from` / `to` (`YYYY-MM-DD`, both included) or `Accept: text/csv`, the daily history for
    /// chargeback.
    async fn usage(&self, query: &str, csv: bool) -> Response<Vec<u8>> {
        let only = match self.tenant_param(query) {
            Ok(t) => t,
            Err(unknown) => return unknown.answer(),
        };
        let (from, to) = (query_param(query, "from"), query_param(query, "to"));
        let answer = if from.is_some() || to.is_some() || csv {
            let today = self.state.store.calendar().today(self.state.store.now());
            match history_range(from.as_deref(), to.as_deref(), today) {
                Ok((from, to)) => self.history(only.as_deref(), from, to, csv).await,
                Err(detail) => return error(StatusCode::BAD_REQUEST, "invalid_range", &detail),
            }
        } else {
            self.current(only.as_deref()).await
        };
        answer.unwrap_or_else(|e| {
            tracing::warn!("usage: {e}");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the store that keeps the counts cannot be reached; retry shortly",
            )
        })
    }

    /// Usage of every tenant, or of one, in the current day and month, with this process's
    /// refusals and cache hits.
    async fn current(&self, only: Option<&str>) -> Result<Response<Vec<u8>>, StoreError> {
        let s = &self.state;
        let rt = s.runtime();
        let counter = |vec: &prometheus::IntCounterVec, labels: &[&str]| {
            vec.get_metric_with_label_values(labels)
                .map(|c| c.get())
                .unwrap_or(0)
        };
        let mut tenants = Vec::new();
        for t in rt
            .tenants
            .ids()
            .filter(|id| only.is_none_or(|o| o == *id))
            .filter_map(|id| rt.tenants.get(id))
        {
            let mut v = usage::current(s, t).await?;
            v.insert("disabled".into(), json!(t.disabled));
            v.insert(
                "rate_limited".into(),
                json!(counter(&s.metrics.rate_limited, &[&t.id, "rate"])),
            );
            v.insert(
                "budget_refused".into(),
                json!(counter(&s.metrics.rate_limited, &[&t.id, "budget"])),
            );
            v.insert(
                "cache_hits_saved".into(),
                json!(
                    counter(&s.metrics.cache_lookups, &[&t.id, "hit"])
                        + counter(&s.metrics.cache_lookups, &[&t.id, "coalesced"])
                ),
            );
            tenants.push(serde_json::Value::Object(v));
        }
        Ok(json_reply(StatusCode::OK, json!({ "tenants": tenants })))
    }

    /// The daily history, one row per tenant and day, with a cost where a price is configured.
    async fn history(
        &self,
        only: Option<&str>,
        from: NaiveDate,
        to: NaiveDate,
        csv: bool,
    ) -> Result<Response<Vec<u8>>, StoreError> {
        let s = &self.state;
        let rt = s.runtime();
        let ids: Vec<String> = rt
            .tenants
            .ids()
            .filter(|id| only.is_none_or(|o| o == *id))
            .map(str::to_string)
            .collect();
        // Counts noted in memory reach the store first, so the export includes them.
        let _ = s.store.flush().await;
        let rows = s.store.history(&ids, from, to).await?;
        let price = |t: &str| rt.tenants.get(t).and_then(|c| c.price_per_call);
        let priced = ids.iter().any(|t| price(t).is_some());
        let cost = |r: &DayUsage| price(&r.tenant).map(|p| format_cost(p * r.billable as f64));
        // With several organization keys, each one's calls: to match the provider's invoices.
        let key_ids: Vec<&str> = if rt.config.upstream.keys.keys.len() > 1 {
            rt.config.upstream.keys.ids().collect()
        } else {
            Vec::new()
        };
        if csv {
            let cost: Pricing = &cost;
            let csv = history_csv(&rows, &key_ids, priced.then_some(cost));
            return Ok(respond(
                StatusCode::OK,
                "text/csv; charset=utf-8",
                csv.into_bytes(),
            ));
        }
        let days: Vec<_> = rows
            .iter()
            .map(|r| {
                let mut v = usage::day_json(r, cost(r));
                v["billable_by_org_key"] = json!(r.billable_by_key);
                v["uncertain_by_org_key"] = json!(r.uncertain_by_key);
                v
            })
            .collect();
        // Each key's billable and uncertain calls by day, all tenants together: what the
        // provider's invoice for that key is matched against.
        let mut per_key: std::collections::BTreeMap<(&str, &str), (u64, u64)> = Default::default();
        for r in &rows {
            for (id, n) in &r.billable_by_key {
                per_key.entry((id.as_str(), r.day.as_str())).or_default().0 += n;
            }
            for (id, n) in &r.uncertain_by_key {
                per_key.entry((id.as_str(), r.day.as_str())).or_default().1 += n;
            }
        }
        let org_keys: Vec<_> = per_key
            .into_iter()
            .map(|((id, day), (n, u))| {
                json!({ "org_key": id, "day": day, "billable_calls": n, "uncertain_calls": u })
            })
            .collect();
        Ok(json_reply(
            StatusCode::OK,
            json!({ "from": from.to_string(), "to": to.to_string(), "days": days, "org_keys": org_keys }),
        ))
    }

    /// `POST /admin/usage/adjust?tenant=ID&delta=-3&reason=…`: add calls to (or, negative, take
    /// them back from) the tenant's current day and month, for refunds and mistakes. Audited.
    async fn adjust(&self, query: &str) -> Response<Vec<u8>> {
        let tenant = match self.required_tenant(query, "invalid_adjustment") {
            Ok(t) => t,
            Err(answer) => return *answer,
        };
        let delta = query_param(query, "delta").and_then(|d| d.parse::<i64>().ok());
        let Some(delta) = delta.filter(|d| *d != 0 && d.unsigned_abs() <= 1_000_000_000) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_adjustment",
                "delta must be a whole number of calls, not zero (negative takes calls back)",
            );
        };
        // Kept for the audit line only: plain text, bounded.
        let reason: String = query_param(query, "reason")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.+%".contains(*c))
            .take(200)
            .collect();
        match self
            .state
            .store
            .adjust(&tenant, self.state.store.now(), delta)
            .await
        {
            Ok(a) => {
                let c = &a.counts;
                let clamped = a.day_applied != delta || a.month_applied != delta;
                tracing::info!(target: "audit", action = "usage_adjust", tenant = %tenant, delta, day_applied = a.day_applied, month_applied = a.month_applied, reason = %reason, day_used = c.day_used, month_used = c.month_used, "admin: usage adjusted");
                // A count never goes below zero: a refund larger than it says what it took.
                let note = clamped.then_some(
                    "a count would have gone below zero: it stopped at zero (see applied)",
                );
                json_reply(
                    StatusCode::OK,
                    json!({
                        "tenant": tenant,
                        "delta": delta,
                        "clamped": clamped,
                        "note": note,
                        "daily": { "period": c.day, "used": c.day_used, "applied": a.day_applied },
                        "monthly": { "period": c.month, "used": c.month_used, "applied": a.month_applied },
                    }),
                )
            }
            Err(e) => {
                tracing::warn!(target: "audit", action = "usage_adjust", tenant = %tenant, delta, "admin: usage adjustment failed: {e}");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store that keeps the counts cannot be reached; nothing was changed",
                )
            }
        }
    }

    /// `GET /admin/subjects?tenant=ID[&limit=N]`: the tenant's app-token subjects with the most
    /// billable calls today (by keyed hash, never the subject), most first; 20 by default, at
    /// most 1,000.
    async fn subjects(&self, query: &str) -> Response<Vec<u8>> {
        let tenant = match self.required_tenant(query, "invalid_query") {
            Ok(t) => t,
            Err(answer) => return *answer,
        };
        let limit = match query_param(query, "limit").map(|l| l.parse::<usize>()) {
            None => 20,
            Some(Ok(n)) if (1..=1000).contains(&n) => n,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "limit must be a whole number from 1 to 1000",
                )
            }
        };
        let rt = self.state.runtime();
        let per_subject = rt.tenants.get(&tenant).and_then(|t| t.per_subject);
        let now = self.state.store.now();
        match self.state.store.top_subjects(&tenant, now, limit).await {
            Ok(top) => json_reply(
                StatusCode::OK,
                json!({
                    "tenant": tenant,
                    "day": self.state.store.calendar().day(now),
                    "daily_budget": per_subject.and_then(|p| p.daily_budget),
                    "max_failed_attempts": per_subject.and_then(|p| p.max_failed_attempts),
                    "subjects": top
                        .into_iter()
                        .map(|s| json!({ "subject": s.subject, "billable_calls": s.billable, "failed_attempts": s.failed }))
                        .collect::<Vec<_>>(),
                }),
            ),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                &format!("the store that keeps the counts cannot be reached: {e}"),
            ),
        }
    }

    /// `POST /admin/subjects/reset?tenant=ID&subject=HASH` (or `&issuer=ID&sub=VALUE`, hashed
    /// here as every request's subject is): forget the subject's failed attempts of today, so
    /// that a user refused with `too_many_failed_attempts` may try again. Audited (the hash,
    /// never the subject).
    async fn reset_subject(&self, query: &str) -> Response<Vec<u8>> {
        let tenant = match self.required_tenant(query, "invalid_query") {
            Ok(t) => t,
            Err(answer) => return *answer,
        };
        let subject = match self.subject_param(query) {
            Ok(s) => s,
            Err(detail) => return error(StatusCode::BAD_REQUEST, "invalid_query", detail),
        };
        let now = self.state.store.now();
        match self.state.store.reset_failed(&tenant, &subject, now).await {
            Ok(had) => {
                tracing::info!(target: "audit", action = "subject_reset", tenant = %tenant, subject = %subject, failed_attempts = had, "admin: a subject's failed attempts reset");
                json_reply(
                    StatusCode::OK,
                    json!({
                        "tenant": tenant,
                        "subject": subject,
                        "day": self.state.store.calendar().day(now),
                        "failed_attempts_before": had,
                        "failed_attempts": 0,
                    }),
                )
            }
            Err(e) => {
                tracing::warn!(target: "audit", action = "subject_reset", tenant = %tenant, subject = %subject, "admin: a subject's reset failed: {e}");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store that keeps the counts cannot be reached; nothing was changed",
                )
            }
        }
    }

    /// The subject a query names: its keyed hash (`subject`, as `/admin/subjects` and the access
    /// log show it), or an issuer and the token's subject (`issuer`, `sub`), hashed here.
    fn subject_param(&self, query: &str) -> Result<String, &'static str> {
        let param = |name| query_param(query, name);
        let rt = self.state.runtime();
        match (&param("subject"), &param("issuer"), &param("sub")) {
            (Some(hash), None, None) => {
                let ok = hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit());
                ok.then(|| hash.to_ascii_lowercase()).ok_or(
                    "subject must be a subject's hash: 32 hex digits, as /admin/subjects shows it",
                )
            }
            (None, Some(issuer), Some(sub)) if !sub.is_empty() => {
                if !rt.config.issuers.iter().any(|i| &i.id == issuer) {
                    return Err("issuer must name one of auth.issuers");
                }
                Ok(rt.config.subject_hash_key.name(issuer, sub))
            }
            _ => Err("name the subject by subject (its hash), or by issuer and sub"),
        }
    }

    /// The `tenant` query parameter: absent, or a configured tenant; `Err` for any other.
    fn tenant_param(&self, query: &str) -> Result<Option<String>, UnknownTenant> {
        match query_param(query, "tenant") {
            Some(t) if self.state.runtime().tenants.get(&t).is_none() => Err(UnknownTenant),
            t => Ok(t),
        }
    }

    /// The `tenant` query parameter of an endpoint that needs one: a configured tenant, or the
    /// answer to give (`code` when it is missing).
    fn required_tenant(&self, query: &str, code: &str) -> Result<String, Box<Response<Vec<u8>>>> {
        match self.tenant_param(query) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                code,
                "tenant is required",
            ))),
            Err(unknown) => Err(Box::new(unknown.answer())),
        }
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
        // Sent twice, it is not taken at all.
        let presented = crate::auth::tenant::credential_header(
            &session.req_header().headers,
            http::header::AUTHORIZATION,
        )
        .ok()
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
        token.matches(presented)
    }

    /// The receipts' public keys, as on the client listeners.
    fn jwks(&self) -> Response<Vec<u8>> {
        let Some(receipts) = self.state.runtime().receipts.clone() else {
            return error(StatusCode::NOT_FOUND, "not_found", "receipts are off");
        };
        let mut answer = respond(StatusCode::OK, "application/json", receipts.jwks().to_vec());
        answer.headers_mut().insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static(crate::receipt::JWKS_CACHE_CONTROL),
        );
        answer
    }

    fn readyz(&self) -> Response<Vec<u8>> {
        let s = &self.state;
        let resolved = s.runtime().upstream.address().is_some();
        let shutting_down = s.is_shutting_down();
        let ready = resolved && !shutting_down;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        // Runtime keys not read yet are refused (`auth_unavailable`) until they are; the
        // config's keys work meanwhile, so the replica stays ready.
        let keys_read = s.issued.loaded();
        json_reply(
            status,
            json!({ "ready": ready, "config_loaded": true, "upstream_resolved": resolved, "shutting_down": shutting_down, "runtime_keys_read": keys_read }),
        )
    }

    /// Drop the cached verdicts of one tenant, or all: this process's, and the fleet's shared
    /// level (other replicas would refill this one from it).
    async fn purge_cache(&self, query: &str) -> Response<Vec<u8>> {
        let s = &self.state;
        let tenant = match self.tenant_param(query) {
            Ok(t) => t,
            Err(unknown) => return unknown.answer(),
        };
        s.cache.sync().await;
        let before = s.cache.entries();
        if let Err(e) = s.cache.purge(tenant.as_deref()).await {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "purge_failed", &e);
        }
        let mut purged = before.saturating_sub(s.cache.entries());
        let shared = match s.store.fleet() {
            Some(f) => f.purge_verdicts(tenant.as_deref()).await,
            None => Ok(0),
        };
        match shared {
            Ok(n) => purged += n,
            Err(e) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "purge_failed",
                    &e.to_string(),
                )
            }
        }
        let scope = tenant.unwrap_or_else(|| "all".into());
        tracing::info!(target: "audit", action = "cache_purge", scope = %scope, purged, "admin: cache purged");
        json_reply(
            StatusCode::OK,
            json!({ "purged": scope, "entries_purged": purged, "entries": s.cache.entries() }),
        )
    }

    /// Reload the configuration, off the listener's threads: it reads files, and waits for a
    /// reload under way.
    async fn reload_config(&self) -> Response<Vec<u8>> {
        let reload = self.reload.clone();
        match tokio::task::spawn_blocking(move || reload()).await {
            Ok(Ok(())) => json_reply(StatusCode::OK, json!({ "reloaded": true })),
            Ok(Err(e)) => error(StatusCode::BAD_REQUEST, "invalid_config", &e),
            Err(e) => {
                tracing::error!("reload: {e}");
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "internal gateway error",
                )
            }
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        // The probes tell nothing, and load balancers send them with any `Host`.
        let probe = matches!(path.as_str(), "/healthz" | "/readyz");
        let names = &self.state.runtime().config.admin_hosts;
        if let Some(refusal) = browser_refusal(session.req_header(), names).filter(|_| !probe) {
            let host = session.req_header().headers.get(header::HOST);
            tracing::warn!(target: "audit", action = "admin_refused", code = refusal.code(), method = %method, path = %path, host = ?host, "admin: refused a request a web page could have sent");
            return respond(refusal.status(), "application/json", refusal.body());
        }
        if self.guarded(&path) && !self.authorized(session) {
            return error(
                StatusCode::UNAUTHORIZED,
                "admin_unauthorized",
                "the admin token is missing or wrong",
            );
        }
        if let (false, Err(detail)) = (probe, check_query(&query)) {
            return error(StatusCode::BAD_REQUEST, "invalid_query", &detail);
        }
        if let Some(route) = keys::KeyRoute::of(&path) {
            return self.keys(&method, route, session).await;
        }
        let s = &self.state;
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => json_reply(StatusCode::OK, json!({ "status": "ok" })),
            ("GET", "/readyz") => self.readyz(),
            // A probe may ask with HEAD: the same status, no body.
            ("HEAD", "/healthz" | "/readyz") => {
                let full = if path == "/readyz" {
                    self.readyz()
                } else {
                    json_reply(StatusCode::OK, json!({ "status": "ok" }))
                };
                let (mut parts, _) = full.into_parts();
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, Vec::new())
            }
            ("GET", "/metrics") => {
                self.refresh_gauges().await;
                // Prometheus asks for OpenMetrics (exemplars come only in it); anyone else
                // gets the classic text format.
                let accept = session.req_header().headers.get_all(header::ACCEPT);
                let openmetrics = crate::metrics::wants_openmetrics(
                    accept.iter().filter_map(|v| v.to_str().ok()),
                );
                match openmetrics {
                    true => respond(
                        StatusCode::OK,
                        crate::metrics::OPENMETRICS,
                        s.metrics.render_openmetrics(),
                    ),
                    false => respond(
                        StatusCode::OK,
                        "text/plain; version=0.0.4",
                        s.metrics.render(),
                    ),
                }
            }
            ("GET", "/admin/usage") => {
                let csv = usage::wants_csv(&session.req_header().headers);
                self.usage(&query, csv).await
            }
            ("GET", "/admin/cache") => {
                s.cache.sync().await;
                json_reply(
                    StatusCode::OK,
                    json!({ "enabled": s.cache.enabled(), "entries": s.cache.entries(), "bytes": s.cache.bytes(), "hit_ratio": s.cache.hit_ratio() }),
                )
            }
            ("DELETE", "/admin/cache") => self.purge_cache(&query).await,
            ("POST", "/admin/usage/adjust") => self.adjust(&query).await,
            ("POST", "/admin/usage/grant") => self.grant(session).await,
            ("DELETE", "/admin/usage/grant") => self.end_grant(&query).await,
            ("GET", "/admin/subjects") => self.subjects(&query).await,
            ("POST", "/admin/subjects/reset") => self.reset_subject(&query).await,
            ("POST", "/admin/reload") => self.reload_config().await,
            ("GET", crate::receipt::JWKS_PATH) => self.jwks(),
            (
                _,
                "/healthz"
                | "/readyz"
                | "/metrics"
                | "/admin/usage"
                | "/admin/usage/adjust"
                | "/admin/usage/grant"
                | "/admin/subjects"
                | "/admin/subjects/reset"
                | "/admin/cache"
                | "/admin/reload"
                | crate::receipt::JWKS_PATH,
            ) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            ),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no route for this path"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the admin listener answers with has a hint (one once had none).
    #[test]
    fn every_admin_refusal_has_a_hint() {
        let source = [include_str!("mod.rs"), include_str!("keys.rs")].concat();
        let codes: Vec<&str> = source
            .split("StatusCode::")
            .skip(1)
            .filter_map(|rest| {
                let after = rest.split_once(',')?.1.trim_start();
                let code = after.strip_prefix('"')?.split('"').next()?;
                code.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
                    .then_some(code)
            })
            .collect();
        assert!(codes.len() > 8, "{codes:?}");
        for code in codes {
            assert!(hint(code).is_some(), "{code} has no hint");
        }
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/admin/reload", None).expect("request");
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).expect("header");
        }
        r
    }

    fn code(method: &str, headers: &[(&str, &str)]) -> Option<&'static str> {
        browser_refusal(&request(method, headers), &["gateway-a".into()]).map(|e| e.code())
    }

    /// An `Origin` is the listener's when a browser would call it the same origin as the
    /// listener addressed by `Host`: default port, IPv6 brackets and the name's case included.
    #[test]
    fn the_listeners_own_origin_is_told_apart_from_others() {
        for (host, origin) in [
            ("127.0.0.1:9464", "http://127.0.0.1:9464"),
            ("localhost", "http://localhost:80"),
            ("LocalHost:9464", "http://localhost:9464"),
            ("[::1]:9464", "http://[::1]:9464"),
            ("gateway-a:9464", "http://gateway-a:9464"),
        ] {
            let headers = [("Host", host), ("Origin", origin)];
            assert_eq!(code("POST", &headers), None, "{host} {origin}");
        }
        for (host, origin) in [
            ("127.0.0.1:9464", "https://127.0.0.1:9464"),
            ("127.0.0.1:9464", "http://127.0.0.1:9465"),
            ("127.0.0.1:9464", "http://localhost:9464"),
            ("[::1]:9464", "http://[::2]:9464"),
            ("127.0.0.1:9464", "null"),
            ("127.0.0.1:9464", "http://127.0.0.1:9464.evil.example"),
        ] {
            let headers = [("Host", host), ("Origin", origin)];
            assert_eq!(
                code("POST", &headers),
                Some("admin_cross_site"),
                "{host} {origin}"
            );
        }
        // Without `Host` (HTTP/1.0) no origin can be the listener's.
        assert_eq!(
            code("POST", &[("Origin", "http://127.0.0.1:9464")]),
            Some("admin_cross_site")
        );
    }

    #[test]
    fn names_and_addresses_the_listener_answers() {
        for host in [
            "127.0.0.1:9464",
            "10.0.0.7",
            "[fd00::7]:9464",
            "localhost:1234",
            "GATEWAY-A:9464",
            "gateway-a",
        ] {
            assert_eq!(code("GET", &[("Host", host)]), None, "{host}");
        }
        for host in [
            "gateway-b:9464",
            "localhost.evil.example",
            "evil.example",
            "127.0.0.1.nip.io:9464",
            "gateway-a.evil.example",
            "",
            "a b",
            "evil.example/x",
        ] {
            assert_eq!(
                code("GET", &[("Host", host)]),
                Some("admin_host_not_allowed"),
                "{host:?}"
            );
        }
    }

    #[test]
    fn reads_and_writes_by_fetch_metadata_and_content_type() {
        let h = ("Host", "127.0.0.1:9464");
        for (method, headers, want) in [
            ("GET", vec![h, ("Sec-Fetch-Site", "same-origin")], None),
            ("GET", vec![h, ("Sec-Fetch-Site", "none")], None),
            (
                "GET",
                vec![
                    h,
                    ("Sec-Fetch-Site", "cross-site"),
                    ("Sec-Fetch-Mode", "navigate"),
                ],
                None,
            ),
            (
                "GET",
                vec![
                    h,
                    ("Sec-Fetch-Site", "same-site"),
                    ("Sec-Fetch-Mode", "cors"),
                ],
                Some("admin_cross_site"),
            ),
            (
                "GET",
                vec![h, ("Sec-Fetch-Site", "something-new")],
                Some("admin_cross_site"),
            ),
            (
                "POST",
                vec![
                    h,
                    ("Sec-Fetch-Site", "cross-site"),
                    ("Sec-Fetch-Mode", "navigate"),
                ],
                Some("admin_cross_site"),
            ),
            // A GET's body type does not matter: it changes nothing.
            ("GET", vec![h, ("Content-Type", "text/plain")], None),
            ("POST", vec![h, ("Content-Type", "application/json")], None),
            (
                "PUT",
                vec![h, ("Content-Type", "text/plain;charset=UTF-8")],
                Some("admin_cross_site"),
            ),
            (
                "DELETE",
                vec![h, ("Content-Type", " Multipart/Form-Data ; boundary=x")],
                Some("admin_cross_site"),
            ),
        ] {
            assert_eq!(code(method, &headers), want, "{method} {headers:?}");
        }
    }
}
