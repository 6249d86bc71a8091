//! Whether the shared store may drop keys when its memory is full.
//!
//! Every key the gateway writes carries an expiry, so any eviction policy but `noeviction`
//! (the `volatile-*` ones included) may drop a budget count, a hold or a lock under memory
//! pressure, and a budget could then be overshot without any error. With `noeviction` a full
//! Redis refuses writes instead, and budgets fail closed (`503 store_unavailable`). Redis says
//! which policy it runs in `INFO memory`; the gateway reads it now and then and says so in a
//! gauge and a warning.

use ::redis::Value;

/// What the store does with keys when its memory is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eviction {
    /// `noeviction`, or no `maxmemory` at all: nothing is dropped.
    Never,
    /// The policy (a cluster: the first node's that may) and the memory limit in bytes.
    May { policy: String, maxmemory: u64 },
    /// The store does not say: `INFO` refused (an ACL), or an answer without the fields.
    Unknown(String),
}

impl Eviction {
    /// The value of `store_may_evict`: 1 may, 0 never, -1 not known.
    pub fn gauge(&self) -> i64 {
        match self {
            Eviction::Never => 0,
            Eviction::May { .. } => 1,
            Eviction::Unknown(_) => -1,
        }
    }

    /// From the answer to `INFO memory`: one text from a single Redis, one per node from a
    /// cluster. The worst node decides.
    pub fn from_answer(answer: &Value) -> Eviction {
        let texts = texts(answer);
        if texts.is_empty() {
            return Eviction::Unknown("INFO memory returned no text".into());
        }
        let each: Vec<Eviction> = texts.iter().map(|t| Eviction::from_info(t)).collect();
        each.iter()
            .find(|e| matches!(e, Eviction::May { .. }))
            .or_else(|| each.iter().find(|e| matches!(e, Eviction::Unknown(_))))
            .cloned()
            .unwrap_or(Eviction::Never)
    }

    /// From one node's `INFO memory` text.
    fn from_info(text: &str) -> Eviction {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let (Some(policy), Some(maxmemory)) = (field("maxmemory_policy"), field("maxmemory"))
        else {
            return Eviction::Unknown(
                "INFO memory does not give maxmemory and maxmemory_policy".into(),
            );
        };
        let Ok(maxmemory) = maxmemory.parse::<u64>() else {
            return Eviction::Unknown(format!("INFO memory gives maxmemory as {maxmemory:?}"));
        };
        // `maxmemory 0` is no limit (on 64-bit servers): nothing is ever evicted.
        if policy == "noeviction" || maxmemory == 0 {
            Eviction::Never
        } else {
            Eviction::May {
                policy: policy.to_string(),
                maxmemory,
            }
        }
    }
}

/// The text blobs of an `INFO` answer: one from a single Redis, one per node from a cluster.
pub fn texts(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_texts(v, &mut out);
    out
}

/// The text blobs of an answer: a string, or the values of a map or an array (a cluster's
/// answer per node).
fn collect_texts(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::BulkString(b) => out.push(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => out.push(s.clone()),
        Value::VerbatimString { text, .. } => out.push(text.clone()),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|i| collect_texts(i, out));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, i)| collect_texts(i, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(policy: &str, maxmemory: u64) -> Value {
        Value::BulkString(
            format!("# Memory\r\nused_memory:1000\r\nmaxmemory:{maxmemory}\r\nmaxmemory_human:0B\r\nmaxmemory_policy:{policy}\r\n")
                .into_bytes(),
        )
    }

    #[test]
    fn only_noeviction_or_no_limit_is_safe() {
        assert_eq!(
            Eviction::from_answer(&info("noeviction", 1 << 30)),
            Eviction::Never
        );
        assert_eq!(
            Eviction::from_answer(&info("allkeys-lru", 0)),
            Eviction::Never
        );
        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "volatile-ttl",
            "allkeys-random",
        ] {
            assert_eq!(
                Eviction::from_answer(&info(policy, 64 << 20)),
                Eviction::May {
                    policy: policy.into(),
                    maxmemory: 64 << 20
                },
                "{policy}"
            );
        }
        // `maxmemory_human` and `maxmemory_policy` share the prefix; neither is read as the limit.
        assert_eq!(Eviction::from_answer(&info("noeviction", 5)).gauge(), 0);
    }

    #[test]
    fn a_cluster_is_as_unsafe_as_its_worst_node() {
        let nodes = |policies: &[&str]| {
            Value::Map(
                policies
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        (
                            Value::SimpleString(format!("127.0.0.1:700{i}")),
                            info(p, 1 << 20),
                        )
                    })
                    .collect(),
            )
        };
        assert_eq!(
            Eviction::from_answer(&nodes(&["noeviction", "noeviction"])).gauge(),
            0
        );
        assert_eq!(
            Eviction::from_answer(&nodes(&["noeviction", "volatile-lru", "noeviction"])),
            Eviction::May {
                policy: "volatile-lru".into(),
                maxmemory: 1 << 20
            }
        );
    }

    #[test]
    fn an_answer_without_the_fields_is_not_known() {
        let e = Eviction::from_answer(&Value::BulkString(
            b"# Memory\r\nused_memory:1\r\n".to_vec(),
        ));
        assert_eq!(e.gauge(), -1);
        assert_eq!(Eviction::from_answer(&Value::Nil).gauge(), -1);
        assert_eq!(Eviction::from_answer(&info("noeviction", 0)).gauge(), 0);
        let bad = Value::BulkString(b"maxmemory:lots\r\nmaxmemory_policy:allkeys-lru\r\n".to_vec());
        assert_eq!(Eviction::from_answer(&bad).gauge(), -1);
    }
}
