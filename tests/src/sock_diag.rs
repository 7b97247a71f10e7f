//! Which cgroup a TCP socket belongs to, asked of the kernel (sock_diag)
//! in the socket's own network namespace. The fake IMDS uses it to tell
//! the daemon's calls from any other process's: both come from the same
//! host address.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
/// The attribute that carries the socket's cgroup v2 id (kernel 5.8+).
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `struct nlmsghdr` and `struct inet_diag_msg`.
const NLMSG_HDR_LEN: usize = 16;
const INET_DIAG_MSG_LEN: usize = 72;

/// `struct inet_diag_sockid`: ports and addresses in network order.
#[repr(C)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` followed by `struct inet_diag_req_v2`.
#[repr(C)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// A sock_diag socket bound to one network namespace.
#[derive(Debug)]
pub struct SockDiag(OwnedFd);

impl SockDiag {
    /// Opens the socket inside the namespace at `netns`; it answers for
    /// that namespace's sockets whichever thread uses it.
    pub fn open_in(netns: &Path) -> anyhow::Result<Self> {
        let netns: PathBuf = netns.to_path_buf();
        let fd = std::thread::spawn(move || -> anyhow::Result<OwnedFd> {
            let file = std::fs::File::open(&netns)
                .with_context(|| format!("opening {}", netns.display()))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            // SAFETY: plain socket(2); the fd is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    libc::NETLINK_SOCK_DIAG,
                )
            };
            if fd < 0 {
                bail!("sock_diag socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh socket nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the sock_diag thread panicked"))??;
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
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
        Ok(Self(fd))
    }

    /// The cgroup id of the namespace's TCP socket from `local` to
    /// `remote`, if there is one (a forwarded connection has its socket in
    /// another namespace).
    pub fn tcp_cgroup(&self, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
        let family = match (local.ip(), remote.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
            (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
            _ => return None,
        };
        let request = Request {
            len: std::mem::size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST,
            seq: 1,
            pid: 0,
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: u32::MAX,
            id: SockId {
                sport: local.port().to_be_bytes(),
                dport: remote.port().to_be_bytes(),
                src: address(local.ip()),
                dst: address(remote.ip()),
                ifindex: 0,
                // INET_DIAG_NOCOOKIE: any socket with this address pair.
                cookie: [u32::MAX; 2],
            },
        };
        // SAFETY: request is a valid nlmsghdr + inet_diag_req_v2 of the
        // size given; the fd is our open netlink socket.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                (&raw const request).cast(),
                std::mem::size_of::<Request>(),
                0,
            )
        };
        if sent < 0 {
            return None;
        }
        let mut buf = [0u8; 8192];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        cgroup_of_answer(buf.get(..usize::try_from(n).ok()?)?)
    }
}

fn address(ip: IpAddr) -> [u8; 16] {
    let mut out = [0; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out = v6.octets(),
    }
    out
}

/// The cgroup id in a sock_diag answer: one `inet_diag_msg` and its
/// attributes, or an error (no such socket).
fn cgroup_of_answer(msg: &[u8]) -> Option<u64> {
    let u16_at = |at: usize| Some(u16::from_ne_bytes(msg.get(at..at + 2)?.try_into().ok()?));
    let len = usize::try_from(u32::from_ne_bytes(msg.get(..4)?.try_into().ok()?)).ok()?;
    // Anything else is NLMSG_ERROR: no such socket.
    if u16_at(4)? != SOCK_DIAG_BY_FAMILY {
        return None;
    }
    let mut at = NLMSG_HDR_LEN + INET_DIAG_MSG_LEN;
    while at + 4 <= len.min(msg.len()) {
        let attr_len = usize::from(u16_at(at)?);
        if attr_len < 4 {
            return None;
        }
        if u16_at(at + 2)? == INET_DIAG_CGROUP_ID {
            return Some(u64::from_ne_bytes(
                msg.get(at + 4..at + 12)?.try_into().ok()?,
            ));
        }
        at += attr_len.next_multiple_of(4);
    }
    None
}
