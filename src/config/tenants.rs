//! `[[tenants]]`: who may call, with which keys, limits, budgets and price.

use std::collections::HashSet;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::budgets::price_ok;
use super::limits::TenantDefaults;
use super::{Issues, Rate};

/// The tenant label for requests that never authenticated.
pub const UNKNOWN_TENANT: &str = "unknown";

#[derive(Debug, Deserialize)]
pub struct RawTenant {
    /// Stable id: used in logs, metrics and the usage endpoint, never the key.
    pub id: String,
    /// SHA-256 hex digests of the tenant's keys (several allow rotation); `keys new` prints them.
    pub key_sha256: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    pub rate_per_second: Option<u32>,
    /// The same as a rate (`"30/min"`, `"500/h"`), for rates below one a second; instead of
    /// `rate_per_second`.
    pub rate: Option<String>,
    pub burst: Option<u32>,
    /// Billable calls per day (of `budgets.timezone`).
    pub daily_budget: Option<u64>,
    /// Billable calls per month (of `budgets.timezone`).
    pub monthly_budget: Option<u64>,
    /// Accept this tenant's key only in `Authorization` or `X-Api-Key`, never in the form field.
    /// When every tenant requires it, a request without a header credential is refused before
    /// one byte of its body is read.
    #[serde(default)]
    pub require_header_credentials: bool,
    /// This tenant's price per billable call, instead of `budgets.price_per_call`.
    pub price_per_call: Option<f64>,
    /// Web origins this tenant's key may be used from (a browser's `Origin`); empty: any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// The id of the organization key this tenant's calls go out with (`[[upstream.keys]]`);
    /// none: the default key.
    pub org_key: Option<String>,
    /// Keys to send an upload with, in order, when the provider refuses the subscription of the
    /// one before (each at most once per upload).
    #[serde(default)]
    pub org_key_fallback: Vec<String>,
    /// Whether its static keys (`key_sha256`) are accepted; turn off once its apps use tokens.
    #[serde(default = "yes")]
    pub allow_static_keys: bool,
    /// Issuer ids whose tokens a request must all carry (an App Check token beside the user's
    /// own, say); the first one listed names the subject.
    #[serde(default)]
    pub require_tokens: Vec<String>,
    /// Limits for each verified subject (end user) of this tenant's tokens.
    pub per_subject: Option<RawPerSubject>,
    /// The face check for this tenant's calls, instead of `intake.face.mode`.
    pub face_mode: Option<super::FaceMode>,
}

/// `[tenants.per_subject]`: what one end user may do.
#[derive(Debug, Default, Deserialize)]
pub struct RawPerSubject {
    pub rate_per_second: Option<u32>,
    /// The same as a rate (`"10/min"`), instead of `rate_per_second`.
    pub rate: Option<String>,
    /// Requests at once above the rate; the rate's calls when unset.
    pub burst: Option<u32>,
    /// Billable calls per day (of `budgets.timezone`).
    pub daily_budget: Option<u64>,
    /// Failed verdicts (`result: false`, `CALC_RESULT`) per day (of `budgets.timezone`); past
    /// them the subject's calls are refused until the day ends.
    pub max_failed_attempts: Option<u64>,
}

/// What one subject of a tenant may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerSubject {
    /// Rate and burst, when limited.
    pub rate: Option<(Rate, u32)>,
    pub daily_budget: Option<u64>,
    pub max_failed_attempts: Option<u64>,
}

impl PerSubject {
    /// Whether a call holds anything of the subject's: its budget or its failed attempts.
    pub fn holds(&self) -> bool {
        self.daily_budget.is_some() || self.max_failed_attempts.is_some()
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone)]
pub struct TenantConfig {
    pub id: String,
    pub key_digests: Vec<[u8; 32]>,
    pub disabled: bool,
    pub rate: Rate,
    pub burst: u32,
    pub daily_budget: Option<u64>,
    pub monthly_budget: Option<u64>,
    pub require_header_credentials: bool,
    /// The price of one billable call for the usage export (the tenant's, or the global one).
    pub price_per_call: Option<f64>,
    /// The origins a browser may use this tenant's key from; empty: any.
    pub allowed_origins: Vec<String>,
    /// The ids of the organization keys its calls may go out with: its own first, then its
    /// fallbacks. Filled in by `check_org_keys`.
    pub org_keys: Vec<String>,
    /// Whether its static keys are accepted (tokens of its issuers always are).
    pub allow_static_keys: bool,
    /// Issuers whose tokens a token request must all carry; filled in by `auth::check_required`.
    pub require_tokens: Vec<String>,
    pub per_subject: Option<PerSubject>,
    /// Its own face check mode (`intake.face.mode` when none).
    pub face_mode: Option<super::FaceMode>,
}

