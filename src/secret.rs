//! Secrets in types that never print themselves: the organization's API key (loaded once,
//! printed never), a tenant's presented key, and the admin token (kept only as a digest).

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The organization key the provider bills against. Its `Debug` and `Display` print
/// `[redacted]`, so it cannot reach a log line or an error text by formatting.
#[derive(Clone, PartialEq, Eq)]
pub struct OrgApiKey {
    value: String,
    /// The forms in which a provider could echo it back: as sent, percent-encoded (upper and
    /// lower case hex), and escaped as a JSON string.
    echoes: Vec<Vec<u8>>,
}

impl OrgApiKey {
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        let mut echoes = vec![value.as_bytes().to_vec()];
        let mut upper = String::new();
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                upper.push(b as char);
            } else {
                upper.push_str(&format!("%{b:02X}"));
            }
        }
        let lower = percent_lower(&upper);
        let json = serde_json::to_string(&value).unwrap_or_default();
        let json = json.trim_matches('"').to_string();
        for form in [upper, lower, json] {
            if !form.is_empty() && !echoes.contains(&form.as_bytes().to_vec()) {
                echoes.push(form.into_bytes());
            }
        }
        OrgApiKey { value, echoes }
    }

    /// The raw value, for the one place that writes it into the upstream body.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// Whether these bytes (an answer from the provider) contain the key in any form it could be
    /// echoed in.
    pub fn appears_in(&self, bytes: &[u8]) -> bool {
        self.echoes
            .iter()
            .any(|form| memchr::memmem::find(bytes, form).is_some())
    }
}

/// `%2F` → `%2f`: the hex digits of percent escapes in lower case.
fn percent_lower(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escape = 0;
    for c in s.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Debug for OrgApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for OrgApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A tenant key as a client presented it (header or form field), until it is hashed.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantKey(String);

impl TenantKey {
    pub fn new(value: impl Into<String>) -> Self {
        TenantKey(value.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The credential as sent, for the one check that needs its text: whether it is an app
    /// token (a JWT) rather than a static key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SHA-256 digest the config stores for it.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The admin token, held as its SHA-256 digest: compared in constant time against the digest of
/// what a caller presents, so neither the token nor its length can be learnt from timing.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        AdminToken(Sha256::digest(token.as_bytes()).into())
    }

    pub fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(d.ct_eq(&self.0))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_secrets_never_print_themselves_either() {
        let k = TenantKey::new("tenant-secret");
        assert_eq!(format!("{k:?}"), "[redacted]");
        let t = AdminToken::new("admin-secret");
        assert_eq!(format!("{t:?}"), "[redacted]");
        assert!(t.matches("admin-secret"));
        assert!(!t.matches("admin-secre"));
        assert!(!t.matches(""));
    }

    #[test]
    fn never_prints_itself() {
        let k = OrgApiKey::new("super-secret-organization-key");
        assert_eq!(format!("{k}"), "[redacted]");
        assert_eq!(format!("{k:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(k.clone())), "Some([redacted])");
        assert_eq!(k.expose(), "super-secret-organization-key");
    }

    #[test]
    fn echoes_are_found_in_every_form() {
        let k = OrgApiKey::new("org/key+with \"odd\" chars");
        for echoed in [
            "{\"input\": \"org/key+with \\\"odd\\\" chars\"}",
            "api_key=org%2Fkey%2Bwith%20%22odd%22%20chars&x=1",
            "api_key=org%2fkey%2bwith%20%22odd%22%20chars",
            "raw: org/key+with \"odd\" chars",
        ] {
            assert!(k.appears_in(echoed.as_bytes()), "{echoed}");
        }
        assert!(!k.appears_in(b"org/key+with odd chars"));
        let plain = OrgApiKey::new("ORGKEY123");
        assert!(plain.appears_in(b"{\"detail\":[{\"input\":\"ORGKEY123\"}]}"));
        assert!(!plain.appears_in(b"ORGKEY12"));
    }
}
