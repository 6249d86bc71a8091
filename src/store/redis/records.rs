//! The records issued at runtime (tenant keys, grants) on Redis: one hash of documents by id,
//! a version every change moves, and a hash of when each was last used, all under one hash
//! tag (`{records}`), so the swap script runs on a Redis Cluster too. None of them expires:
//! a record lives until the admin API removes it.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use async_trait::async_trait;

use super::{RedisStore, Retry};
use crate::store::{Records, StoreError};

/// Write ARGV[3] under ARGV[1] (remove it when empty) if what is there is ARGV[2] (empty:
/// nothing), and move the version. KEYS: the records, the version, the uses. 1 when written.
const SWAP: &str = r"
local now = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if now ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('INCR', KEYS[2])
return 1
";

/// Keep the later of the use noted and ARGV's, for each pair (id, Unix seconds) of ARGV after
/// the first, and keep the uses ARGV[1] ms from now (unused that long, they go: config keys
/// leave no record to remove them with). KEYS: the uses.
const TOUCH: &str = r"
for i = 2, #ARGV, 2 do
  local was = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > was then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

/// How long the uses are kept after the last one.
const USES_KEPT: std::time::Duration = std::time::Duration::from_secs(400 * 86_400);

static SWAP_SCRIPT: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(SWAP));
static TOUCH_SCRIPT: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(TOUCH));

impl RedisStore {
    fn records_keys(&self) -> [String; 3] {
        let p = &self.inner.cfg.key_prefix;
        [
            format!("{p}:{{records}}:all"),
            format!("{p}:{{records}}:version"),
            format!("{p}:{{records}}:used"),
        ]
    }
}

#[async_trait]
impl Records for RedisStore {
    async fn version(&self) -> Result<u64, StoreError> {
        let [_, version, _] = self.records_keys();
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(version);
        let v: Option<u64> = self.inner.run_cmd("records", &cmd, Retry::Once).await?;
        Ok(v.unwrap_or(0))
    }

    async fn records(&self) -> Result<(u64, BTreeMap<String, String>), StoreError> {
        let version = self.version().await?;
        let [all, _, _] = self.records_keys();
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(all);
        let records: BTreeMap<String, String> =
            self.inner.run_cmd("records", &cmd, Retry::Once).await?;
        Ok((version, records))
    }

    async fn swap(
        &self,
        id: &str,
        expected: Option<&str>,
        value: Option<&str>,
    ) -> Result<bool, StoreError> {
        let [all, version, used] = self.records_keys();
        let mut inv = SWAP_SCRIPT.prepare_invoke();
        inv.key(all)
            .key(version)
            .key(used)
            .arg(id)
            .arg(expected.unwrap_or(""))
            .arg(value.unwrap_or(""));
        // Never sent twice: a swap that ran finds its own value the second time, and would
        // say it lost to another change.
        let done: i64 = self.inner.run("records", &inv, Retry::Never).await?;
        Ok(done == 1)
    }

    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let [_, _, uses] = self.records_keys();
        let mut inv = TOUCH_SCRIPT.prepare_invoke();
        inv.key(uses).arg(USES_KEPT.as_millis() as u64);
        for (id, at) in used {
            inv.arg(id).arg(*at);
        }
        self.inner
            .run::<i64>("records", &inv, Retry::Once)
            .await
            .map(|_| ())
    }

    async fn touched(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let [_, _, used] = self.records_keys();
        let mut cmd = ::redis::cmd("HGETALL");
        cmd.arg(used);
        self.inner.run_cmd("records", &cmd, Retry::Once).await
    }
}
