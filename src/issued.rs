//! What the admin API issues at runtime, beside the tenants the config declares: **tenant
//! keys** (created, rotated with a grace period under the same key id, revoked, expiring) and
//! **grants** (calls added to a tenant's budgets until a set time).
//!
//! Both are records in the store (`store::Records`): beside the state file on one host, in
//! Redis in a fleet. Every replica keeps a snapshot of them in memory, and polls the records'
//! version every `POLL` to read them again when it moved: a change made on one replica is in
//! force on every other within a second, and a request never waits for the store to check a
//! key. A key is kept as the SHA-256 digest of its secret, as the config keeps its own.
//!
//! A runtime key reads `lgr_<key id>_<secret><checksum>`: a fixed prefix that secret scanners
//! can look for, the key id (12 hex digits), 48 hex digits of secret, and the CRC-32 of what
//! comes before it (8 hex digits), so that a mistyped key is refused without looking anything
//! up.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::{TenantConfig, TenantKey};
use crate::error::GatewayError;
use crate::store::{BudgetLimits, Store, StoreError};

/// How often a replica asks whether the records moved.
pub const POLL: Duration = Duration::from_millis(500);

/// The prefix of every runtime key.
pub const KEY_PREFIX: &str = "lgr_";

/// The longest life a key may be given, and the longest grace of a rotation.
pub const MAX_EXPIRY: Duration = Duration::from_secs(10 * 366 * 86_400);
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 86_400);

/// The longest label, in characters.
pub const MAX_LABEL: usize = 100;

/// Secrets of one key at once: the current one and those still in their grace.
const MAX_SECRETS: usize = 4;

/// How long a grant that ended is kept (shown as ended) before it is removed.
const ENDED_GRANTS_KEPT: i64 = 86_400;

const KEY_ID_HEX: usize = 12;
const SECRET_HEX: usize = 48;
const CHECKSUM_HEX: usize = 8;

/// A new runtime key for `key_id`: its secret, whole.
fn new_key(key_id: &str) -> String {
    let mut secret = [0u8; SECRET_HEX / 2];
    rand::thread_rng().fill_bytes(&mut secret);
    let body = format!("{KEY_PREFIX}{key_id}_{}", hex::encode(secret));
    format!("{body}{:08x}", crc32fast::hash(body.as_bytes()))
}

fn new_id(hex_digits: usize) -> String {
    let mut b = vec![0u8; hex_digits / 2];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Whether a presented key is a runtime key: its key id when it is, `InvalidCredentials` when
/// it has the prefix but not the form or the checksum (a typo, or a forgery), `None` when it
/// is not one (a key of the config).
pub fn runtime_key_id(key: &str) -> Result<Option<&str>, GatewayError> {
    let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
        return Ok(None);
    };
    let well_formed = rest.len() == KEY_ID_HEX + 1 + SECRET_HEX + CHECKSUM_HEX
        && rest.bytes().enumerate().all(|(i, b)| match i {
            KEY_ID_HEX => b == b'_',
            _ => matches!(b, b'0'..=b'9' | b'a'..=b'f'),
        });
    if !well_formed {
        return Err(GatewayError::InvalidCredentials);
    }
    let (body, sum) = key.split_at(key.len() - CHECKSUM_HEX);
    if format!("{:08x}", crc32fast::hash(body.as_bytes())) != sum {
        return Err(GatewayError::InvalidCredentials);
    }
    Ok(Some(&rest[..KEY_ID_HEX]))
}

