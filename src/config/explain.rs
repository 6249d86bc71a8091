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
        "intake.convert" => fields::<super::RawConvert>(),
        "limits" => fields::<RawLimits>(),
        "cache" => fields::<RawCache>(),
        "budgets" => fields::<RawBudgets>(),
        "breaker" => fields::<RawBreaker>(),
        "store" => fields::<RawStore>(),
        "cors" => fields::<RawCors>(),
        "auth" => fields::<RawAuth>(),
        "auth.issuers[]" => fields::<RawIssuer>(),
        "receipts" => fields::<RawReceipts>(),
        "tracing" => fields::<super::RawTracing>(),
        "tenants[]" => fields::<RawTenant>(),
        "tenants[].per_subject" => fields::<RawPerSubject>(),
        _ => &[],
    }
}

/// The keys of `table` (at `path`, known as `name`: a dotted path, array indexes as `[]`) that
/// no setting has, into `out`: what `serde_ignored` reports of a file that deserializes, found
/// without deserializing (a file with a wrong type stops serde before it gets there). Tables
/// this module does not describe are not looked into.
pub fn unknown_keys(
    table: &toml::Table,
    path: &mut Vec<String>,
    name: &str,
    out: &mut Vec<Vec<String>>,
) {
    let known = known_keys(name);
    if known.is_empty() {
        return;
    }
    for (key, value) in table {
        path.push(key.clone());
        let child = if name.is_empty() {
            key.clone()
        } else {
            format!("{name}.{key}")
        };
        if !known.contains(&key.as_str()) {
            out.push(path.clone());
        } else if let toml::Value::Table(t) = value {
            unknown_keys(t, path, &child, out);
        } else if let toml::Value::Array(items) = value {
            for (n, item) in items.iter().enumerate() {
                if let toml::Value::Table(t) = item {
                    path.push(n.to_string());
                    unknown_keys(t, path, &format!("{child}[]"), out);
                    path.pop();
                }
            }
        }
        path.pop();
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

/// Each `key = value` line of a file with where it is: its line number (from 1), its byte
/// range, and its full path (`["tenants", "1", "per_subject", "burst"]`), by following the
/// table headers above it. Header segments are read as TOML writes them (spaces and quotes
/// around a name); an array of tables gets its element's index, for its own header and for a
/// sub-table of it (`[tenants.per_subject]` is in the last `[[tenants]]`). Lines inside a
/// multi-line string are not told apart.
pub fn key_lines(text: &str) -> Vec<(usize, std::ops::Range<usize>, Vec<String>)> {
    let mut out = Vec::new();
    let mut table: Vec<String> = Vec::new();
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    let mut start = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let end = start + line.len();
        let l = line.trim();
        let header = |inner: &str| -> Vec<String> {
            inner
                .split('.')
                .map(|s| s.trim().trim_matches('"').trim_matches('\'').to_string())
                .collect()
        };
        // Inserts the current index after every prefix that is an array of tables.
        let indexed = |names: &[String], arrays: &std::collections::HashMap<String, usize>| {
            let mut path = Vec::new();
            for (i, name) in names.iter().enumerate() {
                path.push(name.clone());
                let prefix = names[..=i].join(".");
                if let Some(count) = arrays.get(&prefix) {
                    path.push(count.saturating_sub(1).to_string());
                }
            }
            path
        };
        if let Some(inner) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let names = header(inner);
            *arrays.entry(names.join(".")).or_default() += 1;
            table = indexed(&names, &arrays);
        } else if let Some(inner) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = indexed(&header(inner), &arrays);
        } else if let Some((key, _)) = l.split_once('=').filter(|_| !l.starts_with('#')) {
            let mut path = table.clone();
            path.extend(header(key));
            out.push((n + 1, start..end, path));
        }
        start = end;
    }
    out
}

/// The path of the key written on the line that holds byte `at`.
pub fn key_at(text: &str, at: usize) -> Option<Vec<String>> {
    key_lines(text)
        .into_iter()
        .find(|(_, range, _)| range.contains(&at))
        .map(|(_, _, path)| path)
}

/// The line where the key or table at `path` is written.
pub fn line_of(text: &str, path: &[&str]) -> Option<usize> {
    key_lines(text)
        .into_iter()
        .find(|(_, _, p)| p.iter().map(String::as_str).eq(path.iter().copied()))
        .map(|(line, _, _)| line)
        .or_else(|| table_line(text, path))
}

/// The line of the table header at `path` (an unknown key's own table, say).
fn table_line(text: &str, path: &[&str]) -> Option<usize> {
    let want = path
        .iter()
        .filter(|s| !s.bytes().all(|b| b.is_ascii_digit()))
        .copied()
        .collect::<Vec<_>>()
        .join(".");
    text.lines()
        .position(|l| {
            let l = l.trim();
            let inner = l
                .strip_prefix("[[")
                .and_then(|r| r.split("]]").next())
                .or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()));
            inner.is_some_and(|i| {
                i.split('.')
                    .map(|s| s.trim().trim_matches('"'))
                    .collect::<Vec<_>>()
                    .join(".")
                    == want
            })
        })
        .map(|n| n + 1)
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
        let text = "[server]\nlisten = 1\n[ \"server\" . tls ]\ncert_file = 5\n[[tenants]]\nid = 1\n[[tenants]]\nid = 2\n[tenants.per_subject]\nburts = 3\nserver.x = 1\n";
        let path = |at: &str| key_at(text, text.find(at).expect("at")).map(|p| p.join("."));
        assert_eq!(path("5").as_deref(), Some("server.tls.cert_file"));
        assert_eq!(path("2").as_deref(), Some("tenants.1.id"));
        assert_eq!(path("3").as_deref(), Some("tenants.1.per_subject.burts"));
        assert_eq!(
            line_of(text, &["tenants", "1", "per_subject", "burts"]),
            Some(10)
        );
        assert_eq!(
            path("server.x").as_deref(),
            Some("tenants.1.per_subject.server.x")
        );
    }
}
