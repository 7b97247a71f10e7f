//! The process on the other end of an accepted connection, as the kernel
//! recorded it at `connect()`: what attribution hands every later stage.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::ids::CgroupId;

/// The process on the other end of an accepted connection, as the kernel
/// saw it at `connect()`.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client's address as `accept()` reported it.
    pub peer: SocketAddr,
    pub cgroup: CgroupId,
    /// The cgroup's path below the cgroup2 mount (`/docker/<id>`); `None`
    /// if the cgroup was gone before we could look.
    pub cgroup_path: Option<Arc<str>>,
    pub pid: u32,
    pub comm: String,
    /// Where the caller meant to connect, e.g. `169.254.169.254:80`.
    pub original_dst: SocketAddr,
    /// When it connected (the kernel's `CLOCK_BOOTTIME`).
    pub boot_ns: u64,
    /// How its connection was tied to the record.
    pub via: Via,
}

/// How an accepted connection was tied to the kernel's record of a
/// connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// By its 4-tuple: the connecting socket's own SYN, as the kernel saw
    /// it leave. Nothing between changed it; the record is taken.
    Direct,
    /// By the slot it was accepted on: its source was translated on the
    /// way (an inner dockerd's MASQUERADE, a user-space relay). The record
    /// is only looked at: the connection must first show it comes from
    /// the record's container, and only then takes it (see
    /// `attribution::Attribution::claim`).
    Translated { slot: u16 },
    /// By its slot, from a local socket of a user-space relay (slirp4netns,
    /// pasta) that the kernel shows serves the network namespace the
    /// record's process connected from (`kernel::relay`). The record is
    /// claimed before anything is read.
    Relayed { slot: u16, relay_pid: u32 },
}

impl Via {
    /// The slot a connection found its record by, if it was not its own
    /// 4-tuple.
    pub fn slot(self) -> Option<u16> {
        match self {
            Via::Direct => None,
            Via::Translated { slot } | Via::Relayed { slot, .. } => Some(slot),
        }
    }
}

impl Caller {
    /// When it connected, as wall-clock time.
    pub fn connected_at(&self) -> SystemTime {
        boot_ns_to_wall(self.boot_ns)
    }
}

/// The kernel stamps records with CLOCK_BOOTTIME; turn that into wall time.
fn boot_ns_to_wall(boot_ns: u64) -> SystemTime {
    let now = SystemTime::now();
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .ok()
        .map(|ts| Duration::from(ts).as_nanos() as u64)
        .and_then(|boot_now| {
            now.checked_sub(Duration::from_nanos(boot_now.saturating_sub(boot_ns)))
        })
        .unwrap_or(now)
}
