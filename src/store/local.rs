//! The single-node store: budgets counted in memory and in a small JSON state file, written
//! atomically (write, fsync, rename) every flush interval and at shutdown. A failed write changes
//! nothing in memory: the counts wait for the next flush. The state file also keeps the usage
//! history (billable calls, the uncertain among them, cache hits, refusals per day) for 400 days.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::{
    BudgetLimits, ClaimReply, Claims, Clock, Counts, DayUsage, Hold, Noted, Replays, Settle,
    SharedVerdict, Store, StoreError, Usage,
};
use crate::budget::{Calendar, Periods};
use crate::egress::Egress;
use crate::error::GatewayError;

/// One period of one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    /// Calls counted: the state file's count when last read, plus this process's since.
    used: u64,
    /// The part of `used` not yet in the state file.
    /// Negative after an adjustment that took calls away (a refund).
    pending: i64,
    /// Calls in flight that may still be counted.
    reserved: u64,
}

#[derive(Debug, Clone, Default)]
struct Ledger {
    days: BTreeMap<String, Tally>,
    months: BTreeMap<String, Tally>,
    /// Cache hits per day (usage history only: `reserved` stays 0).
    hits: BTreeMap<String, Tally>,
    /// Refusals per day (usage history only).
    rejected: BTreeMap<String, Tally>,
    /// Billable calls per day and organization key, as `YYYY-MM-DD/<key id>` (usage history only).
    by_key: BTreeMap<String, Tally>,
    /// Billable calls per day of each app-token subject with a budget, as `YYYY-MM-DD/<hash>`:
    /// today's and yesterday's only.
    subjects: BTreeMap<String, Tally>,
    /// The uncertain part of the billable calls, per day and organization key as `by_key`
    /// (usage history only; the tenant's day is their sum).
    uncertain: BTreeMap<String, Tally>,
}

impl Ledger {
    fn tallies(&mut self, p: &Periods) -> [&mut Tally; 2] {
        [
            self.days.entry(p.day.clone()).or_default(),
            self.months.entry(p.month.clone()).or_default(),
        ]
    }

    /// Every series, in the order of `FileLedger::series`.
    fn series(&mut self) -> [&mut BTreeMap<String, Tally>; 7] {
        [
            &mut self.days,
            &mut self.months,
            &mut self.hits,
            &mut self.rejected,
            &mut self.by_key,
            &mut self.subjects,
            &mut self.uncertain,
        ]
    }
}

/// How long the state file keeps past periods (usage history for chargeback).
const KEEP_DAYS: usize = 400;
const KEEP_MONTHS: usize = 36;

/// The state file: used calls per tenant and period.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileLedger {
    days: BTreeMap<String, u64>,
    months: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    hits: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rejected: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    by_key: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    subjects: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    uncertain: BTreeMap<String, u64>,
}

impl FileLedger {
    fn series(&mut self) -> [&mut BTreeMap<String, u64>; 7] {
        [
            &mut self.days,
            &mut self.months,
            &mut self.hits,
            &mut self.rejected,
            &mut self.by_key,
            &mut self.subjects,
            &mut self.uncertain,
        ]
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    tenants: HashMap<String, FileLedger>,
}

/// Version 1 kept only the current day and month.
#[derive(Deserialize)]
struct StateFileV1 {
    tenants: HashMap<String, CountsV1>,
}

#[derive(Deserialize)]
struct CountsV1 {
    day: String,
    day_used: u64,
    month: String,
    month_used: u64,
}

/// The single-node store: counts in memory, persisted to an optional state file.
pub struct LocalStore {
    ledgers: Mutex<HashMap<String, Ledger>>,
    /// The holds in flight and the holds committed lately, by id: a claim or a commit sent
    /// twice counts once, and a hold given back never frees another (taken before `ledgers`).
    calls: Mutex<Calls>,
    /// Single-use ids seen (scope and id), with when they may be forgotten (Unix ms). In memory
    /// only: a restart forgets them (the tokens they belong to are short-lived).
    used_ids: Mutex<HashMap<(String, String), i64>>,
    path: Option<PathBuf>,
    calendar: Calendar,
}

impl LocalStore {
    /// Open the store, reading the state file if there is one; days and months in UTC.
    pub fn open(path: Option<PathBuf>) -> anyhow::Result<Arc<LocalStore>> {
        LocalStore::open_in(path, Calendar::default())
    }

