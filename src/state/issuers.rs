//! The issuers in force, built from their settings: each with its live key set.

use std::sync::Arc;

use crate::auth::{Issuer, KeySet};
use crate::config::{Config, JwksSource};

/// The issuers of `config` with their keys: an issuer whose id and JWKS URL stay those of one in
/// `kept` keeps its fetched keys and their freshness; a JWKS file is read (again).
pub fn build(config: &Config, kept: &[Issuer]) -> Result<Vec<Issuer>, String> {
    let mut out = Vec::with_capacity(config.issuers.len());
    for (n, settings) in config.issuers.iter().enumerate() {
        let same = kept
            .iter()
            .find(|o| o.id == settings.id && o.jwks == settings.jwks);
        let keys = match (&settings.jwks, same) {
            (JwksSource::Url(_), Some(o)) => o.keys.clone(),
            (JwksSource::Url(url), None) => {
                Arc::new(KeySet::from_url(url.clone(), settings.freshness))
            }
            (JwksSource::File(f), _) => Arc::new(
                KeySet::from_file(f.clone())
                    .map_err(|m| format!("auth.issuers[{n}].jwks_file: {m}"))?,
            ),
        };
        out.push(Issuer {
            settings: settings.clone(),
            keys,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload keeps the key set of an issuer whose id and JWKS URL stay (its fetched keys and
    /// their freshness), makes a new one for a changed URL or id, and reads a JWKS file again.
    #[test]
    fn a_key_set_is_kept_while_the_issuer_and_its_url_stay() {
        let dir = tempfile::tempdir().expect("dir");
        let jwks = dir.path().join("jwks.json");
        let (_, doc) = crate::auth::tools::keygen("ES256", "k1").expect("key");
        std::fs::write(&jwks, doc.to_string()).expect("jwks");
        let text = |url: &str, id: &str| {
            format!(
                r#"
[upstream]
url = "http://127.0.0.1:8081"
api_key_env = "ORG_KEY"
[[tenants]]
id = "a"
key_sha256 = ["0000000000000000000000000000000000000000000000000000000000000000"]
[[auth.issuers]]
id = "{id}"
issuer = "https://issuer.test"
audiences = ["gw"]
algorithms = ["ES256"]
tenant = "a"
jwks_url = "{url}"
[[auth.issuers]]
id = "file"
issuer = "https://issuer.test/file"
audiences = ["gw"]
algorithms = ["ES256"]
tenant = "a"
jwks_file = {jwks:?}
"#
            )
        };
        let config = |url: &str, id: &str| {
            Config::from_toml(&text(url, id), &|_| Some("org".into())).expect("valid")
        };
        let first = build(&config("https://issuer.test/jwks", "url"), &[]).expect("built");
        let again = build(&config("https://issuer.test/jwks", "url"), &first).expect("built");
        assert!(
            Arc::ptr_eq(&first[0].keys, &again[0].keys),
            "same id and URL"
        );
        assert!(
            !Arc::ptr_eq(&first[1].keys, &again[1].keys),
            "a file is read again"
        );
        for (url, id) in [
            ("https://issuer.test/jwks2", "url"),
            ("https://issuer.test/jwks", "other"),
        ] {
            let moved = build(&config(url, id), &first).expect("built");
            assert!(!Arc::ptr_eq(&first[0].keys, &moved[0].keys), "{id} {url}");
        }
        std::fs::write(&jwks, "{").expect("broken");
        let err = build(&config("https://issuer.test/jwks", "url"), &first).expect_err("broken");
        assert!(err.starts_with("auth.issuers[1].jwks_file: "), "{err}");
    }
}
