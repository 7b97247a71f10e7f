//! Types and names shared by the kernel programs (`metaproxy-ebpf`) and the
//! daemon (`metaproxy`).
//!
//! Everything here is `#[repr(C)]` plain data: the same bytes are written by
//! the kernel into BPF maps and read back by userspace. Addresses are kept in
//! network byte order exactly as the kernel hands them over (`[u32; 4]`, IPv4
//! in word 0); ports are kept in host byte order.
//!
//! The `user` feature adds `aya::Pod` impls so userspace can use these as map
//! keys and values.
#![no_std]

#[cfg(feature = "std")]
pub mod mountinfo;

/// `AF_INET`, as stored in [`ConnKey::family`] and [`ConnRecord::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`ConnKey::family`] and [`ConnRecord::family`].
pub const AF_INET6: u16 = 10;

/// The instance metadata service over IPv4: 169.254.169.254, network order.
pub const IMDS_IP4: u32 = u32::from_ne_bytes([169, 254, 169, 254]);
/// The instance metadata service over IPv6: fd00:ec2::254, network order.
pub const IMDS_IP6: [u32; 4] = [
    u32::from_ne_bytes([0xfd, 0x00, 0x0e, 0xc2]),
    0,
    0,
    u32::from_ne_bytes([0x00, 0x00, 0x02, 0x54]),
];
/// The metadata service's TCP port.
pub const IMDS_PORT: u16 = 80;

/// Map from socket cookie to [`ConnRecord`]: filled by `connect4`/`connect6`
/// when they redirect a socket, drained by `sock_ops` once the connection has
/// its local port.
pub const MAP_PENDING: &str = "MP_PENDING";
/// Map from [`ConnKey`] to [`ConnRecord`]: what the daemon reads after
/// `accept()`. Entries are removed by `sock_ops` when the connection closes.
pub const MAP_CONNS: &str = "MP_CONNS";
/// Capacity of [`MAP_PENDING`]: sockets between `connect()` and the SYN.
pub const PENDING_CAPACITY: u32 = 16_384;
/// Capacity of [`MAP_CONNS`]: open redirected connections.
pub const CONNS_CAPACITY: u32 = 65_536;
/// Map from a destination port on the IPv4 listen address (a *slot*) to
/// the [`Slot`] of the connect the redirect sent there. The destination is
/// what address translation keeps (Docker-in-Docker's MASQUERADE,
/// slirp4netns, pasta), so a translated connection finds its record by it.
pub const MAP_SLOTS: &str = "MP_SLOTS";
/// The most slots there can be (and [`MAP_SLOTS`]'s capacity): the
/// range is a power of two no larger than this.
pub const SLOTS_MAX: u32 = 16_384;
/// The default slot range: ports 16384-32767 of the listen address, below
/// the kernel's ephemeral range (32768-60999 by default). A host process
/// connects to the listen address *from* the listen address, so a slot the
/// kernel could also pick as the caller's own port would, now and then,
/// connect the socket to itself (TCP's simultaneous open).
pub const SLOT_BASE_DEFAULT: u16 = 16_384;
pub const SLOT_COUNT_DEFAULT: u16 = 16_384;
/// How many slots a connect tries before it is refused.
pub const SLOT_TRIES: u32 = 8;
/// The daemon's IPv4 listening socket, at index 0: where `sk_lookup`
/// steers connections to a pending slot.
pub const MAP_LISTENER: &str = "MP_LISTENER";

/// Program names, as the loader finds them in the object file.
pub const PROG_CONNECT4: &str = "mp_connect4";
pub const PROG_CONNECT6: &str = "mp_connect6";
pub const PROG_SOCK_OPS: &str = "mp_sock_ops";
pub const PROG_BIND4: &str = "mp_bind4";
pub const PROG_BIND6: &str = "mp_bind6";
pub const PROG_SOCK_RELEASE: &str = "mp_sock_release";
/// Attached to the daemon's network namespace: connections to a pending
/// slot go to the daemon's listening socket.
pub const PROG_SK_LOOKUP: &str = "mp_sk_lookup";
/// The packet guard's two layers (see [`GuardDrop`]): `cgroup_skb/egress`
/// on the attached cgroup, and a tc egress classifier on each interface
/// that routes to a guarded address.
pub const PROG_GUARD_SKB: &str = "mp_guard_skb";
pub const PROG_GUARD_TC: &str = "mp_guard_tc";

