//! The programs themselves (compiled only for the BPF target).
//!
//! * `mp_connect4` / `mp_connect6` (cgroup/connect4, cgroup/connect6): a TCP
//!   connect to the instance metadata service is rewritten to the daemon's
//!   listen address, and what we know about the caller (cgroup, pid, comm)
//!   is remembered under the socket's cookie. Anything we cannot redirect
//!   is refused, never passed on, and so is a connect to another port of a
//!   guarded address (see [`crate::guard`]). Other destinations pass
//!   untouched.
//! * `mp_bind4` / `mp_bind6` (cgroup/bind4, cgroup/bind6): only the daemon
//!   may bind its listen address (or the wildcard address on its port).
//!   Pinned like the rest, this holds while the daemon is down: whoever bound
//!   it first would otherwise answer every container's IMDS requests.
//! * `mp_sock_ops` (sock_ops): when a redirected socket sends its SYN it has
//!   its local port, so the record moves to a map keyed by the connection's
//!   4-tuple, which the daemon looks up from `accept()`'s peer address. The
//!   entry is removed when the connection closes (and the daemon consumes
//!   it at accept: a record serves one connection).
//! * `mp_sock_release` (cgroup/sock_release): a socket whose redirected
//!   connect never sent a SYN (it failed after the hook) leaves its pending
//!   record behind; it goes when the socket does, and so does its slot.
//! * Slots (IPv4): each redirected connect goes to a port of its own on the
//!   listen address (its slot, from a range), and its record is kept under
//!   that port too. Address translation between the caller and the daemon
//!   (Docker-in-Docker's MASQUERADE, slirp4netns, pasta) changes the source
//!   but keeps the destination, so the daemon finds a translated
//!   connection's record by the port it was accepted on.
//! * `mp_sk_lookup` (sk_lookup, on the daemon's network namespace): a
//!   connection to a pending slot goes to the daemon's one listening
//!   socket. Other ports are looked up as usual: a slot nobody is waiting
//!   on steers nothing.

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_ops,
        sk_action::{SK_DROP, SK_PASS},
        BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie,
            bpf_ktime_get_boot_ns,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockMap},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext, Global,
};
use aya_log_ebpf::{debug, warn};
use metaproxy_common::{
    to_v4_mapped, v4_mapped, ConnKey, ConnRecord, ProbeConfig, Slot, AF_INET, AF_INET6,
    CONNS_CAPACITY, IMDS_PORT, PENDING_CAPACITY, SLOTS_MAX, SLOT_TRIES,
};

/// Verdicts of a cgroup/connect program.
const ALLOW: i32 = 1;
/// `connect()` fails with EPERM.
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;

#[unsafe(no_mangle)]
pub(crate) static MP_CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig {
    self_cgroup_id: 0,
    listen_ip4: 0,
    listen_port4: 0,
    listen_port6: 0,
    listen_ip6: [0; 4],
    creds_ip4: [0; 2],
    creds_ip6: [0; 4],
    attached_cgroup_id: 0,
    attached_level: 0,
    slot_base4: 0,
    slot_count4: 0,
});

/// Socket cookie -> record, between `connect()` and the SYN. Pinned so a
/// restarted daemon's programs share it with the ones they replace.
#[map(name = "MP_PENDING")]
static MP_PENDING: LruHashMap<u64, ConnRecord> = LruHashMap::pinned(PENDING_CAPACITY, 0);

/// 4-tuple -> record, from the SYN until the connection closes.
#[map(name = "MP_CONNS")]
static MP_CONNS: LruHashMap<ConnKey, ConnRecord> = LruHashMap::pinned(CONNS_CAPACITY, 0);

/// Slot (a port of the IPv4 listen address) -> the connect sent there,
/// until the daemon takes it or the socket goes. A plain hash, not LRU: its
/// keys are the range's ports, so it never fills, and nothing pending is
/// ever evicted to make room.
#[map(name = "MP_SLOTS")]
static MP_SLOTS: HashMap<u32, Slot> = HashMap::pinned(SLOTS_MAX, 0);

