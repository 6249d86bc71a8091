//! `[auth]`: the issuers whose signed tokens are accepted instead of a tenant key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Issues;
use crate::auth::{parse_algorithm, Issuer};

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
    /// Its public keys, as a JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// Fetching the JWKS over HTTPS is not supported yet: refused with a message.
    pub jwks_url: Option<String>,
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
}

fn default_subject_claim() -> String {
    "sub".into()
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}
fn d_1h() -> Duration {
    Duration::from_secs(3600)
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
        if r.jwks_url.is_some() {
            issue(
                ".jwks_url",
                "not supported yet: keep the issuer's JWKS in a file (jwks_file) and reload when it changes".into(),
            );
        }
        let Some(file) = &r.jwks_file else {
            issue(
                ".jwks_file",
                "the issuer's public keys (a JWKS file) are required".into(),
            );
            continue;
        };
        if offline || !ok {
            continue;
        }
        match Issuer::new(
            r.id.clone(),
            r.issuer.clone(),
            r.audiences.clone(),
            algorithms,
            r.tenant.clone(),
            r.subject_claim.clone(),
            r.leeway,
            r.max_lifetime,
            file.clone(),
        ) {
            Ok(i) => out.push(i),
            Err(m) => issues.add(&format!("{at}.jwks_file"), m),
        }
    }
    out
}