    /// Open the store with days and months in `calendar`.
    pub fn open_in(path: Option<PathBuf>, calendar: Calendar) -> anyhow::Result<Arc<LocalStore>> {
        let mut ledgers = HashMap::new();
        if let Some(p) = &path {
            adopt(&mut ledgers, &read_state(p)?);
        }
        Ok(Arc::new(LocalStore {
            ledgers: Mutex::new(ledgers),
            calls: Mutex::default(),
            used_ids: Mutex::new(HashMap::new()),
            path,
            calendar,
        }))
    }

    fn with<T>(&self, tenant: &str, f: impl FnOnce(&mut Ledger) -> T) -> T {
        let mut map = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(tenant.to_string()).or_default())
    }
}

/// Take the file's counts as the base of `used`, keeping this process's pending calls on top.
fn adopt(ledgers: &mut HashMap<String, Ledger>, file: &HashMap<String, FileLedger>) {
    for (tenant, f) in file {
        let l = ledgers.entry(tenant.clone()).or_default();
        let mut f = f.clone();
        for (mine, theirs) in l.series().into_iter().zip(f.series()) {
            for (period, used) in theirs {
                let t = mine.entry(period.clone()).or_default();
                t.used = used.saturating_add_signed(t.pending);
            }
        }
    }
}

/// How long a committed hold is remembered: a commit sent again comes well within it (the
/// fleet's store keeps its marker as long).
const COMMITTED_KEPT: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Calls {
    held: HashMap<String, Hold>,
    committed: HashMap<String, Instant>,
}

impl Calls {
    /// Whether `id` was committed lately; forgets, now and then, those committed long ago (the
    /// map stays as large as the calls of `COMMITTED_KEPT`).
    fn committed(&mut self, id: &str) -> bool {
        let n = self.committed.len();
        if n >= 1024 && n.is_power_of_two() {
            self.committed.retain(|_, at| at.elapsed() < COMMITTED_KEPT);
        }
        self.committed
            .get(id)
            .is_some_and(|at| at.elapsed() < COMMITTED_KEPT)
    }
}

impl LocalStore {
    /// Hold one call of the tenant's budget and, when the hold names one, of its subject's
    /// daily budget: both or neither, in the hold's periods. A hold held already holds once.
    fn reserve(&self, hold: &Hold) -> Result<(), GatewayError> {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        if !hold.has_budget() || calls.held.contains_key(&hold.id) {
            return Ok(());
        }
        let periods = &hold.periods;
        let subject_key = |name: &str| format!("{}/{name}", periods.day);
        let (limits, now) = (hold.limits, hold.taken);
        self.with(&hold.tenant, |l| {
            if let Some((name, limit)) = &hold.subject {
                let s = l.subjects.entry(subject_key(name)).or_default();
                if s.used + s.reserved >= *limit {
                    return Err(GatewayError::SubjectBudgetExhausted {
                        retry_after_secs: self.calendar.secs_to_next_day(now),
                    });
                }
            }
            let [day, month] = l.tallies(periods);
            if let Some(limit) = limits.daily {
                if day.used + day.reserved >= limit {
                    return Err(GatewayError::BudgetExhausted {
                        period: "daily",
                        retry_after_secs: self.calendar.secs_to_next_day(now),
                    });
                }
            }
            if let Some(limit) = limits.monthly {
                if month.used + month.reserved >= limit {
                    return Err(GatewayError::BudgetExhausted {
                        period: "monthly",
                        retry_after_secs: self.calendar.secs_to_next_month(now),
                    });
                }
            }
            day.reserved += 1;
            month.reserved += 1;
            if let Some((name, _)) = &hold.subject {
                if let Some(s) = l.subjects.get_mut(&subject_key(name)) {
                    s.reserved += 1;
                }
            }
            Ok(())
        })?;
        calls.held.insert(hold.id.clone(), hold.clone());
        Ok(())
    }

