//! What makes a config problem easy to fix: the field a type error is about (serde names only
//! the table), and the known key nearest to an unknown one ("did you mean").

use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::cell::Cell;

use super::auth::{RawAuth, RawIssuer};
use super::store::RawStore;
use super::tenants::RawPerSubject;
use super::upstream::RawOrgKey;
use super::{
    RawBreaker, RawBudgets, RawCache, RawConfig, RawCors, RawIntake, RawLimits, RawReceipts,
    RawServer, RawTenant, RawTls, RawUpstream,
};

/// Asks a type which fields it takes: serde hands them to `deserialize_struct`, where this
/// deserializer keeps them and stops.
struct Probe<'a>(&'a Cell<&'static [&'static str]>);

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("probe"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.set(fields);
        Err(de::Error::custom("probe"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let seen = Cell::new(&[][..]);
    let _ = T::deserialize(Probe(&seen));
    seen.get()
}

/// The keys the table at `table` (a dotted path, array indexes as `[]`) takes.
pub fn known_keys(table: &str) -> &'static [&'static str] {
    match table {
        "" => fields::<RawConfig>(),
        "server" => fields::<RawServer>(),
        "server.tls" => fields::<RawTls>(),
        "upstream" => fields::<RawUpstream>(),
        "upstream.keys[]" => fields::<RawOrgKey>(),
        "intake" => fields::<RawIntake>(),
        "limits" => fields::<RawLimits>(),
        "cache" => fields::<RawCache>(),
        "budgets" => fields::<RawBudgets>(),
        "breaker" => fields::<RawBreaker>(),
        "store" => fields::<RawStore>(),
        "cors" => fields::<RawCors>(),
        "auth" => fields::<RawAuth>(),
        "auth.issuers[]" => fields::<RawIssuer>(),
        "receipts" => fields::<RawReceipts>(),
        "tenants[]" => fields::<RawTenant>(),
        "tenants[].per_subject" => fields::<RawPerSubject>(),
        _ => &[],
    }
}

/// The key of `table` nearest to `key`, when one is near enough to be a typo of it.
pub fn did_you_mean(table: &str, key: &str) -> Option<&'static str> {
    known_keys(table)
        .iter()
        .map(|k| (strsim::jaro_winkler(key, k), *k))
        .filter(|(score, _)| *score > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// The table and key of the line that holds byte `at` of `text` (`(["server", "tls"],
/// "cert_file")`), by following the table headers above it.
pub fn key_at(text: &str, at: usize) -> Option<(Vec<String>, String)> {
    let mut table: Vec<String> = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let l = line.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            table = name.trim().split('.').map(str::to_string).collect();
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().split('.').map(str::to_string).collect();
        } else if (start..end).contains(&at) {
            let (key, _) = l.split_once('=')?;
            return Some((table, key.trim().trim_matches('"').to_string()));
        }
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tables_keys_are_the_types_fields() {
        assert!(known_keys("tenants[]").contains(&"daily_budget"));
        assert!(known_keys("server.tls").contains(&"cert_file"));
        assert!(known_keys("").contains(&"tenants"));
        assert_eq!(
            did_you_mean("tenants[]", "daily_budgt"),
            Some("daily_budget")
        );
        assert_eq!(did_you_mean("cache", "enabeld"), Some("enabled"));
        assert_eq!(did_you_mean("cache", "zzz"), None);
    }

    #[test]
    fn the_key_of_a_line_follows_the_headers() {
        let text = "[server]\nlisten = 1\n[server.tls]\ncert_file = 5\n";
        let at = text.find('5').expect("at");
        assert_eq!(
            key_at(text, at),
            Some((vec!["server".into(), "tls".into()], "cert_file".into()))
        );
    }
}
