//! `[auth]`: the issuers whose signed tokens are accepted instead of a tenant key.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::Issues;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAuth {
    pub issuers: Vec<RawIssuer>,
    /// The variable holding the key of the hash that names subjects in logs, `/admin` and the
    /// store (any text; 32 bytes or more of randomness). Unset: derived from the default
    /// organization key, so every replica of a deployment agrees without more configuration.
    pub subject_hash_key_env: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawIssuer {
    /// The issuer's name in logs and metrics.
    pub id: String,
    /// `jwt` (the default: every field below is set by hand) or `firebase-app-check` (the
    /// issuer, audience, algorithm, JWKS URL and header follow from `project_number`).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Firebase: the project number (digits), as in the console's project settings.
    pub project_number: Option<String>,
    /// Firebase: the app ids whose tokens are accepted (the token's `sub`).
    #[serde(default)]
    pub app_ids: Vec<String>,
    /// The header its tokens come in (`X-Firebase-AppCheck`); none: `Authorization: Bearer`.
    pub header: Option<String>,
    /// The exact `iss` of its tokens.
    #[serde(default)]
    pub issuer: String,
    /// A token's `aud` must contain one of them.
    #[serde(default)]
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
    #[serde(default)]
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

fn default_kind() -> String {
    "jwt".into()
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

/// Firebase App Check: its JWKS, the prefix of its `iss`, and the header its tokens come in.
pub const FIREBASE_JWKS_URL: &str = "https://firebaseappcheck.googleapis.com/v1/jwks";
pub const FIREBASE_ISSUER_PREFIX: &str = "https://firebaseappcheck.googleapis.com/";
pub const FIREBASE_HEADER: &str = "X-Firebase-AppCheck";
/// Google asks verifiers to keep App Check's keys no longer than 6 hours.
const FIREBASE_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

/// Headers that carry something else: a token header may not be one of them.
const TAKEN_HEADERS: [&str; 6] = [
    "authorization",
    "x-api-key",
    "content-type",
    "content-length",
    "origin",
    "x-request-id",
];

/// An issuer's fields once its kind has filled in what it implies.
struct Filled {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<String>,
    jwks_url: Option<String>,
    jwks_max_age: Duration,
    header: Option<String>,
    subjects: Vec<String>,
}

/// What `kind` implies: a `jwt` issuer is as written; `firebase-app-check` is filled in from its
/// project number and app ids (and refuses the fields it sets itself).
fn fill(r: &RawIssuer, mut issue: impl FnMut(&str, String)) -> Filled {
    match r.kind.as_str() {
        "firebase-app-check" => {
            let project = r.project_number.clone().unwrap_or_default();
            if project.is_empty() || !project.bytes().all(|b| b.is_ascii_digit()) {
                issue(
                    ".project_number",
                    "the Firebase project number (digits) is required".into(),
                );
            }
            if r.app_ids.is_empty() || r.app_ids.iter().any(|a| a.trim().is_empty()) {
                issue(
                    ".app_ids",
                    "name the Firebase app ids whose tokens are accepted".into(),
                );
            }
            if !r.issuer.is_empty() || !r.audiences.is_empty() || !r.algorithms.is_empty() {
                issue(
                    "",
                    "issuer, audiences and algorithms follow from project_number with kind = \"firebase-app-check\": leave them out".into(),
                );
            }
            Filled {
                issuer: format!("{FIREBASE_ISSUER_PREFIX}{project}"),
                audiences: vec![format!("projects/{project}")],
                algorithms: vec!["RS256".into()],
                jwks_url: match (&r.jwks_url, &r.jwks_file) {
                    (None, None) => Some(FIREBASE_JWKS_URL.into()),
                    (url, _) => url.clone(),
                },
                jwks_max_age: r.jwks_max_age.min(FIREBASE_MAX_AGE),
                header: Some(r.header.clone().unwrap_or_else(|| FIREBASE_HEADER.into())),
                subjects: r.app_ids.clone(),
            }
        }
        kind => {
            if kind != "jwt" {
                issue(
                    ".kind",
                    format!("{kind:?} is not \"jwt\" or \"firebase-app-check\""),
                );
            }
            if r.project_number.is_some() || !r.app_ids.is_empty() {
                issue(
                    "",
                    "project_number and app_ids belong to kind = \"firebase-app-check\"".into(),
                );
            }
            Filled {
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                algorithms: r.algorithms.clone(),
                jwks_url: r.jwks_url.clone(),
                jwks_max_age: r.jwks_max_age,
                header: r.header.clone(),
                subjects: Vec::new(),
            }
        }
    }
}

/// A token header's name, lower-cased; not one that carries something else.
fn token_header(name: &str) -> Result<http::HeaderName, String> {
    let h = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    if TAKEN_HEADERS.contains(&h.as_str()) {
        return Err(format!(
            "{name:?} carries something else (tokens in Authorization need no header option)"
        ));
    }
    Ok(h)
}

/// One issuer, checked: whose tokens it takes, for which tenant, and where its public keys are
/// (the runtime reads them: `auth::Issuer`).
#[derive(Debug, Clone, PartialEq)]
pub struct IssuerConfig {
    pub id: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub tenant: String,
    pub subject_claim: String,
    /// The subjects accepted (a Firebase App Check issuer's app ids); empty: any.
    pub subjects: Vec<String>,
    /// The header its tokens come in; `None`: `Authorization: Bearer`.
    pub header: Option<http::HeaderName>,
    pub leeway: Duration,
    pub max_lifetime: Duration,
    /// Each token (its `jti`, then required) pays for one request at most.
    pub single_use: bool,
    /// Where its public keys are.
    pub jwks: JwksSource,
    /// How the keys of a JWKS URL are kept.
    pub freshness: Freshness,
}

/// Where an issuer's public keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

/// How a JWKS URL's keys are kept (see `auth::jwks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub max_age_cap: Duration,
    pub max_staleness: Duration,
    pub cooldown: Duration,
    pub fetch_timeout: Duration,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            max_age_cap: Duration::from_secs(24 * 3600),
            max_staleness: Duration::from_secs(24 * 3600),
            cooldown: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// The asymmetric algorithms an issuer may allow. Shared-secret ones (HS*) are never accepted:
/// a JWKS is public, and a "secret" from it would let anyone sign.
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The key of the hash that stands for a subject in logs, `/admin` and the store: subjects are
/// personal data, and a keyed hash cannot be reversed by trying names.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectHashKey(pub [u8; 32]);

impl std::fmt::Debug for SubjectHashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectHashKey(..)")
    }
}