    /// Count a call, once per hold, in the periods it was held in; `uncertain` also counts it
    /// apart (see `Settle::Commit`). Its hold, if it still has one, is given back.
    fn commit(&self, hold: &Hold, org_key: &str, uncertain: bool) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.committed(&hold.id) {
            return;
        }
        calls.committed.insert(hold.id.clone(), Instant::now());
        let held = calls.held.remove(&hold.id).is_some();
        let periods = &hold.periods;
        self.with(&hold.tenant, |l| {
            let count = |t: &mut Tally| {
                if held {
                    t.reserved = t.reserved.saturating_sub(1);
                }
                t.used += 1;
                t.pending += 1;
            };
            if let Some((name, _)) = &hold.subject {
                count(
                    l.subjects
                        .entry(format!("{}/{name}", periods.day))
                        .or_default(),
                );
            }
            for t in l.tallies(periods) {
                count(t);
            }
            let key = format!("{}/{org_key}", periods.day);
            if uncertain {
                let u = l.uncertain.entry(key.clone()).or_default();
                u.used += 1;
                u.pending += 1;
            }
            let k = l.by_key.entry(key).or_default();
            k.used += 1;
            k.pending += 1;
        });
    }

    /// Add `delta` calls (negative: a refund) to the current day and month, never below zero.
    pub fn adjust(&self, tenant: &str, now: DateTime<Utc>, delta: i64) -> Counts {
        let periods = self.calendar.periods(now);
        self.with(tenant, |l| {
            for t in l.tallies(&periods) {
                let new = t.used.saturating_add_signed(delta);
                t.pending += new as i64 - t.used as i64;
                t.used = new;
            }
        });
        LocalStore::counts(self, tenant, now)
    }

    /// Give a hold back, if it is still held.
    fn release(&self, hold: &Hold) {
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        if calls.held.remove(&hold.id).is_none() {
            return;
        }
        let periods = &hold.periods;
        self.with(&hold.tenant, |l| {
            if let Some((name, _)) = &hold.subject {
                if let Some(t) = l.subjects.get_mut(&format!("{}/{name}", periods.day)) {
                    t.reserved = t.reserved.saturating_sub(1);
                }
            }
            for t in l.tallies(periods) {
                t.reserved = t.reserved.saturating_sub(1);
            }
        });
    }

    /// Forget subjects' counts of days before yesterday that have nothing in flight or
    /// unwritten: a subject's budget is a day's, and subjects are many.
    fn forget_old_subjects(&self) {
        let yesterday = self.calendar.day(Utc::now() - chrono::Duration::days(1));
        let mut map = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        for l in map.values_mut() {
            l.subjects.retain(|k, t| {
                k.as_str() >= yesterday.as_str() || t.reserved > 0 || t.pending != 0
            });
        }
    }

    pub fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Counts {
        let p = self.calendar.periods(now);
        let map = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        let l = map.get(tenant);
        let used = |m: Option<&BTreeMap<String, Tally>>, k: &str| {
            m.and_then(|m| m.get(k)).map_or(0, |t| t.used)
        };
        Counts {
            day_used: used(l.map(|l| &l.days), &p.day),
            month_used: used(l.map(|l| &l.months), &p.month),
            day: p.day,
            month: p.month,
        }
    }

    /// Add this process's new calls to the state file and adopt the file's totals, under a file
    /// lock. Another process sharing the file (the old and the new one during an upgrade) adds
    /// its own the same way, so no count is lost whichever writes last. Memory changes only
    /// after the file is safely written: a failed write loses nothing.
    pub fn flush(&self) -> std::io::Result<()> {
        self.forget_old_subjects();
        let Some(path) = &self.path else {
            return Ok(());
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path(path))
            .map_err(|e| in_file(&lock_path(path), e))?;
        lock.lock().map_err(|e| in_file(path, e))?;
        let mut file = read_state(path)?;
        // What this flush writes: (tenant, series, period, count).
        let mut flushed = Vec::new();
        {
            let mut map = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
            for (tenant, l) in map.iter_mut() {
                for (series, mine) in l.series().into_iter().enumerate() {
                    for (period, t) in mine.iter().filter(|(_, t)| t.pending != 0) {
                        let f = file.entry(tenant.clone()).or_default();
                        let v = f.series()[series].entry(period.clone()).or_default();
                        *v = v.saturating_add_signed(t.pending);
                        flushed.push((tenant.clone(), series, period.clone(), t.pending));
                    }
                }
            }
        }
        if !flushed.is_empty() {
            prune(&mut file);
            let text = serde_json::to_vec_pretty(&StateFile {
                version: 2,
                tenants: file.clone(),
            })
            .map_err(std::io::Error::other)?;
            write_atomically(path, &text).map_err(|e| in_file(path, e))?;
        }
        let mut map = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        for (tenant, series, period, n) in flushed {
            if let Some(l) = map.get_mut(&tenant) {
                if let Some(t) = l.series()[series].get_mut(&period) {
                    t.pending -= n;
                }
            }
        }
        adopt(&mut map, &file);
        drop(map);
        lock.unlock()
    }
}