/// Per-CPU array of drop counters, one slot per [`GuardDrop`]. Pinned with
/// the other maps, so counts survive a restart and both generations of an
/// upgrade add to the same counters.
pub const MAP_GUARD_DROPS: &str = "MP_GUARD_DROPS";

/// Why the packet guard dropped a packet to a guarded address (IMDS, or a
/// container-credentials address the probe redirects). The value is the
/// slot in [`MAP_GUARD_DROPS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardDrop {
    /// At the uplink, with no local socket: routed for another namespace
    /// (every container's packets, AF_PACKET frames, spoofed or not, and
    /// anything from a namespace nested inside a container).
    Forwarded = 0,
    /// Sent by a socket in the attached subtree other than the daemon's,
    /// caught as it leaves the socket (`cgroup_skb`): raw IP sockets, UDP,
    /// TCP to another port or NATed onto IMDS inside a namespace.
    SubtreeSocket = 1,
    /// At the uplink, from a local socket in the attached subtree: a packet
    /// socket (AF_PACKET) of a `--network host` process, which bypasses IP
    /// output and so the socket layer.
    SubtreePacketSocket = 2,
    /// At the uplink, from a socket that is no longer a full socket
    /// (time-wait, request socket) and the packet carries data or is not
    /// TCP. Their bare ACKs, FINs and RSTs pass.
    NotFullSocket = 3,
    /// At the uplink, from a full socket with no cgroup to check.
    Unattributed = 4,
}

/// Slots in [`MAP_GUARD_DROPS`].
pub const GUARD_DROP_KINDS: u32 = 5;

impl GuardDrop {
    pub const ALL: [GuardDrop; GUARD_DROP_KINDS as usize] = [
        GuardDrop::Forwarded,
        GuardDrop::SubtreeSocket,
        GuardDrop::SubtreePacketSocket,
        GuardDrop::NotFullSocket,
        GuardDrop::Unattributed,
    ];

    /// The metric label and the name `metaproxy status` shows.
    pub const fn name(self) -> &'static str {
        match self {
            GuardDrop::Forwarded => "forwarded",
            GuardDrop::SubtreeSocket => "subtree_socket",
            GuardDrop::SubtreePacketSocket => "subtree_packet_socket",
            GuardDrop::NotFullSocket => "not_full_socket",
            GuardDrop::Unattributed => "unattributed",
        }
    }
}

/// The layer-2 lock (see [`L2Refusal`]): `lsm_cgroup/socket_create` and
/// `cgroup/setsockopt` on the attached cgroup. Together they leave a job
/// no way to put a frame on the wire that the kernel did not build for it:
/// its frames carry its own MAC, its ARP and neighbour discovery its own
/// addresses, its IP packets a source address of its own namespace.
pub const PROG_L2_SOCKET: &str = "mp_l2_socket";
pub const PROG_L2_SOCKOPT: &str = "mp_l2_sockopt";
/// The answer pin (see [`L2Peer`]): a tc egress classifier on each bridge
/// the daemon answers containers through.
pub const PROG_L2_DELIVER: &str = "mp_l2_deliver";
/// Map from [`L2PeerKey`] (a container's address) to [`L2Peer`] (its MAC
/// and its port on the bridge), written by the daemon before it first
/// answers that container.
pub const MAP_L2_PEERS: &str = "MP_L2_PEERS";
/// Capacity of [`MAP_L2_PEERS`]: addresses of live containers.
pub const L2_PEERS_CAPACITY: u32 = 16_384;
/// The LSM hook `mp_l2_socket` is loaded against.
pub const L2_SOCKET_HOOK: &str = "socket_create";
/// Per-CPU array of refusal counters, one slot per [`L2Refusal`]. Pinned
/// with the other maps.
pub const MAP_L2_REFUSED: &str = "MP_L2_REFUSED";
/// LRU map from [`L2Seen`] to the boot time of that cgroup's first refusal
/// of that kind: the daemon reads it to log each container's first refusal
/// by name, once.
pub const MAP_L2_SEEN: &str = "MP_L2_SEEN";
/// Capacity of [`MAP_L2_SEEN`].
pub const L2_SEEN_CAPACITY: u32 = 4096;

