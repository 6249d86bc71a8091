//! Throttled warnings: a warning that each request would write while a dependency is down (a
//! store outage) is written once, then at most once every ten seconds with the number left out.

/// A warning that each request would write while a dependency is down (a store outage): the
/// first is written, then at most one every `EVERY`, with the number left out meanwhile, so an
/// outage at a thousand requests a second is a line every ten seconds, not a thousand a second.
/// (The access log still has a line per request, with its code.)
pub struct Throttled {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttled {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub const fn new() -> Self {
        Throttled {
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last one written)` when this one is to be written.
    pub fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if s.0
            .is_some_and(|last| now.duration_since(last) < Self::EVERY)
        {
            s.1 += 1;
            return None;
        }
        s.0 = Some(now);
        Some(std::mem::take(&mut s.1))
    }
}

impl Default for Throttled {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` through a `Throttled` of its own call site: the first, then at most one
/// every 10 s, with `left_out`.
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static SAID: $crate::throttle::Throttled = $crate::throttle::Throttled::new();
        if let Some(left_out) = SAID.admit() {
            tracing::warn!(left_out, $($arg)+);
        }
    }};
}
pub(crate) use warn_throttled;
