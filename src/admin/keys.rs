//! The admin routes of what is issued at runtime (`issued`): a tenant's keys
//! (`/admin/tenants/{id}/keys`: create, list, rotate, revoke) and grants
//! (`/admin/usage/grant`). Every change leaves an audit line; no answer but a creation's or a
//! rotation's carries a secret, and those carry it once.

use std::time::Duration;

use http::{Response, StatusCode};
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error, json_reply, query_param, Admin};
use crate::issued::{self, rfc3339, IssueError, KeyRecord};

/// The largest body an admin request may have.
const MAX_BODY: usize = 16 * 1024;

/// The longest a grant may last.
const MAX_GRANT: Duration = Duration::from_secs(366 * 86_400);

/// A route under `/admin/tenants/`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum KeyRoute<'a> {
    /// `/admin/tenants/{id}/keys`
    Keys(&'a str),
    /// `/admin/tenants/{id}/keys/{key_id}`
    Key(&'a str, &'a str),
    /// `/admin/tenants/{id}/keys/{key_id}/rotate`
    Rotate(&'a str, &'a str),
}

impl<'a> KeyRoute<'a> {
    pub(super) fn of(path: &'a str) -> Option<KeyRoute<'a>> {
        let rest = path.strip_prefix("/admin/tenants/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [t, "keys"] if !t.is_empty() => Some(KeyRoute::Keys(t)),
            [t, "keys", k] if !t.is_empty() && !k.is_empty() => Some(KeyRoute::Key(t, k)),
            [t, "keys", k, "rotate"] if !t.is_empty() && !k.is_empty() => {
                Some(KeyRoute::Rotate(t, k))
            }
            _ => None,
        }
    }

    fn tenant(&self) -> &'a str {
        match self {
            KeyRoute::Keys(t) | KeyRoute::Key(t, _) | KeyRoute::Rotate(t, _) => t,
        }
    }
}

/// What a creation may say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    expires_in: Option<String>,
}

/// What a rotation may say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    #[serde(default)]
    grace: Option<String>,
    #[serde(default)]
    expires_in: Option<String>,
}

/// What a grant says.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    tenant: String,
    calls: u64,
    until: String,
    #[serde(default)]
    reason: Option<String>,
}

fn invalid(detail: &str) -> Response<Vec<u8>> {
    error(StatusCode::BAD_REQUEST, "invalid_body", detail)
}

/// The request's body as JSON of type `T` (an empty body is `empty`, when given); `fields`
/// names what it may hold, for the refusal.
async fn body<T: for<'de> Deserialize<'de>>(
    session: &mut ServerSession,
    empty: Option<T>,
    fields: &str,
) -> Result<T, Box<Response<Vec<u8>>>> {
    let mut buf = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_BODY {
                    return Err(Box::new(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        &format!("an admin request's body is at most {MAX_BODY} bytes"),
                    )));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => return Err(Box::new(invalid("the body could not be read"))),
        }
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        if let Some(v) = empty {
            return Ok(v);
        }
    }
    // Where it went wrong, never what was sent (serde's messages repeat values). An object
    // only: serde would take an array for a struct, by position.
    let wrong = |e: serde_json::Error| {
        Box::new(invalid(&format!(
            "the body must be a JSON object of {fields} (the problem is at line {}, column {})",
            e.line(),
            e.column()
        )))
    };
    let object: serde_json::Map<String, Value> = serde_json::from_slice(&buf).map_err(wrong)?;
    serde_json::from_value(Value::Object(object)).map_err(|e| {
        Box::new(invalid(&format!(
            "the body must be a JSON object of {fields} ({})",
            field_problem(&e)
        )))
    })
}

