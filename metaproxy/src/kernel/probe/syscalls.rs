//! The few `bpf(2)` commands aya 0.14 does not offer, and the one place in
//! the daemon with `unsafe`:
//!
//! * a pinned cgroup link for the `cgroup/setsockopt` program. aya attaches
//!   a `CgroupSockopt` with a bpf_link but, unlike every other cgroup
//!   program type, cannot hand that link out as an `FdLink`, so it cannot
//!   be pinned, and it would detach when the daemon exits: the lock on
//!   `PACKET_QDISC_BYPASS` and AF_XDP would then be gone whenever the
//!   daemon is down. So this module makes the link and pins it itself
//!   (`BPF_LINK_CREATE`, `BPF_OBJ_PIN`);
//! * holding a pinned link by a descriptor of the daemon's own
//!   (`BPF_OBJ_GET`), pinning it again where its pin was removed
//!   (`BPF_OBJ_PIN`), asking the kernel where it is attached
//!   (`BPF_OBJ_GET_INFO_BY_FD`), and detaching it to attach it again in
//!   front (`BPF_LINK_DETACH`), for the probe's watchdog;
//! * taking a record out of a hash map in one step
//!   (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, which aya offers only for queues
//!   and stacks): one `bpf(2)` call on the request path where a lookup and
//!   a delete were two, and no lock around them.
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
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;
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

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the pin path"))
}

/// A descriptor of the object pinned at `path`: the object lives while the
/// descriptor does, whatever becomes of the pin.
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = c_path(path)?;
    let mut get = ObjPin {
        pathname: c_path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object `fd` refers to at `path`.
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = c_path(path)?;
    let mut pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut pin).map(drop)
}

/// `union bpf_attr` as `BPF_OBJ_GET_INFO_BY_FD` reads it.
#[repr(C)]
#[derive(Default)]
struct GetInfo {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
    _rest: [u64; 12],
}

/// The head of `struct bpf_link_info`: its type, ids, and the first 8 bytes
/// of the per-type union, which hold a cgroup link's cgroup id and a tcx
/// link's ifindex.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    target: [u8; 8],
    _rest: [u64; 6],
}

/// Where a link is attached, as the kernel says: a cgroup link's cgroup id,
/// a tcx link's ifindex (both 0 once the link was detached), and the ids
/// of the link and its program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LinkTarget {
    pub id: u32,
    pub cgroup_id: u64,
    pub ifindex: u32,
    pub netns_ino: u32,
    pub prog_id: u32,
}

pub(super) fn link_target(fd: BorrowedFd<'_>) -> io::Result<LinkTarget> {
    let mut info = LinkInfo::default();
    let mut get = GetInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
        ..Default::default()
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get)?;
    Ok(LinkTarget {
        id: info.id,
        cgroup_id: u64::from_ne_bytes(info.target),
        ifindex: u32::from_ne_bytes([
            info.target[0],
            info.target[1],
            info.target[2],
            info.target[3],
        ]),
        // A netns link's target starts with the namespace's inode, as a
        // tc link's starts with the interface's index.
        netns_ino: u32::from_ne_bytes([
            info.target[0],
            info.target[1],
            info.target[2],
            info.target[3],
        ]),
        prog_id: info.prog_id,
    })
}

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A hash map's own descriptor, for taking values out of it in one step.
/// Made only for a plain (not per-CPU) hash map whose key and value are
/// `K` and `V` in size, so the kernel writes no more than a `V`.
pub(super) struct TakeFd<K, V> {
    fd: OwnedFd,
    _types: std::marker::PhantomData<fn(&K) -> V>,
}

impl<K: aya::Pod, V: aya::Pod> TakeFd<K, V> {
    pub(super) fn of(map: &aya::maps::MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        // A per-CPU map (pinned in our place by someone) would have the
        // kernel write one value per CPU.
        if !matches!(
            info.map_type(),
            Ok(aya::maps::MapType::Hash | aya::maps::MapType::LruHash)
        ) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the map is not a plain hash map",
            ));
        }
        let sizes = (info.key_size() as usize, info.value_size() as usize);
        if sizes != (std::mem::size_of::<K>(), std::mem::size_of::<V>()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the map's key and value are {sizes:?} bytes, not ours"),
            ));
        }
        Ok(Self {
            fd: map.fd().as_fd().try_clone_to_owned()?,
            _types: std::marker::PhantomData,
        })
    }

    /// Looks `key` up and deletes it, as one step: the value, or `None` if
    /// the key was not there. A kernel before 5.14 does not do this for
    /// hash maps and says so; see [`is_unsupported`].
    pub(super) fn take(&self, key: &K) -> io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::zeroed();
        let mut elem = MapElem {
            map_fd: self.fd.as_raw_fd() as u32,
            key: std::ptr::from_ref(key) as u64,
            value: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut elem) {
            // SAFETY: the kernel wrote one value, which is a V in size (see
            // `of`), and V is Pod (any bytes are a valid V; they were
            // zeroed before in any case).
            Ok(_) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Whether `e` says the kernel cannot take from a hash map in one step.
pub(super) fn is_unsupported(e: &io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own, not ENOTSUP.
    matches!(
        e.raw_os_error(),
        Some(524 | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

/// `union bpf_attr` as `BPF_LINK_DETACH` reads it.
#[repr(C)]
#[derive(Default)]
struct LinkDetach {
    link_fd: u32,
    _rest: [u32; 31],
}

/// Detaches the link `fd` refers to (it stays a defunct link while held).
pub(super) fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut detach = LinkDetach {
        link_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_DETACH, &mut detach).map(drop)
}
