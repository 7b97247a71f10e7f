//! The record of intercepted connections that `metaproxy connections` shows:
//! a bounded ring of recent ones plus a live feed for `--follow`.

use std::{collections::VecDeque, net::SocketAddr, sync::Mutex, time::SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

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
}

impl Connection {
    /// A connection refused before any request: the probe had no record
    /// of it, so nothing is known but the client's address.
    pub fn refused(client: SocketAddr, reason: Option<String>) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            client: client.to_string(),
            cgroup_id: None,
            cgroup: None,
            pid: None,
            comm: None,
            original_dst: None,
            container_id: None,
            container: None,
            role: None,
            request: None,
            outcome: Outcome::Refused,
            reason,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// Recent connections (oldest first) and a feed of new ones.
#[derive(Debug)]
pub struct ConnLog {
    recent: Mutex<VecDeque<Connection>>,
    capacity: usize,
    feed: broadcast::Sender<Connection>,
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

    pub fn push(&self, conn: Connection) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        // A copy only for watchers, when there are any (every request
        // passes here). Under the lock, like subscribing, so a new watcher
        // finds each connection in its snapshot or its feed, never both.
        if self.feed.receiver_count() > 0 {
            let _ = self.feed.send(conn.clone());
        }
        recent.push_back(conn);
    }

    /// The recent connections, and a receiver for those after them.
    pub fn snapshot_and_subscribe(&self) -> (Vec<Connection>, broadcast::Receiver<Connection>) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        // Subscribing under the lock means nothing falls between the two.
        (recent.iter().cloned().collect(), self.feed.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(n: u32) -> Connection {
        Connection {
            time: String::new(),
            client: format!("10.0.0.1:{n}"),
            cgroup_id: None,
            cgroup: None,
            pid: Some(n),
            comm: None,
            original_dst: None,
            container_id: None,
            container: None,
            role: None,
            request: None,
            outcome: Outcome::Served,
            reason: None,
        }
    }

    #[test]
    fn keeps_the_newest_and_feeds_the_rest() {
        let log = ConnLog::new(2);
        for n in 0..3 {
            log.push(conn(n));
        }
        let (recent, mut rx) = log.snapshot_and_subscribe();
        assert_eq!(
            recent.iter().map(|c| c.pid).collect::<Vec<_>>(),
            [Some(1), Some(2)]
        );
        log.push(conn(3));
        assert_eq!(rx.try_recv().unwrap().pid, Some(3));
    }
}
