//! `[cors]`: which web origins may call the liveness route from a browser.

use std::time::Duration;

use serde::Deserialize;

use super::Issues;

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawCors {
    /// Exact origins (`https://app.example.com`); empty: no CORS headers at all.
    pub allowed_origins: Vec<String>,
    /// How long a browser may keep a preflight's answer.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for RawCors {
    fn default() -> Self {
        RawCors {
            allowed_origins: Vec::new(),
            max_age: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
    pub max_age: Duration,
    /// The headers app tokens come in besides `Authorization` (`auth.issuers[].header`): a
    /// browser may send them too.
    pub token_headers: Vec<String>,
}

impl CorsConfig {
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }
}

/// Check `[cors]`.
pub fn check(raw: RawCors, issues: &mut Issues) -> CorsConfig {
    let allowed_origins = origins(&raw.allowed_origins, "cors.allowed_origins", issues);
    if raw.max_age > Duration::from_secs(86_400) {
        issues.add(
            "cors.max_age",
            "at most 24h (browsers cap it lower anyway)".into(),
        );
    }
    CorsConfig {
        allowed_origins,
        max_age: raw.max_age,
        token_headers: Vec::new(),
    }
}

/// Check a list of origins, each `scheme://host[:port]` exactly as a browser sends it in
/// `Origin`: lower case, no path, no trailing slash, no wildcard.
pub fn origins(list: &[String], at: &str, issues: &mut Issues) -> Vec<String> {
    let mut out = Vec::new();
    for (n, o) in list.iter().enumerate() {
        match check_origin(o) {
            Ok(()) => out.push(o.clone()),
            Err(m) => issues.add(&format!("{at}[{n}]"), format!("{o:?} {m}")),
        }
    }
    out
}

fn check_origin(o: &str) -> Result<(), &'static str> {
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .ok_or("is not an origin like \"https://app.example.com\"")?;
    if o.contains('*') {
        return Err("has a wildcard: list each origin exactly");
    }
    if rest.is_empty() || rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err("must be scheme://host[:port], with no path or trailing slash");
    }
    if o.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("must be lower case, as browsers send it");
    }
    if rest.parse::<http::uri::Authority>().is_err() {
        return Err("does not have a valid host[:port]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact() {
        let mut issues = Issues::default();
        let good = origins(
            &[
                "https://app.example.com".into(),
                "http://127.0.0.1:8000".into(),
            ],
            "cors.allowed_origins",
            &mut issues,
        );
        assert_eq!(good.len(), 2);
        assert!(issues.0.is_empty());
        for bad in [
            "*",
            "https://*.example.com",
            "https://app.example.com/",
            "app.example.com",
            "https://App.example.com",
            "ftp://x",
        ] {
            let mut issues = Issues::default();
            origins(&[bad.into()], "cors.allowed_origins", &mut issues);
            assert_eq!(issues.0.len(), 1, "{bad}");
            assert_eq!(issues.0[0].path, "cors.allowed_origins[0]");
        }
    }
}
