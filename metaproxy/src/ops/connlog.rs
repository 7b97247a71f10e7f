//! The record of intercepted connections that `metaproxy connections` shows:
//! a bounded ring of recent ones plus a live feed for `--follow`.
//!
//! Every request passes here, so an [`Entry`] keeps what it is made of
//! (the caller's record, shared with the connection; ids that are cheap to
//! copy) and is spelled out as a [`Connection`] only when someone reads it.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    model::caller::Caller,
    model::ids::{ContainerId, RoleArn},
};

/// Longest request path kept: a caller must not fill our memory with its
/// paths.
const LOGGED_PATH: usize = 200;

/// One request on an intercepted connection (or one connection refused
/// before any request), as an admin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// When the caller connected (the kernel's timestamp), RFC 3339 UTC.
    pub time: String,
    /// The client's address as the daemon saw it.
    pub client: String,
    pub cgroup_id: Option<u64>,
    /// Path below the cgroup2 mount, e.g. `/docker/<id>`.
    pub cgroup: Option<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Where the caller meant to connect, e.g. `169.254.169.254:80`.
    pub original_dst: Option<String>,
    #[serde(default)]
    pub container_id: Option<String>,
    /// The container's name.
    #[serde(default)]
    pub container: Option<String>,
    /// The role ARN the container may assume, if any.
    #[serde(default)]
    pub role: Option<String>,
    /// `METHOD /path` of the request, absent for refused connections.
    #[serde(default)]
    pub request: Option<String>,
    pub outcome: Outcome,
    /// Why it was refused, for refusals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `translated` when its source was rewritten on the way (an inner
    /// dockerd's NAT, a relay) and the connection was found by its slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Answered: credentials, the role listing, a token or metadata.
    Served,
    /// The container has no role: nothing to serve.
    NoRole,
    /// Refused, with a reason: no probe record, a refused role, a host
    /// process not in `--allow-host-cgroup`, STS or Docker unavailable.
    Refused,
    /// A bad, expired or foreign token, or IMDSv1 under `--require-imdsv2`.
    Unauthorized,
    /// A path containers may not read.
    NotFound,
    /// A host process's request, passed to the real IMDS unchanged.
    Passthrough,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Served => "served",
            Self::NoRole => "no-role",
            Self::Refused => "refused",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not-found",
            Self::Passthrough => "passthrough",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who an entry is about.
#[derive(Debug)]
enum Source {
    /// The probe's record of an attributed connection (its address and
    /// when it connected included).
    Caller(Arc<Caller>),
    /// A connection the probe did not record: its address, and when it was
    /// refused.
    Unattributed { client: SocketAddr, at: SystemTime },
}

/// One entry of the log, as recorded on the request path.
#[derive(Debug)]
pub struct Entry {
    source: Source,
    container: Option<(ContainerId, String)>,
    role: Option<RoleArn>,
    /// Method and path (cut to [`LOGGED_PATH`] characters, and whether it was).
    request: Option<(hyper::Method, Box<str>, bool)>,
    outcome: Outcome,
    reason: Option<String>,
}

impl Entry {
    /// A connection refused before any request: the probe had no record
    /// of it, so nothing is known but the client's address.
    pub fn refused(client: SocketAddr, reason: Option<String>) -> Self {
        Self {
            source: Source::Unattributed {
                client,
                at: SystemTime::now(),
            },
            container: None,
            role: None,
            request: None,
            outcome: Outcome::Refused,
            reason,
        }
    }

    /// A request `caller` sent: `method path`, answered with `outcome`.
    pub fn answered(
        caller: &Arc<Caller>,
        method: &hyper::Method,
        path: &str,
        container: Option<(&ContainerId, &str)>,
        role: Option<&RoleArn>,
        outcome: Outcome,
        reason: Option<String>,
    ) -> Self {
        let (path, cut) = match path.char_indices().nth(LOGGED_PATH) {
            Some((at, _)) => (&path[..at], true),
            None => (path, false),
        };
        Self {
            source: Source::Caller(caller.clone()),
            container: container.map(|(id, name)| (id.clone(), name.to_owned())),
            role: role.cloned(),
            request: Some((method.clone(), path.into(), cut)),
            outcome,
            reason,
        }
    }

