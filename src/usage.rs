//! A tenant's usage: its current day and month against its budgets, and its daily history. The
//! admin API reports it for every tenant (`GET /admin/usage`); a tenant reads its own, and only
//! its own, with its key (`GET /api/v1/usage`, this module's route).

use pingora::proxy::Session;
use serde_json::{json, Value};

use crate::auth::tenant;
use crate::config::TenantConfig;
use crate::error::GatewayError;
use crate::state::{AppState, RequestCtx, Runtime};
use crate::store::{DayUsage, StoreError};

/// The tenant's own usage route.
pub const ROUTE: &str = "/api/v1/usage";

/// Days of history the tenant's route answers with, today included.
pub const HISTORY_DAYS: u64 = 30;

/// Whether a path is the usage route (a trailing slash allowed).
pub fn is_route(path: &str) -> bool {
    path == ROUTE || path.strip_suffix('/') == Some(ROUTE)
}

/// One tenant's limits and current periods, as both routes write them: `daily` and `monthly`
/// with the period, the limit, the calls used (and the uncertain part of them: calls whose
/// answer never came, counted as billed), what remains and when it resets.
pub async fn current(
    state: &AppState,
    t: &TenantConfig,
) -> Result<serde_json::Map<String, Value>, StoreError> {
    let now = state.store.now();
    let calendar = state.store.calendar();
    let today = calendar.today(now);
    let month_start = chrono::Datelike::with_day(&today, 1).unwrap_or(today);
    let c = state.store.counts(&t.id, now).await?;
    // The uncertain part of `used`, from the usage history of the month so far.
    let days = state
        .store
        .history(std::slice::from_ref(&t.id), month_start, today)
        .await?;
    let month_uncertain: u64 = days.iter().map(|d| d.uncertain).sum();
    let day_uncertain = days
        .iter()
        .find(|d| d.day == c.day)
        .map_or(0, |d| d.uncertain);
    // Calls granted for now are in each limit, and listed apart.
    let granted = state.issued.granted(&t.id);
    let grants: Vec<Value> = state
        .issued
        .grants(&t.id)
        .iter()
        .map(|g| grant_json(g, now.timestamp()))
        .collect();
    let budget = state.issued.budget(t);
    let period = |limit: Option<u64>, used: u64, uncertain: u64, key: &str, resets_in: u64| {
        json!({
            "period": key,
            "limit": limit,
            "granted": limit.map(|_| granted),
            "used": used,
            "uncertain": uncertain,
            "remaining": limit.map(|l| l.saturating_sub(used)),
            "resets_in_seconds": resets_in,
        })
    };
    let mut out = serde_json::Map::new();
    out.insert("tenant".into(), json!(t.id));
    out.insert("rate".into(), json!(t.rate.to_string()));
    out.insert("rate_per_second".into(), json!(t.rate.calls_per_second()));
    out.insert("burst".into(), json!(t.burst));
    out.insert(
        "daily".into(),
        period(
            budget.daily,
            c.day_used,
            day_uncertain,
            &c.day,
            calendar.secs_to_next_day(now),
        ),
    );
    out.insert(
        "monthly".into(),
        period(
            budget.monthly,
            c.month_used,
            month_uncertain,
            &c.month,
            calendar.secs_to_next_month(now),
        ),
    );
    out.insert("grants".into(), Value::Array(grants));
    Ok(out)
}

/// A grant as the usage answers and the admin API show it.
pub fn grant_json(g: &crate::issued::Grant, now: i64) -> Value {
    let at = crate::issued::rfc3339;
    json!({
        "grant_id": g.grant_id,
        "calls": g.calls,
        "from": at(g.from),
        "until": at(g.until),
        "in_force": g.in_force(now),
        "reason": g.reason,
    })
}

/// A day's cost, when the tenant has a price per call.
pub type Pricing<'a> = &'a dyn Fn(&DayUsage) -> Option<String>;

/// A cost with at most four decimals and no float noise (`0.15`, not `0.15000000000000002`).
pub fn format_cost(c: f64) -> String {
    let s = format!("{c:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// A day of the history as JSON, with its cost when priced.
pub fn day_json(r: &DayUsage, cost: Option<String>) -> Value {
    let mut v = json!({
        "tenant": r.tenant,
        "day": r.day,
        "billable_calls": r.billable,
        "uncertain_calls": r.uncertain,
        "cache_hits_saved": r.cache_hits,
        "rejected": r.rejected,
    });
    if let Some(c) = cost {
        v["cost"] = json!(c);
    }
    v
}

/// The usage history as CSV: one line per tenant and day, the cost when `cost` is given, and
/// with several organization keys, each one's calls. The uncertain columns come last: the
/// earlier ones keep their places.
pub fn history_csv(rows: &[DayUsage], key_ids: &[&str], cost: Option<Pricing<'_>>) -> String {
    let mut out = String::from("tenant,day,billable_calls,cache_hits_saved,rejected");
    if cost.is_some() {
        out.push_str(",cost");
    }
    for id in key_ids {
        out.push_str(&format!(",billable_calls_{id}"));
    }
    out.push_str(",uncertain_calls");
    for id in key_ids {
        out.push_str(&format!(",uncertain_calls_{id}"));
    }
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{}",
            r.tenant, r.day, r.billable, r.cache_hits, r.rejected
        ));
        if let Some(cost) = cost {
            out.push(',');
            out.push_str(&cost(r).unwrap_or_default());
        }
        for id in key_ids {
            let n = r.billable_by_key.get(*id).copied().unwrap_or(0);
            out.push_str(&format!(",{n}"));
        }
        out.push_str(&format!(",{}", r.uncertain));
        for id in key_ids {
            let n = r.uncertain_by_key.get(*id).copied().unwrap_or(0);
            out.push_str(&format!(",{n}"));
        }
        out.push('\n');
    }
    out
}

