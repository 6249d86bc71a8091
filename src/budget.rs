//! The budget calendar: where days and months start and end (`budgets.timezone`), and the
//! periods a billable call is counted in. The counts themselves are the store's (`store`).

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// The day and the month a call belongs to, as the keys they are counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    pub day: String,
    pub month: String,
}

/// Where budget periods start and end: days and months in one time zone
/// (`budgets.timezone`, UTC by default). The provider's customers are mostly in Kazakhstan
/// (`Asia/Almaty`, UTC+5): their finance team's day is not UTC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar(pub Tz);

impl Default for Calendar {
    fn default() -> Self {
        Calendar(Tz::UTC)
    }
}

impl Calendar {
    /// The day and month of `now` in this calendar.
    pub fn periods(&self, now: DateTime<Utc>) -> Periods {
        let local = now.with_timezone(&self.0);
        Periods {
            day: local.format("%Y-%m-%d").to_string(),
            month: local.format("%Y-%m").to_string(),
        }
    }

    /// The day of `now`, as it is counted under (`2026-11-25`): for what is noted per request.
    pub fn day(&self, now: DateTime<Utc>) -> String {
        now.with_timezone(&self.0).format("%Y-%m-%d").to_string()
    }

    /// Today's date in this calendar.
    pub fn today(&self, now: DateTime<Utc>) -> NaiveDate {
        now.with_timezone(&self.0).date_naive()
    }

    /// Seconds until the next local midnight (at least 1).
    pub fn secs_to_next_day(&self, now: DateTime<Utc>) -> u64 {
        self.secs_until(now, self.today(now) + ChronoDuration::days(1))
            .unwrap_or(86_400)
    }

    /// Seconds until the first of next month, local midnight (at least 1).
    pub fn secs_to_next_month(&self, now: DateTime<Utc>) -> u64 {
        let today = self.today(now);
        let (y, m) = if today.month() == 12 {
            (today.year() + 1, 1)
        } else {
            (today.year(), today.month() + 1)
        };
        NaiveDate::from_ymd_opt(y, m, 1)
            .and_then(|d| self.secs_until(now, d))
            .unwrap_or(31 * 86_400)
    }

    /// Seconds from `now` to the start of local day `day` (its first instant, should a clock
    /// change skip midnight).
    fn secs_until(&self, now: DateTime<Utc>, day: NaiveDate) -> Option<u64> {
        let start = (0..3).find_map(|h| {
            let t = day.and_hms_opt(h, 0, 0)?;
            self.0.from_local_datetime(&t).earliest()
        })?;
        Some((start.with_timezone(&Utc) - now).num_seconds().max(1) as u64)
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
        let utc = Calendar::default();
        assert_eq!(utc.secs_to_next_day(at("2026-11-25T23:59:00Z")), 60);
        assert_eq!(utc.secs_to_next_month(at("2026-12-31T23:00:00Z")), 3600);
    }

    /// Almaty is UTC+5: its day ends at 19:00 UTC, its month at 19:00 UTC on the last day.
    #[test]
    fn an_almaty_day_ends_at_its_own_midnight() {
        let almaty = Calendar("Asia/Almaty".parse().expect("tz"));
        let before = almaty.periods(at("2026-11-25T18:59:59Z"));
        let after = almaty.periods(at("2026-11-25T19:00:01Z"));
        assert_eq!(before.day, "2026-11-25");
        assert_eq!(after.day, "2026-11-26");
        assert_eq!(almaty.secs_to_next_day(at("2026-11-25T18:59:00Z")), 60);
        assert_eq!(almaty.periods(at("2026-11-30T19:00:00Z")).month, "2026-12");
        assert_eq!(almaty.secs_to_next_month(at("2026-11-30T18:00:00Z")), 3600);
        // The same instants in UTC are one day.
        let utc = Calendar::default();
        assert_eq!(
            utc.periods(at("2026-11-25T18:59:59Z")).day,
            utc.periods(at("2026-11-25T19:00:01Z")).day
        );
    }
}
