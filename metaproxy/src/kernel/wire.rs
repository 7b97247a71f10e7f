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
use metaproxy_common::L2Peer;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    link::LinkAttribute,
    nsid::{NsidAttribute, NsidMessage},
    RouteNetlinkMessage,
};

use crate::{
    kernel::{
        guard::RouteTable,
        probe::{Interface, Probe},
    },
    model::{container::Container, ids::ContainerId},
    server::AnswerPath,
};

/// Pins answer paths in the kernel, once per container and address.
pub struct KernelAnswerPath {
    probe: Arc<Probe>,
    routes: RouteTable,
    /// What is pinned already: (container, address) -> port.
    pinned: Mutex<HashMap<(ContainerId, IpAddr), u32>>,
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
            .keys()
            .filter(|(c, _)| c == id)
            .map(|(_, addr)| *addr)
            .collect();
        pinned.retain(|(c, _), _| c != id);
        for addr in gone {
            // Another container may hold the address now, pinned afresh.
            if !pinned.iter().any(|((_, a), port)| *a == addr && *port != 0) {
                self.probe.unpin_peer(addr);
            }
        }
    }

    fn is_pinned(&self, key: &(ContainerId, IpAddr)) -> bool {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    async fn pin_now(&self, peer: IpAddr, container: &Container) -> Result<(), String> {
        let peer = peer.to_canonical();
        let key = (container.id.clone(), peer);
        if self.is_pinned(&key) {
            return Ok(());
        }
        let _one_at_a_time = self.making.lock().await;
        // Made while we waited?
        if self.is_pinned(&key) {
            return Ok(());
        }
        let bridge = self
            .routes
            .route_to(peer)
            .await
            .ok_or_else(|| format!("no route to {peer}"))?;
        if bridge.name == "lo" {
            // Host network: nothing crosses a bridge.
            self.remember(key, 0);
            return Ok(());
        }
        let pid = container
            .wire
            .pid
            .ok_or_else(|| format!("container {} has no running process", container.name))?;
        let mac = container
            .wire
            .mac_of(peer)
            .ok_or_else(|| format!("Docker gave no MAC for {peer}"))?;
        let port = self.port(pid, &bridge).await?;
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
        self.remember(key, port);
        tracing::debug!(container = %container.name, address = %peer, bridge = %bridge.name, port, "answers pinned to the container's port");
        Ok(())
    }

    /// Remembers a pin made (`port` 0: none needed, over `lo`).
    fn remember(&self, key: (ContainerId, IpAddr), port: u32) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if pinned.len() >= MAX_PINNED {
            pinned.clear();
        }
        pinned.insert(key, port);
    }

    /// The port on `bridge` whose veth peer is in `pid`'s network namespace.
    async fn port(&self, pid: u32, bridge: &Interface) -> Result<u32, String> {
        let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| format!("opening the network namespace of pid {pid}: {e}"))?;
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
        peer: IpAddr,
        container: &'a Container,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.pin_now(peer, container))
    }
}