/// Whether a text is a key id as runtime keys have them.
pub fn is_key_id(text: &str) -> bool {
    text.len() == KEY_ID_HEX && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The id under which a config key's use is noted and listed: `config-` and the first digits
/// of its digest (which the config file shows whole). Written on the stack: it is made for
/// every request with a config key.
pub fn config_key_id(digest: &[u8; 32]) -> ConfigKeyId {
    let mut text = *b"config-000000000000";
    let _ = hex::encode_to_slice(&digest[..KEY_ID_HEX / 2], &mut text[7..]);
    ConfigKeyId(text)
}

/// A config key's id (`config_key_id`).
pub struct ConfigKeyId([u8; 7 + KEY_ID_HEX]);

impl std::ops::Deref for ConfigKeyId {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// A time in Unix seconds as RFC 3339 (UTC, to the second).
pub fn rfc3339(secs: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// One secret of a runtime key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    /// The SHA-256 of the secret, hex.
    pub sha256: String,
    /// For a secret a rotation replaced: the end of its grace (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
}

/// A runtime key as the store keeps it (record `key/<key id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub tenant: String,
    #[serde(default)]
    pub label: String,
    /// Unix seconds.
    pub created: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// When it was last rotated (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated: Option<i64>,
    /// The current secret first, then those a rotation replaced that are still in their grace.
    pub secrets: Vec<Secret>,
}

impl KeyRecord {
    fn record_id(key_id: &str) -> String {
        format!("key/{key_id}")
    }

    /// The end of the grace of the secrets a rotation replaced, the latest, if any is in it.
    pub fn grace_until(&self, now: i64) -> Option<i64> {
        self.secrets
            .iter()
            .filter_map(|s| s.until)
            .filter(|u| *u > now)
            .max()
    }
}

/// A grant (record `grant/<id>`): `calls` added to each of the tenant's budgets from `from`
/// until `until` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub grant_id: String,
    pub tenant: String,
    pub calls: u64,
    pub from: i64,
    pub until: i64,
    #[serde(default)]
    pub reason: String,
}

impl Grant {
    fn record_id(grant_id: &str) -> String {
        format!("grant/{grant_id}")
    }

    pub fn in_force(&self, now: i64) -> bool {
        self.from <= now && now < self.until
    }
}

/// A runtime key as a snapshot holds it: its record, and its secrets' digests decoded.
#[derive(Debug, Clone)]
struct Known {
    record: KeyRecord,
    digests: Vec<([u8; 32], Option<i64>)>,
}

/// The records as a replica read them last.
#[derive(Debug, Default)]
struct Snapshot {
    /// `None` until the store has been read once.
    version: Option<u64>,
    keys: HashMap<String, Known>,
    grants: Vec<Grant>,
    /// Each record as stored, by record id: what a change names as the value it replaces.
    raw: BTreeMap<String, String>,
}

impl Snapshot {
    fn of(version: u64, raw: BTreeMap<String, String>) -> Snapshot {
        let mut s = Snapshot {
            version: Some(version),
            ..Snapshot::default()
        };
        for (id, text) in &raw {
            if id.starts_with("key/") {
                match serde_json::from_str::<KeyRecord>(text) {
                    Ok(record) => {
                        let digests = record
                            .secrets
                            .iter()
                            .filter_map(|s| {
                                let mut d = [0u8; 32];
                                hex::decode_to_slice(&s.sha256, &mut d).ok()?;
                                Some((d, s.until))
                            })
                            .collect();
                        s.keys
                            .insert(record.key_id.clone(), Known { record, digests });
                    }
                    Err(e) => {
                        tracing::warn!(record = %id, "a runtime key record is unreadable, and ignored: {e}")
                    }
                }
            } else if id.starts_with("grant/") {
                match serde_json::from_str::<Grant>(text) {
                    Ok(g) => s.grants.push(g),
                    Err(e) => {
                        tracing::warn!(record = %id, "a grant record is unreadable, and ignored: {e}")
                    }
                }
            }
        }
        s.raw = raw;
        s
    }
}

/// Why a change of the records was not made.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("no such key")]
    UnknownKey,
    #[error("no such grant")]
    UnknownGrant,
    /// The store did not answer: the change may or may not have been made.
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the record kept changing under this change; try again")]
    Contended,
    #[error("the key has as many secrets in their grace as it may have")]
    TooManySecrets,
}

/// A key as the admin API answers once it is made: its record and its secret, shown once.
#[derive(Debug, Clone)]
pub struct Issued {
    pub record: KeyRecord,
    pub key: String,
}

/// The records issued at runtime, as this replica knows them, and the changes the admin API
/// makes to them.
pub struct Registry {
    store: Arc<dyn Store>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Uses of keys not yet written to the store: id → the minute (Unix seconds).
    uses: Mutex<HashMap<String, i64>>,
    /// The last minute written for each id, so that a key used all day is written once a
    /// minute.
    written: Mutex<HashMap<String, i64>>,
}