/// Give every tenant its chain of organization keys: `org_key` (or the default key), then
/// `org_key_fallback`; each must name a key, and none twice.
pub fn check_org_keys(
    raw: &[RawTenant],
    tenants: &mut [TenantConfig],
    known: &[String],
    default: Option<&str>,
    issues: &mut Issues,
) {
    for (n, t) in raw.iter().enumerate() {
        let at = format!("tenants[{n}]");
        let primary = match (&t.org_key, default) {
            (Some(id), _) => Some(id.as_str()),
            (None, Some(d)) => Some(d),
            // No organization key at all: `upstream` says so, once, not every tenant.
            (None, None) if known.is_empty() => None,
            (None, None) => {
                issues.add(
                    &format!("{at}.org_key"),
                    "no default organization key: name one of upstream.keys (or set upstream.default_key)".into(),
                );
                None
            }
        };
        let mut chain: Vec<String> = Vec::new();
        for (field, id) in primary.map(|p| ("org_key", p)).into_iter().chain(
            t.org_key_fallback
                .iter()
                .map(|f| ("org_key_fallback", f.as_str())),
        ) {
            if !known.iter().any(|k| k == id) {
                // Named back only when it reads as an id: a value pasted here may be the
                // organization key itself, which no problem report repeats.
                let id_like = id.len() <= 24
                    && (id.bytes()).all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                let named = match id_like {
                    true => format!("{id:?}"),
                    false => "the value given".into(),
                };
                issues.add(
                    &format!("{at}.{field}"),
                    format!(
                        "{named} is not an organization key (known: {})",
                        known.join(", ")
                    ),
                );
            } else if chain.iter().any(|c| c == id) {
                issues.add(
                    &format!("{at}.{field}"),
                    format!(
                        "{id:?} is in the chain twice: an upload is never sent twice with one key"
                    ),
                );
            } else {
                chain.push(id.to_string());
            }
        }
        if let Some(tenant) = tenants.iter_mut().find(|c| c.id == t.id) {
            tenant.org_keys = chain;
        }
    }
}

/// Check every `[[tenants]]` entry: ids and key digests unique, limits and budgets sane.
pub fn check(
    raw: &[RawTenant],
    defaults: TenantDefaults,
    price_per_call: Option<f64>,
    issues: &mut Issues,
) -> Vec<TenantConfig> {
    // Problems found by the shared origin check, added once the loop is done.
    let mut origin_issues = Issues::default();
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let default_rate = defaults.rate;
    let mut tenants = Vec::new();
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    for (n, t) in raw.iter().enumerate() {
        let at = format!("tenants[{n}]");
        if let Err(m) = check_id(&t.id) {
            issue(&format!("{at}.id"), m);
        } else if !ids.insert(t.id.clone()) {
            issue(&format!("{at}.id"), format!("{:?} is used twice", t.id));
        }
        if t.key_sha256.is_empty() {
            issue(
                &format!("{at}.key_sha256"),
                "needs at least one key digest (see `liveness-gateway keys new`)".into(),
            );
        }
        let key_digests = key_digests(t, &at, &mut digests, &mut issue);
        for (name, budget) in [
            ("daily_budget", t.daily_budget),
            ("monthly_budget", t.monthly_budget),
        ] {
            if budget == Some(0) {
                issue(
                        &format!("{at}.{name}"),
                        "0 would refuse every call: to stop a tenant set disabled = true; for no limit leave the budget out".into(),
                    );
            }
        }
        if t.rate_per_second == Some(0) || t.burst == Some(0) {
            issue(&at, "rate_per_second and burst must be at least 1".into());
        }
        if t.rate_per_second.is_some() && t.rate.is_some() {
            issue(&at, "set rate_per_second or rate, not both".into());
        }
        let rate = match (&t.rate, t.rate_per_second) {
            (Some(text), _) => Rate::parse(text).unwrap_or_else(|m| {
                issue(&format!("{at}.rate"), m);
                default_rate
            }),
            (None, Some(n)) => Rate::per_second(n),
            (None, None) => default_rate,
        };
        let per_subject = t
            .per_subject
            .as_ref()
            .and_then(|p| per_subject(p, &format!("{at}.per_subject"), &mut issue));
        if !price_ok(t.price_per_call) {
            issue(
                &format!("{at}.price_per_call"),
                "must be a number, zero or more".into(),
            );
        }
        tenants.push(TenantConfig {
            id: t.id.clone(),
            key_digests,
            disabled: t.disabled,
            rate,
            burst: t.burst.unwrap_or(defaults.burst),
            daily_budget: t.daily_budget,
            monthly_budget: t.monthly_budget,
            require_header_credentials: t.require_header_credentials,
            price_per_call: t.price_per_call.or(price_per_call),
            allowed_origins: super::cors::origins(
                &t.allowed_origins,
                &format!("{at}.allowed_origins"),
                &mut origin_issues,
            ),
            org_keys: Vec::new(),
            allow_static_keys: t.allow_static_keys,
            require_tokens: Vec::new(),
            per_subject,
            face_mode: t.face_mode,
        });
        if t.face_mode.is_some_and(|m| m != super::FaceMode::Off) {
            super::intake::face_supported(&format!("{at}.face_mode"), &mut issue);
        }
    }

    issues.0.extend(origin_issues.0);
    tenants
}