/// Socket cookie -> the slot it holds, so that a socket holds one slot at
/// most: connecting again (after a failed connect, or a disconnect with
/// `AF_UNSPEC`) frees the one it had. LRU: a lost entry only leaves the
/// slot to its socket's release or the daemon's sweep.
#[map(name = "MP_SOCK_SLOTS")]
static MP_SOCK_SLOTS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(SLOTS_MAX, 0);

/// The daemon's IPv4 listening socket (index 0), set by the daemon of this
/// generation once it listens. Not pinned: the socket is the daemon's own.
#[map(name = "MP_LISTENER")]
static MP_LISTENER: SockMap = SockMap::with_max_entries(1, 0);

const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn mp_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/connect4 program a valid
    // bpf_sock_addr for the duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let cfg = MP_CONFIG.load();
    let dst = sa.user_ip4;
    if !cfg.redirects_ip4(dst) {
        return ALLOW;
    }
    if port_of(sa) != IMDS_PORT {
        return other_port(&cfg);
    }
    redirect(
        &ctx,
        sa,
        &cfg,
        AF_INET,
        to_v4_mapped(dst),
        true,
        |sa, port| {
            sa.user_ip4 = cfg.listen_ip4;
            set_port(sa, port);
        },
    )
}

#[cgroup_sock_addr(connect6)]
pub fn mp_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in mp_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = read_ip6(&sa.user_ip6);
    let cfg = MP_CONFIG.load();
    if !cfg.guards_ip6(dst) {
        return ALLOW;
    }
    if port_of(sa) != IMDS_PORT {
        return other_port(&cfg);
    }
    if v4_mapped(dst).is_some_and(|v4| cfg.redirects_ip4(v4)) {
        // A dual-stack socket reaching IPv4 IMDS as ::ffff:169.254.169.254
        // never runs connect4, so it is caught here and sent to the IPv4
        // listener in the same mapped form.
        return redirect(&ctx, sa, &cfg, AF_INET, dst, true, |sa, port| {
            write_ip6(&mut sa.user_ip6, to_v4_mapped(cfg.listen_ip4));
            set_port(sa, port);
        });
    }
    if !cfg.redirects_ip6(dst) {
        return ALLOW;
    }
    if cfg.listen_port6 == 0 && current_cgroup_id() != cfg.self_cgroup_id {
        // Debug, not warn: any process can connect in a loop, and the
        // kernel log must not become a way to flood the daemon's.
        debug!(
            &ctx,
            "refusing ipv6 imds connect: no ipv6 listener configured"
        );
        return REFUSE;
    }
    redirect(&ctx, sa, &cfg, AF_INET6, dst, false, |sa, port| {
        write_ip6(&mut sa.user_ip6, cfg.listen_ip6);
        set_port(sa, port);
    })
}

#[cgroup_sock_addr(bind4)]
pub fn mp_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in mp_connect4.
    let sa = unsafe { &*ctx.sock_addr };
    let cfg = MP_CONFIG.load();
    let takes_listen =
        port_of(sa) == cfg.listen_port4 && (sa.user_ip4 == cfg.listen_ip4 || sa.user_ip4 == 0);
    bind_verdict(takes_listen, &cfg)
}

#[cgroup_sock_addr(bind6)]
pub fn mp_bind6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in mp_connect4.
    let sa = unsafe { &*ctx.sock_addr };
    let cfg = MP_CONFIG.load();
    let addr = read_ip6(&sa.user_ip6);
    let port = port_of(sa);
    let any = addr == [0; 4];
    // A dual-stack [::]:port socket also receives IPv4 connects.
    let takes_listen4 =
        port == cfg.listen_port4 && (any || v4_mapped(addr) == Some(cfg.listen_ip4));
    let takes_listen6 =
        cfg.listen_port6 != 0 && port == cfg.listen_port6 && (any || addr == cfg.listen_ip6);
    bind_verdict(takes_listen4 || takes_listen6, &cfg)
}

