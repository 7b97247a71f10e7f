//! The answer pin's userspace half: before the daemon reads a container's
//! first request, it tells the kernel where answers to that container's
//! address go (its MAC, and the host side of its veth), so that
//! `mp_l2_deliver` sends them there whatever forged ARP or forged source
//! MACs have written into the neighbour and bridge forwarding tables.
//!
//! Every fact comes from the kernel or from Docker, none from the job:
//! * the bridge: the interface the kernel routes the address to;
//! * the port: the veth enslaved to that bridge whose peer lives in the
//!   network namespace of the container's init process (matched by the
//!   namespace id the kernel gives it, `RTM_GETNSID`, against each link's
//!   `IFLA_LINK_NETNSID`);
//! * the MAC: the one Docker gave the endpoint holding the address.
//!
//! An address reached over `lo` (a `--network host` job, a host process)
//! crosses no bridge and needs no pin. One that reaches a bridge without a
//! port of the container's, or whose container has no MAC or process, is
//! refused: the connection is closed unanswered.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
};

use futures_util::{future::BoxFuture, StreamExt as _, TryStreamExt as _};
use metaproxy_common::{mountinfo, L2Peer};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    link::LinkAttribute,
    nsid::{NsidAttribute, NsidMessage},
    RouteNetlinkMessage,
};

use crate::{
    kernel::{guard::RouteTable, probe::Probe},
    model::{
        container::Container,
        ids::{CgroupId, ContainerId},
        interface::Interface,
    },
};

/// Where the daemon's answers to a container go on the wire: pinned to
/// the container's own MAC and port before the daemon reads its first
/// request, so forged ARP or MACs cannot turn them aside. The daemon's is
/// [`KernelAnswerPath`]; the in-process tests record what they are asked.
pub trait AnswerPath: Send + Sync + std::fmt::Debug + 'static {
    /// Pins the path to `peer`, the address `container` connected from in
    /// `cgroup`; `Err` says why it could not be, and the connection is
    /// then closed unanswered.
    fn pin<'a>(
        &'a self,
        cgroup: CgroupId,
        peer: IpAddr,
        container: &'a Container,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// Pins answer paths in the kernel, once per container and address.
pub struct KernelAnswerPath {
    probe: Arc<Probe>,
    routes: RouteTable,
    /// What is pinned already: (the caller's cgroup, address) -> (its
    /// container, the port; 0 for none needed). By cgroup: `docker
    /// restart` keeps the id but gives a new cgroup and a new veth.
    pinned: Mutex<HashMap<(CgroupId, IpAddr), (ContainerId, u32)>>,
    /// One pin made at a time: a container's first connections often come
    /// together (an SDK's retries, a job's parallel steps), and each would
    /// otherwise walk every link on the host.
    making: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KernelAnswerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelAnswerPath").finish_non_exhaustive()
    }
}

/// Tries at making one pin before the connection is closed unanswered.
const PIN_ATTEMPTS: u32 = 4;

/// Bound on remembered pins; past it they are forgotten and made again.
const MAX_PINNED: usize = 16_384;

impl KernelAnswerPath {
    /// Opens its own rtnetlink socket (a task of the current runtime).
    pub fn new(probe: Arc<Probe>) -> anyhow::Result<Self> {
        Ok(Self {
            probe,
            routes: RouteTable::open()?,
            pinned: Mutex::new(HashMap::new()),
            making: tokio::sync::Mutex::new(()),
        })
    }