/// What is wrong with a field, without the value serde would repeat: the name of a missing
/// field (one of the route's own), else the kind of problem (a field the route does not know
/// is not named: it is what was sent).
fn field_problem(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let named = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .filter(|name| {
                name.len() <= 40 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
            .map(str::to_string)
    };
    if let Some(name) = named("missing field `") {
        return format!("{name} is missing");
    }
    if text.starts_with("unknown field") {
        return "a field is not one of them".into();
    }
    "a field has the wrong type".into()
}

/// A duration as the API takes it (`90d`, `24h`, `30m`), within `max`.
fn duration(text: &str, name: &str, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|_| format!("{name} must be a duration like 90d, 24h or 30m"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{name} must be whole seconds"));
    }
    if d > max {
        return Err(format!(
            "{name} is at most {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A key's life as a creation or a rotation gives it: none, or a duration above zero.
fn expires_in(text: Option<&str>) -> Result<Option<Duration>, String> {
    match text.map(|e| duration(e, "expires_in", issued::MAX_EXPIRY)) {
        None => Ok(None),
        Some(Ok(d)) if d.is_zero() => Err("expires_in must be longer than zero".into()),
        Some(d) => d.map(Some),
    }
}

/// A label as kept: printable text, at most `issued::MAX_LABEL` characters.
fn label(text: Option<&str>) -> Result<String, String> {
    let text = text.unwrap_or("").trim();
    if text.chars().count() > issued::MAX_LABEL {
        return Err(format!("label is at most {} characters", issued::MAX_LABEL));
    }
    // Control characters, and the invisible ones that reorder or hide text where the label
    // is shown (bidi overrides, zero-width characters).
    let invisible = |c: char| {
        c.is_control()
            || matches!(c, '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
    };
    if text.chars().any(invisible) {
        return Err(
            "label may hold only visible text (no control, bidi or zero-width characters)".into(),
        );
    }
    Ok(text.to_string())
}

/// A key as the list and the answers show it (never a secret).
fn key_json(r: &KeyRecord, last_used: Option<i64>, now: i64) -> Value {
    json!({
        "key_id": r.key_id,
        "source": "runtime",
        "label": r.label,
        "created": rfc3339(r.created),
        "last_used": last_used.and_then(rfc3339),
        "expires_at": r.expires_at.and_then(rfc3339),
        "expired": r.expires_at.is_some_and(|e| e <= now),
        "rotated": r.rotated.and_then(rfc3339),
        "previous_valid_until": r.grace_until(now).and_then(rfc3339),
    })
}

impl Admin {
    fn issue_failed(&self, e: IssueError, action: &str, tenant: &str) -> Response<Vec<u8>> {
        match e {
            IssueError::UnknownKey => error(
                StatusCode::NOT_FOUND,
                "unknown_key",
                "the tenant has no runtime key with that id",
            ),
            IssueError::UnknownGrant => error(
                StatusCode::NOT_FOUND,
                "unknown_grant",
                "the tenant has no grant with that id",
            ),
            IssueError::TooManySecrets => error(
                StatusCode::CONFLICT,
                "too_many_secrets",
                "the key already has as many secrets in their grace as it may have: rotate with a shorter grace (\"0s\" ends them all), or wait for a grace to end",
            ),
            IssueError::Contended => error(
                StatusCode::CONFLICT,
                "conflict",
                "the record kept changing under this change; nothing was changed",
            ),
            IssueError::Store(e) => {
                tracing::warn!(target: "audit", action, tenant = %tenant, "admin: {action} failed: {e}");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store did not answer: the change may or may not have been made (list the keys to see)",
                )
            }
        }
    }

    /// The routes of `/admin/tenants/{id}/keys…`.
    pub(super) async fn keys(
        &self,
        method: &http::Method,
        route: KeyRoute<'_>,
        session: &mut ServerSession,
    ) -> Response<Vec<u8>> {
        let tenant = route.tenant();
        let rt = self.state.runtime();
        let Some(t) = rt.tenants.get(tenant) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_tenant",
                "no tenant with that id",
            );
        };
        let issued = &self.state.issued;
        match (method.as_str(), route) {
            ("GET", KeyRoute::Keys(_)) => {
                let used = match issued.last_used().await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::warn!("keys: {e}");
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "store_unavailable",
                            "the store that keeps the keys cannot be reached; retry shortly",
                        );
                    }
                };
                let now = self.state.store.now().timestamp();
                let mut keys: Vec<Value> = t
                    .key_digests
                    .iter()
                    .map(|d| {
                        let id = issued::config_key_id(d);
                        json!({
                            "key_id": &*id,
                            "source": "config",
                            "label": null,
                            "created": null,
                            "last_used": used.get(&*id).copied().and_then(rfc3339),
                            "expires_at": null,
                            "expired": false,
                        })
                    })
                    .collect();
                keys.extend(
                    issued
                        .keys(tenant)
                        .iter()
                        .map(|r| key_json(r, used.get(&format!("key/{}", r.key_id)).copied(), now)),
                );
                json_reply(StatusCode::OK, json!({ "tenant": tenant, "keys": keys }))
            }
            ("POST", KeyRoute::Keys(_)) => {
                let req: Create = match body(
                    session,
                    Some(Create::default()),
                    "label (text) and expires_in (a duration like 90d)",
                )
                .await
                {
                    Ok(r) => r,
                    Err(answer) => return *answer,
                };
                let label = match label(req.label.as_deref()) {
                    Ok(l) => l,
                    Err(detail) => return invalid(&detail),
                };
                let expires_in = match expires_in(req.expires_in.as_deref()) {
                    Ok(e) => e,
                    Err(detail) => return invalid(&detail),
                };
                if !issued.durable() {
                    return error(
                        StatusCode::CONFLICT,
                        "store_not_durable",
                        "runtime keys need a store that outlives the process: set budgets.state_file, or store.backend = \"redis\"",
                    );
                }
                match issued.create(tenant, &label, expires_in).await {
                    Ok(k) => {
                        let r = &k.record;
                        tracing::info!(target: "audit", action = "key_create", tenant = %tenant, key_id = %r.key_id, label = %r.label, expires_at = %r.expires_at.and_then(rfc3339).unwrap_or_else(|| "never".into()), "admin: a tenant key created");
                        let mut v = key_json(r, None, r.created);
                        v["tenant"] = json!(tenant);
                        v["key"] = json!(k.key);
                        json_reply(StatusCode::CREATED, v)
                    }
                    Err(e) => self.issue_failed(e, "key_create", tenant),
                }
            }
            (_, KeyRoute::Rotate(_, key_id) | KeyRoute::Key(_, key_id))
                if key_id.starts_with("config-") =>
            {
                error(
                    StatusCode::CONFLICT,
                    "key_in_config",
                    "this key is declared in the config: change it there (and reload)",
                )
            }
            ("POST", KeyRoute::Rotate(_, key_id)) => {
                let req: Rotate = match body(
                    session,
                    Some(Rotate::default()),
                    "grace and expires_in (durations like 24h)",
                )
                .await
                {
                    Ok(r) => r,
                    Err(answer) => return *answer,
                };
                let grace = match req.grace.as_deref() {
                    Some(g) => match duration(g, "grace", issued::MAX_GRACE) {
                        Ok(d) => d,
                        Err(detail) => return invalid(&detail),
                    },
                    None => Duration::ZERO,
                };
                let expires_in = match expires_in(req.expires_in.as_deref()) {
                    Ok(e) => e,
                    Err(detail) => return invalid(&detail),
                };
                if !issued::is_key_id(key_id) {
                    return self.issue_failed(IssueError::UnknownKey, "key_rotate", tenant);
                }
                match issued.rotate(tenant, key_id, grace, expires_in).await {
                    Ok(k) => {
                        let r = &k.record;
                        let now = r.rotated.unwrap_or(r.created);
                        tracing::info!(target: "audit", action = "key_rotate", tenant = %tenant, key_id = %r.key_id, grace = %humantime::format_duration(grace), expires_at = %r.expires_at.and_then(rfc3339).unwrap_or_else(|| "never".into()), "admin: a tenant key rotated");
                        let mut v = key_json(r, None, now);
                        v["tenant"] = json!(tenant);
                        v["key"] = json!(k.key);
                        json_reply(StatusCode::OK, v)
                    }
                    Err(e) => self.issue_failed(e, "key_rotate", tenant),
                }
            }
            ("DELETE", KeyRoute::Key(_, key_id)) => {
                if !issued::is_key_id(key_id) {
                    return self.issue_failed(IssueError::UnknownKey, "key_revoke", tenant);
                }
                match issued.revoke(tenant, key_id).await {
                    Ok(r) => {
                        tracing::info!(target: "audit", action = "key_revoke", tenant = %tenant, key_id = %r.key_id, label = %r.label, "admin: a tenant key revoked");
                        json_reply(
                            StatusCode::OK,
                            json!({ "tenant": tenant, "key_id": r.key_id, "revoked": true }),
                        )
                    }
                    Err(e) => self.issue_failed(e, "key_revoke", tenant),
                }
            }
            _ => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            ),
        }
    }

    /// `POST /admin/usage/grant` (`{"tenant", "calls", "until", "reason"}`): `calls` more in
    /// each of the tenant's budgets until `until` (an RFC 3339 time, or a duration from now).
    pub(super) async fn grant(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req: GrantBody = match body(
            session,
            None,
            "tenant, calls (a whole number), until and reason",
        )
        .await
        {
            Ok(r) => r,
            Err(answer) => return *answer,
        };
        let rt = self.state.runtime();
        let Some(t) = rt.tenants.get(&req.tenant) else {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_tenant",
                "no tenant with that id",
            );
        };
        if t.daily_budget.is_none() && t.monthly_budget.is_none() {
            return error(
                StatusCode::CONFLICT,
                "no_budget",
                "the tenant has no budget to add calls to",
            );
        }
        if req.calls == 0 || req.calls > 1_000_000_000 {
            return invalid("calls must be a whole number from 1 to 1000000000");
        }
        let now = self.state.store.now();
        let until = match chrono::DateTime::parse_from_rfc3339(req.until.trim()) {
            Ok(t) => t.timestamp(),
            Err(_) => match duration(&req.until, "until", MAX_GRANT) {
                Ok(d) => now.timestamp() + d.as_secs() as i64,
                Err(_) => {
                    return invalid(
                        "until must be a time like 2026-12-31T23:59:59Z, or a duration from now like 24h",
                    )
                }
            },
        };
        if until <= now.timestamp() || until > now.timestamp() + MAX_GRANT.as_secs() as i64 {
            return invalid("until must be in the future, and at most 366 days away");
        }
        let reason = match label(req.reason.as_deref()) {
            Ok(r) => r,
            Err(detail) => return invalid(&detail.replace("label", "reason")),
        };
        match self
            .state
            .issued
            .grant(&req.tenant, req.calls, until, &reason)
            .await
        {
            Ok(g) => {
                tracing::info!(target: "audit", action = "grant", tenant = %g.tenant, grant_id = %g.grant_id, calls = g.calls, until = %rfc3339(g.until).unwrap_or_default(), reason = %g.reason, "admin: calls granted");
                let mut v = crate::usage::grant_json(&g, now.timestamp());
                v["tenant"] = json!(g.tenant);
                json_reply(StatusCode::CREATED, v)
            }
            Err(e) => self.issue_failed(e, "grant", &req.tenant),
        }
    }

    /// `DELETE /admin/usage/grant?tenant=ID&grant_id=G`: end a grant now.
    pub(super) async fn end_grant(&self, query: &str) -> Response<Vec<u8>> {
        let tenant = match self.required_tenant(query, "invalid_query") {
            Ok(t) => t,
            Err(answer) => return *answer,
        };
        let Some(id) = query_param(query, "grant_id").filter(|g| issued::is_key_id(g)) else {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "grant_id must be the id a grant was answered with",
            );
        };
        match self.state.issued.end_grant(&tenant, &id).await {
            Ok(g) => {
                tracing::info!(target: "audit", action = "grant_end", tenant = %tenant, grant_id = %g.grant_id, calls = g.calls, "admin: a grant ended");
                json_reply(
                    StatusCode::OK,
                    json!({ "tenant": tenant, "grant_id": g.grant_id, "ended": true }),
                )
            }
            Err(e) => self.issue_failed(e, "grant_end", &tenant),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_under_tenants() {
        assert_eq!(
            KeyRoute::of("/admin/tenants/a/keys"),
            Some(KeyRoute::Keys("a"))
        );
        assert_eq!(
            KeyRoute::of("/admin/tenants/a/keys/0123"),
            Some(KeyRoute::Key("a", "0123"))
        );
        assert_eq!(
            KeyRoute::of("/admin/tenants/a/keys/0123/rotate"),
            Some(KeyRoute::Rotate("a", "0123"))
        );
        for none in [
            "/admin/tenants/",
            "/admin/tenants//keys",
            "/admin/tenants/a",
            "/admin/tenants/a/keys/",
            "/admin/tenants/a/keys/k/rotate/x",
            "/admin/tenants/a/other",
        ] {
            assert_eq!(KeyRoute::of(none), None, "{none}");
        }
    }

    #[test]
    fn durations_and_labels() {
        assert_eq!(
            duration("90d", "x", issued::MAX_EXPIRY),
            Ok(Duration::from_secs(90 * 86_400))
        );
        assert!(duration("31d", "grace", issued::MAX_GRACE).is_err());
        assert!(duration("soon", "x", issued::MAX_GRACE).is_err());
        assert_eq!(label(Some("  ci  ")), Ok("ci".into()));
        assert!(label(Some("a\nb")).is_err());
        assert!(label(Some("\u{202e}gnp.exe")).is_err());
        assert!(label(Some("zero\u{200b}width")).is_err());
        assert_eq!(label(Some("équipe ☂")), Ok("équipe ☂".into()));
        assert!(duration("500ms", "expires_in", issued::MAX_EXPIRY).is_err());
        assert!(label(Some(&"x".repeat(101))).is_err());
    }
}
