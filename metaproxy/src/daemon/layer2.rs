//! Names the jobs the layer-2 lock refused: the kernel notes each cgroup's
//! first refusal of each kind (`MP_L2_SEEN`), and this task logs it once,
//! with the container and the job it belongs to, so an admin reading the
//! log knows whom to ask why their job forged frames.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use metaproxy_common::{L2Refusal, L2Seen};

use crate::{
    identity::{container_roots, Identities},
    kernel::{cgroup::CgroupPaths, probe::Probe},
};

/// How often the kernel's notes are read.
const EVERY: Duration = Duration::from_secs(1);
/// At most this many lines per read; the rest wait for the next one.
const LINES_PER_READ: usize = 32;

/// Runs forever; spawn it as a task.
pub(super) async fn log_refusals(probe: Arc<Probe>, mount: PathBuf, identities: Arc<Identities>) {
    let paths = Arc::new(CgroupPaths::new(mount));
    let mut logged: HashSet<L2Seen> = HashSet::new();
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tick.tick().await;
        let seen: HashSet<L2Seen> = probe.l2_seen().into_iter().collect();
        // What the kernel's LRU evicted may be logged again if it recurs.
        logged.retain(|k| seen.contains(k));
        let new: Vec<L2Seen> = seen
            .into_iter()
            .filter(|k| !logged.contains(k))
            .take(LINES_PER_READ)
            .collect();
        for key in new {
            logged.insert(key);
            log_one(&key, &paths, &identities).await;
        }
    }
}

async fn log_one(key: &L2Seen, paths: &Arc<CgroupPaths>, identities: &Identities) {
    let refusal = L2Refusal::from_slot(key.kind);
    let kind = refusal.map_or("unknown", L2Refusal::name);
    let path = {
        let (paths, id) = (paths.clone(), key.cgroup_id);
        tokio::task::spawn_blocking(move || paths.path_of(id))
            .await
            .ok()
            .flatten()
    };
    let Some(path) = path else {
        tracing::warn!(
            kind,
            cgroup_id = key.cgroup_id,
            "layer-2 lock refused a process whose cgroup is gone"
        );
        return;
    };
    let container = match container_roots(&path).into_iter().next() {
        Some((id, ..)) => identities.find(id.as_str()).await.ok().flatten(),
        None => None,
    };
    match container {
        Some(c) => tracing::warn!(
            kind,
            container = %c.name,
            job = c.job_id().unwrap_or("-"),
            cgroup = %path,
            "layer-2 lock refused a job: {}",
            explain(refusal)
        ),
        None => tracing::warn!(
            kind,
            cgroup = %path,
            "layer-2 lock refused a process in no known container: {}",
            explain(refusal)
        ),
    }
}

/// What the refused call would have allowed, for the log line.
fn explain(refusal: Option<L2Refusal>) -> &'static str {
    match refusal {
        Some(L2Refusal::PacketSocket) => {
            "a packet socket (forged ARP or MACs, sniffing, frames past tc egress)"
        }
        Some(L2Refusal::XdpSocket | L2Refusal::XdpOption) => {
            "an AF_XDP socket (frames past tc egress)"
        }
        Some(L2Refusal::RawIpv6Socket) => "a raw IPv6 socket (forged neighbour discovery)",
        Some(L2Refusal::IpHeader) => "an IP header of its own making (a forged source address)",
        Some(L2Refusal::NonlocalBind) => "binding an address that is not its own",
        Some(L2Refusal::QdiscBypass) => "PACKET_QDISC_BYPASS (frames past tc egress)",
        // Counted at a bridge, never noted against a cgroup.
        Some(L2Refusal::SpoofedArp | L2Refusal::UnpinnedAnswer) | None => "a call the lock refuses",
    }
}
