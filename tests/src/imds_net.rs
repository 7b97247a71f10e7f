//! Where the fake IMDS lives: a namespace of its own, one routed hop from
//! the test namespace (which plays the EC2 host), as the real IMDS is one
//! hop from an instance. Containers' packets to it are forwarded by the
//! test namespace exactly as an instance forwards them, so a guard on the
//! route (and the hop limit of token answers) is tested as it works on EC2.
//!
//! ```text
//! test namespace ("host")                     IMDS namespace
//!   docker0 172.31.213.1/24 (containers)        lo: 169.254.169.254, 169.254.170.2,
//!   mpimds 169.254.200.1/30, fd00:200::1/64 ==     169.254.170.23, fd00:ec2::254, ::23
//!   routes: the guarded addresses via mpimds    eth0 169.254.200.2/30, fd00:200::2/64
//!   ip_forward on                               default route back to the host
//! ```
//!
//! Nothing here routes off the machine: the test namespace still has no
//! route but these, and the IMDS namespace only a route back to it.
//!
//! A [`PacketLog`] records every IP packet that reaches the IMDS namespace,
//! so a test can say that nothing from an attacker arrived, whatever the
//! protocol.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use anyhow::{bail, Context as _};

use crate::netns::NetNs;

/// The test namespace's end of the link to the IMDS namespace: the
/// interface the daemon must find and guard.
pub const UPLINK: &str = "mpimds";
/// The IMDS namespace's end.
const IMDS_IFACE: &str = "eth0";
const HOST_ADDR4: &str = "169.254.200.1";
const IMDS_ADDR4: &str = "169.254.200.2";
const HOST_ADDR6: &str = "fd00:200::1";
const IMDS_ADDR6: &str = "fd00:200::2";
/// What the IMDS namespace serves (on its lo), and the test namespace
/// routes to it.
const SERVED: [&str; 5] = [
    "169.254.169.254/32",
    "169.254.170.2/32",
    "169.254.170.23/32",
    "fd00:ec2::254/128",
    "fd00:ec2::23/128",
];

/// The IMDS namespace and its link; removed on drop (the veth goes with
/// the namespace).
#[derive(Debug)]
pub struct ImdsNet {
    pub ns: NetNs,
}

impl ImdsNet {
    /// Builds the IMDS namespace behind a veth from `host`, with the routes
    /// both ways and forwarding on in `host`.
    pub fn new(host: &NetNs) -> anyhow::Result<Self> {
        let ns = NetNs::new("mpimds", &SERVED)?;
        let net = Self { ns };
        net.link(host)?;
        sysctl(host, "net.ipv4.ip_forward=1")?;
        sysctl(host, "net.ipv6.conf.all.forwarding=1")?;
        Ok(net)
    }

    /// Deletes the link and makes it anew, with its routes: the interface
    /// the guard was on is gone and another takes its place.
    pub fn recreate_link(&self, host: &NetNs) -> anyhow::Result<()> {
        host.ip(&["link", "del", UPLINK])?;
        self.link(host)
    }

    fn link(&self, host: &NetNs) -> anyhow::Result<()> {
        host.ip(&[
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            IMDS_IFACE,
            "netns",
            self.ns.name(),
        ])?;
        host.ip(&["addr", "add", &format!("{HOST_ADDR4}/30"), "dev", UPLINK])?;
        host.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{HOST_ADDR6}/64"),
            "dev",
            UPLINK,
            "nodad",
        ])?;
        host.ip(&["link", "set", UPLINK, "up"])?;
        self.ns.ip(&[
            "addr",
            "add",
            &format!("{IMDS_ADDR4}/30"),
            "dev",
            IMDS_IFACE,
        ])?;
        self.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{IMDS_ADDR6}/64"),
            "dev",
            IMDS_IFACE,
            "nodad",
        ])?;
        self.ns.ip(&["link", "set", IMDS_IFACE, "up"])?;
        self.ns
            .ip(&["route", "add", "default", "via", HOST_ADDR4])?;
        self.ns
            .ip(&["-6", "route", "add", "default", "via", HOST_ADDR6])?;
        for served in SERVED {
            let (family, via) = if served.contains(':') {
                ("-6", IMDS_ADDR6)
            } else {
                ("-4", IMDS_ADDR4)
            };
            host.ip(&[family, "route", "add", served, "via", via])?;
        }
        Ok(())
    }

    /// The MAC address of the IMDS end of the link (where a raw frame from
    /// the host side must go).
    pub fn imds_mac(&self) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["-n", self.ns.name(), "-br", "link", "show", IMDS_IFACE])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(2)
            .map(str::to_string)
            .with_context(|| format!("no MAC in {text:?}"))
    }

    /// Starts recording every IP packet that arrives on the IMDS end.
    pub fn record(&self) -> anyhow::Result<PacketLog> {
        PacketLog::start(&self.ns, IMDS_IFACE)
    }
}

fn sysctl(ns: &NetNs, setting: &str) -> anyhow::Result<()> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["sysctl", "-qw", setting])
        .output()
        .context("running nsenter sysctl")?;
    if !out.status.success() {
        bail!(
            "sysctl {setting}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One IP packet seen arriving in the IMDS namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol (6 TCP, 17 UDP, ...).
    pub protocol: u8,
}

/// Records the IP packets arriving on an interface, from a thread inside
/// its namespace; stops on drop.
pub struct PacketLog {
    seen: Arc<Mutex<Vec<SeenPacket>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PacketLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketLog").finish_non_exhaustive()
    }
}

impl PacketLog {
    fn start(ns: &NetNs, iface: &'static str) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let (log, flag) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("packet-log".into())
            .spawn(move || {
                let socket = (|| -> anyhow::Result<OwnedFd> {
                    let file = std::fs::File::open(&path)?;
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    open_packet_socket(iface)
                })();
                match socket {
                    Ok(fd) => {
                        let _ = ready_tx.send(Ok(()));
                        capture(&fd, &log, &flag);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx
            .recv()
            .context("packet log thread died")?
            .context("starting the packet log")?;
        Ok(Self {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Every packet seen so far.
    pub fn seen(&self) -> Vec<SeenPacket> {
        self.seen.lock().unwrap().clone()
    }

    /// Packets seen from `src`.
    pub fn from(&self, src: IpAddr) -> Vec<SeenPacket> {
        self.seen().into_iter().filter(|p| p.src == src).collect()
    }
}

impl Drop for PacketLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An AF_PACKET socket that receives the IP packets arriving on `iface`
/// (not those it sends), with a short receive timeout so the thread can
/// notice it should stop.
fn open_packet_socket(iface: &str) -> anyhow::Result<OwnedFd> {
    let index = nix::net::if_::if_nametoindex(iface).with_context(|| format!("no {iface}"))?;
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(protocol)) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: addr is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        bail!("binding to {iface}: {}", std::io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: timeout is a valid timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc != 0 {
        bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn capture(fd: &OwnedFd, seen: &Mutex<Vec<SeenPacket>>, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buf and from are valid for the sizes given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut len,
            )
        };
        if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        if let Some(packet) = parse(&buf[..n as usize]) {
            seen.lock().unwrap().push(packet);
        }
    }
}

fn parse(ip: &[u8]) -> Option<SeenPacket> {
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => Some(SeenPacket {
            src: IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?),
            dst: IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?),
            protocol: ip[9],
        }),
        6 if ip.len() >= 40 => Some(SeenPacket {
            src: IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?),
            dst: IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?),
            protocol: ip[6],
        }),
        _ => None,
    }
}