    /// Forgets container `id`'s pins (it stopped): its addresses may go to
    /// another container, which will be pinned afresh.
    pub fn forget(&self, id: &ContainerId) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<IpAddr> = pinned
            .iter()
            .filter(|(_, (c, port))| c == id && *port != 0)
            .map(|((_, addr), _)| *addr)
            .collect();
        pinned.retain(|_, (c, _)| c != id);
        for addr in gone {
            // Another container may hold the address now, pinned afresh.
            if !pinned
                .iter()
                .any(|((_, a), (_, port))| *a == addr && *port != 0)
            {
                self.probe.unpin_peer(addr);
            }
        }
    }

    /// Forgets every pin remembered (container events were lost): each is
    /// made again at its container's next connection.
    pub fn forget_all(&self) {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn is_pinned(&self, key: &(CgroupId, IpAddr)) -> bool {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    async fn pin_now(
        &self,
        cgroup: CgroupId,
        peer: IpAddr,
        container: &Container,
    ) -> Result<(), String> {
        let peer = peer.to_canonical();
        let key = (cgroup, peer);
        if self.is_pinned(&key) {
            return Ok(());
        }
        let _one_at_a_time = self.making.lock().await;
        // Made while we waited?
        if self.is_pinned(&key) {
            return Ok(());
        }
        // A link dump that meets links coming and going (containers
        // starting in a crowd) is cut short by the kernel: ask again.
        let mut last = String::new();
        for attempt in 0..PIN_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
            }
            match self.make(key, peer, container).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn make(
        &self,
        key: (CgroupId, IpAddr),
        peer: IpAddr,
        container: &Container,
    ) -> Result<(), String> {
        let bridge = self
            .routes
            .route_to(peer)
            .await
            .ok_or_else(|| format!("no route to {peer}"))?;
        if bridge.name == "lo" {
            // Host network: nothing crosses a bridge.
            self.remember(key, container.id.clone(), 0);
            return Ok(());
        }
        let pid = container
            .wire
            .pid
            .ok_or_else(|| format!("container {} has no running process", container.name))?;
        // None for a container in another's network namespace: its frames
        // still go only to the pinned port, with the MAC they have.
        let mac = container.wire.mac_of(peer).unwrap_or([0; 6]);
        let port = self.port(pid, container, &bridge).await?;
        self.probe
            .pin_peer(
                peer,
                L2Peer {
                    mac,
                    _pad: [0; 2],
                    port,
                    _pad2: 0,
                },
                &bridge,
            )
            .map_err(|e| format!("{:#}", anyhow::Error::new(e)))?;
        self.remember(key, container.id.clone(), port);
        tracing::debug!(container = %container.name, address = %peer, bridge = %bridge.name, port, "answers pinned to the container's port");
        Ok(())
    }

    /// Remembers a pin made (`port` 0: none needed, over `lo`).
    fn remember(&self, key: (CgroupId, IpAddr), id: ContainerId, port: u32) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if pinned.len() >= MAX_PINNED {
            pinned.clear();
        }
        pinned.insert(key, (id, port));
    }

    /// The port on `bridge` whose veth peer is in `pid`'s network namespace.
    async fn port(
        &self,
        pid: u32,
        container: &Container,
        bridge: &Interface,
    ) -> Result<u32, String> {
        let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| format!("opening the network namespace of pid {pid}: {e}"))?;
        // The pid came from an inspect that may be old: the namespace is
        // the container's only if the process still lives in its cgroup
        // (else another job's process may have the number now).
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|text| mountinfo::own_cgroup2(&text).map(str::to_owned));
        if cgroup.is_none() || cgroup != container.cgroup {
            return Err(format!(
                "pid {pid} is no longer container {}'s init",
                container.name
            ));
        }
        let nsid = self.nsid(&netns).await?;
        let mut links = self.routes.handle().link().get().execute();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|e| format!("listing links: {e}"))?
        {
            let mut netnsid = None;
            let mut controller = None;
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::LinkNetNsId(id) => netnsid = Some(*id),
                    LinkAttribute::Controller(c) => controller = Some(*c),
                    _ => {}
                }
            }
            if netnsid == Some(nsid) && controller == Some(bridge.index) {
                return Ok(link.header.index);
            }
        }
        Err(format!(
            "no port on {} leads to the network namespace of pid {pid}",
            bridge.name
        ))
    }

    /// The id our namespace knows `netns` by (one is assigned if it has
    /// none, as the kernel does for every veth peer already).
    async fn nsid(&self, netns: &std::fs::File) -> Result<i32, String> {
        let mut question = NsidMessage::default();
        question
            .attributes
            .push(NsidAttribute::Fd(netns.as_raw_fd() as u32));
        let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(question));
        message.header.flags = NLM_F_REQUEST;
        let mut answers = self
            .routes
            .handle()
            .request(message)
            .map_err(|e| format!("asking the namespace id: {e}"))?;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    if let Some(id) = m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(id) => Some(*id),
                        _ => None,
                    }) {
                        return if id >= 0 {
                            Ok(id)
                        } else {
                            Err("the container's network namespace has no id here".into())
                        };
                    }
                }
                NetlinkPayload::Error(e) => return Err(format!("asking the namespace id: {e}")),
                _ => {}
            }
        }
        Err("no answer to the namespace id question".into())
    }
}

impl AnswerPath for KernelAnswerPath {
    fn pin<'a>(
        &'a self,
        cgroup: CgroupId,
        peer: IpAddr,
        container: &'a Container,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.pin_now(cgroup, peer, container))
    }
}