/// A tenant's key digests, each one used by no other key (`seen`: those of the tenants before).
fn key_digests(
    t: &RawTenant,
    at: &str,
    seen: &mut HashSet<[u8; 32]>,
    issue: &mut impl FnMut(&str, String),
) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    for (k, d) in t.key_sha256.iter().enumerate() {
        match parse_digest(d) {
            Some(bytes) => {
                if !seen.insert(bytes) {
                    issue(
                        &format!("{at}.key_sha256[{k}]"),
                        "this digest is used by another key".into(),
                    );
                }
                out.push(bytes);
            }
            None => issue(
                &format!("{at}.key_sha256[{k}]"),
                "must be 64 hex digits (a SHA-256 digest)".into(),
            ),
        }
    }
    out
}

fn per_subject(
    p: &RawPerSubject,
    at: &str,
    issue: &mut impl FnMut(&str, String),
) -> Option<PerSubject> {
    let rate = match (&p.rate, p.rate_per_second) {
        (Some(_), Some(_)) => {
            issue(at, "set rate_per_second or rate, not both".into());
            None
        }
        (Some(text), None) => match Rate::parse(text) {
            Ok(r) => Some(r),
            Err(m) => {
                issue(&format!("{at}.rate"), m);
                None
            }
        },
        (None, Some(0)) => {
            issue(&format!("{at}.rate_per_second"), "at least 1".into());
            None
        }
        (None, Some(n)) => Some(Rate::per_second(n)),
        (None, None) => None,
    };
    if p.burst == Some(0) {
        issue(&format!("{at}.burst"), "at least 1".into());
    }
    if p.burst.is_some() && rate.is_none() && p.rate.is_none() && p.rate_per_second.is_none() {
        issue(&format!("{at}.burst"), "a burst needs a rate".into());
    }
    if p.daily_budget == Some(0) {
        issue(
            &format!("{at}.daily_budget"),
            "0 would refuse every call; for no limit leave it out".into(),
        );
    }
    if p.max_failed_attempts == Some(0) {
        issue(
            &format!("{at}.max_failed_attempts"),
            "0 would refuse every call; for no limit leave it out".into(),
        );
    }
    if rate.is_none()
        && p.daily_budget.is_none()
        && p.max_failed_attempts.is_none()
        && p.rate.is_none()
        && p.rate_per_second.is_none()
    {
        issue(
            at,
            "set a rate, a daily_budget, max_failed_attempts, or several".into(),
        );
    }
    Some(PerSubject {
        rate: rate.map(|r| (r, p.burst.unwrap_or(r.calls).max(1))),
        daily_budget: p.daily_budget,
        max_failed_attempts: p.max_failed_attempts,
    })
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

/// Whether a tenant id is valid: non-empty ASCII letters, digits, `-` or `_`, and not the
/// reserved `unknown`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "{id:?} must be non-empty ASCII letters, digits, - or _"
        ));
    }
    if id == UNKNOWN_TENANT {
        return Err("\"unknown\" is reserved for unauthenticated requests".into());
    }
    Ok(())
}

/// The digest of a tenant key as `key_sha256` lists it (what `keys new` and `keys hash` print).
pub fn key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