/// What the layer-2 lock refused a process below the attached cgroup. The
/// value is the slot in [`MAP_L2_REFUSED`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L2Refusal {
    /// `socket(AF_PACKET)` (and the old `SOCK_PACKET`): forged ARP, forged
    /// source MACs, frames past tc egress with `PACKET_QDISC_BYPASS`, and
    /// reading other jobs' traffic off a host interface.
    PacketSocket = 0,
    /// `socket(AF_XDP)`: frames straight to the driver's queue.
    XdpSocket = 1,
    /// `socket(AF_INET6, SOCK_RAW)`: forged neighbour advertisements (the
    /// ARP of IPv6) and IPv6 headers of the job's own making.
    RawIpv6Socket = 2,
    /// An IPv4 header of the job's own making: `socket(AF_INET, SOCK_RAW,
    /// IPPROTO_RAW)` or `IP_HDRINCL`, which let it forge the source address.
    IpHeader = 3,
    /// `IP_FREEBIND`, `IP_TRANSPARENT` and their IPv6 twins: binding, and so
    /// sending from, an address that is not the job's.
    NonlocalBind = 4,
    /// `PACKET_QDISC_BYPASS` on a packet socket opened before the lock (or
    /// where the BPF LSM is missing): frames past tc egress.
    QdiscBypass = 5,
    /// Any `SOL_XDP` option: the rings an AF_XDP socket needs.
    XdpOption = 6,
    /// An answer of the daemon's whose destination MAC, as the host's
    /// neighbour table had it, was not the container's: someone had
    /// poisoned the table (forged ARP or neighbour advertisements). The
    /// answer went to the container's own port all the same.
    SpoofedArp = 7,
    /// An answer of the daemon's to an address with no pinned port: it is
    /// dropped rather than handed to the bridge's forwarding table, which
    /// forged source MACs can rewrite.
    UnpinnedAnswer = 8,
}

/// Slots in [`MAP_L2_REFUSED`].
pub const L2_REFUSAL_KINDS: u32 = 9;

impl L2Refusal {
    pub const ALL: [L2Refusal; L2_REFUSAL_KINDS as usize] = [
        L2Refusal::PacketSocket,
        L2Refusal::XdpSocket,
        L2Refusal::RawIpv6Socket,
        L2Refusal::IpHeader,
        L2Refusal::NonlocalBind,
        L2Refusal::QdiscBypass,
        L2Refusal::XdpOption,
        L2Refusal::SpoofedArp,
        L2Refusal::UnpinnedAnswer,
    ];

