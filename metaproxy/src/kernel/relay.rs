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
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::Path,
};

use procfs::process::{FDTarget, Process};

/// A process that relays a network namespace's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    pub pid: u32,
    pub comm: String,
}

/// `_IO('T', 227)`: a file descriptor for the network namespace of a
/// TUN/TAP file's device (Linux 5.2).
const TUNGETDEVNETNS: libc::c_ulong = 0x54e3;

/// `/dev/net/tun`: misc device 10, minor 200.
const TUN_DEVICE: u64 = (10 << 8) | 200;

/// The relay that holds the local socket connected from `peer` to `local`
/// and serves the network namespace of process `pid`, which must still be
/// in the cgroup at `cgroup_path` (below the cgroup2 mount). `None` if the
/// socket is not local, or no process holding it serves that namespace.
/// Reads /proc: run it off the async workers.
pub fn relay_of(
    peer: SocketAddr,
    local: SocketAddr,
    pid: u32,
    cgroup_path: &str,
) -> Result<Option<Relay>, String> {
    let Some(inode) = local_socket(peer, local)? else {
        return Ok(None);
    };
    let Some(served) = netns_of(pid, cgroup_path)? else {
        return Ok(None);
    };
    if Some(served) == netns_id(Path::new("/proc/self/ns/net")) {
        // A process in this very namespace connects directly.
        return Ok(None);
    }
    let all = procfs::process::all_processes().map_err(|e| format!("/proc: {e}"))?;
    for process in all.flatten() {
        let holds = process.fd().is_ok_and(|mut fds| {
            fds.any(|fd| fd.is_ok_and(|fd| matches!(fd.target, FDTarget::Socket(i) if i == inode)))
        });
        if holds && serves(&process, served) {
            let comm = process.stat().map(|s| s.comm).unwrap_or_default();
            return Ok(Some(Relay {
                pid: process.pid as u32,
                comm,
            }));
        }
    }
    Ok(None)
}

/// Whether `process` holds a TUN/TAP file whose device lives in the
/// network namespace `netns`. The device is told by its number, not by
/// the path its file was opened by (a relay in a mount namespace of its
/// own opened it by a path we may not see).
fn serves(process: &Process, netns: NetnsId) -> bool {
    let Ok(fds) = process.fd() else {
        return false;
    };
    fds.flatten().any(|fd| {
        let FDTarget::Path(_) = fd.target else {
            return false;
        };
        let file = format!("/proc/{}/fd/{}", process.pid, fd.fd);
        let is_tun = std::fs::metadata(&file)
            .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == TUN_DEVICE);
        is_tun && tap_netns(process, fd.fd) == Some(netns)
    })
}

/// The inode of the local TCP socket whose own address is `peer` and whose
/// remote is `local`, if there is one in this network namespace.
fn local_socket(peer: SocketAddr, local: SocketAddr) -> Result<Option<u64>, String> {
    let (peer, local) = (canonical(peer), canonical(local));
    let table = match peer {
        SocketAddr::V4(_) => procfs::net::tcp(),
        SocketAddr::V6(_) => procfs::net::tcp6(),
    }
    .map_err(|e| format!("/proc/net/tcp: {e}"))?;
    Ok(table
        .iter()
        .find(|e| e.local_address == peer && e.remote_address == local)
        .map(|e| e.inode))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A network namespace, as its nsfs device and inode.
type NetnsId = (u64, u64);

fn netns_id(path: &Path) -> Option<NetnsId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The network namespace of process `pid`, if it is still in the cgroup
/// at `cgroup_path`.
fn netns_of(pid: u32, cgroup_path: &str) -> Result<Option<NetnsId>, String> {
    let Ok(process) = Process::new(pid as i32) else {
        return Ok(None);
    };
    let before = netns_id(&Path::new("/proc").join(pid.to_string()).join("ns/net"));
    let in_cgroup = process
        .cgroups()
        .map(|c| {
            c.0.iter()
                .any(|c| c.hierarchy == 0 && c.pathname == cgroup_path)
        })
        .unwrap_or(false);
    if !in_cgroup {
        return Ok(None);
    }
    Ok(before)
}

/// The network namespace of the device behind file `fd` of `process`, if
/// that file is an attached TUN/TAP.
fn tap_netns(process: &Process, fd: i32) -> Option<NetnsId> {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let pidfd = pidfd_open(Pid::from_raw(process.pid)?, PidfdFlags::empty()).ok()?;
    let tap = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).ok()?;
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
        let found = relay_of(peer, server.local_addr().unwrap(), me, &path).unwrap();
        assert_eq!(found, None);
        // A pid that is not in the cgroup named is nobody's either.
        assert_eq!(netns_of(me, "/not/its/cgroup").unwrap(), None);
        assert!(netns_of(me, &path).unwrap().is_some());
    }
}
