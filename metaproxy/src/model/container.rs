//! A container as its runtime reports it, and its comings and goings.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use super::{gitlab, ids::ContainerId};

/// One container of our runtime, as the runtime describes it. Everything
/// here except the id and addresses was written by someone: the runner, the
/// image author, the job. Treat it as input, not as truth.
#[derive(Clone)]
pub struct Container {
    pub id: ContainerId,
    pub name: String,
    pub labels: HashMap<String, String>,
    /// `Config.Env`: the runner's, the image's and the job's variables.
    pub env: Vec<String>,
    /// The image's own `ENV`.
    pub image_env: Vec<String>,
    /// The image's own labels: a container inherits them, so a label the
    /// image carries says nothing about who started the container.
    pub image_labels: HashMap<String, String>,
    /// The container's own addresses, which its connections must come
    /// from; `None` when it shares another network namespace (`host`,
    /// `container:<id>`) and has none of its own.
    pub addresses: Option<Vec<IpAddr>>,
    /// The cgroup (below the cgroup2 mount) its init process is in, as the
    /// kernel reports it; `None` when it is not running.
    pub cgroup: Option<String>,
    /// Where it sits on the wire, for pinning the daemon's answers to it.
    pub wire: Wire,
}

/// What the answer pin needs of a container: the process whose network
/// namespace holds its interfaces, and the MAC of each of its addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wire {
    /// Its init process (Docker's `State.Pid`).
    pub pid: Option<u32>,
    /// Each address Docker gave it, with the MAC of that endpoint.
    pub macs: Vec<(IpAddr, [u8; 6])>,
}

impl Wire {
    /// The MAC of the endpoint that holds `addr`.
    pub fn mac_of(&self, addr: IpAddr) -> Option<[u8; 6]> {
        let addr = addr.to_canonical();
        self.macs.iter().find(|(a, _)| *a == addr).map(|(_, m)| *m)
    }
}

/// `aa:bb:cc:dd:ee:ff`, as Docker writes MACs.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl std::fmt::Debug for Container {
    // By hand: the environment holds job variables, which may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("env", &format_args!("<{} variables>", self.env.len()))
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

impl Container {
    /// Whether a connection from `peer` can be this container's. Catches a
    /// 4-tuple that another network namespace reused (overlapping subnets).
    pub fn owns_address(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.addresses
            .as_ref()
            .is_none_or(|own| own.contains(&peer))
    }

    /// The gitlab-runner job this container runs, from its label.
    pub fn job_id(&self) -> Option<&str> {
        self.labels.get(gitlab::JOB_LABEL).map(String::as_str)
    }
}

/// A container came or went.
#[derive(Debug, Clone)]
pub enum ContainerEvent {
    Started(Arc<Container>),
    Gone(ContainerId),
}