impl Registry {
    pub fn new(store: Arc<dyn Store>) -> Registry {
        Registry {
            store,
            snapshot: RwLock::default(),
            uses: Mutex::default(),
            written: Mutex::default(),
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn now(&self) -> i64 {
        self.store.now().timestamp()
    }

    /// Whether what is issued outlives this process (see `Records::durable`).
    pub fn durable(&self) -> bool {
        self.store.durable()
    }

    /// Whether the records have been read once.
    pub fn loaded(&self) -> bool {
        self.snapshot().version.is_some()
    }

    /// The tenant of a runtime key, and its key id; `None` for a key that is not a runtime key.
    /// Refused: a malformed one, one not issued (or revoked), a secret past its grace
    /// (`key_expired`), a key past its expiry (`key_expired`); `auth_unavailable` while the
    /// records have never been read.
    pub fn authenticate(&self, key: &TenantKey) -> Result<Option<(String, String)>, GatewayError> {
        let Some(key_id) = runtime_key_id(key.as_str())? else {
            return Ok(None);
        };
        let snap = self.snapshot();
        if snap.version.is_none() {
            return Err(GatewayError::AuthUnavailable {
                retry_after_secs: 1,
            });
        }
        let known = snap
            .keys
            .get(key_id)
            .ok_or(GatewayError::InvalidCredentials)?;
        let digest = key.digest();
        let mut matched: Option<Option<i64>> = None;
        for (d, until) in &known.digests {
            if bool::from(d.ct_eq(&digest)) {
                matched = Some(*until);
            }
        }
        let now = self.now();
        match matched {
            None => Err(GatewayError::InvalidCredentials),
            Some(Some(until)) if until <= now => Err(GatewayError::KeyExpired),
            Some(_) if known.record.expires_at.is_some_and(|e| e <= now) => {
                Err(GatewayError::KeyExpired)
            }
            Some(_) => {
                self.note_use(&KeyRecord::record_id(key_id));
                Ok(Some((known.record.tenant.clone(), key_id.to_string())))
            }
        }
    }

    /// Note that a key was used now (written to the store by `keep_current`, once a minute).
    pub fn note_use(&self, id: &str) {
        let minute = self.now() / 60 * 60;
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        match uses.get_mut(id) {
            Some(at) => *at = minute,
            None => {
                uses.insert(id.to_string(), minute);
            }
        }
    }

    /// The calls granted to a tenant now, added to each of its budgets.
    pub fn granted(&self, tenant: &str) -> u64 {
        let now = self.now();
        self.snapshot()
            .grants
            .iter()
            .filter(|g| g.tenant == tenant && g.in_force(now))
            .fold(0u64, |sum, g| sum.saturating_add(g.calls))
    }

    /// A tenant's budgets as they stand now: the config's, with the calls granted for now
    /// added to each. What a call is held against, and what every report of it shows.
    pub fn budget(&self, t: &TenantConfig) -> BudgetLimits {
        let granted = self.granted(&t.id);
        BudgetLimits {
            daily: t.daily_budget.map(|l| l.saturating_add(granted)),
            monthly: t.monthly_budget.map(|l| l.saturating_add(granted)),
        }
    }

    /// A tenant's grants not yet ended, soonest to end first.
    pub fn grants(&self, tenant: &str) -> Vec<Grant> {
        let now = self.now();
        let mut out: Vec<Grant> = self
            .snapshot()
            .grants
            .iter()
            .filter(|g| g.tenant == tenant && g.until > now)
            .cloned()
            .collect();
        out.sort_by_key(|g| (g.until, g.grant_id.clone()));
        out
    }

    /// A tenant's runtime keys, oldest first.
    pub fn keys(&self, tenant: &str) -> Vec<KeyRecord> {
        let mut out: Vec<KeyRecord> = self
            .snapshot()
            .keys
            .values()
            .filter(|k| k.record.tenant == tenant)
            .map(|k| k.record.clone())
            .collect();
        out.sort_by_key(|k| (k.created, k.key_id.clone()));
        out
    }

    /// Whether a record of this id was there at the last read.
    pub fn has(&self, id: &str) -> bool {
        self.snapshot().raw.contains_key(id)
    }

    /// Every runtime key, of every tenant.
    pub fn all_keys(&self) -> Vec<KeyRecord> {
        let mut out: Vec<KeyRecord> = self
            .snapshot()
            .keys
            .values()
            .map(|k| k.record.clone())
            .collect();
        out.sort_by_key(|k| (k.created, k.key_id.clone()));
        out
    }

    /// The records (as stored) whose id starts with `prefix`, as last read: the ones the admin
    /// API does not issue (`notify`'s events and latches) live beside them.
    pub fn raw(&self, prefix: &str) -> Vec<(String, String)> {
        self.snapshot()
            .raw
            .range(prefix.to_string()..)
            .take_while(|(id, _)| id.starts_with(prefix))
            .map(|(id, v)| (id.clone(), v.clone()))
            .collect()
    }

    /// When each key was last used (Unix seconds, to the minute), by record id.
    pub async fn last_used(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut used = self.store.touched().await?;
        for (id, at) in self.uses.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let e = used.entry(id.clone()).or_default();
            *e = (*e).max(*at);
        }
        Ok(used)
    }

    /// Read the records again when their version moved (or was never read).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let known = self.snapshot().version;
        if known.is_some() && known == Some(self.store.version().await?) {
            return Ok(());
        }
        let (version, raw) = self.store.records().await?;
        let snap = Snapshot::of(version, raw);
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        Ok(())
    }

