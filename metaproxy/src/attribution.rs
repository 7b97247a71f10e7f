//! Who opened an accepted connection: the accepted connection's address
//! pair -> the kernel's record -> a [`Caller`] with its cgroup, pid, comm
//! and original destination.
//!
//! The first step of the request path, and the only place that reads the
//! probe's records or resolves a cgroup id to its path. A connection the
//! probe did not record (a direct connect to the listen address, anything
//! from off the host) has no caller and is refused.
//!
//! A connection is tied to its record by its 4-tuple where nothing
//! translated it ([`Via::Direct`]), else by the slot (the port of the
//! listen address) the redirect sent it to ([`Via::Translated`]). A
//! translated connection only claims its record once it has shown that it
//! comes from the record's container ([`Attribution::claim`]): until then
//! the record stays for the connection it belongs to. A translated
//! connection from a local socket of a user-space relay that serves the
//! record's network namespace ([`Via::Relayed`], see `kernel::relay`)
//! claims it at once.

use std::{net::SocketAddr, sync::Arc};

use metaproxy_common::ConnRecord;

use crate::{
    kernel::addrs::{ip_from_words, AddrPair, ClientAddr},
    kernel::cgroup::CgroupPaths,
    kernel::probe::Probe,
    kernel::relay::{self, Relay},
    model::{
        caller::{Caller, Via},
        ids::CgroupId,
    },
};

/// Where the kernel's connection records come from: the probe's pinned
/// maps in the daemon, a table in tests.
pub trait RecordSource: Send + Sync + 'static {
    /// The record of the accepted connection `pair`: the one its own
    /// socket made, taken ([`Via::Direct`]); else the one pending on the
    /// slot it was accepted on, only looked at ([`Via::Translated`]).
    fn lookup(&self, pair: &AddrPair) -> Result<Option<(ConnRecord, Via)>, String>;
    /// Takes the record pending on `slot` if it is still the one made at
    /// `boot_ns` by `cgroup`; false if another connection took it first.
    fn claim(&self, slot: u16, boot_ns: u64, cgroup: CgroupId) -> Result<bool, String>;
}

impl RecordSource for Probe {
    fn lookup(&self, pair: &AddrPair) -> Result<Option<(ConnRecord, Via)>, String> {
        // The error and its causes on one line.
        Probe::lookup(self, pair).map_err(|e| format!("{:#}", anyhow::Error::new(e)))
    }
    fn claim(&self, slot: u16, boot_ns: u64, cgroup: CgroupId) -> Result<bool, String> {
        Probe::claim(self, slot, |r| {
            r.boot_ns == boot_ns && r.cgroup_id == cgroup.0
        })
        .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
    }
}

/// Which user-space relay (slirp4netns, pasta), if any, opened a
/// translated connection on behalf of the record's process: /proc and the
/// kernel in the daemon, a table in tests.
pub trait RelaySource: Send + Sync + 'static {
    /// Whether the client of `pair` has an address of this host (only
    /// then can it be a relay's). Cheap, never blocks for long.
    fn is_local(&self, pair: &AddrPair) -> bool;
    /// The relay holding the local socket of `pair` that serves the
    /// network namespace of thread `tid` of process `pid`, still in the
    /// cgroup at `cgroup_path`. May block.
    fn relay_of(
        &self,
        pair: &AddrPair,
        pid_tid: (u32, u32),
        cgroup_path: &str,
    ) -> Result<Option<Relay>, String>;
}

/// The host's relays, as /proc and the kernel show them.
#[derive(Debug, Default)]
pub struct HostRelays;

impl RelaySource for HostRelays {
    fn is_local(&self, pair: &AddrPair) -> bool {
        relay::is_local(pair.client.0.ip())
    }
    fn relay_of(
        &self,
        pair: &AddrPair,
        pid_tid: (u32, u32),
        cgroup_path: &str,
    ) -> Result<Option<Relay>, String> {
        relay::relay_of(pair.client.0, pair.server.0, pid_tid, cgroup_path)
    }
}

/// Relay checks at once: each reads every process's open files, and any
/// local process can open connections to a pending slot. A connection
/// that finds both taken is not a relay's (it is refused: fail closed);
/// none waits for one.
const RELAY_CHECKS: usize = 2;
/// How long a relay check may take before its connection is refused (the
/// check itself runs on, holding its place, until it ends).
const RELAY_CHECK_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Failed relay checks are logged at most this often.
static RELAY_LOG: crate::ops::ratelimit::PerSource = crate::ops::ratelimit::PerSource::new(1, 5);

/// Maps cgroup ids to their paths below the cgroup2 mount.
pub trait CgroupDirectory: Send + Sync + 'static {
    /// From memory only; never blocks.
    fn cached(&self, id: CgroupId) -> Option<Arc<str>>;
    /// May walk the filesystem (run off the async workers).
    fn resolve(&self, id: CgroupId) -> Option<Arc<str>>;
}

