//! Budgets of billable calls per tenant, per UTC day and month, with reserve-then-commit so that
//! concurrent requests can never overshoot: a slot is reserved before the upstream call, committed
//! when the provider may have billed it, and released otherwise (on drop, if nothing was decided).
//!
//! The single-node store keeps counts in memory and in a small JSON state file, written
//! atomically (write, fsync, rename) every flush interval and at shutdown. `BudgetStore` is the
//! seam for a shared store.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// Used and reserved calls in the current periods.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub day: String,
    /// Calls counted in `day`: those in the state file when last read, plus this process's own.
    pub day_used: u64,
    pub month: String,
    pub month_used: u64,
    /// This process's calls not yet added to the state file.
    #[serde(skip)]
    pub day_pending: u64,
    #[serde(skip)]
    pub month_pending: u64,
    #[serde(skip)]
    pub day_reserved: u64,
    /// The date `day` was last checked against.
    #[serde(skip)]
    pub day_date: Option<chrono::NaiveDate>,
    #[serde(skip)]
    pub month_reserved: u64,
}

pub trait BudgetStore: Send + Sync {
    /// Reserve one call, or say which period is exhausted and for how long.
    fn reserve(
        &self,
        tenant: &str,
        limits: BudgetLimits,
        now: DateTime<Utc>,
    ) -> Result<(), GatewayError>;
    /// The reserved call reached the provider: count it.
    fn commit(&self, tenant: &str, now: DateTime<Utc>);
    /// The reserved call was never billed: give it back.
    fn release(&self, tenant: &str, now: DateTime<Utc>);
    fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Counts;
    /// Persist what changed.
    fn flush(&self) -> std::io::Result<()>;
}

fn day_key(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%d").to_string()
}

fn month_key(now: DateTime<Utc>) -> String {
    now.format("%Y-%m").to_string()
}

pub fn secs_to_next_day(now: DateTime<Utc>) -> u64 {
    let next = (now.date_naive() + ChronoDuration::days(1))
        .and_hms_opt(0, 0, 0)
        .map(|d| Utc.from_utc_datetime(&d));
    next.map(|n| (n - now).num_seconds().max(1) as u64)
        .unwrap_or(86_400)
}

pub fn secs_to_next_month(now: DateTime<Utc>) -> u64 {
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let next = NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| Utc.from_utc_datetime(&d));
    next.map(|n| (n - now).num_seconds().max(1) as u64)
        .unwrap_or(31 * 86_400)
}

impl Counts {
    /// Start new periods when the date has moved on. The period keys are compared as dates, and
    /// only formatted when they change (this runs on every reservation).
    fn roll(&mut self, now: DateTime<Utc>) {
        let today = now.date_naive();
        if self.day_date != Some(today) {
            start_period(
                &mut self.day,
                day_key(now),
                [
                    &mut self.day_used,
                    &mut self.day_pending,
                    &mut self.day_reserved,
                ],
            );
            start_period(
                &mut self.month,
                month_key(now),
                [
                    &mut self.month_used,
                    &mut self.month_pending,
                    &mut self.month_reserved,
                ],
            );
            self.day_date = Some(today);
        }
    }
}

/// Move a period to `key`, with its counts at zero, unless it is there already.
fn start_period(period: &mut String, key: String, counts: [&mut u64; 3]) {
    if *period != key {
        *period = key;
        for c in counts {
            *c = 0;
        }
    }
}

/// The single-node store: counts in memory, persisted to an optional state file.
pub struct LocalBudgets {
    counts: Mutex<HashMap<String, Counts>>,
    path: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    tenants: HashMap<String, Counts>,
}

impl LocalBudgets {
    /// Open the store, reading the state file if there is one.
    pub fn open(path: Option<PathBuf>) -> anyhow::Result<Arc<LocalBudgets>> {
        let counts = match &path {
            Some(p) => read_state(p)?,
            None => HashMap::new(),
        };
        Ok(Arc::new(LocalBudgets {
            counts: Mutex::new(counts),
            path,
        }))
    }

