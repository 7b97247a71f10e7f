//! User-space relays: which process on this host's own stack opened a
//! connection, and whether it relays a given network namespace's traffic.
//!
//! Rootless Podman (slirp4netns, pasta) gives each container a network
//! namespace whose only way out is a TAP device held by a relay process in
//! the host's namespace. The relay opens a host socket of its own for each
//! of the container's connections, from a host address: the daemon sees
//! neither the container's address nor its port. What does not change is
//! the destination, so the connection still finds its record by slot; it
//! may take it only if the kernel shows the relay serves the namespace the
//! record's process connected from:
//!
//! * the connecting socket is found in this namespace's TCP table by the
//!   exact address pair `accept()` gave (so it is a local socket, not a
//!   forged packet), and then among the open files of the processes that
//!   hold it;
//! * one of those processes holds a TUN/TAP file whose device lives in
//!   the network namespace of the record's process (`TUNGETDEVNETNS` on a
//!   copy of the file taken with `pidfd_getfd`): only the relay of that
//!   namespace, or root, can hold one;
//! * the record's process is re-checked to still be in the record's
//!   cgroup, so a reused pid borrows nothing.
//!
//! Needs `CAP_SYS_PTRACE` (to read other users' open files and copy one).

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process},
};
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};

/// A process that relays a network namespace's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    pub pid: u32,
    pub comm: String,
}

/// `_IO('T', 227)`: a file descriptor for the network namespace of a
/// TUN/TAP file's device (Linux 5.2).
const TUNGETDEVNETNS: libc::c_ulong = 0x54e3;

/// Whether `ip` is an address of this network namespace: only a socket
/// of this host can be a relay's, and asking costs one netlink dump, where
/// the TCP table and /proc cost far more. Connections from a container's
/// address (Docker-in-Docker's) stop here.
pub fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        return true;
    }
    nix::ifaddrs::getifaddrs().is_ok_and(|mut all| {
        all.any(|a| {
            a.address.is_some_and(|s| {
                s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(ip)
                    || s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(ip)
            })
        })
    })
}

/// The relay that holds the local socket connected from `peer` to `local`
/// and serves the network namespace of thread `tid` of process `pid`,
/// which must still be in the cgroup at `cgroup_path` (below the cgroup2
/// mount). `None` if the socket is not local, or no process holding it
/// serves that namespace. Reads /proc: run it off the async workers.
pub fn relay_of(
    peer: SocketAddr,
    local: SocketAddr,
    (pid, tid): (u32, u32),
    cgroup_path: &str,
) -> Result<Option<Relay>, String> {
    let Some(inode) = local_socket(peer, local)? else {
        return Ok(None);
    };
    let Some(served) = netns_of(pid, tid, cgroup_path) else {
        return Ok(None);
    };
    if Some(served) == netns_id(Path::new("/proc/self/ns/net")) {
        // A process in this very namespace connects directly.
        return Ok(None);
    }
    let all = procfs::process::all_processes().map_err(|e| format!("/proc: {e}"))?;
    for process in all.flatten() {
        if !holds(&process, inode) {
            continue;
        }
        // From here on the pid is pinned: if it was reused since it was
        // listed, the process now behind it must hold the socket too.
        let Some(pidfd) =
            Pid::from_raw(process.pid).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok())
        else {
            continue;
        };
        if holds(&process, inode) && serves(&process, &pidfd, served) {
            let comm = process.stat().map(|s| s.comm).unwrap_or_default();
            return Ok(Some(Relay {
                pid: process.pid as u32,
                comm,
            }));
        }
    }
    Ok(None)
}

/// Whether `process` holds the socket `inode`. Reads links only: nothing
/// here touches the files themselves (a file on a hung mount would hang
/// us).
fn holds(process: &Process, inode: u64) -> bool {
    process.fd().is_ok_and(|mut fds| {
        fds.any(|fd| fd.is_ok_and(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode)))
    })
}