#[async_trait]
impl Clock for LocalStore {
    fn calendar(&self) -> Calendar {
        self.calendar
    }
}

#[async_trait]
impl Claims for LocalStore {
    /// No shared level here: whatever image it is for, the call may go once its budget is held.
    async fn claim(&self, hold: &Hold, _: &Egress) -> Result<ClaimReply, GatewayError> {
        self.reserve(hold)?;
        Ok(ClaimReply::Go)
    }

    async fn settle(&self, hold: &Hold, how: Settle, _: Option<(&SharedVerdict, Duration)>) {
        match how {
            Settle::Commit { org_key, uncertain } => self.commit(hold, &org_key, uncertain),
            Settle::Release => self.release(hold),
        }
    }

    fn abandon(&self, hold: &Hold) {
        self.release(hold);
    }
}

#[async_trait]
impl Usage for LocalStore {
    async fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Result<Counts, StoreError> {
        Ok(LocalStore::counts(self, tenant, now))
    }

    async fn adjust(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        delta: i64,
    ) -> Result<Counts, StoreError> {
        Ok(LocalStore::adjust(self, tenant, now, delta))
    }

    async fn history(
        &self,
        tenants: &[String],
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DayUsage>, StoreError> {
        let map = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for tenant in tenants {
            let l = map.get(tenant);
            let count = |m: Option<&BTreeMap<String, Tally>>, day: &str| {
                m.and_then(|m| m.get(day)).map_or(0, |t| t.used)
            };
            for d in super::days(from, to) {
                let day = d.format("%Y-%m-%d").to_string();
                let billable_by_key = l
                    .map(|l| of_day(&l.by_key, &day).collect())
                    .unwrap_or_default();
                let uncertain_by_key: BTreeMap<String, u64> = l
                    .map(|l| of_day(&l.uncertain, &day).collect())
                    .unwrap_or_default();
                out.push(DayUsage {
                    tenant: tenant.clone(),
                    billable: count(l.map(|l| &l.days), &day),
                    uncertain: uncertain_by_key.values().sum(),
                    cache_hits: count(l.map(|l| &l.hits), &day),
                    rejected: count(l.map(|l| &l.rejected), &day),
                    billable_by_key,
                    uncertain_by_key,
                    day,
                });
            }
        }
        Ok(out)
    }

    async fn top_subjects(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let day = self.calendar.day(now);
        let map = self.ledgers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, u64)> = map
            .get(tenant)
            .map(|l| of_day(&l.subjects, &day).collect())
            .unwrap_or_default();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out.truncate(limit);
        Ok(out)
    }

    fn note(&self, tenant: &str, what: Noted) {
        let day = self.calendar.day(Utc::now());
        self.with(tenant, |l| {
            let series = match what {
                Noted::CacheHit => &mut l.hits,
                Noted::Rejected => &mut l.rejected,
            };
            let t = series.entry(day).or_default();
            t.used += 1;
            t.pending += 1;
        });
    }

    async fn flush(&self) -> Result<(), StoreError> {
        LocalStore::flush(self).map_err(|e| StoreError(e.to_string()))
    }

    fn flush_at_exit(&self) -> Result<(), StoreError> {
        LocalStore::flush(self).map_err(|e| StoreError(e.to_string()))
    }
}

#[async_trait]
impl Replays for LocalStore {
    async fn first_use(&self, scope: &str, id: &str, until_ms: i64) -> Result<bool, StoreError> {
        let now = Utc::now().timestamp_millis();
        let mut used = self.used_ids.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the expired now and then: the map stays as large as the tokens alive.
        if used.len() >= 1024 && used.len().is_power_of_two() {
            used.retain(|_, until| *until > now);
        }
        let key = (scope.to_string(), id.to_string());
        match used.get(&key) {
            Some(until) if *until > now => Ok(false),
            _ => {
                used.insert(key, until_ms.max(now + 1000));
                Ok(true)
            }
        }
    }