    fn with<T>(&self, tenant: &str, now: DateTime<Utc>, f: impl FnOnce(&mut Counts) -> T) -> T {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = map.entry(tenant.to_string()).or_default();
        c.roll(now);
        f(c)
    }
}

impl BudgetStore for LocalBudgets {
    fn reserve(
        &self,
        tenant: &str,
        limits: BudgetLimits,
        now: DateTime<Utc>,
    ) -> Result<(), GatewayError> {
        self.with(tenant, now, |c| {
            if let Some(limit) = limits.daily {
                if c.day_used + c.day_reserved >= limit {
                    return Err(GatewayError::BudgetExhausted {
                        period: "daily",
                        retry_after_secs: secs_to_next_day(now),
                    });
                }
            }
            if let Some(limit) = limits.monthly {
                if c.month_used + c.month_reserved >= limit {
                    return Err(GatewayError::BudgetExhausted {
                        period: "monthly",
                        retry_after_secs: secs_to_next_month(now),
                    });
                }
            }
            c.day_reserved += 1;
            c.month_reserved += 1;
            Ok(())
        })
    }

    fn commit(&self, tenant: &str, now: DateTime<Utc>) {
        self.with(tenant, now, |c| {
            c.day_reserved = c.day_reserved.saturating_sub(1);
            c.month_reserved = c.month_reserved.saturating_sub(1);
            c.day_used += 1;
            c.month_used += 1;
            c.day_pending += 1;
            c.month_pending += 1;
        });
    }

    fn release(&self, tenant: &str, now: DateTime<Utc>) {
        self.with(tenant, now, |c| {
            c.day_reserved = c.day_reserved.saturating_sub(1);
            c.month_reserved = c.month_reserved.saturating_sub(1);
        });
    }

    fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Counts {
        self.with(tenant, now, |c| c.clone())
    }

    /// Add this process's new calls to the state file and adopt the file's totals, under a file
    /// lock. Another process sharing the file (the old and the new one during an upgrade) adds
    /// its own the same way, so no count is lost whichever writes last.
    fn flush(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path(path))?;
        lock.lock()?;
        let mut on_disk = read_state(path)?;
        let mut changed = false;
        {
            let mut mine = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            for (tenant, c) in mine.iter_mut() {
                let f = on_disk.entry(tenant.clone()).or_default();
                changed |= c.day_pending > 0 || c.month_pending > 0;
                merge_period(
                    &mut f.day,
                    &mut f.day_used,
                    &mut c.day,
                    &mut c.day_used,
                    &mut c.day_pending,
                    &mut c.day_reserved,
                );
                merge_period(
                    &mut f.month,
                    &mut f.month_used,
                    &mut c.month,
                    &mut c.month_used,
                    &mut c.month_pending,
                    &mut c.month_reserved,
                );
                // The keys may have changed: check them again on the next use.
                c.day_date = None;
            }
            for (tenant, f) in &on_disk {
                mine.entry(tenant.clone()).or_insert_with(|| f.clone());
            }
        }
        if changed {
            let text = serde_json::to_vec_pretty(&StateFile {
                version: 1,
                tenants: on_disk,
            })
            .map_err(std::io::Error::other)?;
            write_atomically(path, &text)?;
        }
        lock.unlock()
    }
}

/// One period of one tenant: the file's count plus this process's pending calls, when both
/// speak of the same period; the newer period wins otherwise (ISO dates sort by time).
fn merge_period(
    file_key: &mut String,
    file_used: &mut u64,
    key: &mut String,
    used: &mut u64,
    pending: &mut u64,
    reserved: &mut u64,
) {
    if *file_key == *key {
        *file_used += *pending;
    } else if *key > *file_key {
        *file_key = key.clone();
        *file_used = *pending;
    } else {
        // The file is in a later period than this process: start that period here too.
        *key = file_key.clone();
        *reserved = 0;
    }
    *used = *file_used;
    *pending = 0;
}