/// A connect to a guarded address on a port other than 80: nothing there is
/// for a job, and the packet guard would drop its packets anyway, so it
/// fails at once (EPERM) instead of timing out. The daemon's own pass.
#[inline(always)]
fn other_port(cfg: &ProbeConfig) -> i32 {
    if current_cgroup_id() == cfg.self_cgroup_id {
        ALLOW
    } else {
        REFUSE
    }
}

/// Refuses a bind that would take the daemon's listen address, unless the
/// daemon's own cgroup asks. Only TCP matters: the redirect is TCP.
#[inline(always)]
fn bind_verdict(takes_listen: bool, cfg: &ProbeConfig) -> i32 {
    if takes_listen && current_cgroup_id() != cfg.self_cgroup_id {
        REFUSE
    } else {
        ALLOW
    }
}

/// Record the caller under the socket's cookie (and, to the IPv4 listener,
/// under a slot of its own) and rewrite the destination, unless the caller
/// is the daemon itself. Fails closed: a socket we cannot record is refused
/// rather than passed to the real IMDS.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    sa: &mut bpf_sock_addr,
    cfg: &ProbeConfig,
    family: u16,
    orig: [u32; 4],
    to_ip4_listener: bool,
    rewrite: impl FnOnce(&mut bpf_sock_addr, u16),
) -> i32 {
    let cgroup_id = current_cgroup_id();
    if cgroup_id == cfg.self_cgroup_id {
        return ALLOW;
    }
    if sa.type_ != SOCK_STREAM {
        // IMDS speaks only TCP; nothing else to it from here is legitimate.
        return REFUSE;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut record = ConnRecord {
        cgroup_id,
        // SAFETY: helper with no arguments.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        orig_addr: if family == AF_INET {
            [orig[3], 0, 0, 0]
        } else {
            orig
        },
        orig_port: IMDS_PORT,
        family,
        slot: 0,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // SAFETY: ctx is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A socket connecting again lets go of the slot it had.
    if let Some(held) = MP_SOCK_SLOTS.get_ptr(cookie) {
        // SAFETY: the pointer came from a successful lookup just now.
        free_slot((unsafe { *held }) as u16, cookie);
        let _ = MP_SOCK_SLOTS.remove(cookie);
    }
    let port = if !to_ip4_listener {
        cfg.listen_port6
    } else if cfg.slot_count4 == 0 {
        cfg.listen_port4
    } else {
        // With no slot free (some job holds them all), the listen port
        // itself: the connection is then attributed by its 4-tuple alone,
        // as before slots, and only a translated one is refused. Holding
        // the slots must not cost every other job its credentials.
        take_slot(cfg, cookie, &mut record).unwrap_or_else(|| {
            debug!(ctx, "no free slot: the listen port (cgroup {})", cgroup_id);
            cfg.listen_port4
        })
    };
    if MP_PENDING.insert(cookie, record, 0).is_err() {
        free_slot(record.slot, cookie);
        warn!(
            ctx,
            "refusing imds connect: cannot record it (cgroup {})", cgroup_id
        );
        return REFUSE;
    }
    rewrite(sa, port);
    debug!(
        ctx,
        "redirected imds connect: pid {} cgroup {}", record.pid, cgroup_id
    );
    ALLOW
}

/// Takes a free slot for the socket `cookie`, from a random place in the
/// range (so another job cannot tell which slot a connect was given), and
/// notes it in `record`.
#[inline(always)]
fn take_slot(cfg: &ProbeConfig, cookie: u64, record: &mut ConnRecord) -> Option<u16> {
    let mask = u32::from(cfg.slot_count4).wrapping_sub(1);
    // SAFETY: helper with no arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..SLOT_TRIES {
        let port = u32::from(cfg.slot_base4) + (start.wrapping_add(i) & mask);
        record.slot = port as u16;
        let slot = Slot {
            cookie,
            record: *record,
            conn: ConnKey::default(),
        };
        if MP_SLOTS.insert(port, slot, u64::from(BPF_NOEXIST)).is_ok() {
            let _ = MP_SOCK_SLOTS.insert(cookie, port, 0);
            return Some(port as u16);
        }
    }
    record.slot = 0;
    None
}