    async fn forget_use(&self, scope: &str, id: &str) -> Result<(), StoreError> {
        let mut used = self.used_ids.lock().unwrap_or_else(|p| p.into_inner());
        used.remove(&(scope.to_string(), id.to_string()));
        Ok(())
    }
}

/// This process alone: no shared level.
impl Store for LocalStore {}

/// The used counts of one day in a series keyed `YYYY-MM-DD/<name>`: (name, count), none zero.
fn of_day<'a>(
    series: &'a BTreeMap<String, Tally>,
    day: &str,
) -> impl Iterator<Item = (String, u64)> + 'a {
    let prefix = format!("{day}/");
    let len = prefix.len();
    series
        .range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
        .filter(|(_, t)| t.used > 0)
        .map(move |(k, t)| (k[len..].to_string(), t.used))
}

/// Keep the newest `KEEP_DAYS` days and `KEEP_MONTHS` months of each tenant (keys sort by time).
fn prune(file: &mut HashMap<String, FileLedger>) {
    fn keep_last(m: &mut BTreeMap<String, u64>, n: usize) {
        while m.len() > n {
            m.pop_first();
        }
    }
    for f in file.values_mut() {
        keep_last(&mut f.days, KEEP_DAYS);
        keep_last(&mut f.months, KEEP_MONTHS);
        keep_last(&mut f.hits, KEEP_DAYS);
        keep_last(&mut f.rejected, KEEP_DAYS);
        // Per key, the days the day counts keep (every commit counts in both).
        if let Some(first) = f.days.keys().next().cloned() {
            f.by_key.retain(|k, _| k.as_str() >= first.as_str());
            f.uncertain.retain(|k, _| k.as_str() >= first.as_str());
        }
        // Subjects: their last two days (today's budget, and a call settled after midnight).
        if let Some(last) = f
            .days
            .keys()
            .nth_back(1)
            .or(f.days.keys().next_back())
            .cloned()
        {
            f.subjects.retain(|k, _| k.as_str() >= last.as_str());
        }
    }
}

/// An I/O error that names the file it is about.
fn in_file(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".lock");
    path.with_file_name(name)
}

fn read_state(path: &Path) -> std::io::Result<HashMap<String, FileLedger>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(in_file(path, e)),
    };
    let invalid = |e: serde_json::Error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    };
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    match serde_json::from_str::<Version>(&text)
        .map_err(invalid)?
        .version
    {
        1 => Ok(serde_json::from_str::<StateFileV1>(&text)
            .map_err(invalid)?
            .tenants
            .into_iter()
            .map(|(t, c)| {
                let f = FileLedger {
                    days: BTreeMap::from([(c.day, c.day_used)]),
                    months: BTreeMap::from([(c.month, c.month_used)]),
                    ..FileLedger::default()
                };
                (t, f)
            })
            .collect()),
        _ => Ok(serde_json::from_str::<StateFile>(&text)
            .map_err(invalid)?
            .tenants),
    }
}

