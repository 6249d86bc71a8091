//! A request's turn to call the provider: its claim in the store (waiting while another
//! replica calls for the same image), and the `Reservation` it holds until the call is settled.
//!
//! Each period is counted under its own key (`2026-11-25`, `2026-11`), and a reservation
//! remembers the periods it was taken in: a call reserved at 23:59:59 and settled after midnight
//! is settled in the day it came from, so the roll-over can neither free nor double-count a slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{lock_wait, ClaimReply, Claims, Hold, Settle, SharedVerdict};
use crate::egress::Egress;
use crate::error::GatewayError;
use crate::upstream::Exchange;

/// One claimed call: released on drop unless settled, always in the periods it was taken in.
pub struct Reservation {
    store: Arc<dyn Claims>,
    hold: Hold,
    done: bool,
}

impl Reservation {
    pub fn new(store: Arc<dyn Claims>, hold: Hold) -> Reservation {
        Reservation {
            store,
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

/// What the store gave a request that leads the call for its image.
pub enum Turn {
    /// Its turn to call: the budget is held (and, in a fleet, the image locked) for it.
    Call(Reservation),
    /// Another replica answered this image already: its exchange, and where it came from.
    Answered(Exchange, super::Origin),
}

/// Claim the call in the store: a verdict another replica has, or the image's lock and the
/// budget hold. While another replica is calling for the same image, ask again (every 10 ms at
/// first, then up to every 100 ms) until its verdict arrives or its lock lapses (this request
/// then takes over); its owner keeps it for its call at most, and a dead owner's lapses within a
/// lease, so waiting longer than `lock_wait` is a store fault.
pub async fn take_turn(
    store: Arc<dyn Claims>,
    hold: Hold,
    egress: &Egress,
    longest_call: Duration,
) -> Result<Turn, GatewayError> {
    let until = Instant::now() + lock_wait(longest_call);
    let mut pause = Duration::from_millis(10);
    loop {
        match store.claim(&hold, egress).await? {
            ClaimReply::Go => return Ok(Turn::Call(Reservation::new(store, hold))),
            ClaimReply::Hit(e, origin) => return Ok(Turn::Answered(e, origin)),
            ClaimReply::Wait(left) => {
                if Instant::now() >= until {
                    return Err(GatewayError::UpstreamTimeout);
                }
                let nap = pause.min(left.max(Duration::from_millis(1)));
                tokio::time::sleep(nap).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}
