//! The layer-2 lock: no job reads another job's credentials off the wire,
//! and none sends past tc egress.
//!
//! Docker's default capabilities keep `NET_RAW`, and with it a job can
//! forge ARP and source MACs on a shared bridge (and so have the host send
//! it another job's answers), read every job's traffic from a `--network
//! host` packet socket, and send frames past tc egress (and so past the
//! packet guard) with `PACKET_QDISC_BYPASS` or an AF_XDP socket. Three
//! programs close that:
//!
//! * `mp_l2_deliver` (tc egress of each bridge the daemon answers
//!   containers through): the daemon's own packets go to the container's
//!   MAC out of the container's own port, as the daemon pinned them from
//!   the kernel's and Docker's facts before it first answered (`MP_L2_PEERS`).
//!   Neither the neighbour table nor the bridge's forwarding table, the two
//!   things forged frames rewrite, is consulted. An answer to an address
//!   with no pin is dropped. This needs nothing of the kernel beyond tc,
//!   and nothing of the attacker: it holds from a job's first frame.
//! * `mp_l2_sockopt` (`cgroup/setsockopt`, every kernel): no
//!   `PACKET_QDISC_BYPASS`, no `SOL_XDP` option, no `IP_HDRINCL`, no
//!   binding of addresses that are not the job's (`IP_FREEBIND`,
//!   `IP_TRANSPARENT`, and IPv6's). Every frame a job sends meets tc.
//! * `mp_l2_socket` (`lsm_cgroup/socket_create`, where the kernel runs BPF
//!   LSM programs): no `AF_PACKET`, no `AF_XDP`, no raw IPv6 socket, no
//!   `IPPROTO_RAW` socket, so a job cannot forge a frame or read another's
//!   at all, `--network host` jobs included.
//!
//! What the hooks refuse is decided by [`L2Refusal::of_socket`] and
//! [`L2Refusal::of_sockopt`] (tested on the host). Each refusal is counted
//! per CPU by kind, and the first of each kind per cgroup is written to
//! `MP_L2_SEEN`, from which the daemon logs it by container name.

use aya_ebpf::{
    bindings::bpf_sockopt,
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_redirect, bpf_sk_fullsock,
        bpf_skb_cgroup_id,
    },
    macros::{cgroup_sockopt, classifier, lsm_cgroup, map},
    maps::{LruHashMap, PerCpuArray},
    programs::{LsmContext, SockoptContext, TcContext},
};
use metaproxy_common::{
    L2Peer, L2PeerKey, L2Refusal, L2Seen, AF_INET, AF_INET6, L2_PEERS_CAPACITY, L2_REFUSAL_KINDS,
    L2_SEEN_CAPACITY,
};

use crate::probe::MP_CONFIG;

/// lsm_cgroup and cgroup/setsockopt verdicts: 1 lets the call go on, 0
/// fails it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// tc verdicts.
const TC_NEXT: i32 = -1;
const TC_SHOT: i32 = 2;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Refusals, per CPU, by [`L2Refusal`].
#[map(name = "MP_L2_REFUSED")]
static MP_L2_REFUSED: PerCpuArray<u64> = PerCpuArray::pinned(L2_REFUSAL_KINDS, 0);

/// Where the daemon's answers to each container address go.
#[map(name = "MP_L2_PEERS")]
static MP_L2_PEERS: LruHashMap<L2PeerKey, L2Peer> = LruHashMap::pinned(L2_PEERS_CAPACITY, 0);

/// Each cgroup's first refusal of each kind, for the daemon's log.
#[map(name = "MP_L2_SEEN")]
static MP_L2_SEEN: LruHashMap<L2Seen, u64> = LruHashMap::pinned(L2_SEEN_CAPACITY, 0);

/// `int socket_create(int family, int type, int protocol, int kern)`.
#[lsm_cgroup(hook = "socket_create")]
pub fn mp_l2_socket(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let kind: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    if kern != 0 {
        return ALLOW;
    }
    match L2Refusal::of_socket(family, kind, protocol) {
        Some(why) => refuse(why),
        None => ALLOW,
    }
}

#[cgroup_sockopt(setsockopt)]
pub fn mp_l2_sockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/setsockopt program a valid
    // bpf_sockopt for the duration of the call.
    let opt: &bpf_sockopt = unsafe { &*ctx.sockopt };
    match L2Refusal::of_sockopt(opt.level, opt.optname) {
        Some(why) => refuse(why),
        // optlen and optval untouched: the kernel runs the call as asked.
        None => ALLOW,
    }
}

/// The Ethernet header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct EthHeader {
    dst: [u8; 6],
    src: [u8; 6],
    proto: u16,
}