    /// The metric label and the name `metaproxy status` shows.
    pub const fn name(self) -> &'static str {
        match self {
            L2Refusal::PacketSocket => "packet_socket",
            L2Refusal::XdpSocket => "xdp_socket",
            L2Refusal::RawIpv6Socket => "raw_ipv6_socket",
            L2Refusal::IpHeader => "ip_header",
            L2Refusal::NonlocalBind => "nonlocal_bind",
            L2Refusal::QdiscBypass => "qdisc_bypass",
            L2Refusal::XdpOption => "xdp_option",
            L2Refusal::SpoofedArp => "spoofed_arp",
            L2Refusal::UnpinnedAnswer => "unpinned_answer",
        }
    }

    /// What the lock's socket hook refuses: `socket(family, kind,
    /// protocol)` from a job. Everything else is let through.
    pub const fn of_socket(family: i32, kind: i32, protocol: i32) -> Option<Self> {
        const AF_INET: i32 = 2;
        const AF_INET6: i32 = 10;
        const AF_PACKET: i32 = 17;
        const AF_XDP: i32 = 44;
        const SOCK_RAW: i32 = 3;
        const IPPROTO_RAW: i32 = 255;
        match family {
            AF_PACKET => Some(Self::PacketSocket),
            AF_XDP => Some(Self::XdpSocket),
            AF_INET6 if kind == SOCK_RAW => Some(Self::RawIpv6Socket),
            AF_INET if kind == SOCK_RAW && protocol == IPPROTO_RAW => Some(Self::IpHeader),
            _ => None,
        }
    }

    /// What the lock's setsockopt hook refuses: `setsockopt(level, name)`
    /// from a job.
    pub const fn of_sockopt(level: i32, name: i32) -> Option<Self> {
        const SOL_IP: i32 = 0;
        const SOL_IPV6: i32 = 41;
        const SOL_PACKET: i32 = 263;
        const SOL_XDP: i32 = 283;
        const IP_HDRINCL: i32 = 3;
        const IP_FREEBIND: i32 = 15;
        const IP_TRANSPARENT: i32 = 19;
        const IPV6_HDRINCL: i32 = 36;
        const IPV6_TRANSPARENT: i32 = 75;
        const IPV6_FREEBIND: i32 = 78;
        const PACKET_QDISC_BYPASS: i32 = 20;
        match (level, name) {
            (SOL_IP, IP_HDRINCL) | (SOL_IPV6, IPV6_HDRINCL) => Some(Self::IpHeader),
            (SOL_IP, IP_FREEBIND | IP_TRANSPARENT)
            | (SOL_IPV6, IPV6_FREEBIND | IPV6_TRANSPARENT) => Some(Self::NonlocalBind),
            (SOL_PACKET, PACKET_QDISC_BYPASS) => Some(Self::QdiscBypass),
            (SOL_XDP, _) => Some(Self::XdpOption),
            _ => None,
        }
    }

    /// The kind of slot `slot`, if there is one.
    pub const fn from_slot(slot: u32) -> Option<Self> {
        if slot < L2_REFUSAL_KINDS {
            Some(Self::ALL[slot as usize])
        } else {
            None
        }
    }
}

/// Key of [`MAP_L2_PEERS`]: an address, as four network-order words (IPv4
/// in word 0) and its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L2PeerKey {
    pub addr: [u32; 4],
    pub family: u32,
}

/// Where the daemon's answers to an address go: the container's MAC and
/// the host side of its veth, whatever the neighbour table and the bridge's
/// forwarding table say.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Peer {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The port's interface index, in the host's namespace.
    pub port: u32,
    pub _pad2: u32,
}

/// Key of [`MAP_L2_SEEN`]: who was refused what.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L2Seen {
    /// The cgroup of the refused task.
    pub cgroup_id: u64,
    /// An [`L2Refusal`] slot.
    pub kind: u32,
    pub _pad: u32,
}

/// Load-time globals the loader overrides (see `EbpfLoader::override_global`).
pub const GLOBAL_CONFIG: &str = "MP_CONFIG";

/// What the kernel programs need to know, fixed at load time. A daemon that
/// restarts loads fresh programs with its own config and swaps them in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The daemon's cgroup id: its own connects are never redirected.
    pub self_cgroup_id: u64,
    /// IPv4 listen address, network order.
    pub listen_ip4: u32,
    /// IPv4 listen port, host order.
    pub listen_port4: u16,
    /// IPv6 listen port, host order; 0 means "no IPv6 listener: refuse".
    pub listen_port6: u16,
    /// IPv6 listen address, network order (meaningful when `listen_port6 != 0`).
    pub listen_ip6: [u32; 4],
    /// IPv4 addresses of the container-credentials endpoint to redirect on
    /// port 80 as well (169.254.170.2, 169.254.170.23), network order; 0
    /// is unused.
    pub creds_ip4: [u32; 2],
    /// IPv6 address of the container-credentials endpoint (fd00:ec2::23),
    /// network order; all zero is unused.
    pub creds_ip6: [u32; 4],
    /// The attached cgroup's id: the packet guard drops what sockets below
    /// it send to a guarded address (the daemon's excepted).
    pub attached_cgroup_id: u64,
    /// The attached cgroup's level (0 for the cgroup2 root), for
    /// `bpf_skb_ancestor_cgroup_id`.
    pub attached_level: u32,
    /// First port of the slot range on the IPv4 listen address, host order.
    pub slot_base4: u16,
    /// Ports in the slot range: a power of two, at most [`SLOTS_MAX`]; 0
    /// sends every IPv4 redirect to the listen port itself (no slots).
    pub slot_count4: u16,
}