    /// Write the uses noted since the last call.
    async fn write_uses(&self) -> Result<(), StoreError> {
        let fresh: Vec<(String, i64)> = {
            let uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
            let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            uses.iter()
                .filter(|(id, at)| written.get(*id).is_none_or(|w| w < at))
                .map(|(id, at)| (id.clone(), *at))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        self.store.touch(&fresh).await?;
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        for (id, at) in fresh {
            written.insert(id, at);
        }
        Ok(())
    }

    /// Remove the grants that ended more than a day ago (any replica may: a removal names the
    /// value it removes).
    async fn prune(&self) -> Result<(), StoreError> {
        let now = self.now();
        let snap = self.snapshot();
        for g in snap
            .grants
            .iter()
            .filter(|g| g.until + ENDED_GRANTS_KEPT < now)
        {
            let id = Grant::record_id(&g.grant_id);
            if let Some(raw) = snap.raw.get(&id) {
                self.store.swap(&id, Some(raw), None).await?;
            }
        }
        Ok(())
    }

    /// Keep this replica's snapshot current and write its keys' uses, every `POLL`, for as
    /// long as the process runs.
    pub async fn keep_current(&self) {
        let mut failing = false;
        let mut next_prune = tokio::time::Instant::now();
        loop {
            let r = async {
                self.refresh().await?;
                self.write_uses().await?;
                if tokio::time::Instant::now() >= next_prune {
                    self.prune().await?;
                    next_prune = tokio::time::Instant::now() + Duration::from_secs(600);
                }
                Ok::<(), StoreError>(())
            }
            .await;
            match r {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("cannot read the runtime keys and grants (those last read stay in force): {e}");
                }
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("the runtime keys and grants are read again");
                }
                _ => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Write a new record under a fresh id (`make` builds it from the id), trying a new id if
    /// the first is taken.
    async fn insert<T: Serialize>(
        &self,
        prefix: &str,
        id_digits: usize,
        make: impl Fn(String) -> T,
    ) -> Result<T, IssueError> {
        for _ in 0..4 {
            let id = new_id(id_digits);
            let value = make(id.clone());
            let text = serde_json::to_string(&value).map_err(|e| StoreError(e.to_string()))?;
            if self
                .store
                .swap(&format!("{prefix}/{id}"), None, Some(&text))
                .await?
            {
                let _ = self.refresh().await;
                return Ok(value);
            }
        }
        Err(IssueError::Contended)
    }

    /// Change a record with `f` (`None`: remove it), naming the value it replaces; read again
    /// and retried when another change came first. What it was before, and what it is now.
    /// `unknown` when there is no such record, or `f` refuses it.
    async fn change<T: Serialize + for<'de> Deserialize<'de>>(
        &self,
        id: &str,
        unknown: fn() -> IssueError,
        f: impl Fn(T) -> Result<Option<T>, IssueError>,
    ) -> Result<(T, Option<T>), IssueError> {
        let parse = |text: &str| -> Result<T, IssueError> {
            serde_json::from_str(text).map_err(|e| StoreError(e.to_string()).into())
        };
        for _ in 0..4 {
            let (_, raw) = self.store.records().await?;
            let was = raw.get(id).ok_or_else(unknown)?;
            let next = f(parse(was)?)?;
            let text = match &next {
                Some(v) => Some(serde_json::to_string(v).map_err(|e| StoreError(e.to_string()))?),
                None => None,
            };
            if self.store.swap(id, Some(was), text.as_deref()).await? {
                let _ = self.refresh().await;
                return Ok((parse(was)?, next));
            }
        }
        Err(IssueError::Contended)
    }

    /// A new key for a tenant; its secret is in the answer only.
    pub async fn create(
        &self,
        tenant: &str,
        label: &str,
        expires_in: Option<Duration>,
    ) -> Result<Issued, IssueError> {
        let now = self.now();
        let secret = Mutex::new(String::new());
        let record = self
            .insert("key", KEY_ID_HEX, |key_id| {
                let key = new_key(&key_id);
                let sha256 = crate::config::key_digest_hex(&key);
                *secret.lock().unwrap_or_else(|p| p.into_inner()) = key;
                KeyRecord {
                    key_id,
                    tenant: tenant.to_string(),
                    label: label.to_string(),
                    created: now,
                    expires_at: expires_in.map(|d| now + d.as_secs() as i64),
                    rotated: None,
                    secrets: vec![Secret {
                        sha256,
                        until: None,
                    }],
                }
            })
            .await?;
        let key = secret.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(Issued { record, key })
    }

    /// A new secret for a key, under the same key id; the secret it replaces stays valid for
    /// `grace`. `expires_in`: a new expiry from now, else the key keeps its own.
    pub async fn rotate(
        &self,
        tenant: &str,
        key_id: &str,
        grace: Duration,
        expires_in: Option<Duration>,
    ) -> Result<Issued, IssueError> {
        let key = new_key(key_id);
        let sha256 = crate::config::key_digest_hex(&key);
        let now = self.now();
        let record = self
            .change(
                &KeyRecord::record_id(key_id),
                || IssueError::UnknownKey,
                |mut r: KeyRecord| {
                    if r.tenant != tenant {
                        return Err(IssueError::UnknownKey);
                    }
                    rotated(&mut r, &sha256, now, grace)?;
                    if let Some(d) = expires_in {
                        r.expires_at = Some(now + d.as_secs() as i64);
                    }
                    Ok(Some(r))
                },
            )
            .await?
            .1
            .ok_or(IssueError::UnknownKey)?;
        Ok(Issued { record, key })
    }

    /// Revoke a key: refused from the next request on, on every replica within `POLL`.
    pub async fn revoke(&self, tenant: &str, key_id: &str) -> Result<KeyRecord, IssueError> {
        let gone = |r: KeyRecord| match r.tenant == tenant {
            true => Ok(None),
            false => Err(IssueError::UnknownKey),
        };
        let id = KeyRecord::record_id(key_id);
        Ok(self.change(&id, || IssueError::UnknownKey, gone).await?.0)
    }

    /// Grant a tenant `calls` more in each of its budgets from now until `until`.
    pub async fn grant(
        &self,
        tenant: &str,
        calls: u64,
        until: i64,
        reason: &str,
    ) -> Result<Grant, IssueError> {
        let from = self.now();
        self.insert("grant", 12, |grant_id| Grant {
            grant_id,
            tenant: tenant.to_string(),
            calls,
            from,
            until,
            reason: reason.to_string(),
        })
        .await
    }

    /// End a grant now.
    pub async fn end_grant(&self, tenant: &str, grant_id: &str) -> Result<Grant, IssueError> {
        let gone = |g: Grant| match g.tenant == tenant {
            true => Ok(None),
            false => Err(IssueError::UnknownGrant),
        };
        let id = Grant::record_id(grant_id);
        Ok(self.change(&id, || IssueError::UnknownGrant, gone).await?.0)
    }
}

/// A key's record after a rotation at `now` to the secret of digest `sha256`. Every secret it
/// replaces stays valid for `grace` more at most (none: not at all), never past an end it had
/// already (a grace, or the key's expiry: an expired key's secrets stay refused).
/// `TooManySecrets` when more than `MAX_SECRETS` would be valid at once.
fn rotated(r: &mut KeyRecord, sha256: &str, now: i64, grace: Duration) -> Result<(), IssueError> {
    let grace_end = now + grace.as_secs() as i64;
    let mut secrets = vec![Secret {
        sha256: sha256.to_string(),
        until: None,
    }];
    for s in &r.secrets {
        let ends = [s.until, r.expires_at, Some(grace_end)];
        let until = ends.into_iter().flatten().min().unwrap_or(grace_end);
        if until > now {
            secrets.push(Secret {
                sha256: s.sha256.clone(),
                until: Some(until),
            });
        }
    }
    if secrets.len() > MAX_SECRETS {
        return Err(IssueError::TooManySecrets);
    }
    r.secrets = secrets;
    r.rotated = Some(now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_keys_are_recognised_and_checked_without_a_lookup() {
        let key = new_key("0123456789ab");
        assert_eq!(key.len(), 4 + 12 + 1 + 48 + 8);
        assert_eq!(runtime_key_id(&key), Ok(Some("0123456789ab")));
        // Not a runtime key: a config key.
        assert_eq!(runtime_key_id("lgk_abc"), Ok(None));
        assert_eq!(runtime_key_id("anything"), Ok(None));
        // One character changed anywhere: refused by the checksum (or the form).
        for i in KEY_PREFIX.len()..key.len() {
            let mut b = key.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let typo = String::from_utf8(b).expect("ascii");
            assert_eq!(
                runtime_key_id(&typo),
                Err(GatewayError::InvalidCredentials),
                "{i}"
            );
        }
        // Cut short, or with a capital letter.
        assert!(runtime_key_id(&key[..key.len() - 1]).is_err());
        assert!(runtime_key_id(&key.to_uppercase().replacen("LGR_", "lgr_", 1)).is_err());
    }

    #[test]
    fn a_rotation_keeps_the_replaced_secrets_for_its_grace_only() {
        let mut r = KeyRecord {
            key_id: "0123456789ab".into(),
            tenant: "t".into(),
            label: String::new(),
            created: 0,
            expires_at: None,
            rotated: None,
            secrets: vec![Secret {
                sha256: "a".into(),
                until: None,
            }],
        };
        let secret = |s: &str, until: Option<i64>| Secret {
            sha256: s.into(),
            until,
        };
        rotated(&mut r, "b", 100, Duration::from_secs(50)).expect("rotated");
        assert_eq!(r.secrets, vec![secret("b", None), secret("a", Some(150))]);
        assert_eq!(r.grace_until(120), Some(150));
        // A longer grace does not lengthen an older secret's; a shorter one shortens it.
        rotated(&mut r, "c", 110, Duration::from_secs(100)).expect("rotated");
        assert_eq!(
            r.secrets,
            vec![
                secret("c", None),
                secret("b", Some(210)),
                secret("a", Some(150))
            ]
        );
        rotated(&mut r, "d", 120, Duration::from_secs(10)).expect("rotated");
        assert_eq!(
            r.secrets,
            vec![
                secret("d", None),
                secret("c", Some(130)),
                secret("b", Some(130)),
                secret("a", Some(130))
            ]
        );
        // One more within the grace would make five at once: refused, nothing changed.
        let before = r.clone();
        assert!(matches!(
            rotated(&mut r, "e", 125, Duration::from_secs(10)),
            Err(IssueError::TooManySecrets)
        ));
        assert_eq!(r.secrets, before.secrets);
        // With no grace every older secret ends at once.
        rotated(&mut r, "e", 125, Duration::ZERO).expect("rotated");
        assert_eq!(r.secrets, vec![secret("e", None)]);
        assert_eq!(r.grace_until(125), None);
        // An expired key's secret gets no grace from a rotation.
        r.expires_at = Some(200);
        rotated(&mut r, "f", 300, Duration::from_secs(3600)).expect("rotated");
        assert_eq!(r.secrets, vec![secret("f", None)]);
        // One about to expire keeps it until its expiry at most.
        r.expires_at = Some(400);
        rotated(&mut r, "g", 390, Duration::from_secs(3600)).expect("rotated");
        assert_eq!(r.secrets, vec![secret("g", None), secret("f", Some(400))]);
    }

    #[test]
    fn a_snapshot_reads_keys_and_grants_and_skips_what_it_cannot_read() {
        let key = KeyRecord {
            key_id: "0123456789ab".into(),
            tenant: "t".into(),
            label: "ci".into(),
            created: 1,
            expires_at: None,
            rotated: None,
            secrets: vec![Secret {
                sha256: crate::config::key_digest_hex("x"),
                until: None,
            }],
        };
        let grant = Grant {
            grant_id: "g".into(),
            tenant: "t".into(),
            calls: 5,
            from: 0,
            until: 10,
            reason: String::new(),
        };
        let raw = BTreeMap::from([
            (
                "key/0123456789ab".to_string(),
                serde_json::to_string(&key).expect("json"),
            ),
            (
                "grant/g".to_string(),
                serde_json::to_string(&grant).expect("json"),
            ),
            ("key/bad".to_string(), "{".to_string()),
            ("other/x".to_string(), "{}".to_string()),
        ]);
        let s = Snapshot::of(7, raw);
        assert_eq!(s.version, Some(7));
        assert_eq!(s.keys.len(), 1);
        assert_eq!(s.keys["0123456789ab"].digests.len(), 1);
        assert_eq!(s.grants, vec![grant.clone()]);
        assert!(grant.in_force(0) && grant.in_force(9) && !grant.in_force(10));
    }
}
