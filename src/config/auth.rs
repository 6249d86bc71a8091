//! `[auth]`: the issuers whose signed tokens are accepted instead of a tenant key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Issues;
use crate::auth::{parse_algorithm, Freshness, Issuer, KeySet, Source};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAuth {
    pub issuers: Vec<RawIssuer>,
    /// Set by `check-config --offline`: the JWKS files are not read.
    #[serde(skip)]
    pub offline: bool,
}

#[derive(Debug, Deserialize)]
pub struct RawIssuer {
    /// The issuer's name in logs and metrics.
    pub id: String,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// A token's `aud` must contain one of them.
    pub audiences: Vec<String>,
    /// Its public keys, as a JWKS file ...
    pub jwks_file: Option<PathBuf>,
    /// ... or a URL, fetched at start and kept fresh (see `auth::jwks`).
    pub jwks_url: Option<String>,
    /// Upper bound of how long a fetched JWKS is kept before it is fetched again (its
    /// `Cache-Control: max-age` within 1 min … this).
    #[serde(default = "d_24h", with = "humantime_serde")]
    pub jwks_max_age: Duration,
    /// How long the last good keys serve while the JWKS URL cannot be fetched.
    #[serde(default = "d_24h", with = "humantime_serde")]
    pub jwks_max_staleness: Duration,
    /// At most one refetch for unknown `kid`s (or missing keys) in this long.
    #[serde(default = "d_30s", with = "humantime_serde")]
    pub jwks_refetch_cooldown: Duration,
    /// The allowlist: `ES256`, `ES384`, `RS256`…`PS512`, `EdDSA` (never a shared-secret one).
    pub algorithms: Vec<String>,
    /// The tenant its tokens act for.
    pub tenant: String,
    /// The claim naming the end user; required and non-empty.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Tolerance of `exp`, `nbf` and `iat` for clocks apart.
    #[serde(default = "d_60s", with = "humantime_serde")]
    pub leeway: Duration,
    /// Tokens whose `exp - iat` is longer are refused.
    #[serde(default = "d_1h", with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// A token (its `jti`, then required) is accepted for one request only; a second use gets
    /// `401 token_replayed` (remembered until it expires, in the fleet's store when there is one).
    #[serde(default)]
    pub single_use: bool,
}

fn default_subject_claim() -> String {
    "sub".into()
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_1h() -> Duration {
    Duration::from_secs(3600)
}
fn d_24h() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Check every issuer and read its JWKS (`offline`: the file is not read).
pub fn check(raw: &RawAuth, tenant_ids: &[String], issues: &mut Issues) -> Vec<Issuer> {
    let offline = raw.offline;
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (n, r) in raw.issuers.iter().enumerate() {
        let at = format!("auth.issuers[{n}]");
        let mut ok = true;
        let mut issue = |field: &str, m: String| {
            ok = false;
            issues.add(&format!("{at}{field}"), m);
        };
        if r.id.is_empty() || !ids.insert(r.id.clone()) {
            issue(".id", format!("{:?} is empty or used twice", r.id));
        }
        if r.issuer.is_empty() {
            issue(".issuer", "the exact iss of the tokens is required".into());
        }
        if r.audiences.is_empty() || r.audiences.iter().any(String::is_empty) {
            issue(".audiences", "at least one, none empty".into());
        }
        let mut algorithms = Vec::new();
        for a in &r.algorithms {
            match parse_algorithm(a) {
                Some(alg) => algorithms.push(alg),
                None => issue(
                    ".algorithms",
                    format!("{a:?} is not one of ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA (shared-secret algorithms are never accepted)"),
                ),
            }
        }
        if r.algorithms.is_empty() {
            issue(".algorithms", "name the allowed algorithms".into());
        }
        if !tenant_ids.contains(&r.tenant) {
            issue(".tenant", format!("{:?} is not a tenant id", r.tenant));
        }
        if r.subject_claim.is_empty() {
            issue(".subject_claim", "must name a claim".into());
        }
        if r.max_lifetime.is_zero() {
            issue(".max_lifetime", "must be more than zero".into());
        }
        let source = match (&r.jwks_file, &r.jwks_url) {
            (Some(f), None) => Source::File(f.clone()),
            (None, Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {
                Source::Url(u.clone())
            }
            (None, Some(u)) => {
                issue(".jwks_url", format!("{u:?} is not an http(s) URL"));
                continue;
            }
            _ => {
                issue("", "set jwks_file or jwks_url (one of them)".into());
                continue;
            }
        };
        if r.jwks_max_age.is_zero()
            || r.jwks_max_staleness.is_zero()
            || r.jwks_refetch_cooldown.is_zero()
        {
            issue(
                "",
                "jwks_max_age, jwks_max_staleness and jwks_refetch_cooldown must be more than zero"
                    .into(),
            );
        }
        if !ok {
            continue;
        }
        let keys = match source {
            Source::Url(url) => KeySet::from_url(
                url,
                Freshness {
                    max_age_cap: r.jwks_max_age,
                    max_staleness: r.jwks_max_staleness,
                    cooldown: r.jwks_refetch_cooldown,
                    ..Freshness::default()
                },
            ),
            // `check-config --offline`: the file is not read; nothing serves from this config.
            Source::File(_) if offline => continue,
            Source::File(path) => match KeySet::from_file(path) {
                Ok(k) => k,
                Err(m) => {
                    issues.add(&format!("{at}.jwks_file"), m);
                    continue;
                }
            },
        };
        out.push(Issuer {
            id: r.id.clone(),
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            algorithms,
            tenant: r.tenant.clone(),
            subject_claim: r.subject_claim.clone(),
            leeway: r.leeway,
            max_lifetime: r.max_lifetime,
            single_use: r.single_use,
            keys: std::sync::Arc::new(keys),
        });
    }
    out
}
