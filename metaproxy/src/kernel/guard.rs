//! Where the packet guard goes: the interfaces through which the kernel
//! routes the guarded addresses (IMDS, and the container-credentials
//! addresses the redirect covers), and every other interface of the host's
//! namespace but `lo` and containers' ports (so what policy routing, ECMP
//! or a bridge sends around that one route lookup meets it too), asked of
//! the kernel with rtnetlink and followed as routes and links change, so a
//! renamed, re-created, new or newly routed interface is guarded again.
//!
//! The kernel programs are in `metaproxy-ebpf/src/guard.rs`; attaching them
//! is the probe's ([`crate::kernel::probe`]). This module only decides where.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::{link::LinkAttribute, route::RouteAttribute};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};

use crate::{
    kernel::probe::{interface_name, Probe},
    model::interface::Interface,
};

/// IMDS over IPv4 and IPv6.
pub const IMDS4: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
pub const IMDS6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254));

/// Routes and links are looked at again this often even without an event
/// (a netlink socket may drop events when its buffer overflows).
const RESYNC: Duration = Duration::from_secs(10);
/// Events come in bursts (a link going down takes its routes with it):
/// one lookup after the burst settles.
const SETTLE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("rtnetlink: {0}")]
    Netlink(#[from] std::io::Error),
    #[error(transparent)]
    Probe(#[from] crate::kernel::probe::ProbeError),
}

/// Where each guarded address leaves the host, as last looked up, and
/// every other interface the guard goes on.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Routes {
    /// (address, interface) for each guarded address that has a route.
    pub routed: Vec<(IpAddr, Interface)>,
    /// Guarded addresses with no route (nothing can reach them).
    pub unrouted: Vec<IpAddr>,
    /// Every other interface of the host's namespace but `lo` and
    /// containers' ports: what `ip rule` policy routing (by source, mark or
    /// incoming interface), ECMP or a bridge sends around the route lookup
    /// still meets the guard.
    #[serde(default)]
    pub host: Vec<Interface>,
    /// Containers' ports seen in the same look: the guard comes off these
    /// alone (one put on a new veth before Docker made it a port).
    #[serde(skip)]
    pub ports: Vec<u32>,
}

impl Routes {
    /// The interfaces a guarded address routes through, each once.
    pub fn routed_interfaces(&self) -> Vec<Interface> {
        let mut all: Vec<Interface> = self.routed.iter().map(|(_, i)| i.clone()).collect();
        all.sort();
        all.dedup();
        all
    }

    /// The interfaces, each once.
    pub fn interfaces(&self) -> Vec<Interface> {
        let mut all: Vec<Interface> = self.routed.iter().map(|(_, i)| i.clone()).collect();
        all.extend(self.host.iter().cloned());
        all.sort();
        all.dedup();
        all
    }
}

/// A connection to the kernel's routing tables.
pub struct RouteTable {
    handle: Handle,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteTable")
    }
}

impl RouteTable {
    /// Opens an rtnetlink socket; its connection runs as a task of the
    /// current runtime.
    pub fn open() -> Result<Self, GuardError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Where the kernel would send a packet to each of `addrs` (`ip route
    /// get`).
    pub async fn lookup(&self, addrs: &[IpAddr]) -> Routes {
        let mut routes = Routes::default();
        for addr in addrs {
            match self.route_to(*addr).await {
                Some(iface) => routes.routed.push((*addr, iface)),
                None => routes.unrouted.push(*addr),
            }
        }
        match self.host_interfaces().await {
            Some((host, ports)) => {
                routes.host = host;
                routes.ports = ports;
            }
            None => {
                tracing::warn!("cannot list the host's interfaces; the guard stays where it is")
            }
        }
        routes
    }

    /// Every interface of this namespace but `lo` and containers' ports,
    /// and the ports (by index). A container's port is a veth whose peer
    /// lives in another namespace and which is a bridge's port: what a job
    /// sends through it is forwarded out of another interface, which has
    /// the guard. Anything else enslaved elsewhere (a VRF, a bond, a veth
    /// to a router namespace that is no bridge's port) keeps the guard.
    pub async fn host_interfaces(&self) -> Option<(Vec<Interface>, Vec<u32>)> {
        use netlink_packet_route::link::{InfoKind, InfoPortKind, LinkInfo};
        let (mut host, mut ports) = (Vec::new(), Vec::new());
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.ok()? {
            let (mut name, mut peer_elsewhere, mut veth, mut bridge_port) =
                (None, false, false, false);
            for attr in &link.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            match info {
                                LinkInfo::Kind(InfoKind::Veth) => veth = true,
                                LinkInfo::PortKind(InfoPortKind::Bridge) => bridge_port = true,
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            let Some(name) = name else { continue };
            if veth && peer_elsewhere && bridge_port {
                ports.push(link.header.index);
            } else if name != "lo" {
                host.push(Interface {
                    index: link.header.index,
                    name,
                });
            }
        }
        host.sort();
        Some((host, ports))
    }

    /// The netlink handle, for other questions to the same socket.
    pub(crate) fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Where the kernel would send a packet to `addr`, if anywhere.
    pub async fn route_to(&self, addr: IpAddr) -> Option<Interface> {
        let message = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        // An unreachable address is an error reply: no route.
        let route = self
            .handle
            .route()
            .get(message)
            .execute()
            .try_next()
            .await
            .ok()??;
        let index = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })?;
        Some(Interface {
            index,
            name: interface_name(index)?,
        })
    }
}

