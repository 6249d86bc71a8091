//! A rate of calls, as the config writes it (`"20/s"`, `"30/min"`, `"500/h"`): what tenants,
//! subjects and the global pace are limited to.

use std::time::Duration;

/// A steady rate: `calls` every `per` (`"20/s"`, `"30/min"`, `"500/h"`), so rates below one a
/// second can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub calls: u32,
    pub per: Duration,
}

impl Rate {
    pub fn per_second(calls: u32) -> Rate {
        Rate {
            calls,
            per: Duration::from_secs(1),
        }
    }

    /// `N/s`, `N/min` or `N/h` (also `sec`, `second`, `m`, `minute`, `hour`), N at least 1.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("{text:?} is not a rate like \"20/s\", \"30/min\" or \"500/h\"");
        let (n, unit) = text.split_once('/').ok_or_else(bad)?;
        let calls: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            _ => return Err(bad()),
        };
        if calls == 0 {
            return Err(format!("{text:?}: at least one call"));
        }
        Ok(Rate {
            calls,
            per: Duration::from_secs(per),
        })
    }

    /// The time in which one call is earned back.
    pub fn interval(&self) -> Duration {
        self.per / self.calls.max(1)
    }

    pub fn calls_per_second(&self) -> f64 {
        f64::from(self.calls) / self.per.as_secs_f64()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "min",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_below_one_a_second() {
        assert_eq!(
            Rate::parse("30/min").expect("ok").interval(),
            Duration::from_secs(2)
        );
        assert_eq!(Rate::parse("500/h").expect("ok").to_string(), "500/h");
        for bad in ["0/min", "30", "x/min", "30/day"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