/// Write to a temporary file beside the target, fsync it, rename it over the target, fsync the folder.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("budget-state")
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    /// Hold one call of tenant `t`, taken at `taken`, in the store's calendar.
    fn reserve(
        b: &LocalStore,
        limits: BudgetLimits,
        subject: Option<&(String, u64)>,
        taken: DateTime<Utc>,
    ) -> Result<Hold, GatewayError> {
        let h = Hold {
            id: uuid::Uuid::new_v4().simple().to_string(),
            tenant: "t".into(),
            limits,
            periods: b.calendar.periods(taken),
            taken,
            shared: None,
            subject: subject.cloned(),
        };
        b.reserve(&h).map(|()| h)
    }

    fn daily(n: u64) -> BudgetLimits {
        BudgetLimits {
            daily: Some(n),
            monthly: None,
        }
    }

    #[test]
    fn reserve_commit_release_never_overshoot() {
        let b = LocalStore::open(None).expect("open");
        let lim = daily(2);
        let now = at("2026-11-25T10:00:00Z");
        let p1 = reserve(&b, lim, None, now).expect("1");
        let p2 = reserve(&b, lim, None, now).expect("2");
        assert!(matches!(
            reserve(&b, lim, None, now),
            Err(GatewayError::BudgetExhausted {
                period: "daily",
                ..
            })
        ));
        b.release(&p1);
        let p3 = reserve(&b, lim, None, now).expect("released slot is reusable");
        b.commit(&p2, "default", false);
        b.commit(&p3, "default", false);
        assert_eq!(b.counts("t", now).day_used, 2);
        assert!(reserve(&b, lim, None, now).is_err());
        // A new UTC day starts from zero; the month goes on counting.
        let tomorrow = at("2026-11-26T00:00:01Z");
        reserve(&b, lim, None, tomorrow).expect("new day");
        assert_eq!(b.counts("t", tomorrow).month_used, 2);
    }

    /// A reservation taken before midnight and released after it gives its slot back to the day
    /// it came from, not to the new day.
    #[test]
    fn a_release_after_midnight_cannot_free_a_slot_of_the_new_day() {
        let b = LocalStore::open(None).expect("open");
        let lim = daily(1);
        let before =
            reserve(&b, lim, None, at("2026-11-25T23:59:59Z")).expect("last call of the day");
        let after =
            reserve(&b, lim, None, at("2026-11-26T00:00:01Z")).expect("first call of the new day");
        b.release(&before);
        assert!(
            reserve(&b, lim, None, at("2026-11-26T00:00:02Z")).is_err(),
            "the new day's one slot is still held"
        );
        b.commit(&after, "default", false);
        let now = at("2026-11-26T00:00:03Z");
        assert_eq!(b.counts("t", now).day_used, 1);
        assert!(reserve(&b, lim, None, now).is_err());
    }

    /// A call reserved before midnight and billed after it counts in the day it was reserved in:
    /// the new day's limit is not overshot by it.
    #[test]
    fn a_commit_after_midnight_counts_in_the_day_it_was_reserved_in() {
        let b = LocalStore::open(None).expect("open");
        let lim = daily(1);
        let before = reserve(&b, lim, None, at("2026-11-25T23:59:59Z")).expect("r");
        let after = reserve(&b, lim, None, at("2026-11-26T00:00:01Z")).expect("r");
        b.commit(&before, "default", false);
        b.commit(&after, "default", false);
        assert_eq!(b.counts("t", at("2026-11-25T23:59:59Z")).day_used, 1);
        assert_eq!(b.counts("t", at("2026-11-26T00:00:02Z")).day_used, 1);
        assert_eq!(b.counts("t", at("2026-11-26T00:00:02Z")).month_used, 2);
    }

    /// A subject's daily budget: held with the tenant's, given back on release, kept in the
    /// state file across a restart, and a new day's from midnight; another subject has its own.
    #[test]
    fn a_subjects_budget_is_held_kept_and_rolls_over() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state.json");
        let b = LocalStore::open(Some(path.clone())).expect("open");
        let none = BudgetLimits {
            daily: None,
            monthly: None,
        };
        let ana = ("ana-hash".to_string(), 1);
        let now = at("2026-11-25T23:59:00Z");
        let p = reserve(&b, none, Some(&ana), now).expect("first");
        assert!(matches!(
            reserve(&b, none, Some(&ana), now),
            Err(GatewayError::SubjectBudgetExhausted { .. })
        ));
        b.release(&p);
        let p = reserve(&b, none, Some(&ana), now).expect("given back");
        b.commit(&p, "default", false);
        reserve(&b, none, Some(&("bo-hash".to_string(), 1)), now).expect("another subject");
        b.flush().expect("flush");
        drop(b);
        let b = LocalStore::open(Some(path)).expect("reopen");
        assert!(matches!(
            reserve(&b, none, Some(&ana), now),
            Err(GatewayError::SubjectBudgetExhausted {
                retry_after_secs: 60
            })
        ));
        reserve(&b, none, Some(&ana), at("2026-11-26T00:00:01Z")).expect("a new day");
    }

    #[test]
    fn month_end_is_the_same_for_monthly_budgets() {
        let b = LocalStore::open(None).expect("open");
        let lim = BudgetLimits {
            daily: None,
            monthly: Some(1),
        };
        let before =
            reserve(&b, lim, None, at("2026-11-30T23:59:59Z")).expect("last call of November");
        let after =
            reserve(&b, lim, None, at("2026-12-01T00:00:01Z")).expect("first call of December");
        b.release(&before);
        assert!(matches!(
            reserve(&b, lim, None, at("2026-12-01T00:00:02Z")),
            Err(GatewayError::BudgetExhausted {
                period: "monthly",
                ..
            })
        ));
        b.commit(&after, "default", false);
        assert_eq!(b.counts("t", at("2026-12-01T00:00:03Z")).month_used, 1);
        assert_eq!(b.counts("t", at("2026-11-30T12:00:00Z")).month_used, 0);
    }

    /// A refund takes calls back from the day and the month, never below zero, and reaches the
    /// state file like any count.
    #[test]
    fn an_adjustment_reaches_the_file_and_never_goes_below_zero() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let b = LocalStore::open(Some(path.clone())).expect("open");
        let now = Utc::now();
        commit_n(&b, 5, now);
        b.flush().expect("flush");
        let c = b.adjust("t", now, -3);
        assert_eq!((c.day_used, c.month_used), (2, 2));
        b.flush().expect("flush");
        let again = LocalStore::open(Some(path.clone())).expect("reopen");
        assert_eq!(again.counts("t", now).day_used, 2);
        assert_eq!(b.adjust("t", now, -10).day_used, 0);
        b.flush().expect("flush");
        assert_eq!(
            LocalStore::open(Some(path))
                .expect("reopen")
                .counts("t", now)
                .month_used,
            0
        );
        assert_eq!(b.adjust("t", now, 4).day_used, 4);
    }

    /// With `budgets.timezone = "Asia/Almaty"` (UTC+5), the day rolls over at 19:00 UTC: a
    /// daily budget of one allows one call just before and one just after, and the refusal's
    /// Retry-After reaches Almaty's midnight.
    #[test]
    fn a_budget_day_rolls_over_at_almaty_midnight() {
        let almaty = Calendar("Asia/Almaty".parse().expect("tz"));
        let b = LocalStore::open_in(None, almaty).expect("open");
        let lim = daily(1);
        let p = reserve(&b, lim, None, at("2026-11-25T18:59:00Z")).expect("last of the 25th");
        b.commit(&p, "default", false);
        match reserve(&b, lim, None, at("2026-11-25T18:59:00Z")) {
            Err(GatewayError::BudgetExhausted {
                retry_after_secs, ..
            }) => assert_eq!(retry_after_secs, 60),
            other => panic!("{other:?}"),
        }
        let p = reserve(&b, lim, None, at("2026-11-25T19:00:01Z"))
            .expect("first of the 26th in Almaty");
        assert_eq!(p.periods.day, "2026-11-26");
        // In UTC both instants are the 25th: the second call would have been refused.
        let utc = LocalStore::open(None).expect("open");
        let q = reserve(&utc, lim, None, at("2026-11-25T18:59:00Z")).expect("r");
        utc.commit(&q, "default", false);
        assert!(reserve(&utc, lim, None, at("2026-11-25T19:00:01Z")).is_err());
    }

    fn commit_n(b: &LocalStore, n: usize, now: DateTime<Utc>) {
        for _ in 0..n {
            let p = reserve(&b, daily(100), None, now).expect("r");
            b.commit(&p, "default", false);
        }
    }

    #[test]
    fn two_processes_sharing_the_file_lose_no_count() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let now = Utc::now();
        let old = LocalStore::open(Some(path.clone())).expect("old");
        commit_n(&old, 3, now);
        old.flush().expect("flush");
        // The new process starts from the file, then both go on counting.
        let new = LocalStore::open(Some(path.clone())).expect("new");
        assert_eq!(new.counts("t", now).day_used, 3);
        commit_n(&new, 2, now);
        commit_n(&old, 1, now);
        new.flush().expect("flush");
        old.flush().expect("flush");
        new.flush().expect("flush");
        assert_eq!(old.counts("t", now).day_used, 6);
        assert_eq!(new.counts("t", now).day_used, 6);
        assert_eq!(
            LocalStore::open(Some(path))
                .expect("reopen")
                .counts("t", now)
                .day_used,
            6
        );
    }

    /// The uncertain part of the billable calls reaches the state file, per day and key, and is
    /// read back after a restart; two processes sharing the file (an upgrade) lose none of it.
    #[tokio::test]
    async fn uncertain_calls_survive_a_restart_and_a_shared_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let now = at("2026-11-25T10:00:00Z");
        let day = NaiveDate::from_ymd_opt(2026, 11, 25).expect("day");
        let old = LocalStore::open(Some(path.clone())).expect("old");
        let p = reserve(&old, daily(10), None, now).expect("r");
        old.commit(&p, "default", true);
        old.flush().expect("flush");
        let new = LocalStore::open(Some(path.clone())).expect("new");
        for (store, key) in [(&new, "retail"), (&old, "default")] {
            let p = reserve(&store, daily(10), None, now).expect("r");
            store.commit(&p, key, true);
            let p = reserve(&store, daily(10), None, now).expect("r");
            store.commit(&p, key, false);
        }
        new.flush().expect("flush");
        old.flush().expect("flush");
        let again = LocalStore::open(Some(path)).expect("reopen");
        let rows = again
            .history(&["t".to_string()], day, day)
            .await
            .expect("history");
        let r = &rows[0];
        assert_eq!((r.billable, r.uncertain), (5, 3));
        assert_eq!(
            r.uncertain_by_key,
            BTreeMap::from([("default".to_string(), 2), ("retail".to_string(), 1)])
        );
        assert_eq!(
            r.billable_by_key,
            BTreeMap::from([("default".to_string(), 3), ("retail".to_string(), 2)])
        );
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let b = LocalStore::open(Some(path.clone())).expect("open");
        let now = Utc::now();
        commit_n(&b, 1, now);
        b.flush().expect("flush");
        let again = LocalStore::open(Some(path)).expect("reopen");
        assert_eq!(again.counts("t", now).day_used, 1);
    }

    /// A failed write (disk full, I/O error) keeps every count in memory, and the next good flush
    /// writes them all. The failure is injected with a directory where the temporary file goes:
    /// it works as root too, where permissions would not stop the write.
    #[test]
    fn a_failed_write_loses_no_count() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let blocker = dir.path().join(".budgets.json.tmp");
        let now = Utc::now();
        let b = LocalStore::open(Some(path.clone())).expect("open");
        commit_n(&b, 3, now);
        b.flush().expect("first flush");
        commit_n(&b, 2, now);
        std::fs::create_dir(&blocker).expect("blocker");
        let err = b.flush().expect_err("the write must fail");
        assert!(
            err.to_string().contains("budgets.json"),
            "the error names the file: {err}"
        );
        assert!(b.flush().is_err());
        assert_eq!(b.counts("t", now).day_used, 5, "nothing lost in memory");
        assert_eq!(
            LocalStore::open(Some(path.clone()))
                .expect("reopen")
                .counts("t", now)
                .day_used,
            3,
            "the file still holds the last good write"
        );
        std::fs::remove_dir(&blocker).expect("unblock");
        b.flush().expect("the retry succeeds");
        assert_eq!(b.counts("t", now).day_used, 5);
        assert_eq!(
            LocalStore::open(Some(path))
                .expect("reopen")
                .counts("t", now)
                .day_used,
            5,
            "every count reached the file"
        );
    }

    #[test]
    fn a_version_1_state_file_is_read() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        std::fs::write(
            &path,
            r#"{"version":1,"tenants":{"t":{"day":"2026-11-25","day_used":4,"month":"2026-11","month_used":9}}}"#,
        )
        .expect("write");
        let b = LocalStore::open(Some(path)).expect("open");
        let c = b.counts("t", at("2026-11-25T12:00:00Z"));
        assert_eq!((c.day_used, c.month_used), (4, 9));
    }

    #[test]
    fn history_is_kept_for_400_days() {
        let mut file = HashMap::from([(
            "t".to_string(),
            FileLedger {
                days: (0..500).map(|n| (format!("d{n:04}"), 1)).collect(),
                months: (0..50).map(|n| (format!("m{n:03}"), 1)).collect(),
                ..FileLedger::default()
            },
        )]);
        prune(&mut file);
        let f = &file["t"];
        assert_eq!(f.days.len(), KEEP_DAYS);
        assert_eq!(f.days.keys().next().map(String::as_str), Some("d0100"));
        assert_eq!(f.months.len(), KEEP_MONTHS);
    }
}
