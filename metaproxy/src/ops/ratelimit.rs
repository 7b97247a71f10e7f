//! Log rate limits: anything on the host can make the daemon refuse
//! things, and must not be able to fill the disk with our log, nor drown
//! one container's lines in another's.
//!
//! [`PerSource`] is the one for refusals: each source (a container's
//! cgroup, or the address of a client nobody recorded) gets its own few
//! lines a second, and all of them together a bounded number, from a table
//! of bounded size. [`RateLimit`] is the plain process-wide kind, for lines
//! with no source (accept failures).

use std::{collections::BTreeMap, net::IpAddr, sync::Mutex, time::SystemTime};

use crate::model::ids::{CgroupId, ContainerId};

/// Lets `per_second` events a second through and counts the others.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u32,
    /// (second, events let through in it, events held back since the last
    /// one let through)
    window: Mutex<(u64, u32, u64)>,
}

fn unix_second() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RateLimit {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Mutex::new((0, 0, 0)),
        }
    }

    /// `Some(held back since the last one)` if this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(unix_second())
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

/// Who a log line is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A caller the probe recorded: its cgroup (one per container).
    Cgroup(CgroupId),
    /// A container the caller was identified as.
    Container(ContainerId),
    /// A client nobody recorded, by address.
    Client(IpAddr),
}

impl From<CgroupId> for Source {
    fn from(id: CgroupId) -> Self {
        Self::Cgroup(id)
    }
}

impl From<&ContainerId> for Source {
    fn from(id: &ContainerId) -> Self {
        Self::Container(id.clone())
    }
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        Self::Client(ip)
    }
}

/// Sources [`PerSource`] keeps at most. A source past it (more than this
/// many logged in the very same second) is held back with the rest.
pub const MAX_SOURCES: usize = 1024;

/// One source's window.
#[derive(Debug, Clone, Copy)]
struct Window {
    second: u64,
    let_through: u32,
    held: u64,
}

#[derive(Debug)]
struct Table {
    sources: BTreeMap<Source, Window>,
    /// The second the table was last cleared of quiet sources.
    pruned: u64,
}

/// Lets `per_source` lines a second through for each [`Source`], and
/// `total` a second for all sources together; counts the others, per
/// source. A source's held-back count is reported with its next line (a
/// source dropped from the full table takes its count with it).
#[derive(Debug)]
pub struct PerSource {
    per_source: u32,
    total: RateLimit,
    table: Mutex<Table>,
}

impl PerSource {
    pub const fn new(per_source: u32, total: u32) -> Self {
        Self {
            per_source,
            total: RateLimit::new(total),
            table: Mutex::new(Table {
                sources: BTreeMap::new(),
                pruned: 0,
            }),
        }
    }

    /// `Some(this source's lines held back since its last one)` if this
    /// line about `source` may be logged.
    pub fn allow(&self, source: impl Into<Source>) -> Option<u64> {
        self.allow_at(&source.into(), unix_second())
    }

    fn allow_at(&self, source: &Source, now: u64) -> Option<u64> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !t.sources.contains_key(source) && t.sources.len() >= MAX_SOURCES {
            // Once a second at most: forget the sources that have not
            // logged in this second.
            if t.pruned != now {
                t.pruned = now;
                t.sources.retain(|_, w| w.second == now);
            }
            if t.sources.len() >= MAX_SOURCES {
                return None;
            }
        }
        let w = t.sources.entry(source.clone()).or_insert(Window {
            second: now,
            let_through: 0,
            held: 0,
        });
        if w.second != now {
            w.second = now;
            w.let_through = 0;
        }
        if w.let_through < self.per_source && self.total.allow_at(now).is_some() {
            w.let_through += 1;
            Some(std::mem::take(&mut w.held))
        } else {
            w.held += 1;
            None
        }
    }

    /// Sources in the table.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sources
            .len()
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

    #[test]
    fn one_noisy_source_cannot_hide_another_and_no_source_is_unlimited() {
        let noisy = Source::Cgroup(CgroupId(1));
        let quiet = Source::Cgroup(CgroupId(2));
        let stranger = Source::Client("127.0.0.9".parse().unwrap());
        let limit = PerSource::new(2, 5);
        // The noisy container's flood: two lines, then it is held back...
        assert_eq!(limit.allow_at(&noisy, 100), Some(0));
        assert_eq!(limit.allow_at(&noisy, 100), Some(0));
        for _ in 0..1000 {
            assert_eq!(limit.allow_at(&noisy, 100), None);
        }
        // ...while the others still get theirs in the same second.
        assert_eq!(limit.allow_at(&quiet, 100), Some(0));
        assert_eq!(limit.allow_at(&stranger, 100), Some(0));
        assert_eq!(limit.allow_at(&stranger, 100), Some(0));
        // All together: `total` a second (two noisy, one quiet, two
        // stranger so far).
        assert_eq!(limit.allow_at(&quiet, 100), None);
        // Each source's next line counts what it held back.
        assert_eq!(limit.allow_at(&noisy, 101), Some(1000));
        assert_eq!(limit.allow_at(&quiet, 101), Some(1));
        assert_eq!(limit.allow_at(&stranger, 101), Some(0));
    }

    #[test]
    fn the_per_source_table_is_bounded() {
        let limit = PerSource::new(1, u32::MAX);
        let source = |i: u32| Source::Client(IpAddr::from(i.to_be_bytes()));
        for i in 0..MAX_SOURCES as u32 {
            assert_eq!(limit.allow_at(&source(i), 100), Some(0));
        }
        // Full with sources of this very second: a new one is held back.
        assert_eq!(limit.allow_at(&source(u32::MAX), 100), None);
        assert_eq!(limit.sources(), MAX_SOURCES);
        // A second later the quiet ones make room.
        assert_eq!(limit.allow_at(&source(u32::MAX), 101), Some(0));
        assert_eq!(limit.sources(), 1);
        assert_eq!(limit.allow_at(&CgroupId(7).into(), 101), Some(0));
    }
}
