//! The single-node store: budgets counted in memory and in a small JSON state file, written
//! atomically (write, fsync, rename) every flush interval and at shutdown. A failed write changes
//! nothing in memory: the counts wait for the next flush. The state file also keeps the usage
//! history (billable calls, the uncertain among them, cache hits, refusals per day) for 400 days.
//!
//! A process alone on its state file counts in memory, with no file I/O per request. While
//! another process shares the file (the new process of a zero-downtime upgrade and the old one
//! draining), every hold, commit and spent single-use id also goes through the journal beside
//! it (`journal`), under the file's lock: each process reads the others' lines before it admits
//! a call, so a budget is never overshot by the two together, and no call the budget has room
//! for is refused. A process admits through the journal only once every live process counts
//! through it; the old one of an upgrade starts to when it gets the upgrade signal, before it
//! hands its sockets over, and any other at its next flush, when it sees another process's
//! slot taken. When the last other process is gone, the journal's counts are added to the state
//! file and the survivor counts in memory again.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::{
    Adjusted, BudgetLimits, ClaimReply, Claims, Clock, Counts, DayUsage, Hold, Noted, Records,
    Replays, Settle, SharedVerdict, Store, StoreError, SubjectDay, SubjectHold, Usage,
};
use crate::config::{Calendar, Periods};
use crate::egress::Egress;
use crate::error::GatewayError;

mod journal;
mod records;

use journal::{Entry, Journal, Line, Series, Slot};

/// One period of one tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    /// Calls counted: the state file's count when last read, plus this process's since, plus
    /// the journal's.
    used: u64,
    /// The part of `used` not yet in the state file, counted by this process alone.
    /// Negative after an adjustment that took calls away (a refund).
    pending: i64,
    /// Calls in flight in this process that may still be counted.
    reserved: u64,
    /// The part of `used` counted through the journal (by any process), not yet in the state
    /// file.
    shared: i64,
    /// Calls in flight in the other processes sharing the state file.
    others: u64,
}

impl Tally {
    /// Calls counted or in flight anywhere: what a limit is checked against.
    fn taken(&self) -> u64 {
        self.used + self.reserved + self.others
    }
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
    /// Failed verdicts per day of each subject with a hold, keyed as `subjects`; their holds
    /// are the subject's (`subjects`).
    failed: BTreeMap<String, Tally>,
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
    fn series(&mut self) -> [&mut BTreeMap<String, Tally>; 8] {
        [
            &mut self.days,
            &mut self.months,
            &mut self.hits,
            &mut self.rejected,
            &mut self.by_key,
            &mut self.subjects,
            &mut self.uncertain,
            &mut self.failed,
        ]
    }

    /// A series budgets are checked against.
    fn budget(&mut self, s: Series) -> &mut BTreeMap<String, Tally> {
        match s {
            Series::Days => &mut self.days,
            Series::Months => &mut self.months,
            Series::Subjects => &mut self.subjects,
            Series::Failed => &mut self.failed,
        }
    }
}

/// The tallies one hold takes: the day, the month, and the subject's day.
fn hold_keys(periods: &Periods, subject: Option<&str>) -> Vec<(Series, String)> {
    let mut k = vec![
        (Series::Days, periods.day.clone()),
        (Series::Months, periods.month.clone()),
    ];
    k.extend(subject.map(|name| (Series::Subjects, format!("{}/{name}", periods.day))));
    k
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    failed: BTreeMap<String, u64>,
}

impl FileLedger {
    fn series(&mut self) -> [&mut BTreeMap<String, u64>; 8] {
        [
            &mut self.days,
            &mut self.months,
            &mut self.hits,
            &mut self.rejected,
            &mut self.by_key,
            &mut self.subjects,
            &mut self.uncertain,
            &mut self.failed,
        ]
    }
}

#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    tenants: HashMap<String, FileLedger>,
    /// The epoch of the last journal whose counts were added here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    journal_folded: Option<String>,
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

/// A single-use id as it is remembered: a digest of its scope and id.
type IdDigest = [u8; 16];

fn id_digest(scope: &str, id: &str) -> IdDigest {
    let mut h = blake3::Hasher::new();
    h.update(scope.as_bytes());
    h.update(b"\0");
    h.update(id.as_bytes());
    let mut d = [0; 16];
    d.copy_from_slice(&h.finalize().as_bytes()[..16]);
    d
}

/// How long a call that would be admitted waits for every process sharing the state file to
/// count through the journal (one that has not yet seen the newcomer does at its next flush,
/// within a second) before it is refused with `store_unavailable`.
const JOIN_WAIT: Duration = Duration::from_secs(5);
const JOIN_POLL: Duration = Duration::from_millis(20);

/// Another process sharing the state file, as its journal lines tell.
#[derive(Debug, Default)]
struct Member {
    slot: Option<usize>,
    /// Its last line applied.
    seq: u64,
    /// Its calls in flight, by (tenant, series, period).
    holds: HashMap<(String, Series, String), u64>,
}

/// What this process knows about sharing the state file. Locked before the state file's lock,
/// and that one before the counts.
#[derive(Default)]
struct Sharing {
    /// This process's slot; `None` without a state file, and once the store has stopped.
    slot: Option<Slot>,
    slot_index: usize,
    /// This process's id in the journal.
    me: String,
    seq: u64,
    /// Open while counting through it.
    journal: Option<Journal>,
    members: HashMap<String, Member>,
    /// Lines of this process not yet in the journal (a write failed): written before the next.
    outbox: Vec<Line>,
    /// This process is handing over to a new one (the upgrade signal): it counts through the
    /// journal until it exits.
    leaving: bool,
    /// The state file's counts must be read again before the next admission.
    stale_base: bool,
}

/// Why a step that would admit did not.
enum Attempt {
    Refused(GatewayError),
    /// A process sharing the state file does not count through the journal yet.
    NotYet,
}

fn unavailable() -> GatewayError {
    GatewayError::StoreUnavailable {
        retry_after_secs: 1,
    }
}

/// The single-node store: counts in memory, persisted to an optional state file.
pub struct LocalStore {
    ledgers: Mutex<HashMap<String, Ledger>>,
    /// The holds in flight and the holds committed lately, by id: a claim or a commit sent
    /// twice counts once, and a hold given back never frees another (taken before `ledgers`).
    calls: Mutex<Calls>,
    /// Single-use ids seen (their digests), with when they may be forgotten (Unix ms). In memory
    /// (and in the journal while it is shared): a restart forgets them (the tokens they belong
    /// to are short-lived).
    used_ids: Mutex<HashMap<IdDigest, i64>>,
    path: Option<PathBuf>,
    calendar: Calendar,
    /// Counting through the journal. Changed only with both `ledgers` and `used_ids` locked,
    /// so either lock reads it steady.
    shared: AtomicBool,
    sharing: Mutex<Sharing>,
    /// The records issued at runtime, when there is no state file to keep them beside.
    records: Mutex<records::RecordsFile>,
    /// Itself, for the steps that run on the blocking pool.
    this: Weak<LocalStore>,
}