/// Whether `process` (pinned by `pidfd`) holds a TUN/TAP file whose
/// device lives in the network namespace `netns`. A TUN/TAP is told by
/// what the kernel writes in its fdinfo (`iff:`, the interface it is
/// attached to), never by opening, stat-ing or asking a file that may be
/// on a mount its owner controls; only then is a copy of it asked where
/// its device lives.
fn serves(process: &Process, pidfd: &OwnedFd, netns: NetnsId) -> bool {
    let Ok(fds) = process.fd() else {
        return false;
    };
    fds.flatten().any(|fd| {
        let FDTarget::Path(_) = fd.target else {
            return false;
        };
        let info = format!("/proc/{}/fdinfo/{}", process.pid, fd.fd);
        let is_tun =
            std::fs::read_to_string(info).is_ok_and(|i| i.lines().any(|l| l.starts_with("iff:")));
        is_tun && tap_netns(pidfd, fd.fd) == Some(netns)
    })
}

/// The inode of the local TCP socket whose own address is `peer` and whose
/// remote is `local`, established, if there is one in this network
/// namespace (an IPv4 pair is also looked for among dual-stack sockets).
fn local_socket(peer: SocketAddr, local: SocketAddr) -> Result<Option<u64>, String> {
    let (peer, local) = (canonical(peer), canonical(local));
    let mut tables = vec![procfs::net::tcp6()];
    if peer.is_ipv4() {
        tables.insert(0, procfs::net::tcp());
    }
    for table in tables {
        let table = table.map_err(|e| format!("/proc/net/tcp: {e}"))?;
        let found = table.iter().find(|e| {
            e.state == TcpState::Established
                && e.inode != 0
                && canonical(e.local_address) == peer
                && canonical(e.remote_address) == local
        });
        if let Some(e) = found {
            return Ok(Some(e.inode));
        }
    }
    Ok(None)
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A network namespace, as its nsfs device and inode.
type NetnsId = (u64, u64);

fn netns_id(path: &Path) -> Option<NetnsId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The network namespace of thread `tid` of process `pid` (the thread
/// that connected: threads may differ), if it is still in the cgroup at
/// `cgroup_path`. Read before the cgroup is checked, so a thread reused
/// in between fails the check.
fn netns_of(pid: u32, tid: u32, cgroup_path: &str) -> Option<NetnsId> {
    let task = Path::new("/proc")
        .join(pid.to_string())
        .join("task")
        .join(tid.to_string());
    let netns = netns_id(&task.join("ns/net"))?;
    let cgroups = std::fs::read_to_string(task.join("cgroup")).ok()?;
    cgroups
        .lines()
        .any(|l| l.strip_prefix("0::") == Some(cgroup_path))
        .then_some(netns)
}

/// The network namespace of the device behind file `fd` of the process
/// `pidfd`, if that file is an attached TUN/TAP.
fn tap_netns(pidfd: &OwnedFd, fd: i32) -> Option<NetnsId> {
    let tap = pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty()).ok()?;
    let netns = dev_netns(&tap)?;
    let m = rustix::fs::fstat(&netns).ok()?;
    Some((m.st_dev as u64, m.st_ino as u64))
}

#[allow(unsafe_code)]
fn dev_netns(tap: &OwnedFd) -> Option<OwnedFd> {
    // SAFETY: TUNGETDEVNETNS takes no argument and returns a new file
    // descriptor, or -1; on a file that is not a TUN/TAP it fails.
    let fd = unsafe { libc::ioctl(tap.as_raw_fd(), TUNGETDEVNETNS as _) };
    // SAFETY: a non-negative return is a descriptor the kernel just made
    // for us alone.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn inode_of(fd: i32) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let link = link.to_string_lossy();
        link.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    #[test]
    fn the_connecting_socket_is_found_by_its_pair_and_only_that_way_round() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert_eq!(
            local_socket(peer, local).unwrap(),
            Some(inode_of(client.as_raw_fd()))
        );
        // The accepted end is not the connecting socket.
        assert_eq!(
            local_socket(local, peer).unwrap(),
            Some(inode_of(server.as_raw_fd()))
        );
        let elsewhere = SocketAddr::new("127.0.0.1".parse().unwrap(), 1);
        assert_eq!(local_socket(elsewhere, local).unwrap(), None);
    }

    #[test]
    fn a_process_in_this_namespace_is_no_ones_relay() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .to_string();
        let me = std::process::id();
        let found = relay_of(peer, server.local_addr().unwrap(), (me, me), &path).unwrap();
        assert_eq!(found, None);
        // A pid that is not in the cgroup named is nobody's either.
        assert_eq!(netns_of(me, me, "/not/its/cgroup"), None);
        assert!(netns_of(me, me, &path).is_some());
        assert!(is_local(peer.ip()));
        assert!(!is_local("192.0.2.1".parse().unwrap()));
    }
}
