//! `[receipts]`: signed verdict receipts (see `receipt` and docs/receipts.md). Off when the
//! table is absent.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{unset_variable, EnvLookup, Issues};

#[derive(Debug, Deserialize)]
pub struct RawReceipts {
    /// The receipts' `iss`: a name backends check (e.g. the gateway's public URL).
    pub issuer: String,
    /// The signing key, a PKCS#8 PEM file (ES256 on P-256, or EdDSA on Ed25519) ...
    pub key_file: Option<PathBuf>,
    /// ... or the variable holding its PEM text.
    pub key_env: Option<String>,
    /// The key's id in the receipts' header and the JWKS; none: its RFC 7638 thumbprint.
    pub kid: Option<String>,
    /// How long a receipt is valid (`exp - iat`).
    #[serde(default = "d_10m", with = "humantime_serde")]
    pub ttl: Duration,
    /// A JWKS file of more public keys served beside the signing key's: the previous key
    /// (receipts it signed still verify) and the next one (backends know it before it signs).
    pub listed_jwks_file: Option<PathBuf>,
}

fn d_10m() -> Duration {
    Duration::from_secs(600)
}

/// A signing key's PEM text taken from a variable: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningPem(String);

impl SigningPem {
    pub fn new(pem: String) -> Self {
        SigningPem(pem)
    }

    /// The PEM text, for the one place that parses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SigningPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where the signing key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptKey {
    File(PathBuf),
    Pem(SigningPem),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptsConfig {
    pub issuer: String,
    pub key: ReceiptKey,
    pub kid: Option<String>,
    pub ttl: Duration,
    pub listed_jwks_file: Option<PathBuf>,
}

/// The longest `ttl`: a receipt is for the backend's decision right after the check.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// `org_key_vars`: the variables of the organization keys, which a signing key may not share.
pub fn check(
    raw: Option<&RawReceipts>,
    org_key_vars: &[&str],
    env: EnvLookup<'_>,
    issues: &mut Issues,
) -> Option<ReceiptsConfig> {
    let raw = raw?;
    if let Some(var) = raw
        .key_env
        .as_ref()
        .filter(|v| org_key_vars.contains(&v.as_str()))
    {
        issues.add(
            "receipts.key_env",
            format!("{var} holds an organization key: the signing key needs a variable of its own"),
        );
        return None;
    }
    if raw.issuer.trim().is_empty() {
        issues.add(
            "receipts.issuer",
            "must name the gateway (e.g. its public URL)".into(),
        );
    }
    if raw.ttl < Duration::from_secs(1) || raw.ttl > MAX_TTL {
        issues.add("receipts.ttl", "must be between 1s and 24h".into());
    }
    if let Some(kid) = &raw.kid {
        if kid.is_empty() || kid.len() > 128 || !kid.bytes().all(|b| b.is_ascii_graphic()) {
            issues.add(
                "receipts.kid",
                "must be 1 to 128 visible ASCII characters".into(),
            );
        }
    }
    let key = match (&raw.key_file, &raw.key_env) {
        (Some(path), None) => Some(ReceiptKey::File(path.clone())),
        (None, Some(var)) => match env(var).filter(|v| !v.trim().is_empty()) {
            Some(pem) => Some(ReceiptKey::Pem(SigningPem(pem))),
            None => {
                issues.add("receipts.key_env", unset_variable(var, "not set"));
                None
            }
        },
        (Some(_), Some(_)) => {
            issues.add("receipts", "set key_file or key_env, not both".into());
            None
        }
        (None, None) => {
            issues.add(
                "receipts",
                "the signing key is missing: set key_file (a PKCS#8 PEM file) or key_env".into(),
            );
            None
        }
    };
    Some(ReceiptsConfig {
        issuer: raw.issuer.trim().to_string(),
        key: key?,
        kid: raw.kid.clone(),
        ttl: raw.ttl,
        listed_jwks_file: raw.listed_jwks_file.clone(),
    })
}
