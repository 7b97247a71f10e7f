//! The packet guard: no packet reaches a guarded address (IMDS, and the
//! container-credentials addresses the redirect covers) unless the daemon's
//! own socket, or a socket outside the attached subtree, sent it.
//!
//! The redirect hooks `connect()`, and a job with Docker's default
//! `NET_RAW` never needs to call it: raw IP sockets, UDP `sendto`, AF_PACKET
//! frames with a spoofed source, NAT inside a namespace the job controls,
//! and anything forwarded from a nested namespace all go around it. Two
//! layers close that, in the order a packet meets them:
//!
//! * `mp_guard_skb` (cgroup_skb/egress, on the attached cgroup): every IP
//!   packet a socket below the attached cgroup sends, in whatever network
//!   namespace, after netfilter's NAT. Drops those to a guarded address
//!   unless the socket is the daemon's. The sender gets EPERM at once.
//! * `mp_guard_tc` (tc egress, on each interface that routes to a guarded
//!   address): what leaves the host for it. A packet with no local socket
//!   was forwarded (every container has a namespace of its own, so all of
//!   its packets are forwarded here, AF_PACKET frames included): dropped. A
//!   local socket is judged by its cgroup as above; this catches packet
//!   sockets of `--network host` processes, which bypass IP output. A
//!   socket that is no longer full (time-wait, request socket) has no
//!   cgroup to judge: its bare ACK/FIN/RST segments pass, since they carry
//!   nothing and exist only for connections the guard let open, and
//!   anything else from it is dropped.
//!
//! Both return "no opinion" rather than "accept" for what they pass, so
//! other programs on the same hooks still run.

use aya_ebpf::{
    bindings::{__sk_buff, bpf_hdr_start_off::BPF_HDR_START_NET},
    helpers::generated::{
        bpf_ktime_get_boot_ns, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        bpf_skb_load_bytes_relative,
    },
    macros::{cgroup_skb, classifier, map},
    maps::{LruHashMap, PerCpuArray},
    programs::{SkBuffContext, TcContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use metaproxy_common::{GuardDrop, ProbeConfig, AF_INET, AF_INET6, GUARD_DROP_KINDS};

use crate::probe::MP_CONFIG;

/// tc: let the next program (or the stack) decide.
const TC_NEXT: i32 = -1;
/// tc: drop.
const TC_SHOT: i32 = 2;
/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;

/// Drop counters, per CPU, by [`GuardDrop`].
#[map(name = "MP_GUARD_DROPS")]
static MP_GUARD_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(GUARD_DROP_KINDS, 0);

/// When the guard last logged a drop from this source (cgroup or address).
#[map(name = "MP_GUARD_SEEN")]
static MP_GUARD_SEEN: LruHashMap<SeenKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// How many drop lines this CPU logged in the current second.
#[map(name = "MP_GUARD_BUDGET")]
static MP_GUARD_BUDGET: PerCpuArray<Budget> = PerCpuArray::with_max_entries(1, 0);

/// A source logs again only after this long.
const LOG_EVERY_NS: u64 = 60_000_000_000;
/// At most this many drop lines per CPU and second, however many sources a
/// spoofer makes up.
const LOG_PER_SECOND: u64 = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct SeenKey {
    cgroup_id: u64,
    addr: [u32; 4],
    kind: u32,
    family: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Budget {
    second: u64,
    used: u64,
}

/// What the guard needs of a packet to a guarded address.
#[derive(Clone, Copy)]
struct Guarded {
    family: u16,
    src: [u32; 4],
    /// TCP with no payload (a bare ACK, FIN, RST or SYN-ACK).
    bare_tcp: bool,
}

#[cgroup_skb(egress)]
pub fn mp_guard_skb(ctx: SkBuffContext) -> i32 {
    let skb = ctx.skb.skb;
    let cfg = MP_CONFIG.load();
    if plainly_unguarded(skb, &cfg) {
        return SKB_PASS;
    }
    let Some(packet) = guarded(skb, &cfg) else {
        return SKB_PASS;
    };
    // SAFETY: skb is the program's own context; the helper reads the
    // cgroup of the full socket this program runs for.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    if cgroup_id == cfg.self_cgroup_id {
        return SKB_PASS;
    }
    drop_packet(&ctx, GuardDrop::SubtreeSocket, cgroup_id, &packet);
    SKB_DROP
}

#[classifier]
pub fn mp_guard_tc(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    let cfg = MP_CONFIG.load();
    let Some(packet) = guarded(skb, &cfg) else {
        return TC_NEXT;
    };
    // SAFETY: skb is the program's own context pointer.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        drop_packet(&ctx, GuardDrop::Forwarded, 0, &packet);
        return TC_SHOT;
    }
    // SAFETY: sk was checked for null; the helper returns null for sockets
    // that are not full.
    if unsafe { bpf_sk_fullsock(sk) }.is_null() {
        if packet.bare_tcp {
            return TC_NEXT;
        }
        drop_packet(&ctx, GuardDrop::NotFullSocket, 0, &packet);
        return TC_SHOT;
    }
    // SAFETY: skb is the program's own context; skb->sk is a full socket.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    if cgroup_id == 0 {
        drop_packet(&ctx, GuardDrop::Unattributed, 0, &packet);
        return TC_SHOT;
    }
    if cgroup_id == cfg.self_cgroup_id {
        return TC_NEXT;
    }
    // SAFETY: as above; a level deeper than the socket's cgroup gives 0.
    let ancestor = unsafe { bpf_skb_ancestor_cgroup_id(skb, cfg.attached_level as i32) };
    if ancestor == cfg.attached_cgroup_id {
        drop_packet(&ctx, GuardDrop::SubtreePacketSocket, cgroup_id, &packet);
        return TC_SHOT;
    }
    TC_NEXT
}