/// The state file's lock for one step: released when dropped.
struct FileLock(std::fs::File);

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl LocalStore {
    /// Open the store, reading the state file if there is one; days and months in UTC.
    pub fn open(path: Option<PathBuf>) -> anyhow::Result<Arc<LocalStore>> {
        LocalStore::open_in(path, Calendar::default())
    }

    /// Open the store with days and months in `calendar`. With a state file, take a slot
    /// beside it, and join the journal of the processes already there, if any (or add the
    /// counts of a journal left by processes that are gone to the file).
    pub fn open_in(path: Option<PathBuf>, calendar: Calendar) -> anyhow::Result<Arc<LocalStore>> {
        let mut ledgers = HashMap::new();
        let mut sharing = Sharing {
            me: uuid::Uuid::new_v4().simple().to_string(),
            ..Sharing::default()
        };
        if let Some(p) = &path {
            adopt(&mut ledgers, &read_state(p)?.tenants);
            let slot = journal::take_slot(p)?;
            sharing.slot_index = slot.index;
            sharing.slot = Some(slot);
        }
        let store = Arc::new_cyclic(|this| LocalStore {
            ledgers: Mutex::new(ledgers),
            calls: Mutex::default(),
            used_ids: Mutex::new(HashMap::new()),
            path,
            calendar,
            shared: AtomicBool::new(false),
            sharing: Mutex::new(sharing),
            records: Mutex::default(),
            this: this.clone(),
        });
        store.flush()?;
        Ok(store)
    }

    fn with<T>(&self, tenant: &str, f: impl FnOnce(&mut Ledger) -> T) -> T {
        let mut map = self.ledgers();
        f(map.entry(tenant.to_string()).or_default())
    }

    fn ledgers(&self) -> MutexGuard<'_, HashMap<String, Ledger>> {
        self.ledgers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn records(&self) -> MutexGuard<'_, records::RecordsFile> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ids(&self) -> MutexGuard<'_, HashMap<IdDigest, i64>> {
        self.used_ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sharing(&self) -> MutexGuard<'_, Sharing> {
        self.sharing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }
}

/// How many committed holds are remembered: a commit sent again comes long before this many
/// others. Bounded by count, not by time: ten minutes of ids at the chaos run's 1,500 calls a
/// second held tens of MiB (its peak RSS went over the bound the configuration sets).
const COMMITTED_KEPT: usize = 4096;

/// The holds of this process by id (see `LocalStore::calls`).
#[derive(Default)]
struct Calls {
    held: std::collections::HashSet<String>,
    committed: std::collections::HashSet<String>,
    /// `committed`, oldest first.
    order: std::collections::VecDeque<String>,
}

impl Calls {
    /// Record a commit of `id`; false when it was recorded lately (the commit is sent again).
    fn first_commit(&mut self, id: &str) -> bool {
        if self.committed.contains(id) {
            return false;
        }
        if self.order.len() == COMMITTED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.committed.remove(&old);
            }
        }
        self.committed.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

/// Take the file's counts as the base of `used`, keeping this process's pending calls and the
/// journal's on top.
fn adopt(ledgers: &mut HashMap<String, Ledger>, file: &HashMap<String, FileLedger>) {
    for (tenant, f) in file {
        let l = ledgers.entry(tenant.clone()).or_default();
        let mut f = f.clone();
        for (mine, theirs) in l.series().into_iter().zip(f.series()) {
            for (period, used) in theirs {
                let t = mine.entry(period.clone()).or_default();
                t.used = used.saturating_add_signed(t.pending + t.shared);
            }
        }
    }
}

/// Reserve one call of the tenant's budget and, when `subject` names one, of the subject's
/// (its budget and its failed attempts, whose calls in flight count as failed until settled):
/// all or none. The entries that tell the other processes.
fn reserve_in(
    map: &mut HashMap<String, Ledger>,
    calendar: &Calendar,
    tenant: &str,
    limits: BudgetLimits,
    subject: Option<&SubjectHold>,
    now: DateTime<Utc>,
    periods: &Periods,
) -> Result<Vec<Entry>, GatewayError> {
    let l = map.entry(tenant.to_string()).or_default();
    if let Some(h) = subject {
        let key = format!("{}/{}", periods.day, h.name);
        let s = l.subjects.entry(key.clone()).or_default();
        let in_flight = s.reserved + s.others;
        if h.daily_budget.is_some_and(|limit| s.taken() >= limit) {
            return Err(GatewayError::SubjectBudgetExhausted {
                retry_after_secs: calendar.secs_to_next_day(now),
            });
        }
        let failed = l.failed.get(&key).map_or(0, |t| t.used);
        if h.max_failed
            .is_some_and(|limit| failed + in_flight >= limit)
        {
            return Err(GatewayError::TooManyFailedAttempts {
                retry_after_secs: calendar.secs_to_next_day(now),
            });
        }
    }
    let [day, month] = l.tallies(periods);
    if let Some(limit) = limits.daily {
        if day.taken() >= limit {
            return Err(GatewayError::BudgetExhausted {
                period: "daily",
                retry_after_secs: calendar.secs_to_next_day(now),
            });
        }
    }
    if let Some(limit) = limits.monthly {
        if month.taken() >= limit {
            return Err(GatewayError::BudgetExhausted {
                period: "monthly",
                retry_after_secs: calendar.secs_to_next_month(now),
            });
        }
    }
    day.reserved += 1;
    month.reserved += 1;
    let subject = subject.map(|h| h.name.as_str());
    if let Some(name) = subject {
        if let Some(s) = l.subjects.get_mut(&format!("{}/{name}", periods.day)) {
            s.reserved += 1;
        }
    }
    Ok(vec![Entry::Tally {
        t: tenant.to_string(),
        k: hold_keys(periods, subject),
        held: 1,
        counted: 0,
    }])
}

fn release_in(
    map: &mut HashMap<String, Ledger>,
    tenant: &str,
    periods: &Periods,
    subject: Option<&str>,
) -> Vec<Entry> {
    let l = map.entry(tenant.to_string()).or_default();
    if let Some(t) = subject.and_then(|n| l.subjects.get_mut(&format!("{}/{n}", periods.day))) {
        t.reserved = t.reserved.saturating_sub(1);
    }
    for t in l.tallies(periods) {
        t.reserved = t.reserved.saturating_sub(1);
    }
    vec![Entry::Tally {
        t: tenant.to_string(),
        k: hold_keys(periods, subject),
        held: -1,
        counted: 0,
    }]
}