/// The container-credentials endpoint's addresses (ECS task roles, EKS Pod
/// Identity), network order.
pub const CREDS_IP4_ECS: u32 = u32::from_ne_bytes([169, 254, 170, 2]);
pub const CREDS_IP4_EKS: u32 = u32::from_ne_bytes([169, 254, 170, 23]);
pub const CREDS_IP6_EKS: [u32; 4] = [
    u32::from_ne_bytes([0xfd, 0x00, 0x0e, 0xc2]),
    0,
    0,
    u32::from_ne_bytes([0x00, 0x00, 0x00, 0x23]),
];

impl ProbeConfig {
    /// Whether connects to IPv4 `dst` on port 80 are redirected.
    #[inline(always)]
    pub fn redirects_ip4(&self, dst: u32) -> bool {
        dst == IMDS_IP4 || (dst != 0 && (dst == self.creds_ip4[0] || dst == self.creds_ip4[1]))
    }

    /// Whether connects to IPv6 `dst` on port 80 are redirected.
    #[inline(always)]
    pub fn redirects_ip6(&self, dst: [u32; 4]) -> bool {
        dst == IMDS_IP6 || (dst != [0; 4] && dst == self.creds_ip6)
    }

    /// Whether the packet guard keeps packets to IPv4 `dst` (any port, any
    /// protocol) from everyone but the daemon: the addresses the redirect
    /// covers.
    #[inline(always)]
    pub fn guards_ip4(&self, dst: u32) -> bool {
        self.redirects_ip4(dst)
    }

    /// Whether `port` (host order) is in the IPv4 slot range.
    #[inline(always)]
    pub fn is_slot4(&self, port: u16) -> bool {
        self.slot_count4 != 0
            && port >= self.slot_base4
            && u32::from(port) < u32::from(self.slot_base4) + u32::from(self.slot_count4)
    }

    /// As [`ProbeConfig::guards_ip4`], for IPv6.
    #[inline(always)]
    pub fn guards_ip6(&self, dst: [u32; 4]) -> bool {
        self.redirects_ip6(dst) || v4_mapped(dst).is_some_and(|v4| self.guards_ip4(v4))
    }
}

/// What the kernel remembers about one redirected connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// cgroup v2 id (the inode of the cgroup directory) of the task that
    /// called `connect()`.
    pub cgroup_id: u64,
    /// `CLOCK_BOOTTIME` at `connect()`, in nanoseconds.
    pub boot_ns: u64,
    /// Thread group id (the process id userspace sees).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Original destination address, network order (IPv4 in word 0).
    pub orig_addr: [u32; 4],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// Family of the original destination ([`AF_INET`] or [`AF_INET6`]).
    pub family: u16,
    /// The slot the connect was sent to (a port of the IPv4 listen
    /// address), or 0.
    pub slot: u16,
    pub _pad: u16,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
}

/// A pending slot: the record of the connect sent there, its socket's
/// cookie (so only that socket's release frees it), and, once its SYN is
/// about to go out, the connection's 4-tuple (all zero before): a
/// connection accepted on the slot with that 4-tuple is the record's own,
/// any other was translated on its way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub cookie: u64,
    pub record: ConnRecord,
    pub conn: ConnKey,
}

/// One TCP connection as both ends see it: the client's address and port
/// and the daemon's. IPv4 addresses sit in word 0 with the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub client_addr: [u32; 4],
    pub server_addr: [u32; 4],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u16,
    pub _pad: u16,
}

impl ConnKey {
    /// An IPv4 connection; addresses in network order, ports in host order.
    pub const fn v4(client: u32, client_port: u16, server: u32, server_port: u16) -> Self {
        Self {
            client_addr: [client, 0, 0, 0],
            server_addr: [server, 0, 0, 0],
            client_port,
            server_port,
            family: AF_INET,
            _pad: 0,
        }
    }

