//! Budgets of billable calls per tenant, per day and month (of `budgets.timezone`), with
//! reserve-then-commit so that concurrent requests can never overshoot: a slot is reserved before the upstream call, committed
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

use crate::store::{Hold, Settle, SharedVerdict, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    pub daily: Option<u64>,
    pub monthly: Option<u64>,
}

/// A tenant's calls in the current day and month, as `/admin/usage` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub day: String,
    pub day_used: u64,
    pub month: String,
    pub month_used: u64,
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
