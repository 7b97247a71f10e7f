//! A log rate limit: anything on the host can make the daemon refuse
//! things, and must not be able to fill the disk with our log.

use std::time::SystemTime;

/// Lets `per_second` events a second through and counts the others.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u32,
    /// (second, events let through in it, events held back since the last
    /// one let through)
    window: std::sync::Mutex<(u64, u32, u64)>,
}

impl RateLimit {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: std::sync::Mutex::new((0, 0, 0)),
        }
    }

    /// `Some(held back since the last one)` if this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0 != now {
            w.0 = now;
            w.1 = 0;
        }
        if w.1 < self.per_second {
            w.1 += 1;
            Some(std::mem::take(&mut w.2))
        } else {
            w.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_lets_a_few_through_and_counts_the_rest() {
        let limit = RateLimit::new(2);
        assert_eq!(limit.allow_at(100), Some(0));
        assert_eq!(limit.allow_at(100), Some(0));
        assert_eq!(limit.allow_at(100), None);
        assert_eq!(limit.allow_at(100), None);
        // A new second: the first event says how many were held back.
        assert_eq!(limit.allow_at(101), Some(2));
        assert_eq!(limit.allow_at(101), Some(0));
    }
}
