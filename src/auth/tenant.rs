//! Tenants and their credentials. Keys are held only as SHA-256 digests; a presented key is
//! hashed and compared against every stored digest in constant time.

use subtle::ConstantTimeEq;

use crate::config::TenantConfig;
use crate::config::TenantKey;
use crate::error::GatewayError;
use crate::issued;

/// Where the client put its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Bearer,
    /// A verified app token (`Authorization: Bearer <jwt>`).
    Token,
    ApiKeyHeader,
    FormField,
}

#[derive(Debug, Clone)]
pub struct TenantRegistry {
    tenants: Vec<TenantConfig>,
}

impl TenantRegistry {
    pub fn new(tenants: Vec<TenantConfig>) -> Self {
        TenantRegistry { tenants }
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.tenants.iter().map(|t| t.id.as_str())
    }

    /// Whether no enabled tenant accepts its key in the form field.
    pub fn all_require_header_credentials(&self) -> bool {
        self.tenants
            .iter()
            .filter(|t| !t.disabled)
            .all(|t| t.require_header_credentials)
    }

    pub fn get(&self, id: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.id == id)
    }

    /// The tenant owning this key: a runtime key by its key id in `issued` (its tenant as the
    /// config has it now), any other by its digest among the config's. Every digest is
    /// compared, without an early exit, so the time taken says nothing about which digest (if
    /// any) matched. The key's use is noted for `GET /admin/tenants/{id}/keys`.
    pub fn authenticate(
        &self,
        issued: &issued::Registry,
        presented: &TenantKey,
    ) -> Result<&TenantConfig, GatewayError> {
        if let Some((tenant, _)) = issued.authenticate(presented)? {
            return match self.get(&tenant) {
                Some(t) if t.disabled => Err(GatewayError::TenantDisabled),
                Some(t) => Ok(t),
                // A key of a tenant the config no longer has.
                None => Err(GatewayError::InvalidCredentials),
            };
        }
        let digest = presented.digest();
        let mut found: Option<usize> = None;
        for (n, t) in self.tenants.iter().enumerate() {
            for d in &t.key_digests {
                if bool::from(d.ct_eq(&digest)) {
                    found = Some(n);
                }
            }
        }
        match found.map(|n| &self.tenants[n]) {
            Some(t) if t.disabled => Err(GatewayError::TenantDisabled),
            Some(t) => {
                issued.note_use(&issued::config_key_id(&digest));
                Ok(t)
            }
            None => Err(GatewayError::InvalidCredentials),
        }
    }
}

/// The one value of a credential header, if it is there. Sent twice (even with equal values) it
/// is refused: which one the client meant is not the gateway's guess, and a proxy that adds its
/// own must not have it read in place of the client's.
pub fn credential_header(
    headers: &http::HeaderMap,
    name: impl http::header::AsHeaderName,
) -> Result<Option<&http::HeaderValue>, GatewayError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(GatewayError::MalformedCredentials),
    }
}

/// The credential carried in headers, if any: `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
/// A header that is there but not of that form (`Authorization: <key>`, `Basic …`, an empty
/// value), or sent twice, is refused as malformed, rather than treated as no credential at all.
pub fn header_credential(
    headers: &http::HeaderMap,
) -> Result<Option<(TenantKey, CredentialSource)>, GatewayError> {
    let authorization = credential_header(headers, http::header::AUTHORIZATION)?;
    let api_key = credential_header(headers, "x-api-key")?;
    // Two credentials are refused, not merged: which one a tenant meant is not the gateway's
    // guess to make.
    if authorization.is_some() && api_key.is_some() {
        return Err(GatewayError::MalformedCredentials);
    }
    if let Some(v) = authorization {
        let v = v
            .to_str()
            .map_err(|_| GatewayError::MalformedCredentials)?
            .trim();
        return match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") && !v[7..].trim().is_empty() => {
                Ok(Some((
                    TenantKey::new(v[7..].trim()),
                    CredentialSource::Bearer,
                )))
            }
            _ => Err(GatewayError::MalformedCredentials),
        };
    }
    match api_key.map(|v| v.to_str().map(str::trim)) {
        Some(Ok(v)) if !v.is_empty() => {
            Ok(Some((TenantKey::new(v), CredentialSource::ApiKeyHeader)))
        }
        Some(_) => Err(GatewayError::MalformedCredentials),
        None => Ok(None),
    }
}

/// A fresh random tenant key: 32 random bytes, hex, with a recognisable prefix.
pub fn new_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("lgk_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::key_digest_hex;

    fn tenant(id: &str, key: &str, disabled: bool) -> TenantConfig {
        let mut d = [0u8; 32];
        hex::decode_to_slice(key_digest_hex(key), &mut d).expect("hex");
        TenantConfig {
            id: id.into(),
            key_digests: vec![d],
            disabled,
            rate: crate::config::Rate::per_second(1),
            burst: 1,
            daily_budget: None,
            monthly_budget: None,
            require_header_credentials: false,
            price_per_call: None,
            allowed_origins: Vec::new(),
            org_keys: Vec::new(),
            allow_static_keys: true,
            require_tokens: Vec::new(),
            per_subject: None,
            face_mode: None,
        }
    }

    #[test]
    fn authenticates_by_digest() {
        let r = TenantRegistry::new(vec![
            tenant("a", "key-a", false),
            tenant("b", "key-b", true),
        ]);
        let store = crate::store::LocalStore::open(None).expect("store");
        let issued = issued::Registry::new(store);
        assert_eq!(
            r.authenticate(&issued, &TenantKey::new("key-a"))
                .expect("a")
                .id,
            "a"
        );
        assert_eq!(
            r.authenticate(&issued, &TenantKey::new("key-b"))
                .expect_err("disabled"),
            GatewayError::TenantDisabled
        );
        assert_eq!(
            r.authenticate(&issued, &TenantKey::new("nope"))
                .expect_err("unknown"),
            GatewayError::InvalidCredentials
        );
    }

    #[test]
    fn header_forms() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer  k1 ".parse().expect("hv"));
        assert_eq!(
            header_credential(&h),
            Ok(Some((TenantKey::new("k1"), CredentialSource::Bearer)))
        );
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "k2".parse().expect("hv"));
        assert_eq!(
            header_credential(&h),
            Ok(Some((TenantKey::new("k2"), CredentialSource::ApiKeyHeader)))
        );
        assert_eq!(header_credential(&http::HeaderMap::new()), Ok(None));
        // Two credentials: refused, whichever would have been valid.
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer k1".parse().expect("hv"));
        h.insert("x-api-key", "k2".parse().expect("hv"));
        assert_eq!(
            header_credential(&h),
            Err(GatewayError::MalformedCredentials)
        );
        for (name, bad) in [
            ("authorization", "Basic abc"),
            ("authorization", "the-key-without-a-scheme"),
            ("authorization", "Bearer "),
            ("x-api-key", " "),
        ] {
            let mut h = http::HeaderMap::new();
            h.insert(name, bad.parse().expect("hv"));
            assert_eq!(
                header_credential(&h),
                Err(GatewayError::MalformedCredentials),
                "{name}: {bad}"
            );
        }
    }

    #[test]
    fn new_keys_are_distinct_and_hash_to_64_hex() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert_eq!(key_digest_hex(&a).len(), 64);
    }
}