fn lock_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".lock");
    path.with_file_name(name)
}

fn read_state(path: &std::path::Path) -> std::io::Result<HashMap<String, Counts>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<StateFile>(&text)
            .map(|s| s.tenants)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

/// Write to a temporary file beside the target, fsync it, rename it over the target, fsync the folder.
fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
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

/// One reserved call. Released on drop unless committed.
pub struct Reservation {
    store: Arc<dyn BudgetStore>,
    tenant: String,
    done: bool,
}

impl Reservation {
    pub fn take(
        store: &Arc<dyn BudgetStore>,
        tenant: &str,
        limits: BudgetLimits,
    ) -> Result<Reservation, GatewayError> {
        store.reserve(tenant, limits, Utc::now())?;
        Ok(Reservation {
            store: store.clone(),
            tenant: tenant.to_string(),
            done: false,
        })
    }

    pub fn commit(mut self) {
        self.store.commit(&self.tenant, Utc::now());
        self.done = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.store.release(&self.tenant, Utc::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn reserve_commit_release_never_overshoot() {
        let b = LocalBudgets::open(None).expect("open");
        let lim = BudgetLimits {
            daily: Some(2),
            monthly: None,
        };
        let now = at("2026-11-25T10:00:00Z");
        b.reserve("t", lim, now).expect("1");
        b.reserve("t", lim, now).expect("2");
        assert!(matches!(
            b.reserve("t", lim, now),
            Err(GatewayError::BudgetExhausted {
                period: "daily",
                ..
            })
        ));
        b.release("t", now);
        b.reserve("t", lim, now).expect("released slot is reusable");
        b.commit("t", now);
        b.commit("t", now);
        assert_eq!(b.counts("t", now).day_used, 2);
        assert!(b.reserve("t", lim, now).is_err());
        // A new UTC day starts from zero; the month goes on counting.
        let tomorrow = at("2026-11-26T00:00:01Z");
        b.reserve("t", lim, tomorrow).expect("new day");
        assert_eq!(b.counts("t", tomorrow).month_used, 2);
    }

    #[test]
    fn retry_after_reaches_the_period_end() {
        assert_eq!(secs_to_next_day(at("2026-11-25T23:59:00Z")), 60);
        assert_eq!(secs_to_next_month(at("2026-12-31T23:00:00Z")), 3600);
    }

    #[test]
    fn two_processes_sharing_the_file_lose_no_count() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let lim = BudgetLimits {
            daily: Some(100),
            monthly: None,
        };
        let now = Utc::now();
        let old = LocalBudgets::open(Some(path.clone())).expect("old");
        for _ in 0..3 {
            old.reserve("t", lim, now).expect("r");
            old.commit("t", now);
        }
        old.flush().expect("flush");
        // The new process starts from the file, then both go on counting.
        let new = LocalBudgets::open(Some(path.clone())).expect("new");
        assert_eq!(new.counts("t", now).day_used, 3);
        for _ in 0..2 {
            new.reserve("t", lim, now).expect("r");
            new.commit("t", now);
        }
        old.reserve("t", lim, now).expect("r");
        old.commit("t", now);
        new.flush().expect("flush");
        old.flush().expect("flush");
        new.flush().expect("flush");
        assert_eq!(old.counts("t", now).day_used, 6);
        assert_eq!(new.counts("t", now).day_used, 6);
        assert_eq!(
            LocalBudgets::open(Some(path))
                .expect("reopen")
                .counts("t", now)
                .day_used,
            6
        );
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let b = LocalBudgets::open(Some(path.clone())).expect("open");
        let now = Utc::now();
        b.reserve(
            "t",
            BudgetLimits {
                daily: Some(5),
                monthly: None,
            },
            now,
        )
        .expect("r");
        b.commit("t", now);
        b.flush().expect("flush");
        let again = LocalBudgets::open(Some(path)).expect("reopen");
        assert_eq!(again.counts("t", now).day_used, 1);
    }
}
