//! A pinned cgroup link for the `cgroup/setsockopt` program.
//!
//! aya 0.14 attaches a `CgroupSockopt` with a bpf_link but, unlike every
//! other cgroup program type, cannot hand that link out as an `FdLink`, so
//! it cannot be pinned, and it would detach when the daemon exits: the
//! lock on `PACKET_QDISC_BYPASS` and AF_XDP would then be gone whenever the
//! daemon is down. So this module makes the link and pins it itself, with
//! the two `bpf(2)` commands aya uses for the others (`BPF_LINK_CREATE`,
//! `BPF_OBJ_PIN`). It is the one place in the daemon with `unsafe`; drop it
//! when aya implements `TryFrom<CgroupSockoptLink> for FdLink`.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// From linux/bpf.h.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// `union bpf_attr` as `BPF_LINK_CREATE` reads it for a cgroup target,
/// padded to the size of the union's largest member the kernel checks
/// beyond (it requires the unused tail to be zero).
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 12],
}

/// `union bpf_attr` as `BPF_OBJ_PIN` reads it.
#[repr(C)]
#[derive(Default)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _rest: [u32; 25],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised bpf_attr variant that outlives
    // the call, and the size passed is its own; the kernel reads at most
    // that many bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches `prog` (a loaded cgroup/setsockopt program) to `cgroup` as a
/// bpf_link and pins the link at `path`. Returns once the link is pinned;
/// the kernel keeps it attached until the pin is removed.
pub(super) fn attach_and_pin(
    prog: BorrowedFd<'_>,
    cgroup: &std::fs::File,
    path: &Path,
) -> io::Result<()> {
    let mut create = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_fd().as_raw_fd() as u32,
        attach_type: BPF_CGROUP_SETSOCKOPT,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut create)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing
    // else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the pin path"))?;
    let mut pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut pin)?;
    // The pin holds the link now; our descriptor can go.
    drop(link);
    Ok(())
}