/// On the egress of a bridge the daemon answers containers through: the
/// daemon's own packets go to the container's MAC, out of the container's
/// own port, whatever the neighbour table (forged ARP) and the bridge's
/// forwarding table (forged source MACs) say. Everything else passes
/// untouched, at the cost of a pointer test (no socket: forwarded) or a
/// cgroup read (a host socket).
#[classifier]
pub fn mp_l2_deliver(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: skb is the program's own context pointer.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return TC_NEXT;
    }
    let cfg = MP_CONFIG.load();
    // The commonest frame into a bridge is anything but the listener's
    // answer (forwarded traffic has no socket at all): one load of the
    // socket's local port (host order) sends it on, before any helper.
    // SAFETY: sk was checked for null; the local port is a field of every
    // socket the kernel hands here, full or not.
    let local_port = unsafe { (*sk).src_port };
    if local_port != u32::from(cfg.listen_port4)
        && local_port != u32::from(cfg.listen_port6)
        && !cfg.is_slot4(local_port as u16)
    {
        return TC_NEXT;
    }
    // SAFETY: sk was checked for null; the helper returns null for sockets
    // that are not full (a time-wait or request socket: bare segments).
    if unsafe { bpf_sk_fullsock(sk) }.is_null() {
        return TC_NEXT;
    }
    // SAFETY: skb is the program's own context; skb->sk is a full socket.
    if unsafe { bpf_skb_cgroup_id(skb) } != cfg.self_cgroup_id {
        return TC_NEXT;
    }
    let Ok(eth) = ctx.load::<EthHeader>(0) else {
        return TC_NEXT;
    };
    // Only the listener's answers: the daemon's own calls out (to a proxy
    // or a resolver in a container, say) are not answers to pin.
    let (key, listen_port, tcp_at) = match u16::from_be(eth.proto) {
        ETH_P_IP => match (ctx.load::<u32>(14 + 16), ctx.load::<u8>(14)) {
            (Ok(dst), Ok(version_ihl)) => (
                L2PeerKey {
                    addr: [dst, 0, 0, 0],
                    family: u32::from(AF_INET),
                },
                cfg.listen_port4,
                14 + usize::from(version_ihl & 0x0f) * 4,
            ),
            _ => return TC_NEXT,
        },
        ETH_P_IPV6 => match ctx.load::<[u32; 4]>(14 + 24) {
            Ok(dst) => (
                L2PeerKey {
                    addr: dst,
                    family: u32::from(AF_INET6),
                },
                cfg.listen_port6,
                14 + 40,
            ),
            Err(_) => return TC_NEXT,
        },
        _ => return TC_NEXT,
    };
    // The listener's answers leave from its port, or (IPv4) from the slot
    // the connection was steered from.
    match ctx.load::<u16>(tcp_at).map(u16::from_be) {
        Ok(src_port) if src_port == listen_port && listen_port != 0 => {}
        Ok(src_port) if key.family == u32::from(AF_INET) && cfg.is_slot4(src_port) => {}
        _ => return TC_NEXT,
    }
    // SAFETY: the map holds plain data; the value is copied out at once.
    let Some(peer) = (unsafe { MP_L2_PEERS.get(key) }).copied() else {
        // The daemon pins a container before it reads its first request;
        // only the kernel's own bare ACKs can come before that, and they
        // carry nothing. Anything with data goes nowhere unpinned.
        if bare_tcp(&ctx, key.family) {
            return TC_NEXT;
        }
        count(L2Refusal::UnpinnedAnswer);
        return TC_SHOT;
    };
    // An all-zero MAC: Docker gave none (a container in another's network
    // namespace); the frame still goes only to the pinned port.
    if peer.mac != [0; 6] && eth.dst != peer.mac {
        count(L2Refusal::SpoofedArp);
        if ctx.store(0, &peer.mac, 0).is_err() {
            return TC_SHOT;
        }
    }
    // SAFETY: a helper that only reads its arguments.
    unsafe { bpf_redirect(peer.port, 0) as i32 }
}

#[inline(always)]
fn count(what: L2Refusal) {
    if let Some(count) = MP_L2_REFUSED.get_ptr_mut(what as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *count += 1 };
    }
}

/// A TCP segment without payload (after the 14-byte Ethernet header).
#[inline(always)]
fn bare_tcp(ctx: &TcContext, family: u32) -> bool {
    const IPPROTO_TCP: u8 = 6;
    let tcp_header = |offset: usize| match ctx.load::<u8>(offset + 12) {
        Ok(b) => usize::from(b >> 4) * 4,
        Err(_) => usize::MAX / 2,
    };
    if family == u32::from(AF_INET) {
        let (Ok(version_ihl), Ok(total), Ok(protocol)) = (
            ctx.load::<u8>(14),
            ctx.load::<u16>(14 + 2),
            ctx.load::<u8>(14 + 9),
        ) else {
            return false;
        };
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        return protocol == IPPROTO_TCP
            && ihl + tcp_header(14 + ihl) == usize::from(u16::from_be(total));
    }
    let (Ok(payload), Ok(next)) = (ctx.load::<u16>(14 + 4), ctx.load::<u8>(14 + 6)) else {
        return false;
    };
    next == IPPROTO_TCP && tcp_header(14 + 40) == usize::from(u16::from_be(payload))
}

/// Counts the refusal, notes the cgroup's first of its kind, and refuses.
#[inline(always)]
fn refuse(why: L2Refusal) -> i32 {
    count(why);
    let key = L2Seen {
        // SAFETY: helper with no arguments; both program types may call it.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        kind: why as u32,
        _pad: 0,
    };
    // SAFETY: as above.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // BPF_NOEXIST: the first refusal's time stays.
    let _ = MP_L2_SEEN.insert(key, now, 1);
    REFUSE
}
