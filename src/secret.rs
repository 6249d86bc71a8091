//! The organization's API key: loaded once, printed never.

use std::fmt;

/// The organization key the provider bills against. Its `Debug` and `Display` print
/// `[redacted]`, so it cannot reach a log line or an error text by formatting.
#[derive(Clone, PartialEq, Eq)]
pub struct OrgApiKey(String);

impl OrgApiKey {
    pub fn new(value: impl Into<String>) -> Self {
        OrgApiKey(value.into())
    }

    /// The raw value, for the one place that writes it into the upstream body.
    pub fn expose(&self) -> &str {
        &self.0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_itself() {
        let k = OrgApiKey::new("super-secret-organization-key");
        assert_eq!(format!("{k}"), "[redacted]");
        assert_eq!(format!("{k:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(k.clone())), "Some([redacted])");
        assert_eq!(k.expose(), "super-secret-organization-key");
    }
}