impl CgroupDirectory for CgroupPaths {
    fn cached(&self, id: CgroupId) -> Option<Arc<str>> {
        CgroupPaths::cached(self, id.0)
    }
    fn resolve(&self, id: CgroupId) -> Option<Arc<str>> {
        self.path_of(id.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributionError {
    #[error("no probe record for this connection")]
    NoRecord,
    #[error("probe lookup failed: {0}")]
    Lookup(String),
    /// A translated connection whose source is not the record's container
    /// (nor one of its addresses), or whose record another connection took.
    #[error("the connect pending on this slot is another's")]
    NotItsSlot,
}

/// Attribution: accepted connection -> [`Caller`].
pub struct Attribution {
    records: Arc<dyn RecordSource>,
    cgroups: Arc<dyn CgroupDirectory>,
    relays: Arc<dyn RelaySource>,
    relay_checks: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Attribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attribution").finish_non_exhaustive()
    }
}

impl Attribution {
    pub fn new(
        records: Arc<dyn RecordSource>,
        cgroups: Arc<dyn CgroupDirectory>,
        relays: Arc<dyn RelaySource>,
    ) -> Self {
        Self {
            records,
            cgroups,
            relays,
            relay_checks: Arc::new(tokio::sync::Semaphore::new(RELAY_CHECKS)),
        }
    }

    /// The caller behind `pair`. Known cgroups are answered from memory;
    /// only a new one walks the cgroup tree, on the blocking pool.
    pub async fn attribute(&self, pair: &AddrPair) -> Result<Caller, AttributionError> {
        let (record, via) = self
            .records
            .lookup(pair)
            .map_err(AttributionError::Lookup)?
            .ok_or(AttributionError::NoRecord)?;
        let id = CgroupId(record.cgroup_id);
        let path = match self.cgroups.cached(id) {
            Some(path) => Some(path),
            None => {
                let cgroups = self.cgroups.clone();
                tokio::task::spawn_blocking(move || cgroups.resolve(id))
                    .await
                    .ok()
                    .flatten()
            }
        };
        let mut caller = caller(pair.client, &record, path, via);
        if let (Via::Translated { slot }, Some(path)) = (via, caller.cgroup_path.clone()) {
            if let Some(relay) = self.relay(pair, (caller.pid, record.tid), path).await {
                tracing::debug!(client = %pair.client.0, relay_pid = relay.pid, relay = %crate::ops::logging::Clean(&relay.comm), cgroup_id = %caller.cgroup, "connection relayed for the record's network namespace");
                caller.via = Via::Relayed {
                    slot,
                    relay_pid: relay.pid,
                };
            }
        }
        Ok(caller)
    }

    /// The relay that opened `pair` for thread `tid` of process `pid` of
    /// the cgroup at `path`, if one did.
    async fn relay(&self, pair: &AddrPair, pid_tid: (u32, u32), path: Arc<str>) -> Option<Relay> {
        if !self.relays.is_local(pair) {
            return None;
        }
        let Ok(permit) = self.relay_checks.clone().try_acquire_owned() else {
            if let Some(suppressed) = RELAY_LOG.allow(pair.client.0.ip()) {
                tracing::warn!(client = %pair.client.0, suppressed, "relay checks busy: refusing a connection from a host address on a pending slot");
            }
            return None;
        };
        let (relays, pair) = (self.relays.clone(), *pair);
        let check = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            relays.relay_of(&pair, pid_tid, &path)
        });
        let why = match tokio::time::timeout(RELAY_CHECK_TIME, check).await {
            Ok(Ok(Ok(relay))) => return relay,
            Ok(Ok(Err(e))) => e,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "it took too long".to_string(),
        };
        if let Some(suppressed) = RELAY_LOG.allow(pair.client.0.ip()) {
            tracing::warn!(client = %pair.client.0, error = %crate::ops::logging::Clean(&why), suppressed, "cannot tell whether a relay opened this connection; refusing it");
        }
        None
    }

    /// Takes the record of a connection that will not be served (shed
    /// before it was attributed), so that its slot is free at once. A
    /// translated connection takes nothing: its record may be another's.
    pub fn release(&self, pair: &AddrPair) {
        let _ = self.records.lookup(pair);
    }

    /// Takes the record a translated caller was found by. Call it once the
    /// connection has shown it comes from the record's container; until
    /// then the record waits for the connection it belongs to. A direct
    /// caller took its record at lookup.
    pub fn claim(&self, caller: &Caller) -> Result<(), AttributionError> {
        let Some(slot) = caller.via.slot() else {
            return Ok(());
        };
        match self.records.claim(slot, caller.boot_ns, caller.cgroup) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AttributionError::NotItsSlot),
            Err(e) => Err(AttributionError::Lookup(e)),
        }
    }
}

/// A caller from a kernel record.
fn caller(peer: ClientAddr, r: &ConnRecord, cgroup_path: Option<Arc<str>>, via: Via) -> Caller {
    Caller {
        peer: peer.0,
        cgroup: CgroupId(r.cgroup_id),
        cgroup_path,
        pid: r.pid,
        comm: comm(&r.comm),
        original_dst: original_dst(r),
        boot_ns: r.boot_ns,
        via,
    }
}

/// The destination the caller asked for before the probe rewrote it.
pub fn original_dst(r: &ConnRecord) -> SocketAddr {
    SocketAddr::new(ip_from_words(r.family, r.orig_addr), r.orig_port)
}

/// The kernel's NUL-padded `comm`.
pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaproxy_common::AF_INET;

    #[test]
    fn original_destination_and_comm_render() {
        let mut r = ConnRecord {
            family: AF_INET,
            orig_addr: [u32::from_ne_bytes([169, 254, 169, 254]), 0, 0, 0],
            orig_port: 80,
            ..Default::default()
        };
        assert_eq!(original_dst(&r).to_string(), "169.254.169.254:80");
        r.family = metaproxy_common::AF_INET6;
        r.orig_addr = metaproxy_common::IMDS_IP6;
        assert_eq!(original_dst(&r).to_string(), "[fd00:ec2::254]:80");
        assert_eq!(comm(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
        assert_eq!(comm(b"exactly16bytes!!"), "exactly16bytes!!");
    }
}
