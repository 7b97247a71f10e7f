//! Where the packet guard goes: the interfaces through which the kernel
//! routes the guarded addresses (IMDS, and the container-credentials
//! addresses the redirect covers), asked of the kernel with rtnetlink and
//! followed as routes and links change, so a renamed, re-created or newly
//! routed interface is guarded again.
//!
//! The kernel programs are in `metaproxy-ebpf/src/guard.rs`; attaching them
//! is the probe's ([`crate::kernel::probe`]). This module only decides where.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::route::RouteAttribute;
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};

use crate::kernel::probe::{interface_name, Interface, Probe};

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

/// Where each guarded address leaves the host, as last looked up.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Routes {
    /// (address, interface) for each guarded address that has a route.
    pub routed: Vec<(IpAddr, Interface)>,
    /// Guarded addresses with no route (nothing can reach them).
    pub unrouted: Vec<IpAddr>,
}

impl Routes {
    /// The interfaces, each once.
    pub fn interfaces(&self) -> Vec<Interface> {
        let mut all: Vec<Interface> = self.routed.iter().map(|(_, i)| i.clone()).collect();
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
        routes
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

    /// Whether every interface a guarded address routes through has the
    /// guard (`guarded` lists those that do).
    pub fn covered_by(&self, guarded: &[Interface]) -> bool {
        self.routes()
            .routed
            .iter()
            .all(|(_, iface)| guarded.iter().any(|g| g.index == iface.index))
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

/// Guards every interface in `routes` and forgets interfaces that are gone.
pub fn apply(probe: &Probe, routes: &Routes) -> Result<(), GuardError> {
    probe.forget_interfaces(|index| interface_name(index).is_some())?;
    for iface in routes.interfaces() {
        if probe.guard_interface(&iface)? {
            tracing::info!(interface = %iface.name, ifindex = iface.index, "packet guard attached to a new route's interface");
        }
    }
    Ok(())
}

/// The addresses the guard protects: IMDS, and the container-credentials
/// addresses the redirect covers.
pub fn guarded_addresses(container_credentials: &[IpAddr]) -> Vec<IpAddr> {
    let mut addrs = vec![IMDS4, IMDS6];
    addrs.extend(container_credentials.iter().copied());
    addrs
}