/// Count a held call; `uncertain` also counts it apart (see `Settle::Commit`). Sharing the
/// state file, its budget counts go through the journal.
#[allow(clippy::too_many_arguments)]
fn commit_in(
    map: &mut HashMap<String, Ledger>,
    shared: bool,
    held: bool,
    tenant: &str,
    periods: &Periods,
    subject: Option<&str>,
    org_key: &str,
    uncertain: bool,
    failed: bool,
) -> Vec<Entry> {
    let l = map.entry(tenant.to_string()).or_default();
    let mut entries = Vec::new();
    if let Some(name) = subject.filter(|_| failed) {
        let key = format!("{}/{name}", periods.day);
        let f = l.failed.entry(key.clone()).or_default();
        f.used += 1;
        if shared {
            f.shared += 1;
            entries.push(Entry::Tally {
                t: tenant.to_string(),
                k: vec![(Series::Failed, key)],
                held: 0,
                counted: 1,
            });
        } else {
            f.pending += 1;
        }
    }
    let count = |t: &mut Tally| {
        if held {
            t.reserved = t.reserved.saturating_sub(1);
        }
        t.used += 1;
        if shared {
            t.shared += 1;
        } else {
            t.pending += 1;
        }
    };
    if let Some(name) = subject {
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
    entries.push(Entry::Tally {
        t: tenant.to_string(),
        k: hold_keys(periods, subject),
        held: if held { -1 } else { 0 },
        counted: 1,
    });
    entries
}

/// Apply another process's line.
fn apply(
    s: &mut Sharing,
    map: &mut HashMap<String, Ledger>,
    ids: &mut HashMap<IdDigest, i64>,
    line: Line,
) {
    if line.p == s.me {
        return;
    }
    let member = s.members.entry(line.p.clone()).or_default();
    if line.q <= member.seq {
        return;
    }
    member.seq = line.q;
    match line.entry {
        Entry::Join { slot, .. } => {
            member.slot = Some(slot);
            // A slot taken by a new process: the one that had it is gone.
            let gone: Vec<String> = s
                .members
                .iter()
                .filter(|(p, m)| **p != line.p && m.slot == Some(slot))
                .map(|(p, _)| p.clone())
                .collect();
            for p in gone {
                forget_member(s, map, &p);
            }
        }
        Entry::Tally {
            t,
            k,
            held,
            counted,
        } => {
            let l = map.entry(t.clone()).or_default();
            for (series, period) in k {
                let h = member
                    .holds
                    .entry((t.clone(), series, period.clone()))
                    .or_default();
                // Never below zero: a hold taken before this process read the journal is not
                // given back twice.
                let held = held.max(-(*h as i64));
                *h = h.saturating_add_signed(held);
                let tally = l.budget(series).entry(period).or_default();
                tally.others = tally.others.saturating_add_signed(held);
                tally.used = tally.used.saturating_add_signed(counted);
                tally.shared += counted;
            }
        }
        Entry::Spent { id, until } => {
            if let Some(d) = parse_digest(&id) {
                ids.insert(d, until);
            }
        }
        Entry::Unspent { id } => {
            if let Some(d) = parse_digest(&id) {
                ids.remove(&d);
            }
        }
    }
}

fn parse_digest(hex_id: &str) -> Option<IdDigest> {
    let mut d = [0; 16];
    hex::decode_to_slice(hex_id, &mut d).ok()?;
    Some(d)
}

/// A process that is gone: its calls in flight count no more (those that were answered were
/// committed in the journal before it went).
fn forget_member(s: &mut Sharing, map: &mut HashMap<String, Ledger>, p: &str) {
    let Some(m) = s.members.remove(p) else {
        return;
    };
    for ((tenant, series, period), n) in m.holds {
        if let Some(t) = map
            .get_mut(&tenant)
            .and_then(|l| l.budget(series).get_mut(&period))
        {
            t.others = t.others.saturating_sub(n);
        }
    }
}

impl LocalStore {
    /// One step of counting. Alone on the state file: `op` on the counts in memory, nothing
    /// else. Sharing it: under the state file's lock, after reading the other processes' lines,
    /// with `op`'s entries appended to the journal after it. A step that `admits` a call waits
    /// (`NotYet`) until every live process counts through the journal, and stands only once its
    /// entries are in the journal: when they cannot be written, `undo` takes it back.
    fn step<T>(
        &self,
        admits: bool,
        op: impl FnOnce(
            &mut HashMap<String, Ledger>,
            &mut HashMap<IdDigest, i64>,
            bool,
        ) -> Result<(T, Vec<Entry>), GatewayError>,
        undo: impl FnOnce(&mut HashMap<String, Ledger>, &mut HashMap<IdDigest, i64>) -> Vec<Entry>,
    ) -> Result<T, Attempt> {
        {
            let (mut map, mut ids) = (self.ledgers(), self.ids());
            if !self.is_shared() {
                return op(&mut map, &mut ids, false)
                    .map(|(t, _)| t)
                    .map_err(Attempt::Refused);
            }
        }
        let mut s = self.sharing();
        let caught_up = self.lock_file().and_then(|lock| {
            let ready = self.catch_up(&mut s)?;
            Ok((lock, ready))
        });
        let (mut map_guard, mut ids_guard) = (self.ledgers(), self.ids());
        let (map, ids) = (&mut *map_guard, &mut *ids_guard);
        if !self.is_shared() {
            return op(map, ids, false)
                .map(|(t, _)| t)
                .map_err(Attempt::Refused);
        }
        let ready = match &caught_up {
            Ok((_, ready)) => *ready,
            Err(e) if admits => {
                tracing::warn!("cannot read the budget journal, a call is refused: {e}");
                return Err(Attempt::Refused(unavailable()));
            }
            Err(_) => false,
        };
        if admits && !ready {
            return Err(Attempt::NotYet);
        }
        let (out, entries) = op(map, ids, true).map_err(Attempt::Refused)?;
        s.queue(entries);
        let written = match &caught_up {
            Ok(_) => s.write_outbox(),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        if let Err(e) = written {
            tracing::warn!("cannot write the budget journal (retried at the next step): {e}");
            if admits {
                let back = undo(map, ids);
                s.queue(back);
                return Err(Attempt::Refused(unavailable()));
            }
        }
        Ok(out)
    }

    /// Take the state file's lock (waiting for another process's step or flush).
    fn lock_file(&self) -> std::io::Result<FileLock> {
        let Some(path) = &self.path else {
            return Err(std::io::Error::other("no state file"));
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path(path))
            .map_err(|e| in_file(&lock_path(path), e))?;
        f.lock().map_err(|e| in_file(path, e))?;
        Ok(FileLock(f))
    }

    /// Read what the other processes wrote in the journal since the last read, and drop the
    /// holds of those that are gone. Whether every live process counts through the journal.
    /// Called with the state file's lock held.
    fn catch_up(&self, s: &mut Sharing) -> std::io::Result<bool> {
        let Some(path) = &self.path else {
            return Ok(true);
        };
        if s.journal.is_none() {
            let folded = read_state(path)?.journal_folded;
            s.journal = Some(
                Journal::open(path, folded.as_deref())
                    .map_err(|e| in_file(&journal::journal_path(path), e))?,
            );
            s.members.clear();
        }
        let lines = match s.journal.as_mut() {
            Some(j) => j
                .read_new()
                .map_err(|e| in_file(&journal::journal_path(path), e))?,
            None => Vec::new(),
        };
        // A process that joins has written its earlier counts to the state file: read it again.
        s.stale_base |= lines
            .iter()
            .any(|l| l.p != s.me && matches!(l.entry, Entry::Join { .. }));
        let base = match s.stale_base {
            true => Some(read_state(path)),
            false => None,
        };
        let live = journal::live_slots(path, s.slot_index);
        let (mut map, mut ids) = (self.ledgers(), self.ids());
        for line in lines {
            apply(s, &mut map, &mut ids, line);
        }
        if let Some(base) = base {
            adopt(&mut map, &base?.tenants);
            s.stale_base = false;
        }
        let live = live?;
        let mine = s.slot_index;
        let gone: Vec<String> = s
            .members
            .iter()
            .filter(|(_, m)| {
                m.slot
                    .is_some_and(|k| k == mine || !live.get(k).copied().unwrap_or(false))
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            forget_member(s, &mut map, &p);
        }
        Ok((0..journal::SLOTS)
            .filter(|k| live[*k])
            .all(|k| s.members.values().any(|m| m.slot == Some(k))))
    }

    /// Start counting through the journal: this process's calls in flight, its counts not yet
    /// in the state file and its spent single-use ids go into it, and from now on every step.
    /// Called with the state file's lock held.
    fn join(&self, s: &mut Sharing) -> std::io::Result<()> {
        let caught_up = self.catch_up(s);
        let (mut map, ids) = (self.ledgers(), self.ids());
        if self.is_shared() {
            return caught_up.map(drop);
        }
        let mut entries = vec![Entry::Join {
            slot: s.slot_index,
            pid: std::process::id(),
        }];
        for (tenant, l) in map.iter_mut() {
            for series in [
                Series::Days,
                Series::Months,
                Series::Subjects,
                Series::Failed,
            ] {
                for (period, t) in l.budget(series).iter_mut() {
                    if t.reserved == 0 && t.pending == 0 {
                        continue;
                    }
                    entries.push(Entry::Tally {
                        t: tenant.clone(),
                        k: vec![(series, period.clone())],
                        held: t.reserved as i64,
                        counted: t.pending,
                    });
                    t.shared += t.pending;
                    t.pending = 0;
                }
            }
        }
        let now = Utc::now().timestamp_millis();
        entries.extend(
            ids.iter()
                .filter(|(_, until)| **until > now)
                .map(|(d, until)| Entry::Spent {
                    id: hex::encode(d),
                    until: *until,
                }),
        );
        self.shared.store(true, Ordering::Relaxed);
        drop((map, ids));
        s.queue(entries);
        caught_up?;
        s.write_outbox()
    }

    /// Add the journal's counts to the state file, remove the journal, and count in memory
    /// again: no other process is left. Called with the state file's lock held.
    fn fold(&self, s: &mut Sharing) -> std::io::Result<()> {
        let (Some(path), Some(epoch)) = (&self.path, s.journal.as_ref().map(|j| j.epoch.clone()))
        else {
            return Ok(());
        };
        self.flush_locked(path, Some(&epoch))?;
        Journal::remove(path).map_err(|e| in_file(&journal::journal_path(path), e))?;
        let (mut map, _ids) = (self.ledgers(), self.ids());
        for l in map.values_mut() {
            for series in [
                Series::Days,
                Series::Months,
                Series::Subjects,
                Series::Failed,
            ] {
                for t in l.budget(series).values_mut() {
                    t.others = 0;
                }
            }
        }
        if self.is_shared() {
            tracing::info!(
                "no other process shares the budget state file any more: counting in memory again"
            );
        }
        self.shared.store(false, Ordering::Relaxed);
        s.journal = None;
        s.members.clear();
        s.outbox.clear();
        Ok(())
    }

    /// `try_reserve` with a refusal as the error a request gets.
    #[cfg(test)]
    fn reserve(
        &self,
        tenant: &str,
        limits: BudgetLimits,
        subject: Option<&SubjectHold>,
        now: DateTime<Utc>,
    ) -> Result<Periods, GatewayError> {
        self.try_reserve(tenant, limits, subject, now)
            .map_err(|a| match a {
                Attempt::Refused(e) => e,
                Attempt::NotYet => unavailable(),
            })
    }

    /// Reserve one call of the tenant's budget and, when `subject` names one, of the
    /// subject's: all or none.
    fn try_reserve(
        &self,
        tenant: &str,
        limits: BudgetLimits,
        subject: Option<&SubjectHold>,
        now: DateTime<Utc>,
    ) -> Result<Periods, Attempt> {
        let periods = self.calendar.periods(now);
        let name = subject.map(|h| h.name.as_str());
        self.step(
            true,
            |map, _, _| {
                reserve_in(map, &self.calendar, tenant, limits, subject, now, &periods)
                    .map(|e| ((), e))
            },
            |map, _| release_in(map, tenant, &periods, name),
        )?;
        Ok(periods)
    }

    /// Count a held call; `uncertain` also counts it apart (see `Settle::Commit`).
    #[cfg(test)]
    fn commit(
        &self,
        tenant: &str,
        periods: &Periods,
        subject: Option<&str>,
        org_key: &str,
        uncertain: bool,
    ) {
        self.count_call(true, tenant, periods, subject, org_key, (uncertain, false));
    }

    /// Count a call, giving its hold back when it still has one (`held`); `(uncertain, failed)`
    /// as `Settle::Commit` says.
    fn count_call(
        &self,
        held: bool,
        tenant: &str,
        periods: &Periods,
        subject: Option<&str>,
        org_key: &str,
        (uncertain, failed): (bool, bool),
    ) {
        let _ = self.step(
            false,
            |map, _, shared| {
                let entries = commit_in(
                    map, shared, held, tenant, periods, subject, org_key, uncertain, failed,
                );
                Ok(((), entries))
            },
            |_, _| Vec::new(),
        );
    }

    /// Hold a call's budget once per hold id (a claim sent again holds nothing more).
    fn try_hold(&self, hold: &Hold) -> Result<(), Attempt> {
        let mut calls = self.calls();
        if calls.held.contains(&hold.id) {
            return Ok(());
        }
        self.try_reserve(&hold.tenant, hold.limits, hold.subject.as_ref(), hold.taken)?;
        calls.held.insert(hold.id.clone());
        Ok(())
    }

    /// Count a call once per hold id, in the periods it was held in; its hold, if it still has
    /// one, is given back (a commit after a release frees no other call's hold).
    fn commit_hold(&self, hold: &Hold, org_key: &str, outcome: (bool, bool)) {
        let mut calls = self.calls();
        if !calls.first_commit(&hold.id) {
            return;
        }
        let held = calls.held.remove(&hold.id);
        let subject = hold.subject.as_ref().map(|h| h.name.as_str());
        self.count_call(held, &hold.tenant, &hold.periods, subject, org_key, outcome);
    }

    /// Give a hold back, if it is still held.
    fn release_hold(&self, hold: &Hold) {
        let mut calls = self.calls();
        if !calls.held.remove(&hold.id) {
            return;
        }
        let subject = hold.subject.as_ref().map(|h| h.name.as_str());
        self.release(&hold.tenant, &hold.periods, subject);
    }

    /// Add `delta` calls (negative: a refund) to the current day and month, never below zero.
    pub fn adjust(&self, tenant: &str, now: DateTime<Utc>, delta: i64) -> Adjusted {
        let periods = self.calendar.periods(now);
        let applied = self.step(
            false,
            |map, _, shared| {
                let l = map.entry(tenant.to_string()).or_default();
                let mut entries = Vec::new();
                let mut applied = [0i64; 2];
                for (n, (series, period)) in [
                    (Series::Days, &periods.day),
                    (Series::Months, &periods.month),
                ]
                .into_iter()
                .enumerate()
                {
                    let t = l.budget(series).entry(period.clone()).or_default();
                    let new = t.used.saturating_add_signed(delta);
                    let d = new as i64 - t.used as i64;
                    applied[n] = d;
                    t.used = new;
                    if shared {
                        t.shared += d;
                        entries.push(Entry::Tally {
                            t: tenant.to_string(),
                            k: vec![(series, period.clone())],
                            held: 0,
                            counted: d,
                        });
                    } else {
                        t.pending += d;
                    }
                }
                Ok((applied, entries))
            },
            |_, _| Vec::new(),
        );
        let [day_applied, month_applied] = applied.unwrap_or_default();
        Adjusted {
            counts: LocalStore::counts(self, tenant, now),
            day_applied,
            month_applied,
        }
    }

    /// Set a subject's failed attempts of a day (`key`: `day/hash`) back to zero; how many it
    /// had. Sharing the state file, through the journal.
    fn reset_failed_now(&self, tenant: &str, key: String) -> u64 {
        self.step(
            false,
            |map, _, shared| {
                let l = map.entry(tenant.to_string()).or_default();
                let Some(t) = l.failed.get_mut(&key) else {
                    return Ok((0, Vec::new()));
                };
                let had = t.used;
                let d = -(had as i64);
                t.used = 0;
                let mut entries = Vec::new();
                if shared {
                    t.shared += d;
                    entries.push(Entry::Tally {
                        t: tenant.to_string(),
                        k: vec![(Series::Failed, key.clone())],
                        held: 0,
                        counted: d,
                    });
                } else {
                    t.pending += d;
                }
                Ok((had, entries))
            },
            |_, _| Vec::new(),
        )
        .unwrap_or(0)
    }

    fn release(&self, tenant: &str, periods: &Periods, subject: Option<&str>) {
        let _ = self.step(
            false,
            |map, _, _| Ok(((), release_in(map, tenant, periods, subject))),
            |_, _| Vec::new(),
        );
    }

    /// Record a single-use id; false when it was recorded before (by any process sharing the
    /// state file).
    fn try_first_use(&self, digest: IdDigest, until_ms: i64) -> Result<bool, Attempt> {
        let now = Utc::now().timestamp_millis();
        self.step(
            true,
            |_, used, _| {
                // Forget the expired now and then: the map stays as large as the tokens alive.
                if used.len() >= 1024 && used.len().is_power_of_two() {
                    used.retain(|_, until| *until > now);
                }
                match used.get(&digest) {
                    Some(until) if *until > now => Ok((false, Vec::new())),
                    _ => {
                        let until = until_ms.max(now + 1000);
                        used.insert(digest, until);
                        Ok((
                            true,
                            vec![Entry::Spent {
                                id: hex::encode(digest),
                                until,
                            }],
                        ))
                    }
                }
            },
            |_, used| {
                used.remove(&digest);
                vec![Entry::Unspent {
                    id: hex::encode(digest),
                }]
            },
        )
    }

    /// Run `f` where it may wait for the state file's lock: while the file is shared, on the
    /// blocking pool, so that a wait for the other process holds up no other request; alone,
    /// in place (memory only). `None` when the pool did not run it (the runtime is stopping).
    async fn off_runtime<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LocalStore) -> T + Send + 'static,
    ) -> Option<T> {
        match self.this.upgrade() {
            Some(me) if self.is_shared() => tokio::task::spawn_blocking(move || f(&me)).await.ok(),
            _ => Some(f(self)),
        }
    }

    /// Run an admitting step again while a process sharing the state file has yet to count
    /// through the journal, for `JOIN_WAIT` at most.
    async fn admitting<T: Send + 'static>(
        &self,
        attempt: impl Fn(&LocalStore) -> Result<T, Attempt> + Clone + Send + 'static,
    ) -> Result<T, GatewayError> {
        let give_up = Instant::now() + JOIN_WAIT;
        loop {
            let once = attempt.clone();
            let tried = self.off_runtime(move |s| once(s)).await;
            match tried.unwrap_or(Err(Attempt::Refused(unavailable()))) {
                Ok(t) => return Ok(t),
                Err(Attempt::Refused(e)) => return Err(e),
                Err(Attempt::NotYet) if Instant::now() >= give_up => {
                    tracing::warn!(
                        "a process sharing the budget state file does not count through the journal: a call is refused"
                    );
                    return Err(unavailable());
                }
                Err(Attempt::NotYet) => tokio::time::sleep(JOIN_POLL).await,
            }
        }
    }

    /// Forget subjects' counts of days before yesterday that have nothing in flight or
    /// unwritten: a subject's budget is a day's, and subjects are many.
    fn forget_old_subjects(&self) {
        let yesterday = self.calendar.day(Utc::now() - chrono::Duration::days(1));
        let mut map = self.ledgers();
        for l in map.values_mut() {
            for series in [&mut l.subjects, &mut l.failed] {
                series.retain(|k, t| {
                    k.as_str() >= yesterday.as_str()
                        || t.reserved > 0
                        || t.others > 0
                        || t.pending != 0
                        || t.shared != 0
                });
            }
        }
    }

    /// Read what the other processes sharing the state file wrote, so that what is shown
    /// (counts, usage history) is theirs too.
    fn catch_up_to_show(&self) {
        if !self.is_shared() {
            return;
        }
        let mut s = self.sharing();
        if let Err(e) = self.lock_file().and_then(|_lock| self.catch_up(&mut s)) {
            tracing::warn!("cannot read the budget journal (counts shown as last read): {e}");
        }
    }

    pub fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Counts {
        self.catch_up_to_show();
        let p = self.calendar.periods(now);
        let map = self.ledgers();
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

    /// Add this process's new calls to the state file and adopt the file's totals, under the
    /// file's lock; first see whether another process shares the file (and count through the
    /// journal while one does), and add a journal no other process is left to share to the
    /// file. Memory changes only after the file is safely written: a failed write loses
    /// nothing.
    pub fn flush(&self) -> std::io::Result<()> {
        self.share_or_fold(false)
    }

    fn share_or_fold(&self, exiting: bool) -> std::io::Result<()> {
        self.forget_old_subjects();
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut s = self.sharing();
        let _lock = self.lock_file()?;
        // The journal's fate first; its errors are told after the state file's write.
        let mut shared = Ok(());
        if s.slot.is_some() {
            let live = journal::live_slots(path, s.slot_index)?;
            let others = live.iter().any(|l| *l);
            if !self.is_shared() && others {
                tracing::info!(
                    "another process shares the budget state file: counting through its journal"
                );
                shared = self.join(&mut s);
            }
            if self.is_shared() || Journal::exists(path) {
                let caught_up = self.catch_up(&mut s).and_then(|_| {
                    s.write_outbox()?;
                    match s.journal.as_mut() {
                        Some(j) => j.sync(),
                        None => Ok(()),
                    }
                });
                if !others && (exiting || !s.leaving) && caught_up.is_ok() {
                    return self.fold(&mut s);
                }
                shared = shared.and(caught_up);
            }
        }
        self.flush_locked(path, None).and(shared)
    }

    /// Write the state file with this process's pending counts added (and, `folding` a
    /// journal, its counts too, with its epoch), then adopt the file's totals. Called with the
    /// state file's lock held.
    fn flush_locked(&self, path: &Path, folding: Option<&str>) -> std::io::Result<()> {
        let mut file = read_state(path)?;
        // What this flush writes: (tenant, series, period, pending, shared).
        let mut flushed = Vec::new();
        {
            let mut map = self.ledgers();
            for (tenant, l) in map.iter_mut() {
                for (series, mine) in l.series().into_iter().enumerate() {
                    for (period, t) in mine.iter() {
                        let shared = if folding.is_some() { t.shared } else { 0 };
                        if t.pending == 0 && shared == 0 {
                            continue;
                        }
                        let f = file.tenants.entry(tenant.clone()).or_default();
                        let v = f.series()[series].entry(period.clone()).or_default();
                        *v = v.saturating_add_signed(t.pending + shared);
                        flushed.push((tenant.clone(), series, period.clone(), t.pending, shared));
                    }
                }
            }
        }
        if !flushed.is_empty() || folding.is_some() {
            prune(&mut file.tenants);
            if let Some(epoch) = folding {
                file.journal_folded = Some(epoch.to_string());
            }
            file.version = 2;
            let text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
            write_atomically(path, &text).map_err(|e| in_file(path, e))?;
        }
        let mut map = self.ledgers();
        for (tenant, series, period, pending, shared) in flushed {
            if let Some(l) = map.get_mut(&tenant) {
                if let Some(t) = l.series()[series].get_mut(&period) {
                    t.pending -= pending;
                    t.shared -= shared;
                }
            }
        }
        adopt(&mut map, &file.tenants);
        Ok(())
    }
}

impl Sharing {
    fn queue(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            self.seq += 1;
            self.outbox.push(Line {
                p: self.me.clone(),
                q: self.seq,
                entry,
            });
        }
    }

    /// Append the lines waiting in the outbox. Called with the state file's lock held.
    fn write_outbox(&mut self) -> std::io::Result<()> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let j = self
            .journal
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the budget journal is not open"))?;
        j.append(&self.outbox)?;
        self.outbox.clear();
        Ok(())
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
        let hold = hold.clone();
        self.admitting(move |s| s.try_hold(&hold)).await?;
        Ok(ClaimReply::Go)
    }

    async fn settle(&self, hold: &Hold, how: Settle, _: Option<(&SharedVerdict, Duration)>) {
        let hold = hold.clone();
        self.off_runtime(move |s| match how {
            Settle::Commit {
                org_key,
                uncertain,
                failed,
            } => s.commit_hold(&hold, &org_key, (uncertain, failed)),
            Settle::Release => s.release_hold(&hold),
        })
        .await;
    }

    fn abandon(&self, hold: &Hold) {
        // Dropped on a request's path: while the file is shared, given back off the runtime.
        match (self.this.upgrade(), tokio::runtime::Handle::try_current()) {
            (Some(me), Ok(rt)) if self.is_shared() => {
                let hold = hold.clone();
                rt.spawn_blocking(move || me.release_hold(&hold));
            }
            _ => self.release_hold(hold),
        }
    }
}