    /// An IPv6 connection; addresses in network order, ports in host order.
    pub const fn v6(
        client: [u32; 4],
        client_port: u16,
        server: [u32; 4],
        server_port: u16,
    ) -> Self {
        Self {
            client_addr: client,
            server_addr: server,
            client_port,
            server_port,
            family: AF_INET6,
            _pad: 0,
        }
    }
}

impl ConnKey {
    /// The key for a connection of `family` between `client` and `server`
    /// (addresses as four network-order words, ports in host order). A
    /// connection whose two ends are both IPv4-mapped IPv6 addresses is the
    /// IPv4 connection the other side sees, so it is keyed as plain IPv4.
    ///
    /// The one place this normalisation lives: the kernel's `sock_ops`
    /// writes keys with it and the daemon looks them up with it.
    pub const fn new(
        family: u16,
        client: [u32; 4],
        client_port: u16,
        server: [u32; 4],
        server_port: u16,
    ) -> Option<Self> {
        match family {
            AF_INET => Some(Self::v4(client[0], client_port, server[0], server_port)),
            AF_INET6 => match (v4_mapped(client), v4_mapped(server)) {
                (Some(c), Some(s)) => Some(Self::v4(c, client_port, s, server_port)),
                _ => Some(Self::v6(client, client_port, server, server_port)),
            },
            _ => None,
        }
    }
}

/// If `addr` is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), the IPv4
/// address in network order.
pub const fn v4_mapped(addr: [u32; 4]) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(addr[3])
    } else {
        None
    }
}

