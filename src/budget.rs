//! Budgets of billable calls per tenant, per UTC day and month, with reserve-then-commit so that
//! concurrent requests can never overshoot: a slot is reserved before the upstream call, committed
//! when the provider may have billed it, and released otherwise (on drop, if nothing was decided).
//!
//! Each period is counted under its own key (`2026-11-25`, `2026-11`), and a reservation
//! remembers the periods it was taken in: a call reserved at 23:59:59 and settled after midnight
//! is settled in the day it came from, so the roll-over can neither free nor double-count a slot.
//!
//! Where the counts live is the store's business (`store::local`: this process and its state
//! file; `store::redis`: the fleet's Redis); a `Reservation` works the same against either.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, TimeZone, Utc};

use crate::store::{Hold, Settle, SharedVerdict, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// The day and the month a call belongs to, as the keys they are counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    pub day: String,
    pub month: String,
}

impl Periods {
    pub fn at(now: DateTime<Utc>) -> Periods {
        Periods {
            day: now.format("%Y-%m-%d").to_string(),
            month: now.format("%Y-%m").to_string(),
        }
    }
}

/// A tenant's calls in the current day and month, as `/admin/usage` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub day: String,
    pub day_used: u64,
    pub month: String,
    pub month_used: u64,
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

/// One claimed call: released on drop unless settled, always in the periods it was taken in.
pub struct Reservation {
    store: Arc<dyn Store>,
    hold: Hold,
    done: bool,
}

impl Reservation {
    pub fn new(store: &Arc<dyn Store>, hold: Hold) -> Reservation {
        Reservation {
            store: store.clone(),
            hold,
            done: false,
        }
    }

    pub fn tenant(&self) -> &str {
        &self.hold.tenant
    }

    pub fn hold(&self) -> &Hold {
        &self.hold
    }

    /// Commit or release the hold, sharing the verdict with the fleet when there is one.
    pub async fn settle(mut self, how: Settle, verdict: Option<(&SharedVerdict, Duration)>) {
        self.done = true;
        self.store.settle(&self.hold, how, verdict).await;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.store.abandon(&self.hold);
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
    fn retry_after_reaches_the_period_end() {
        assert_eq!(secs_to_next_day(at("2026-11-25T23:59:00Z")), 60);
        assert_eq!(secs_to_next_month(at("2026-12-31T23:00:00Z")), 3600);
    }
}