/// Frees `slot` if the socket `cookie` holds it.
#[inline(always)]
fn free_slot(slot: u16, cookie: u64) {
    if slot == 0 {
        return;
    }
    let key = u32::from(slot);
    if let Some(held) = MP_SLOTS.get_ptr(key) {
        // SAFETY: the pointer came from a successful lookup just now.
        if unsafe { (*held).cookie } == cookie {
            let _ = MP_SLOTS.remove(key);
        }
    }
}

#[inline(always)]
fn current_cgroup_id() -> u64 {
    // SAFETY: helper with no arguments.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
fn port_of(sa: &bpf_sock_addr) -> u16 {
    // user_port holds the big-endian port in its low 16 bits.
    u16::from_be(sa.user_port as u16)
}

#[inline(always)]
fn set_port(sa: &mut bpf_sock_addr, port: u16) {
    sa.user_port = u32::from(port.to_be());
}

/// The verifier accepts only 4-byte accesses to the address words of the
/// context structs, so read and write them one word at a time.
#[inline(always)]
fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each pointer is to a field of a valid context struct.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(words: &mut [u32; 4], addr: [u32; 4]) {
    // SAFETY: as in read_ip6.
    unsafe {
        core::ptr::write_volatile(&mut words[0], addr[0]);
        core::ptr::write_volatile(&mut words[1], addr[1]);
        core::ptr::write_volatile(&mut words[2], addr[2]);
        core::ptr::write_volatile(&mut words[3], addr[3]);
    }
}

#[cgroup_sock(sock_release)]
pub fn mp_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands every cgroup/sock program a valid bpf_sock.
    let sock = unsafe { &*ctx.sock };
    if sock.type_ != SOCK_STREAM {
        return ALLOW;
    }
    // Only a redirected socket can have a pending record, and its peer
    // port is then one of our listen ports, or 0 (the kernel clears it when
    // a connect fails). Every other connected socket (the common case: a
    // job's ordinary connections, and the ones it accepted) goes without
    // the cookie and the map delete, which were the largest cost a job's
    // ordinary connection paid.
    let peer_port = u16::from_be(sock.dst_port);
    let cfg = MP_CONFIG.load();
    if peer_port != 0
        && peer_port != cfg.listen_port4
        && !cfg.is_slot4(peer_port)
        && (cfg.listen_port6 == 0 || peer_port != cfg.listen_port6)
    {
        return ALLOW;
    }
    // SAFETY: ctx is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Its slot: as noted when it was taken, or from the pending record (a
    // connect that failed, or a disconnected socket, has no peer port
    // left), or the port it was connected to.
    let slot = if let Some(held) = MP_SOCK_SLOTS.get_ptr(cookie) {
        // SAFETY: the pointer came from a successful lookup just now.
        (unsafe { *held }) as u16
    } else if let Some(record) = MP_PENDING.get_ptr(cookie) {
        // SAFETY: as above.
        unsafe { (*record).slot }
    } else if cfg.is_slot4(peer_port) {
        peer_port
    } else {
        0
    };
    let _ = MP_PENDING.remove(cookie);
    let _ = MP_SOCK_SLOTS.remove(cookie);
    free_slot(slot, cookie);
    ALLOW
}