/// The IPv4-mapped IPv6 form of `addr` (network order).
pub const fn to_v4_mapped(addr: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all six are #[repr(C)] structs of integers and integer arrays
    // with explicit padding fields, so every bit pattern is valid and there
    // are no implicit padding bytes.
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::Slot {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::L2Seen {}
    unsafe impl aya::Pod for super::L2PeerKey {}
    unsafe impl aya::Pod for super::L2Peer {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer2_lock_refuses_what_forges_frames_and_nothing_ordinary() {
        use L2Refusal as R;
        // socket(family, type, protocol)
        assert_eq!(L2Refusal::of_socket(17, 3, 0x0300), Some(R::PacketSocket));
        assert_eq!(L2Refusal::of_socket(17, 2, 0), Some(R::PacketSocket));
        assert_eq!(L2Refusal::of_socket(44, 3, 0), Some(R::XdpSocket));
        assert_eq!(L2Refusal::of_socket(10, 3, 58), Some(R::RawIpv6Socket));
        assert_eq!(L2Refusal::of_socket(2, 3, 255), Some(R::IpHeader));
        // ping (raw ICMP, and ICMP datagram sockets), TCP, UDP, netlink,
        // unix sockets stay.
        assert_eq!(L2Refusal::of_socket(2, 3, 1), None);
        assert_eq!(L2Refusal::of_socket(2, 2, 1), None);
        assert_eq!(L2Refusal::of_socket(10, 2, 58), None);
        assert_eq!(L2Refusal::of_socket(2, 1, 6), None);
        assert_eq!(L2Refusal::of_socket(10, 2, 17), None);
        assert_eq!(L2Refusal::of_socket(16, 3, 0), None);
        assert_eq!(L2Refusal::of_socket(1, 1, 0), None);
        // setsockopt(level, name)
        assert_eq!(L2Refusal::of_sockopt(263, 20), Some(R::QdiscBypass));
        assert_eq!(L2Refusal::of_sockopt(283, 4), Some(R::XdpOption));
        assert_eq!(L2Refusal::of_sockopt(283, 2), Some(R::XdpOption));
        assert_eq!(L2Refusal::of_sockopt(0, 3), Some(R::IpHeader));
        assert_eq!(L2Refusal::of_sockopt(41, 36), Some(R::IpHeader));
        assert_eq!(L2Refusal::of_sockopt(0, 15), Some(R::NonlocalBind));
        assert_eq!(L2Refusal::of_sockopt(0, 19), Some(R::NonlocalBind));
        assert_eq!(L2Refusal::of_sockopt(41, 75), Some(R::NonlocalBind));
        assert_eq!(L2Refusal::of_sockopt(41, 78), Some(R::NonlocalBind));
        // SO_REUSEADDR, TCP_NODELAY, IP_TTL, IPV6_V6ONLY, PACKET_ADD_MEMBERSHIP
        // (only ever reached where packet sockets open) stay.
        assert_eq!(L2Refusal::of_sockopt(1, 2), None);
        assert_eq!(L2Refusal::of_sockopt(6, 1), None);
        assert_eq!(L2Refusal::of_sockopt(0, 2), None);
        assert_eq!(L2Refusal::of_sockopt(41, 26), None);
        assert_eq!(L2Refusal::of_sockopt(263, 1), None);
        // Every slot names itself and maps back.
        for (slot, kind) in L2Refusal::ALL.iter().enumerate() {
            assert_eq!(L2Refusal::from_slot(slot as u32), Some(*kind));
            assert_eq!(*kind as usize, slot);
        }
        assert_eq!(L2Refusal::from_slot(L2_REFUSAL_KINDS), None);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<L2PeerKey>(), 16 + 4);
        assert_eq!(core::mem::size_of::<L2Peer>(), 6 + 2 + 4 + 4);
        assert_eq!(core::mem::size_of::<L2Seen>(), 8 + 4 + 4);
        assert_eq!(
            core::mem::size_of::<ProbeConfig>(),
            8 + 4 + 2 + 2 + 16 + 8 + 16 + 8 + 4 + 2 + 2
        );
        assert_eq!(
            core::mem::size_of::<ConnRecord>(),
            8 + 8 + 4 + 4 + 16 + 2 + 2 + 2 + 2 + 16
        );
        assert_eq!(
            core::mem::size_of::<Slot>(),
            8 + core::mem::size_of::<ConnRecord>() + core::mem::size_of::<ConnKey>()
        );
        assert_eq!(core::mem::size_of::<ConnKey>(), 16 + 16 + 2 + 2 + 2 + 2);
    }

    #[test]
    fn mapped_pairs_key_as_ipv4_and_mixed_pairs_stay_ipv6() {
        let c = u32::from_ne_bytes([10, 0, 0, 2]);
        let s = u32::from_ne_bytes([169, 254, 170, 254]);
        let v4 = ConnKey::new(AF_INET, [c, 0, 0, 0], 4000, [s, 0, 0, 0], 8169);
        assert_eq!(v4, Some(ConnKey::v4(c, 4000, s, 8169)));
        let mapped = ConnKey::new(AF_INET6, to_v4_mapped(c), 4000, to_v4_mapped(s), 8169);
        assert_eq!(mapped, v4);
        let mixed = ConnKey::new(AF_INET6, to_v4_mapped(c), 4000, IMDS_IP6, 80).unwrap();
        assert_eq!(mixed.family, AF_INET6);
        assert_eq!(ConnKey::new(1, [0; 4], 0, [0; 4], 0), None);
    }

    #[test]
    fn slot_range_is_half_open() {
        let cfg = ProbeConfig {
            slot_base4: 49_152,
            slot_count4: 16_384,
            ..Default::default()
        };
        assert!(!cfg.is_slot4(49_151));
        assert!(cfg.is_slot4(49_152));
        assert!(cfg.is_slot4(65_535));
        let default = ProbeConfig {
            slot_base4: SLOT_BASE_DEFAULT,
            slot_count4: SLOT_COUNT_DEFAULT,
            ..Default::default()
        };
        assert!(default.is_slot4(16_384) && default.is_slot4(32_767));
        assert!(
            !default.is_slot4(32_768),
            "the kernel's ephemeral ports stay out"
        );
        let off = ProbeConfig {
            slot_base4: 49_152,
            ..Default::default()
        };
        assert!(!off.is_slot4(50_000));
    }

    #[test]
    fn v4_mapped_round_trips() {
        let a = u32::from_ne_bytes([169, 254, 169, 254]);
        assert_eq!(v4_mapped(to_v4_mapped(a)), Some(a));
        assert_eq!(v4_mapped(IMDS_IP6), None);
    }
}