/// What the guard covers now: shared by the follower, `/readyz`, status and
/// the metrics.
#[derive(Debug, Default)]
pub struct GuardState {
    routes: Mutex<Routes>,
}

impl GuardState {
    pub fn new(routes: Routes) -> Self {
        Self {
            routes: Mutex::new(routes),
        }
    }

    pub fn routes(&self) -> Routes {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether every interface a guarded address routes through, and
    /// every other host interface, has the guard (`guarded` lists those
    /// that do).
    pub fn covered_by(&self, guarded: &[Interface]) -> bool {
        self.routes()
            .interfaces()
            .iter()
            .all(|iface| guarded.iter().any(|g| g.index == iface.index))
    }

    fn set(&self, routes: Routes) {
        *self.routes.lock().unwrap_or_else(|p| p.into_inner()) = routes;
    }
}

/// Follows route and link changes for as long as the daemon runs: each
/// interface a guarded address comes to route through gets the guard, and
/// interfaces that are gone are forgotten. Runs as a task.
pub async fn follow(
    probe: Arc<Probe>,
    table: RouteTable,
    addrs: Vec<IpAddr>,
    state: Arc<GuardState>,
) {
    let events = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ]);
    let mut events = match events {
        Ok((connection, _, messages)) => {
            tokio::spawn(connection);
            Some(messages)
        }
        Err(e) => {
            tracing::warn!(error = %e, interval = ?RESYNC, "cannot follow route changes; looking at the routes periodically instead");
            None
        }
    };
    loop {
        let event = async {
            match events.as_mut() {
                Some(events) => events.next().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = event => {
                if !got {
                    tracing::warn!("the route event stream ended; looking at the routes periodically instead");
                    events = None;
                }
                tokio::time::sleep(SETTLE).await;
                // Drain the rest of the burst.
                if let Some(events) = events.as_mut() {
                    while tokio::time::timeout(Duration::ZERO, events.next()).await.is_ok_and(|e| e.is_some()) {}
                }
            }
            () = tokio::time::sleep(RESYNC) => {}
        }
        let routes = table.lookup(&addrs).await;
        tracing::debug!(?routes, "routes to the guarded addresses");
        if let Err(e) = apply(&probe, &routes) {
            tracing::error!(error = %e, "cannot put the packet guard on a new route's interface");
        }
        state.set(routes);
    }
}

/// Guards every interface in `routes`, forgets interfaces that are gone,
/// and takes the guard off containers' ports (a new veth is guarded until
/// Docker has moved its peer and made it a bridge's port). One interface
/// that fails (a veth moved away between the dump and the attach) does
/// not keep the others from the guard; it is tried again next time.
pub fn apply(probe: &Probe, routes: &Routes) -> Result<(), GuardError> {
    probe.forget_interfaces(|index| interface_name(index).is_some())?;
    let mut failed = None;
    for iface in routes.interfaces() {
        match probe.guard_interface(&iface) {
            Ok(true) => {
                tracing::info!(interface = %iface.name, ifindex = iface.index, "packet guard attached to a new interface")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(interface = %iface.name, ifindex = iface.index, error = %e, "cannot put the packet guard on this interface now");
                failed.get_or_insert(e);
            }
        }
    }
    for index in &routes.ports {
        if let Err(e) = probe.unguard_interface(*index) {
            tracing::debug!(ifindex = index, error = %e, "cannot take the packet guard off a container's port");
        }
    }
    // Only a routed interface left without the guard is an error here (the
    // readiness check says so too); a host interface is tried again.
    let (guarded, _) = probe.guarded_interfaces();
    let routed_covered = routes
        .routed_interfaces()
        .iter()
        .all(|r| guarded.iter().any(|g| g.index == r.index));
    match failed {
        Some(e) if !routed_covered => Err(e.into()),
        _ => Ok(()),
    }
}

/// The addresses the guard protects: IMDS, and the container-credentials
/// addresses the redirect covers.
pub fn guarded_addresses(container_credentials: &[IpAddr]) -> Vec<IpAddr> {
    let mut addrs = vec![IMDS4, IMDS6];
    addrs.extend(container_credentials.iter().copied());
    addrs
}