/// A connection to a pending slot of the IPv4 listen address goes to the
/// daemon's listening socket; one to any other port of the slot range on
/// that address is refused (`SK_DROP` ends the lookup: TCP answers RST): a
/// socket some process bound there (a wildcard bind on the host, while the
/// daemon is down) must never answer a connect the redirect sent to a
/// slot. Everything else is looked up as usual.
#[sk_lookup]
pub fn mp_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands every sk_lookup program a valid bpf_sk_lookup.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != u32::from(AF_INET) || lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let cfg = MP_CONFIG.load();
    let port = lookup.local_port as u16; // host order
    if lookup.local_ip4 != cfg.listen_ip4 || !cfg.is_slot4(port) {
        return SK_PASS;
    }
    if MP_SLOTS.get_ptr(u32::from(port)).is_none() {
        return SK_DROP;
    }
    // No listener (the daemon is down or not listening yet): refused too,
    // never handed to another socket.
    match MP_LISTENER.redirect_sk_lookup(&ctx, 0, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}

#[sock_ops]
pub fn mp_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if let Some(key) = conn_key(&ctx) {
                let _ = MP_CONNS.remove(key);
            }
        }
        _ => {}
    }
    1
}

/// The SYN is about to go out: the local port is known, so move the record
/// from the cookie to the 4-tuple (beside it on its slot, or in the 4-tuple
/// map, asking to hear when the socket closes).
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // Every connect of every job passes here; only those the redirect sent
    // to one of our listen ports can have a record. Checking the port
    // first spares the others the cookie and the map lookup.
    let port = u32::from_be(ctx.remote_port()) as u16;
    let cfg = MP_CONFIG.load();
    if port != cfg.listen_port4
        && !cfg.is_slot4(port)
        && (cfg.listen_port6 == 0 || port != cfg.listen_port6)
    {
        return;
    }
    // SAFETY: ctx is the program's own context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = MP_PENDING.get_ptr(cookie) else {
        return;
    };
    // SAFETY: the pointer came from a successful lookup just now.
    let record = unsafe { *record };
    let _ = MP_PENDING.remove(cookie);
    let Some(key) = conn_key(ctx) else {
        return;
    };
    // (A v4-mapped connection of an IPv6 socket keys as IPv4; a native
    // IPv6 one is never on a slot, whatever its listen port.)
    if key.family == AF_INET && cfg.is_slot4(port) {
        // Sent to a slot: the record waits there, and its 4-tuple goes
        // beside it, by which the daemon tells this connection from a
        // translated one. The slot is freed when the daemon takes it, or
        // when this socket goes: no close callback, no second map.
        if let Some(slot) = MP_SLOTS.get_ptr_mut(u32::from(port)) {
            // SAFETY: the pointer came from a successful lookup just now.
            unsafe {
                if (*slot).cookie == cookie {
                    (*slot).conn = key;
                }
            }
        }
        return;
    }
    // Without the close callback the entry would outlive the connection and
    // could be found by a later one reusing the 4-tuple: record nothing (the
    // daemon then refuses the connection) rather than that.
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        warn!(
            ctx,
            "cannot watch connection of cgroup {}", record.cgroup_id
        );
        return;
    }
    if MP_CONNS.insert(key, record, 0).is_err() {
        warn!(
            ctx,
            "cannot record connection of cgroup {}", record.cgroup_id
        );
    }
}

/// The connection's 4-tuple as the daemon sees it from `accept()`.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> Option<ConnKey> {
    // SAFETY: the kernel hands every sock_ops program a valid bpf_sock_ops.
    let ops: &bpf_sock_ops = unsafe { &*ctx.ops };
    let client_port = ctx.local_port() as u16; // host order
    let server_port = u32::from_be(ctx.remote_port()) as u16; // network order, shifted
    match ctx.family() as u16 {
        AF_INET => ConnKey::new(
            AF_INET,
            [ctx.local_ip4(), 0, 0, 0],
            client_port,
            [ctx.remote_ip4(), 0, 0, 0],
            server_port,
        ),
        AF_INET6 => ConnKey::new(
            AF_INET6,
            read_ip6(&ops.local_ip6),
            client_port,
            read_ip6(&ops.remote_ip6),
            server_port,
        ),
        _ => None,
    }
}

#[cfg(all(not(test), target_arch = "bpf"))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