impl SubjectHashKey {
    /// The subject's name where it is kept or shown: 128 bits of its keyed hash, in hex, scoped
    /// by the issuer (two issuers' `sub`s are different people).
    pub fn name(&self, issuer: &str, subject: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(issuer.as_bytes());
        h.update(&[0]);
        h.update(subject.as_bytes());
        hex::encode(&h.finalize().as_bytes()[..16])
    }
}

/// Check every issuer (its JWKS file is read by the runtime, not here).
pub fn check(raw: &RawAuth, tenant_ids: &[String], issues: &mut Issues) -> Vec<IssuerConfig> {
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut claimed: Vec<Claim> = Vec::new();
    for (n, r) in raw.issuers.iter().enumerate() {
        let at = format!("auth.issuers[{n}]");
        let f = fill(r, |field, m| issues.add(&format!("{at}{field}"), m));
        let claim = Claim {
            id: r.id.clone(),
            issuer: f.issuer.clone(),
            audiences: f.audiences.clone(),
            subject_claim: r.subject_claim.clone(),
            subjects: f.subjects.clone(),
        };
        if let Some(other) = claimed.iter().find(|c| c.overlaps(&claim)) {
            issues.add(&at, claim.overlap_message(other));
        }
        claimed.push(claim);
        let mut issue = |field: &str, m: String| issues.add(&format!("{at}{field}"), m);
        if r.id.is_empty() || !ids.insert(r.id.clone()) {
            issue(".id", format!("{:?} is empty or used twice", r.id));
        }
        out.extend(check_one(r, f, tenant_ids, &mut issue));
    }
    out
}