/// The answer of the tenant's route: its body, and whether it is CSV.
pub struct Report {
    pub body: Vec<u8>,
    pub csv: bool,
}

/// `GET /api/v1/usage` with a tenant's key (in `Authorization: Bearer` or `X-Api-Key`, as on
/// the liveness route; an app token is refused, since an app's user has no business with the
/// organization's budgets): that tenant's current periods and its last `HISTORY_DAYS` days,
/// as JSON, or the days as CSV with `Accept: text/csv`. It takes a request from the tenant's
/// rate limit like a call, and it is never a paid call.
pub async fn handle(
    state: &AppState,
    rt: &Runtime,
    session: &Session,
    ctx: &mut RequestCtx,
) -> Result<Report, GatewayError> {
    let headers = &session.req_header().headers;
    let Some((key, source)) = tenant::header_credential(headers)? else {
        return Err(GatewayError::MissingCredentials);
    };
    let t = rt.tenants.authenticate(&state.issued, &key)?;
    rt.egress.learn(&key);
    ctx.caller.tenant = Some(t.id.clone());
    ctx.caller.credential = Some(source);
    // The tenant's own rules for its key, as on the liveness route.
    if !t.allow_static_keys {
        return Err(GatewayError::StaticKeysDisabled);
    }
    if !ctx.cors.permits(&t.allowed_origins) {
        return Err(GatewayError::OriginNotAllowed);
    }
    match rt.limits.check_tenant_shared(&t.id).await {
        Ok(limit) => ctx.answer.rate_headers = limit.headers().into_iter().collect(),
        Err((err, limit)) => {
            ctx.answer.rate_headers = limit.headers().into_iter().collect();
            return Err(err);
        }
    }
    let unavailable = |e: StoreError| {
        tracing::warn!(tenant = %t.id, "usage: {e}");
        GatewayError::StoreUnavailable {
            retry_after_secs: 1,
        }
    };
    let today = state.store.calendar().today(state.store.now());
    let from = today - chrono::Days::new(HISTORY_DAYS - 1);
    // Counts noted in memory reach the store first, so that the history includes them.
    let _ = state.store.flush().await;
    let rows = state
        .store
        .history(std::slice::from_ref(&t.id), from, today)
        .await
        .map_err(unavailable)?;
    let cost = |r: &DayUsage| t.price_per_call.map(|p| format_cost(p * r.billable as f64));
    if wants_csv(headers) {
        let priced: Option<Pricing<'_>> = t.price_per_call.map(|_| &cost as Pricing<'_>);
        return Ok(Report {
            body: history_csv(&rows, &[], priced).into_bytes(),
            csv: true,
        });
    }
    let mut out = current(state, t).await.map_err(unavailable)?;
    out.insert("history_from".into(), json!(from.to_string()));
    out.insert("history_to".into(), json!(today.to_string()));
    let days: Vec<Value> = rows.iter().map(|r| day_json(r, cost(r))).collect();
    out.insert("days".into(), json!(days));
    Ok(Report {
        body: serde_json::to_vec(&Value::Object(out)).unwrap_or_default(),
        csv: false,
    })
}

/// Whether the client asks for CSV: `Accept` names `text/csv` with a weight above zero and at
/// least that of JSON (`application/json`, `application/*` or `*/*`).
pub fn wants_csv(headers: &http::HeaderMap) -> bool {
    let (mut csv, mut json) = (0.0_f32, 0.0_f32);
    let ranges = (headers.get_all(http::header::ACCEPT).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';');
        let kind = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        match kind.as_str() {
            "text/csv" => csv = csv.max(q),
            "application/json" | "application/*" | "*/*" => json = json.max(q),
            _ => {}
        }
    }
    csv > 0.0 && csv >= json
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> bool {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_str(v).expect("value"),
        );
        wants_csv(&h)
    }

    #[test]
    fn csv_is_answered_when_asked_for_above_json() {
        for yes in [
            "text/csv",
            "TEXT/CSV; charset=utf-8",
            "text/csv, */*;q=0.1",
            "application/json;q=0.5, text/csv",
        ] {
            assert!(accept(yes), "{yes}");
        }
        for no in [
            "application/json",
            "text/csv;q=0",
            "application/json;q=1, text/csv;q=0.1",
            "*/*",
            "text/html",
        ] {
            assert!(!accept(no), "{no}");
        }
        assert!(!wants_csv(&http::HeaderMap::new()));
    }
}