#[async_trait]
impl Usage for LocalStore {
    async fn counts(&self, tenant: &str, now: DateTime<Utc>) -> Result<Counts, StoreError> {
        let tenant = tenant.to_string();
        self.off_runtime(move |s| s.counts(&tenant, now))
            .await
            .ok_or_else(|| StoreError("the counts could not be read".into()))
    }

    async fn adjust(
        &self,
        tenant: &str,
        now: DateTime<Utc>,
        delta: i64,
    ) -> Result<Adjusted, StoreError> {
        let tenant = tenant.to_string();
        self.off_runtime(move |s| s.adjust(&tenant, now, delta))
            .await
            .ok_or_else(|| StoreError("the adjustment could not be made".into()))
    }

    async fn history(
        &self,
        tenants: &[String],
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<DayUsage>, StoreError> {
        self.off_runtime(|s| s.catch_up_to_show()).await;
        let map = self.ledgers();
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
    ) -> Result<Vec<SubjectDay>, StoreError> {
        self.off_runtime(|s| s.catch_up_to_show()).await;
        let day = self.calendar.day(now);
        let map = self.ledgers();
        let Some(l) = map.get(tenant) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<SubjectDay> = of_day(&l.subjects, &day)
            .map(|(subject, billable)| {
                let failed = l
                    .failed
                    .get(&format!("{day}/{subject}"))
                    .map_or(0, |t| t.used);
                SubjectDay {
                    subject,
                    billable,
                    failed,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.billable
                .cmp(&a.billable)
                .then_with(|| a.subject.cmp(&b.subject))
        });
        out.truncate(limit);
        Ok(out)
    }

    async fn reset_failed(
        &self,
        tenant: &str,
        subject: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let key = format!("{}/{subject}", self.calendar.day(now));
        let tenant = tenant.to_string();
        self.off_runtime(move |s| s.reset_failed_now(&tenant, key))
            .await
            .ok_or_else(|| StoreError("the reset did not finish".into()))
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

    /// The last flush; then this process's slot is free, for others to see it gone.
    fn flush_at_exit(&self) -> Result<(), StoreError> {
        let flushed = self.share_or_fold(true);
        self.sharing().slot = None;
        flushed.map_err(|e| StoreError(e.to_string()))
    }

    fn upgrading(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let mut s = self.sharing();
        s.leaving = true;
        if self.is_shared() || s.slot.is_none() {
            return;
        }
        let joined = self.lock_file().and_then(|_lock| {
            self.join(&mut s)?;
            match s.journal.as_mut() {
                Some(j) => j.sync(),
                None => Ok(()),
            }
        });
        match joined {
            Ok(()) => tracing::info!(
                journal = %journal::journal_path(path).display(),
                "handing over: budgets are counted through the journal until this process exits"
            ),
            Err(e) => tracing::error!(
                "handing over: cannot write the budget journal (retried at the next flush; the new process waits for it): {e}"
            ),
        }
    }
}

#[async_trait]
impl Replays for LocalStore {
    async fn first_use(&self, scope: &str, id: &str, until_ms: i64) -> Result<bool, StoreError> {
        let digest = id_digest(scope, id);
        self.admitting(move |s| s.try_first_use(digest, until_ms))
            .await
            .map_err(|e| StoreError(e.to_string()))
    }

    async fn forget_use(&self, scope: &str, id: &str) -> Result<(), StoreError> {
        let digest = id_digest(scope, id);
        self.off_runtime(move |s| {
            let _ = s.step(
                false,
                |_, used, shared| {
                    used.remove(&digest);
                    let entries = shared.then(|| Entry::Unspent {
                        id: hex::encode(digest),
                    });
                    Ok(((), entries.into_iter().collect()))
                },
                |_, _| Vec::new(),
            );
        })
        .await;
        Ok(())
    }
}

/// This process alone: no shared level.
#[async_trait]
impl Records for LocalStore {
    async fn version(&self) -> Result<u64, StoreError> {
        Ok(self.read_records()?.version())
    }

    async fn records(&self) -> Result<(u64, BTreeMap<String, String>), StoreError> {
        let r = self.read_records()?;
        Ok((r.version(), r.all()))
    }

    async fn swap(
        &self,
        id: &str,
        expected: Option<&str>,
        value: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.change_records(|r| {
            let done = r.swap(id, expected, value);
            (done, done)
        })
    }

    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        self.change_records(|r| (r.touch(used), ()))
    }

    async fn touched(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        Ok(self.read_records()?.used())
    }

    fn durable(&self) -> bool {
        self.path.is_some()
    }
}

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
            f.failed.retain(|k, _| k.as_str() >= last.as_str());
        }
    }
}

