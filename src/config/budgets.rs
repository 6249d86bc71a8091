//! `[budgets]`: where the counts are kept, and what a billable call costs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Calendar, Issues};

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct RawBudgets {
    /// File where billable-call counts survive a restart; none keeps them in memory only.
    pub state_file: Option<PathBuf>,
    /// How often changed counts are written to the state file.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// What one billable call costs (any currency): adds a cost column to the usage export.
    pub price_per_call: Option<f64>,
    /// The time zone of budget days and months (an IANA name such as `Asia/Almaty`).
    pub timezone: String,
}

impl Default for RawBudgets {
    fn default() -> Self {
        RawBudgets {
            state_file: None,
            flush_interval: Duration::from_secs(1),
            price_per_call: None,
            timezone: "UTC".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BudgetsConfig {
    pub state_file: Option<PathBuf>,
    pub flush_interval: Duration,
    /// The global price of one billable call (tenants may override it).
    pub price_per_call: Option<f64>,
    /// Where days and months start (`budgets.timezone`).
    pub calendar: Calendar,
}

/// A price is a number, zero or more.
pub(super) fn price_ok(p: Option<f64>) -> bool {
    p.is_none_or(|p| p.is_finite() && p >= 0.0)
}

/// Check `[budgets]`.
pub fn check(raw: RawBudgets, issues: &mut Issues) -> BudgetsConfig {
    let mut issue = |path: &str, message: String| issues.add(path, message);
    let calendar = match raw.timezone.parse::<chrono_tz::Tz>() {
        Ok(tz) => Calendar(tz),
        Err(_) => {
            issue(
                "budgets.timezone",
                format!(
                    "{:?} is not a time zone name like \"UTC\" or \"Asia/Almaty\"",
                    raw.timezone
                ),
            );
            Calendar::default()
        }
    };
    if raw.flush_interval.is_zero() {
        issue("budgets.flush_interval", "must be more than zero".into());
    }
    if !price_ok(raw.price_per_call) {
        issue(
            "budgets.price_per_call",
            "must be a number, zero or more".into(),
        );
    }

    BudgetsConfig {
        state_file: raw.state_file,
        flush_interval: raw.flush_interval,
        price_per_call: raw.price_per_call,
        calendar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_zone_is_an_iana_name() {
        let mut issues = Issues::default();
        let ok = check(
            RawBudgets {
                timezone: "Asia/Almaty".into(),
                ..RawBudgets::default()
            },
            &mut issues,
        );
        assert!(issues.0.is_empty());
        assert_eq!(ok.calendar, Calendar("Asia/Almaty".parse().expect("tz")));
        check(
            RawBudgets {
                timezone: "Almaty".into(),
                ..RawBudgets::default()
            },
            &mut issues,
        );
        assert_eq!(issues.0.len(), 1);
        assert_eq!(issues.0[0].path, "budgets.timezone");
    }
}