    /// The entry as `metaproxy connections` shows it.
    pub fn connection(&self) -> Connection {
        let (at, client, caller) = match &self.source {
            Source::Caller(c) => (c.connected_at(), c.peer, Some(&**c)),
            Source::Unattributed { client, at } => (*at, *client, None),
        };
        Connection {
            time: humantime::format_rfc3339_millis(at).to_string(),
            client: client.to_string(),
            cgroup_id: caller.map(|c| c.cgroup.0),
            cgroup: caller.and_then(|c| c.cgroup_path.as_deref().map(str::to_owned)),
            pid: caller.map(|c| c.pid),
            comm: caller.map(|c| c.comm.clone()),
            original_dst: caller.map(|c| c.original_dst.to_string()),
            container_id: self.container.as_ref().map(|(id, _)| id.to_string()),
            container: self.container.as_ref().map(|(_, name)| name.clone()),
            role: self.role.as_ref().map(RoleArn::to_string),
            request: self.request.as_ref().map(|(method, path, cut)| {
                format!("{method} {path}{}", if *cut { "..." } else { "" })
            }),
            outcome: self.outcome,
            reason: self.reason.clone(),
            via: caller.and_then(|c| match c.via {
                crate::model::caller::Via::Direct => None,
                crate::model::caller::Via::Translated { .. } => Some("translated".into()),
                crate::model::caller::Via::Relayed { relay_pid, .. } => {
                    Some(format!("relayed by pid {relay_pid}"))
                }
            }),
        }
    }
}

/// Recent connections (oldest first) and a feed of new ones.
#[derive(Debug)]
pub struct ConnLog {
    recent: Mutex<VecDeque<Arc<Entry>>>,
    capacity: usize,
    feed: broadcast::Sender<Arc<Entry>>,
}

impl ConnLog {
    pub fn new(capacity: usize) -> Self {
        let (feed, _) = broadcast::channel(1024);
        Self {
            recent: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            feed,
        }
    }

    pub fn push(&self, entry: Entry) {
        let entry = Arc::new(entry);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        // Fed only when someone watches. Under the lock, like subscribing,
        // so a new watcher finds each connection in its snapshot or its
        // feed, never both.
        if self.feed.receiver_count() > 0 {
            let _ = self.feed.send(entry.clone());
        }
        recent.push_back(entry);
    }

    /// The recent connections, and a receiver for those after them.
    pub fn snapshot_and_subscribe(&self) -> (Vec<Connection>, broadcast::Receiver<Arc<Entry>>) {
        let (recent, rx) = {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            // Subscribing under the lock means nothing falls between the two.
            let recent: Vec<Arc<Entry>> = recent.iter().cloned().collect();
            (recent, self.feed.subscribe())
        };
        // Spelled out after the lock: the request path waits on it.
        (recent.iter().map(|e| e.connection()).collect(), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(n: u16) -> Entry {
        Entry::refused(SocketAddr::from(([10, 0, 0, 1], n)), None)
    }

    #[test]
    fn keeps_the_newest_and_feeds_the_rest() {
        let log = ConnLog::new(2);
        for n in 0..3 {
            log.push(conn(n));
        }
        let (recent, mut rx) = log.snapshot_and_subscribe();
        assert_eq!(
            recent.iter().map(|c| c.client.as_str()).collect::<Vec<_>>(),
            ["10.0.0.1:1", "10.0.0.1:2"]
        );
        log.push(conn(3));
        assert_eq!(rx.try_recv().unwrap().connection().client, "10.0.0.1:3");
    }
}