/// The IPv4 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    protocol: u8,
    checksum: u16,
    src: u32,
    dst: u32,
}

/// The IPv6 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: [u32; 4],
    dst: [u32; 4],
}

/// The packet, if it is IPv4 or IPv6 to a guarded address. Reads relative
/// to the network header, so it works on Ethernet and on L3 devices alike.
///
/// Headers are read into uninitialised structs: zeroing a byte array first
/// compiled to a memset call whose clobbered registers the code then read,
/// which the verifier rejects.
#[inline(always)]
fn guarded(skb: *mut __sk_buff, cfg: &ProbeConfig) -> Option<Guarded> {
    let version = load::<u8>(skb, 0)? >> 4;
    if version == 4 {
        let h = load::<Ipv4Header>(skb, 0)?;
        if !cfg.guards_ip4(h.dst) {
            return None;
        }
        let header_len = u32::from(h.version_ihl & 0x0f) * 4;
        // Only a first (or unfragmented) fragment has a TCP header.
        let first_fragment = u16::from_be(h.frag) & 0x1fff == 0;
        let bare_tcp = h.protocol == IPPROTO_TCP
            && first_fragment
            && header_len + tcp_header_len(skb, header_len) == u32::from(u16::from_be(h.total_len));
        return Some(Guarded {
            family: AF_INET,
            src: [h.src, 0, 0, 0],
            bare_tcp,
        });
    }
    if version == 6 {
        let h = load::<Ipv6Header>(skb, 0)?;
        if !cfg.guards_ip6(h.dst) {
            return None;
        }
        // Extension headers are not followed: such a packet is never taken
        // for a bare segment.
        let bare_tcp = h.next_header == IPPROTO_TCP
            && tcp_header_len(skb, 40) == u32::from(u16::from_be(h.payload_len));
        return Some(Guarded {
            family: AF_INET6,
            src: h.src,
            bare_tcp,
        });
    }
    None
}

