//! Secrets in types that never print themselves: the organization's API key (loaded once,
//! printed never), a tenant's presented key, and the admin token (kept only as a digest).

use std::fmt;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The organization key the provider bills against. Its `Debug` and `Display` print
/// `[redacted]`, so it cannot reach a log line or an error text by formatting; `egress` keeps it
/// from the answers.
#[derive(Clone, PartialEq, Eq)]
pub struct OrgApiKey {
    value: String,
}

impl OrgApiKey {
    pub fn new(value: impl Into<String>) -> Self {
        OrgApiKey {
            value: value.into(),
        }
    }

    /// The raw value, for the one place that writes it into the upstream body.
    pub fn expose(&self) -> &str {
        &self.value
    }
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
/// what a caller presents, so neither the token nor its length can be learnt from timing. The
/// egress check also keeps its probe (its length and a keyed fingerprint of its first bytes,
/// see `Probe`), taken while the token was in hand.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    digest: [u8; 32],
    probe: Option<Probe>,
}

impl AdminToken {
    pub fn new(token: &str) -> Self {
        AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
            probe: Probe::of(token.as_bytes()),
        }
    }

    /// The digest it is held as, for the egress check.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Its probe, for the egress check.
    pub fn probe(&self) -> Option<Probe> {
        self.probe
    }

    pub fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(d.ct_eq(&self.digest))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The length of the prefix a probe fingerprints (the egress check's shortest hashed token).
pub const PROBE_BYTES: usize = 6;
/// The longest secret a probe is taken of (the egress check's longest hashed token).
const MAX_PROBED: usize = 1024;

/// What this process learnt of a digest-held secret while it had it in hand (the admin token
/// when the config was read, a tenant key when it authenticated a request): its length and a
/// 32-bit keyed fingerprint of its first `PROBE_BYTES` bytes. With them a secret is found at any byte
/// of a text in one pass (a fingerprint per position, then SHA-256 of the window where one
/// matches), wherever it sits and whatever is glued to it, at about a nanosecond a byte; without
/// them only key-shaped tokens can be hashed. Neither gives the secret away: 32 bits of six
/// bytes under a key of this process, which is never written anywhere.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    len: usize,
    print: u32,
}

impl Probe {
    /// `None` for a secret shorter than `PROBE_BYTES` bytes (never searched for: see `MIN_TOKEN`).
    pub fn of(secret: &[u8]) -> Option<Probe> {
        (secret.len() >= PROBE_BYTES && secret.len() <= MAX_PROBED).then(|| Probe {
            len: secret.len(),
            print: print_of(&secret[..PROBE_BYTES], print_seeds()),
        })
    }

    /// The secret's length in bytes.
    pub fn secret_len(&self) -> usize {
        self.len
    }

    /// The fingerprint of its first `PROBE_BYTES` bytes.
    pub fn print(&self) -> u32 {
        self.print
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Probe")
    }
}

/// The process's fingerprint key, drawn once.
pub fn print_seeds() -> (u64, u64) {
    static SEEDS: OnceLock<(u64, u64)> = OnceLock::new();
    *SEEDS.get_or_init(|| (rand::random(), rand::random::<u64>() | 1))
}

/// A multiply-shift hash of `PROBE_BYTES` bytes (cheap enough for every byte of every text).
pub fn print_of(w: &[u8], (xor, mul): (u64, u64)) -> u32 {
    let mut b = [0u8; 8];
    b[..PROBE_BYTES].copy_from_slice(&w[..PROBE_BYTES]);
    ((u64::from_le_bytes(b) ^ xor).wrapping_mul(mul) >> 32) as u32
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
}
