//! Fair shares of the listener: a budget per job (else per outermost
//! container), one for all host callers together, and a reserve that keeps
//! room for a new job.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::UNATTRIBUTED;
use crate::{identity::Identity, model::ids::ContainerId};

/// Connections any share may hold even when only the reserve is left.
pub(super) const FLOOR: usize = 8;

/// Caps on open connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Per [`Share`]: per job, per container outside a job, and for all
    /// host callers together (`--max-connections-per-container`).
    pub max_connections_per_cgroup: usize,
}

/// Whose budget a connection counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Share {
    /// A gitlab-runner job: its build container, its services and
    /// whatever else carries its job label.
    Job(Arc<str>),
    /// A container outside any job, by its outermost container.
    Container(ContainerId),
    /// Every process in no container, together: a host user can make
    /// cgroups (`systemd-run --user --scope`) but not jobs.
    Host,
    /// Callers whose identity could not be settled (they are refused).
    Unidentified,
}

impl Share {
    pub(super) fn of(identity: &Result<Identity, crate::identity::IdentityError>) -> Self {
        match identity {
            Ok(Identity::Container(c)) => match c.job_id() {
                Some(job) => Share::Job(job.into()),
                None => Share::Container(c.id.clone()),
            },
            Ok(Identity::Host) => Share::Host,
            Err(_) => Share::Unidentified,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_cgroup: 256,
        }
    }
}

/// Open connections, overall and per [`Share`].
#[derive(Debug)]
pub struct ConnectionCount {
    pub(super) limits: Limits,
    pub(super) total: Arc<tokio::sync::Semaphore>,
    /// Connections the probe did not record (direct connects to the listen
    /// address) get their 403 from a small pool of their own, so they
    /// cannot take the permits of attributed connections.
    pub(super) unattributed: tokio::sync::Semaphore,
    pub(super) per_share: Mutex<HashMap<Share, usize>>,
}

impl ConnectionCount {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            total: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            unattributed: tokio::sync::Semaphore::new(UNATTRIBUTED.min(limits.max_connections)),
            per_share: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more connection of `share` (this connection already
    /// holds a global permit), if its share and the reserve allow.
    pub(super) fn enter(self: &Arc<Self>, share: Share) -> Option<ShareSlot> {
        let open = self.open();
        let mut map = self.per_share.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.get(&share).copied().unwrap_or(0);
        if !admits(self.limits, open, n) {
            return None;
        }
        map.insert(share.clone(), n + 1);
        Some(ShareSlot(self.clone(), share))
    }

    /// The most connections any one share has open.
    pub fn largest_per_cgroup(&self) -> usize {
        let map = self.per_share.lock().unwrap_or_else(|e| e.into_inner());
        map.values().copied().max().unwrap_or(0)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.total.available_permits()
    }
}

/// Whether a share holding `held` connections may open one more, with
/// `open` connections open in all (this one included): within its share,
/// and, once only the reserve (the last eighth) is left, only while it
/// holds fewer than [`FLOOR`].
pub(super) fn admits(limits: Limits, open: usize, held: usize) -> bool {
    if held >= limits.max_connections_per_cgroup {
        return false;
    }
    let reserve = limits.max_connections / 8;
    open <= limits.max_connections - reserve || held < FLOOR
}

/// One open connection of a share; released on drop.
pub(super) struct ShareSlot(Arc<ConnectionCount>, Share);

impl Drop for ShareSlot {
    fn drop(&mut self) {
        let mut map = self.0.per_share.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}