/// Every packet of every job passes `mp_guard_skb`, and almost none is to a
/// guarded address: this answers that commonest case from the packet's
/// linear data (for cgroup_skb it starts at the network header), with no
/// helper call. `false` means "look closer" (a guarded destination, or a
/// header not in the linear data), never "guarded".
#[inline(always)]
fn plainly_unguarded(skb: *mut __sk_buff, cfg: &ProbeConfig) -> bool {
    // SAFETY: skb is the program's own context pointer.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if data + 20 > end {
        return false;
    }
    // SAFETY: the 20 bytes from data were bounds-checked just now.
    let version = unsafe { *(data as *const u8) } >> 4;
    if version == 4 {
        // SAFETY: bytes 16..20 are within the 20 checked.
        let dst = unsafe { core::ptr::read_unaligned((data + 16) as *const u32) };
        return !cfg.guards_ip4(dst);
    }
    if version == 6 && data + 40 <= end {
        // SAFETY: bytes 24..40 were bounds-checked just now.
        let dst = unsafe { core::ptr::read_unaligned((data + 24) as *const [u32; 4]) };
        return !cfg.guards_ip6(dst);
    }
    false
}

/// The TCP header's length, from its data offset; if unreadable, a length
/// no segment can match.
#[inline(always)]
fn tcp_header_len(skb: *mut __sk_buff, offset: u32) -> u32 {
    match load::<u8>(skb, offset + 12) {
        Some(b) => u32::from(b >> 4) * 4,
        None => u32::MAX / 2,
    }
}

/// A `T` read from `offset` bytes after the network header.
#[inline(always)]
fn load<T: Copy>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: value has room for a T; the helper bounds-checks the packet
    // and fills all of it on success.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            skb.cast(),
            offset,
            value.as_mut_ptr().cast(),
            core::mem::size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    // SAFETY: a return of 0 means all size_of::<T>() bytes were written,
    // and every T here is plain integers.
    (ret == 0).then(|| unsafe { value.assume_init() })
}

/// Counts the drop and logs it if its source has not been logged lately.
#[inline(always)]
fn drop_packet<C: EbpfContext>(ctx: &C, kind: GuardDrop, cgroup_id: u64, packet: &Guarded) {
    if let Some(count) = MP_GUARD_DROPS.get_ptr_mut(kind as u32) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *count += 1 };
    }
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // A socket is known by its cgroup; a forwarded packet only by its
    // source address, which the sender may have made up.
    let key = SeenKey {
        cgroup_id,
        addr: if cgroup_id == 0 { packet.src } else { [0; 4] },
        kind: kind as u32,
        family: u32::from(packet.family),
    };
    if let Some(last) = MP_GUARD_SEEN.get_ptr(key) {
        // SAFETY: the pointer came from a successful lookup just now.
        if now.saturating_sub(unsafe { *last }) < LOG_EVERY_NS {
            return;
        }
    }
    if !spend_log_budget(now) {
        return;
    }
    let _ = MP_GUARD_SEEN.insert(key, now, 0);
    let kind_name = kind.name();
    if cgroup_id != 0 {
        warn!(
            ctx,
            "guard dropped a packet to imds: kind {} cgroup {}", kind_name, cgroup_id
        );
    } else if packet.family == AF_INET {
        let src = packet.src[0].to_ne_bytes();
        warn!(
            ctx,
            "guard dropped a packet to imds: kind {} source {:i}", kind_name, src
        );
    } else {
        // SAFETY: four network-order words are the address's sixteen bytes
        // in order; both types are plain integers of the same size.
        let src = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(packet.src) };
        warn!(
            ctx,
            "guard dropped a packet to imds: kind {} source {:i}", kind_name, src
        );
    }
}

#[inline(always)]
fn spend_log_budget(now: u64) -> bool {
    let Some(budget) = MP_GUARD_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot, written only by this CPU.
    let budget = unsafe { &mut *budget };
    let second = now / 1_000_000_000;
    if budget.second != second {
        budget.second = second;
        budget.used = 0;
    }
    if budget.used >= LOG_PER_SECOND {
        return false;
    }
    budget.used += 1;
    true
}