/// An I/O error that names the file it is about.
fn in_file(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn lock_path(path: &Path) -> PathBuf {
    beside(path, ".lock")
}

/// The file of the same name as `path` with `suffix` added, in its folder.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

fn read_state(path: &Path) -> std::io::Result<StateFile> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateFile::default()),
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
        1 => Ok(StateFile {
            version: 2,
            tenants: serde_json::from_str::<StateFileV1>(&text)
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
                .collect(),
            journal_folded: None,
        }),
        _ => serde_json::from_str::<StateFile>(&text).map_err(invalid),
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

    /// Commits are remembered (a commit sent again counts once) in memory bounded by count:
    /// remembered for ten minutes, the ids of 1,500 calls a second took tens of MiB.
    #[test]
    fn committed_holds_are_remembered_in_bounded_memory() {
        let mut c = Calls::default();
        for i in 0..COMMITTED_KEPT + 100 {
            assert!(c.first_commit(&i.to_string()));
        }
        assert_eq!(c.committed.len(), COMMITTED_KEPT);
        assert_eq!(c.order.len(), COMMITTED_KEPT);
        let last = (COMMITTED_KEPT + 99).to_string();
        assert!(!c.first_commit(&last), "a commit sent again counts once");
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
        let p1 = b.reserve("t", lim, None, now).expect("1");
        let p2 = b.reserve("t", lim, None, now).expect("2");
        assert!(matches!(
            b.reserve("t", lim, None, now),
            Err(GatewayError::BudgetExhausted {
                period: "daily",
                ..
            })
        ));
        b.release("t", &p1, None);
        let p3 = b
            .reserve("t", lim, None, now)
            .expect("released slot is reusable");
        b.commit("t", &p2, None, "default", false);
        b.commit("t", &p3, None, "default", false);
        assert_eq!(b.counts("t", now).day_used, 2);
        assert!(b.reserve("t", lim, None, now).is_err());
        // A new UTC day starts from zero; the month goes on counting.
        let tomorrow = at("2026-11-26T00:00:01Z");
        b.reserve("t", lim, None, tomorrow).expect("new day");
        assert_eq!(b.counts("t", tomorrow).month_used, 2);
    }

    /// A reservation taken before midnight and released after it gives its slot back to the day
    /// it came from, not to the new day.
    #[test]
    fn a_release_after_midnight_cannot_free_a_slot_of_the_new_day() {
        let b = LocalStore::open(None).expect("open");
        let lim = daily(1);
        let before = b
            .reserve("t", lim, None, at("2026-11-25T23:59:59Z"))
            .expect("last call of the day");
        let after = b
            .reserve("t", lim, None, at("2026-11-26T00:00:01Z"))
            .expect("first call of the new day");
        b.release("t", &before, None);
        assert!(
            b.reserve("t", lim, None, at("2026-11-26T00:00:02Z"))
                .is_err(),
            "the new day's one slot is still held"
        );
        b.commit("t", &after, None, "default", false);
        let now = at("2026-11-26T00:00:03Z");
        assert_eq!(b.counts("t", now).day_used, 1);
        assert!(b.reserve("t", lim, None, now).is_err());
    }

    /// A call reserved before midnight and billed after it counts in the day it was reserved in:
    /// the new day's limit is not overshot by it.
    #[test]
    fn a_commit_after_midnight_counts_in_the_day_it_was_reserved_in() {
        let b = LocalStore::open(None).expect("open");
        let lim = daily(1);
        let before = b
            .reserve("t", lim, None, at("2026-11-25T23:59:59Z"))
            .expect("r");
        let after = b
            .reserve("t", lim, None, at("2026-11-26T00:00:01Z"))
            .expect("r");
        b.commit("t", &before, None, "default", false);
        b.commit("t", &after, None, "default", false);
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
        let ana = SubjectHold::new("ana-hash", Some(1), None);
        let now = at("2026-11-25T23:59:00Z");
        let p = b.reserve("t", none, Some(&ana), now).expect("first");
        assert!(matches!(
            b.reserve("t", none, Some(&ana), now),
            Err(GatewayError::SubjectBudgetExhausted { .. })
        ));
        b.release("t", &p, Some("ana-hash"));
        let p = b.reserve("t", none, Some(&ana), now).expect("given back");
        b.commit("t", &p, Some("ana-hash"), "default", false);
        b.reserve(
            "t",
            none,
            Some(&SubjectHold::new("bo-hash", Some(1), None)),
            now,
        )
        .expect("another subject");
        b.flush().expect("flush");
        drop(b);
        let b = LocalStore::open(Some(path)).expect("reopen");
        assert!(matches!(
            b.reserve("t", none, Some(&ana), now),
            Err(GatewayError::SubjectBudgetExhausted {
                retry_after_secs: 60
            })
        ));
        b.reserve("t", none, Some(&ana), at("2026-11-26T00:00:01Z"))
            .expect("a new day");
    }

    #[test]
    fn month_end_is_the_same_for_monthly_budgets() {
        let b = LocalStore::open(None).expect("open");
        let lim = BudgetLimits {
            daily: None,
            monthly: Some(1),
        };
        let before = b
            .reserve("t", lim, None, at("2026-11-30T23:59:59Z"))
            .expect("last call of November");
        let after = b
            .reserve("t", lim, None, at("2026-12-01T00:00:01Z"))
            .expect("first call of December");
        b.release("t", &before, None);
        assert!(matches!(
            b.reserve("t", lim, None, at("2026-12-01T00:00:02Z")),
            Err(GatewayError::BudgetExhausted {
                period: "monthly",
                ..
            })
        ));
        b.commit("t", &after, None, "default", false);
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
        let c = b.adjust("t", now, -3).counts;
        assert_eq!((c.day_used, c.month_used), (2, 2));
        b.flush().expect("flush");
        let again = LocalStore::open(Some(path.clone())).expect("reopen");
        assert_eq!(again.counts("t", now).day_used, 2);
        assert_eq!(b.adjust("t", now, -10).counts.day_used, 0);
        b.flush().expect("flush");
        assert_eq!(
            LocalStore::open(Some(path))
                .expect("reopen")
                .counts("t", now)
                .month_used,
            0
        );
        assert_eq!(b.adjust("t", now, 4).counts.day_used, 4);
    }

    /// With `budgets.timezone = "Asia/Almaty"` (UTC+5), the day rolls over at 19:00 UTC: a
    /// daily budget of one allows one call just before and one just after, and the refusal's
    /// Retry-After reaches Almaty's midnight.
    #[test]
    fn a_budget_day_rolls_over_at_almaty_midnight() {
        let almaty = Calendar("Asia/Almaty".parse().expect("tz"));
        let b = LocalStore::open_in(None, almaty).expect("open");
        let lim = daily(1);
        let p = b
            .reserve("t", lim, None, at("2026-11-25T18:59:00Z"))
            .expect("last of the 25th");
        b.commit("t", &p, None, "default", false);
        match b.reserve("t", lim, None, at("2026-11-25T18:59:00Z")) {
            Err(GatewayError::BudgetExhausted {
                retry_after_secs, ..
            }) => assert_eq!(retry_after_secs, 60),
            other => panic!("{other:?}"),
        }
        let p = b
            .reserve("t", lim, None, at("2026-11-25T19:00:01Z"))
            .expect("first of the 26th in Almaty");
        assert_eq!(p.day, "2026-11-26");
        // In UTC both instants are the 25th: the second call would have been refused.
        let utc = LocalStore::open(None).expect("open");
        let q = utc
            .reserve("t", lim, None, at("2026-11-25T18:59:00Z"))
            .expect("r");
        utc.commit("t", &q, None, "default", false);
        assert!(utc
            .reserve("t", lim, None, at("2026-11-25T19:00:01Z"))
            .is_err());
    }

    fn commit_n(b: &LocalStore, n: usize, now: DateTime<Utc>) {
        for _ in 0..n {
            let p = b.reserve("t", daily(100), None, now).expect("r");
            b.commit("t", &p, None, "default", false);
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
        // The new process starts from the file, then both go on counting (the old one through
        // the journal from its next flush).
        let new = LocalStore::open(Some(path.clone())).expect("new");
        assert_eq!(new.counts("t", now).day_used, 3);
        old.flush().expect("flush");
        commit_n(&new, 2, now);
        commit_n(&old, 1, now);
        new.flush().expect("flush");
        old.flush().expect("flush");
        new.flush().expect("flush");
        assert_eq!(old.counts("t", now).day_used, 6);
        assert_eq!(new.counts("t", now).day_used, 6);
        assert_eq!(
            LocalStore::open(Some(path.clone()))
                .expect("a third one")
                .counts("t", now)
                .day_used,
            6
        );
        // Both gone without a last flush (a crash): the next one adds the journal to the file.
        drop((old, new));
        assert!(journal::journal_path(&path).exists());
        let after = LocalStore::open(Some(path.clone())).expect("reopen");
        assert!(!after.is_shared());
        assert!(!journal::journal_path(&path).exists());
        assert_eq!(after.counts("t", now).day_used, 6);
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
        let p = old.reserve("t", daily(10), None, now).expect("r");
        old.commit("t", &p, None, "default", true);
        old.flush().expect("flush");
        let new = LocalStore::open(Some(path.clone())).expect("new");
        old.flush().expect("flush");
        for (store, key) in [(&new, "retail"), (&old, "default")] {
            let p = store.reserve("t", daily(10), None, now).expect("r");
            store.commit("t", &p, None, key, true);
            let p = store.reserve("t", daily(10), None, now).expect("r");
            store.commit("t", &p, None, key, false);
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

    fn is_not_yet<T>(r: Result<T, Attempt>) -> bool {
        matches!(r, Err(Attempt::NotYet))
    }

    fn refused<T: std::fmt::Debug>(r: Result<T, Attempt>) -> String {
        match r {
            Err(Attempt::Refused(e)) => e.code().to_string(),
            Err(Attempt::NotYet) => "not yet".into(),
            Ok(t) => format!("admitted: {t:?}"),
        }
    }

    /// Two processes on one state file (an upgrade): the old one has calls in flight and counts
    /// not yet written; the new one admits nothing until the old one counts through the
    /// journal, then sees its holds and commits, the subject's too, and the old one sees the new
    /// one's. Together they never go past a limit, and every slot the limit has is given.
    #[test]
    fn two_processes_sharing_the_file_never_overshoot_a_budget() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let now = Utc::now();
        let lim = daily(5);
        let ana = SubjectHold::new("ana-hash", Some(3), None);
        let old = LocalStore::open(Some(path.clone())).expect("old");
        commit_n(&old, 1, now);
        let a = old.reserve("t", lim, Some(&ana), now).expect("a");
        let b = old.reserve("t", lim, Some(&ana), now).expect("b");
        let new = LocalStore::open(Some(path.clone())).expect("new");
        assert!(new.is_shared(), "the new one sees it is not alone");
        assert!(is_not_yet(new.try_reserve("t", lim, None, now)));
        assert!(is_not_yet(
            new.try_first_use(id_digest("iss", "j"), i64::MAX)
        ));
        // The old one's next flush sees the new one and counts through the journal.
        old.flush().expect("flush");
        assert!(old.is_shared());
        // Ana: 2 held by the old one, room for 1. The day: 1 counted and 2 held by the old one.
        let c = new.reserve("t", lim, Some(&ana), now).expect("ana's third");
        assert_eq!(
            refused(new.try_reserve("t", lim, Some(&ana), now)),
            "subject_budget_exhausted"
        );
        let d = new.reserve("t", lim, None, now).expect("the day's fifth");
        assert_eq!(
            refused(new.try_reserve("t", lim, None, now)),
            "budget_exhausted"
        );
        assert_eq!(
            refused(old.try_reserve("t", lim, None, now)),
            "budget_exhausted"
        );
        old.commit("t", &a, Some("ana-hash"), "default", false);
        old.release("t", &b, Some("ana-hash"));
        // b's slot is free again, for either process, once.
        let e = new.reserve("t", lim, None, now).expect("b's slot");
        assert_eq!(
            refused(old.try_reserve("t", lim, None, now)),
            "budget_exhausted"
        );
        new.commit("t", &c, Some("ana-hash"), "default", false);
        for p in [&d, &e] {
            new.commit("t", p, None, "default", false);
        }
        assert_eq!(
            refused(old.try_reserve("t", lim, None, now)),
            "budget_exhausted"
        );
        assert_eq!(old.counts("t", now).day_used, 5);
        assert_eq!(new.counts("t", now).day_used, 5);
    }

    /// The old process of an upgrade counts through the journal from the upgrade signal on,
    /// before the new one exists: the new one's first call sees the old one's holds, with no
    /// wait. Alone meanwhile, the old one keeps the journal for the new one. Once it is gone, its
    /// commits are the new one's count, its holds free, and the journal goes into the file.
    #[test]
    fn the_upgrade_signal_shares_the_counts_before_the_hand_over() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let now = Utc::now();
        let lim = daily(3);
        let old = LocalStore::open(Some(path.clone())).expect("old");
        let a = old.reserve("t", lim, None, now).expect("a");
        let b = old.reserve("t", lim, None, now).expect("b");
        old.upgrading();
        old.flush().expect("flush");
        assert!(old.is_shared(), "leaving, it keeps the journal");
        let new = LocalStore::open(Some(path.clone())).expect("new");
        let c = new.reserve("t", lim, None, now).expect("the one slot left");
        assert_eq!(
            refused(new.try_reserve("t", lim, None, now)),
            "budget_exhausted"
        );
        old.commit("t", &a, None, "default", false);
        old.flush_at_exit().expect("last flush");
        assert!(
            journal::journal_path(&path).exists(),
            "the new one is still there"
        );
        // b was in flight when the old process went (its grace period ran out): its slot is free.
        drop((old, b));
        let d = new.reserve("t", lim, None, now).expect("b's slot");
        new.commit("t", &c, None, "default", false);
        new.commit("t", &d, None, "default", false);
        new.flush().expect("flush");
        assert!(!new.is_shared(), "alone again");
        assert!(!journal::journal_path(&path).exists());
        assert_eq!(new.counts("t", now).day_used, 3);
        assert_eq!(
            refused(new.try_reserve("t", lim, None, now)),
            "budget_exhausted"
        );
        drop(new);
        let again = LocalStore::open(Some(path)).expect("reopen");
        assert_eq!(again.counts("t", now).day_used, 3);
    }

    /// A user's failed attempts, through the journal of an upgrade and a restart: the old
    /// process's failed verdict and the new one's call in flight both count in the new one, its
    /// fail in the old one, and the count is kept in the state file until an admin resets it.
    #[test]
    fn a_users_failed_attempts_hold_across_processes_and_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let now = Utc::now();
        let none = BudgetLimits {
            daily: None,
            monthly: None,
        };
        let ana = SubjectHold::new("ana-hash", None, Some(2));
        let fail = |s: &LocalStore, p: &Periods| {
            s.count_call(true, "t", p, Some("ana-hash"), "default", (false, true))
        };
        let old = LocalStore::open(Some(path.clone())).expect("old");
        let p = old.reserve("t", none, Some(&ana), now).expect("first");
        fail(&old, &p);
        old.upgrading();
        old.flush().expect("flush");
        let new = LocalStore::open(Some(path.clone())).expect("new");
        let q = new.reserve("t", none, Some(&ana), now).expect("second");
        assert_eq!(
            refused(new.try_reserve("t", none, Some(&ana), now)),
            "too_many_failed_attempts",
            "one failed, one in flight"
        );
        fail(&new, &q);
        assert_eq!(
            refused(old.try_reserve("t", none, Some(&ana), now)),
            "too_many_failed_attempts",
            "the new one's fail"
        );
        old.flush_at_exit().expect("last flush");
        drop(old);
        new.flush().expect("flush");
        drop(new);
        let again = LocalStore::open(Some(path.clone())).expect("restart");
        assert_eq!(
            refused(again.try_reserve("t", none, Some(&ana), now)),
            "too_many_failed_attempts",
            "kept in the state file"
        );
        let key = format!("{}/ana-hash", again.calendar.day(now));
        assert_eq!(again.reset_failed_now("t", key), 2);
        again.flush().expect("flush");
        drop(again);
        let after = LocalStore::open(Some(path)).expect("after the reset");
        after
            .reserve("t", none, Some(&ana), now)
            .expect("reset, and kept so");
    }

    /// The monthly budget, and a refund, go through the journal like the day's.
    #[test]
    fn a_monthly_budget_and_a_refund_hold_across_processes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let now = at("2026-11-25T10:00:00Z");
        let monthly = BudgetLimits {
            daily: None,
            monthly: Some(2),
        };
        let old = LocalStore::open(Some(path.clone())).expect("old");
        let p = old
            .reserve("t", monthly, None, at("2026-11-02T10:00:00Z"))
            .expect("r");
        old.commit("t", &p, None, "default", false);
        let held = old.reserve("t", monthly, None, now).expect("r");
        old.upgrading();
        let new = LocalStore::open(Some(path.clone())).expect("new");
        assert_eq!(
            refused(new.try_reserve("t", monthly, None, now)),
            "budget_exhausted"
        );
        assert_eq!(old.adjust("t", now, -1).counts.month_used, 0);
        let p = new
            .reserve("t", monthly, None, now)
            .expect("the refunded call");
        new.commit("t", &p, None, "default", false);
        old.commit("t", &held, None, "default", false);
        assert_eq!(
            refused(old.try_reserve("t", monthly, None, now)),
            "budget_exhausted"
        );
        assert_eq!(new.counts("t", now).month_used, 2);
        drop(old);
        new.flush().expect("flush");
        drop(new);
        let again = LocalStore::open(Some(path)).expect("reopen");
        assert_eq!(again.counts("t", now).month_used, 2);
        assert_eq!(again.counts("t", now).day_used, 2);
    }

    /// A crash between writing the journal's counts into the state file and removing the
    /// journal adds them once.
    #[test]
    fn a_journal_is_added_to_the_state_file_once() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let now = Utc::now();
        let old = LocalStore::open(Some(path.clone())).expect("old");
        old.upgrading();
        commit_n(&old, 2, now);
        let journal = std::fs::read(journal::journal_path(&path)).expect("journal");
        // Alone at its exit, it adds the journal to the file.
        old.flush_at_exit().expect("last flush");
        assert!(!journal::journal_path(&path).exists());
        drop(old);
        std::fs::write(journal::journal_path(&path), journal).expect("put it back");
        let again = LocalStore::open(Some(path.clone())).expect("again");
        assert_eq!(again.counts("t", now).day_used, 2);
        assert!(!journal::journal_path(&path).exists());
    }

    /// A single-use id spent in one process is spent in the other, whichever spent it, and
    /// stays spent after the other is gone; one given back is free in both.
    #[test]
    fn a_single_use_id_is_spent_once_across_processes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("budgets.json");
        let spend = |s: &LocalStore, id: &str| {
            s.try_first_use(id_digest("iss", id), i64::MAX)
                .map_err(|a| refused::<()>(Err(a)))
        };
        let old = LocalStore::open(Some(path.clone())).expect("old");
        assert_eq!(spend(&old, "before"), Ok(true));
        let new = LocalStore::open(Some(path.clone())).expect("new");
        old.flush().expect("flush");
        assert_eq!(spend(&new, "before"), Ok(false));
        assert_eq!(spend(&new, "during"), Ok(true));
        assert_eq!(spend(&old, "during"), Ok(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        rt.block_on(new.forget_use("iss", "during"))
            .expect("forget");
        assert_eq!(spend(&old, "during"), Ok(true));
        drop(old);
        new.flush().expect("flush");
        assert!(!new.is_shared());
        for id in ["before", "during"] {
            assert_eq!(spend(&new, id), Ok(false), "{id}");
        }
    }
}