/// Check one issuer's fields once its kind has filled them in; `None` when it names no usable
/// source of keys.
fn check_one(
    r: &RawIssuer,
    f: Filled,
    tenant_ids: &[String],
    issue: &mut impl FnMut(&str, String),
) -> Option<IssuerConfig> {
    if f.issuer.is_empty() {
        issue(".issuer", "the exact iss of the tokens is required".into());
    }
    if f.audiences.is_empty() || f.audiences.iter().any(String::is_empty) {
        issue(".audiences", "at least one, none empty".into());
    }
    let mut algorithms = Vec::new();
    for a in &f.algorithms {
        match parse_algorithm(a) {
            Some(alg) => algorithms.push(alg),
            None => issue(
                ".algorithms",
                format!("{a:?} is not one of ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA (shared-secret algorithms are never accepted)"),
            ),
        }
    }
    if f.algorithms.is_empty() {
        issue(".algorithms", "name the allowed algorithms".into());
    }
    let header = match f.header.as_deref().map(token_header) {
        Some(Ok(h)) => Some(h),
        Some(Err(m)) => {
            issue(".header", m);
            None
        }
        None => None,
    };
    if !tenant_ids.contains(&r.tenant) {
        issue(".tenant", format!("{:?} is not a tenant id", r.tenant));
    }
    if r.subject_claim.is_empty() {
        issue(".subject_claim", "must name a claim".into());
    }
    if r.max_lifetime.is_zero() {
        issue(".max_lifetime", "must be more than zero".into());
    }
    let jwks = match (&r.jwks_file, &f.jwks_url) {
        (Some(f), None) => JwksSource::File(f.clone()),
        (None, Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {
            JwksSource::Url(u.clone())
        }
        (None, Some(u)) => {
            issue(".jwks_url", format!("{u:?} is not an http(s) URL"));
            return None;
        }
        _ => {
            issue("", "set jwks_file or jwks_url (one of them)".into());
            return None;
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
    Some(IssuerConfig {
        id: r.id.clone(),
        issuer: f.issuer,
        audiences: f.audiences,
        algorithms,
        tenant: r.tenant.clone(),
        subject_claim: r.subject_claim.clone(),
        subjects: f.subjects,
        header,
        leeway: r.leeway,
        max_lifetime: r.max_lifetime,
        single_use: r.single_use,
        jwks,
        freshness: Freshness {
            max_age_cap: f.jwks_max_age,
            max_staleness: r.jwks_max_staleness,
            cooldown: r.jwks_refetch_cooldown,
            ..Freshness::default()
        },
    })
}

/// Which tokens an issuer takes, as its unverified claims say: tokens are sent to their issuer
/// by these (`auth::verify`), so two issuers must never both take one token.
struct Claim {
    id: String,
    issuer: String,
    audiences: Vec<String>,
    subject_claim: String,
    /// The subjects it accepts (App Check's app ids); empty: any.
    subjects: Vec<String>,
}

impl Claim {
    /// Why this claim may not stand beside `other`'s.
    fn overlap_message(&self, other: &Claim) -> String {
        format!(
            "a token of {:?} could be one of {:?} as well: both take iss {:?} with the audience {:?}{}",
            self.id,
            other.id,
            self.issuer,
            other.shared_audience(self).map_or("", String::as_str),
            if self.subjects.is_empty() || other.subjects.is_empty() {
                "; give each its own audience"
            } else {
                " and an app id in common; give each its own app ids"
            },
        )
    }

    fn shared_audience(&self, other: &Claim) -> Option<&String> {
        self.audiences.iter().find(|a| other.audiences.contains(a))
    }

    /// Whether one token could be taken by both (whatever header each reads it from: a token
    /// moved to the other header would act for the other's tenant).
    fn overlaps(&self, other: &Claim) -> bool {
        let subjects_meet = self.subjects.is_empty()
            || other.subjects.is_empty()
            || self.subject_claim != other.subject_claim
            || self.subjects.iter().any(|s| other.subjects.contains(s));
        !self.issuer.is_empty()
            && self.issuer == other.issuer
            && self.shared_audience(other).is_some()
            && subjects_meet
    }
}

/// Each tenant's `require_tokens`: issuer ids, each acting for that tenant.
pub fn check_required(
    raw: &[super::tenants::RawTenant],
    tenants: &mut [super::TenantConfig],
    issuers: &[RawIssuer],
    issues: &mut Issues,
) {
    for (n, (r, t)) in raw.iter().zip(tenants.iter_mut()).enumerate() {
        for id in &r.require_tokens {
            match issuers.iter().find(|i| &i.id == id) {
                Some(i) if i.tenant == r.id => {}
                Some(_) => issues.add(
                    &format!("tenants[{n}].require_tokens"),
                    format!("the issuer {id:?} acts for another tenant"),
                ),
                None => issues.add(
                    &format!("tenants[{n}].require_tokens"),
                    format!("{id:?} is not an issuer id (auth.issuers)"),
                ),
            }
        }
        t.require_tokens = r.require_tokens.clone();
    }
}

/// The key of the subject hash: from `subject_hash_key_env`, or derived from the default
/// organization key (a secret every replica already shares; the derivation cannot be reversed).
pub fn subject_hash_key(
    raw: &RawAuth,
    upstream: Option<&super::UpstreamConfig>,
    env: super::EnvLookup<'_>,
    issues: &mut Issues,
) -> SubjectHashKey {
    const CONTEXT: &str = "liveness-gateway 2026-11 app token subject hash";
    if let Some(name) = &raw.subject_hash_key_env {
        return match env(name).filter(|v| v.trim().len() >= 16) {
            Some(v) => SubjectHashKey(blake3::derive_key(CONTEXT, v.trim().as_bytes())),
            None => {
                issues.add(
                    "auth.subject_hash_key_env",
                    format!("{name} is unset or shorter than 16 characters"),
                );
                SubjectHashKey([0; 32])
            }
        };
    }
    let org = upstream.and_then(|u| {
        let keys = &u.keys;
        keys.default
            .as_deref()
            .and_then(|d| keys.get(d))
            .or(keys.keys.first())
    });
    SubjectHashKey(blake3::derive_key(
        CONTEXT,
        org.map_or(&b""[..], |k| k.key.expose().as_bytes()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The App Check preset fills in Firebase's fields, and keeps its keys 6 hours at most
    /// whatever `jwks_max_age` says.
    #[test]
    fn the_app_check_preset_fills_in_firebase() {
        let raw: RawAuth = toml::from_str(
            r#"[[issuers]]
            id = "ac"
            kind = "firebase-app-check"
            project_number = "123"
            app_ids = ["1:123:web:abc"]
            tenant = "t"
            jwks_max_age = "24h""#,
        )
        .expect("toml");
        let mut problems = Vec::new();
        let f = fill(&raw.issuers[0], |field, m| {
            problems.push(format!("{field}: {m}"))
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(f.issuer, "https://firebaseappcheck.googleapis.com/123");
        assert_eq!(f.audiences, ["projects/123"]);
        assert_eq!(f.algorithms, ["RS256"]);
        assert_eq!(f.jwks_url.as_deref(), Some(FIREBASE_JWKS_URL));
        assert_eq!(f.jwks_max_age, Duration::from_secs(6 * 3600));
        assert_eq!(f.header.as_deref(), Some(FIREBASE_HEADER));
        assert_eq!(f.subjects, ["1:123:web:abc"]);
    }

    #[test]
    fn only_asymmetric_algorithms_are_allowed() {
        assert_eq!(parse_algorithm("ES256"), Some(Algorithm::ES256));
        assert_eq!(parse_algorithm("EdDSA"), Some(Algorithm::EdDSA));
        for refused in ["HS256", "HS512", "none", "es256"] {
            assert_eq!(parse_algorithm(refused), None, "{refused}");
        }
    }

    #[test]
    fn the_subject_hash_key_comes_from_its_variable_or_the_organization_key() {
        let raw = |env: Option<&str>| RawAuth {
            subject_hash_key_env: env.map(str::to_string),
            ..RawAuth::default()
        };
        let mut issues = Issues::default();
        let from_var = subject_hash_key(
            &raw(Some("K")),
            None,
            &|_| Some("a secret of more than sixteen characters".into()),
            &mut issues,
        );
        let derived = subject_hash_key(&raw(None), None, &|_| None, &mut issues);
        assert!(issues.0.is_empty());
        assert_ne!(from_var, derived);
        // The hash is keyed and scoped by issuer.
        assert_ne!(from_var.name("i", "ana"), derived.name("i", "ana"));
        assert_ne!(from_var.name("i", "ana"), from_var.name("j", "ana"));
        assert_eq!(from_var.name("i", "ana").len(), 32);
        for unusable in [None, Some("short")] {
            let mut issues = Issues::default();
            subject_hash_key(
                &raw(Some("K")),
                None,
                &|_| unusable.map(str::to_string),
                &mut issues,
            );
            assert_eq!(issues.0.len(), 1, "{unusable:?}");
            assert_eq!(issues.0[0].path, "auth.subject_hash_key_env");
        }
    }
}
