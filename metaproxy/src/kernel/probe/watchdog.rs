//! The probe's watchdog: the redirect, the guard and the layer-2 lock must
//! not hang on bpffs pins alone.
//!
//! A job that can write the pin directory (a runner whose `volumes` expose
//! `/sys/fs/bpf` or a host `/sys`) could unlink, rename or replace the
//! pins, and a link whose last reference goes is detached: IMDS would be
//! one connect away. So the daemon holds every link it pins by a
//! descriptor of its own for as long as it runs (unlinked pins then detach
//! nothing), checked at once to be the link of the program it attached,
//! and every few seconds [`Probe::repair`] checks each one:
//!
//! * the pin directory and `links/` are directories of their own, not
//!   symlinks somewhere else;
//! * the link is still attached where it was put (the kernel's link info:
//!   a cgroup link's cgroup, a tcx link's interface), and the packet guard
//!   still first on its interface (a program before it could pass a
//!   packet it would drop); if not, it is attached again (in front: the
//!   kernel refuses one program twice on an interface, so the old link is
//!   detached just before);
//! * its pin is still there, and is this very link (not a symlink, nor
//!   another link renamed over it); if not, it is pinned again.
//!
//! Each link is judged on its own: one that cannot be put back does not
//! keep the others from being checked. Clsact filters (kernels before tcx)
//! are held by their qdisc, not by a link, and are not watched here.
//!
//! A newer generation's links on the same cgroup mean another daemon has
//! taken over (a restart whose old process lingers): this one stands down
//! rather than pin back what the new one unpinned.

use std::{
    fs, io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    programs::{SchedClassifier, TcAttachType},
    Ebpf,
};
use metaproxy_common::{PROG_L2_SOCKET, PROG_L2_SOCKOPT, PROG_SK_LOOKUP};

use super::{
    attach::{attach_lsm, attach_program, attach_sk_lookup, attach_sockopt, attach_tc},
    interface_name, io_err,
    pins::{ensure_bpffs_dir, pinned_links},
    syscalls, tc_program, Pin, Probe, ProbeError, TcMode, TcProg,
};
use crate::model::interface::Interface;

/// A link the daemon holds, and what it is.
#[derive(Debug)]
pub(super) struct Held {
    pub path: PathBuf,
    pub fd: OwnedFd,
    pub what: Attached,
    /// The kernel's ids of the link and of its program.
    pub link_id: u32,
    pub prog_id: u32,
}

/// What a held link attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Attached {
    /// A program of [`PROGRAMS`] (or the LSM half) on the attached cgroup.
    Cgroup(&'static str),
    /// A tc program's tcx link on an interface.
    Tc(TcProg, Interface),
    /// The slot steering on the daemon's network namespace (its inode).
    Netns(u32),
}

impl Attached {
    fn describe(&self) -> String {
        match self {
            Self::Cgroup(name) => format!("{name} on the cgroup"),
            Self::Tc(prog, iface) => format!("{} on {}", prog.name(), iface.name),
            Self::Netns(_) => format!("{PROG_SK_LOOKUP} on the network namespace"),
        }
    }
}

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repairs {
    /// Pins that were gone (or replaced) and were made again.
    pub pins_restored: Vec<String>,
    /// Links that were detached (or not first, for the guard) and were
    /// attached again.
    pub links_reattached: Vec<String>,
    /// What could not be put back, and why: tried again next pass.
    pub failed: Vec<String>,
    /// A newer generation on the cgroup: this daemon no longer watches.
    pub superseded_by: Option<u64>,
}

/// The id of loaded program `name`.
pub(super) fn prog_id(ebpf: &Ebpf, name: &'static str) -> Result<u32, ProbeError> {
    let prog = ebpf.program(name).ok_or(ProbeError::Missing(name))?;
    let info = prog
        .info()
        .map_err(|source| ProbeError::Program { name, source })?;
    Ok(info.id())
}

fn not_ours(path: &Path, why: &str) -> ProbeError {
    ProbeError::Io {
        what: "holding the link pinned at",
        path: path.to_path_buf(),
        source: io::Error::other(why.to_string()),
    }
}

/// Takes a descriptor of the link pinned at `path`, which must be a link
/// of program `prog_id`: a pin renamed over ours in the moment between
/// pinning and this is refused, not held in its place.
pub(super) fn hold(path: &Path, what: Attached, prog_id: u32) -> Result<Held, ProbeError> {
    let fd = syscalls::obj_get(path).map_err(io_err("holding the link pinned at", path))?;
    let target =
        syscalls::link_target(fd.as_fd()).map_err(io_err("reading the link pinned at", path))?;
    if target.prog_id != prog_id {
        return Err(not_ours(path, "it is a link of another program"));
    }
    Ok(Held {
        path: path.to_path_buf(),
        fd,
        what,
        link_id: target.id,
        prog_id,
    })
}

/// Removes whatever sits at `path` (a pin, a symlink); nothing there is
/// fine.
fn clear(path: &Path) -> Result<(), ProbeError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("unpinning", path)(e)),
    }
}

/// Makes `dir` a directory of its own on bpffs again if it was replaced
/// by a symlink (which could lead re-pins into a directory someone else
/// controls) or removed.
fn own_dir(dir: &Path) -> Result<(), ProbeError> {
    if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(dir).map_err(io_err("removing the symlink at", dir))?;
    }
    ensure_bpffs_dir(dir)
}

impl Probe {
    /// Holds the link pinned at `path` for as long as the daemon runs.
    pub(super) fn hold(&self, path: &Path, what: Attached, prog_id: u32) -> Result<(), ProbeError> {
        let held = hold(path, what, prog_id)?;
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(held);
        Ok(())
    }

    /// One watchdog pass (see the module docs).
    pub fn repair(&self) -> Repairs {
        // `guard` before `held`, as everywhere.
        let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut repairs = Repairs::default();
        if let Some(newer) = self.newer_generation(&held) {
            repairs.superseded_by = Some(newer);
            return repairs;
        }
        let pin_dir = self.links_dir.parent().unwrap_or(&self.links_dir);
        for dir in [pin_dir, self.links_dir.as_path()] {
            if let Err(e) = own_dir(dir) {
                repairs.failed.push(e.to_string());
                return repairs;
            }
        }
        for h in held.iter_mut() {
            if let Err(e) = self.repair_one(&mut guard.0, h, &mut repairs) {
                repairs.failed.push(format!("{}: {e}", h.what.describe()));
            }
        }
        self.count_repairs(&repairs);
        repairs
    }

    fn repair_one(
        &self,
        ebpf: &mut Ebpf,
        h: &mut Held,
        repairs: &mut Repairs,
    ) -> Result<(), ProbeError> {
        // Where the interface is now called what (it may have been renamed).
        let iface_now = match &h.what {
            Attached::Tc(_, iface) => match interface_name(iface.index) {
                Some(name) => Some(Interface {
                    index: iface.index,
                    name,
                }),
                // Gone with its interface: forget_interfaces drops it.
                None => return Ok(()),
            },
            Attached::Cgroup(_) | Attached::Netns(_) => None,
        };
        let target = syscalls::link_target(h.fd.as_fd()).ok();
        let attached = target.is_some_and(|t| match &h.what {
            Attached::Cgroup(_) => t.cgroup_id == self.cgroup_id,
            Attached::Tc(_, iface) => t.ifindex == iface.index,
            Attached::Netns(ino) => t.netns_ino == *ino,
        });
        let behind = attached
            && match (&h.what, &iface_now) {
                (Attached::Tc(TcProg::Guard, _), Some(now)) => !first_on(now, h.prog_id),
                _ => false,
            };
        if !attached || behind {
            if behind {
                // The kernel refuses the same program twice on one
                // interface: the old link goes just before the new.
                syscalls::link_detach(h.fd.as_fd())
                    .map_err(io_err("detaching to attach in front", &h.path))?;
            }
            clear(&h.path)?;
            self.attach_again(ebpf, &h.what, iface_now.as_ref(), &h.path)?;
            *h = hold(&h.path, h.what.clone(), h.prog_id)?;
            repairs.links_reattached.push(h.what.describe());
            return Ok(());
        }
        if !self.pinned_here(h) {
            clear(&h.path)?;
            syscalls::obj_pin(h.fd.as_fd(), &h.path).map_err(io_err("pinning again", &h.path))?;
            repairs.pins_restored.push(h.what.describe());
        }
        Ok(())
    }

    /// Whether the pin at `h.path` is this very link: there, not a
    /// symlink, and not another link renamed over it.
    fn pinned_here(&self, h: &Held) -> bool {
        let real = fs::symlink_metadata(&h.path).is_ok_and(|m| !m.file_type().is_symlink());
        real && syscalls::obj_get(&h.path)
            .and_then(|fd| syscalls::link_target(fd.as_fd()))
            .is_ok_and(|t| t.id == h.link_id)
    }

    /// A newer generation's cgroup link on our cgroup that is none of ours.
    fn newer_generation(&self, held: &[Held]) -> Option<u64> {
        let ours: Vec<u32> = held.iter().map(|h| h.link_id).collect();
        pinned_links(&self.links_dir)
            .ok()?
            .into_iter()
            .filter(|(_, generation, pin)| *generation > self.generation && *pin == Pin::Cgroup)
            .find(|(path, _, _)| {
                syscalls::obj_get(path)
                    .and_then(|fd| syscalls::link_target(fd.as_fd()))
                    .is_ok_and(|t| t.cgroup_id == self.cgroup_id && !ours.contains(&t.id))
            })
            .map(|(_, generation, _)| generation)
    }

    fn attach_again(
        &self,
        ebpf: &mut Ebpf,
        what: &Attached,
        iface_now: Option<&Interface>,
        path: &Path,
    ) -> Result<(), ProbeError> {
        match (what, iface_now) {
            (Attached::Tc(prog, _), Some(iface)) => {
                let tc = tc_program(ebpf, *prog)?;
                attach_tc(
                    tc,
                    *prog,
                    iface,
                    TcMode::Tcx,
                    &self.links_dir,
                    self.generation,
                )?;
            }
            (Attached::Tc(..), None) => {}
            (Attached::Netns(_), _) => attach_sk_lookup(ebpf, path)?,
            (Attached::Cgroup(name), _) => {
                let cgroup =
                    fs::File::open(&self.cgroup).map_err(io_err("opening cgroup", &self.cgroup))?;
                if *name == PROG_L2_SOCKOPT {
                    attach_sockopt(ebpf, &cgroup, path)?;
                } else {
                    let link = if *name == PROG_L2_SOCKET {
                        attach_lsm(ebpf, &cgroup)?
                    } else {
                        attach_program(ebpf, name, &cgroup)?
                    };
                    link.pin(path).map_err(|source| ProbeError::Pin {
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Counts a pass's repairs (for the metrics).
    fn count_repairs(&self, repairs: &Repairs) {
        use std::sync::atomic::Ordering;
        self.repairs[0].fetch_add(repairs.pins_restored.len() as u64, Ordering::Relaxed);
        self.repairs[1].fetch_add(repairs.links_reattached.len() as u64, Ordering::Relaxed);
    }

    /// Pins restored and links attached again since the daemon started.
    pub fn repairs_counted(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.repairs[0].load(Ordering::Relaxed),
            self.repairs[1].load(Ordering::Relaxed),
        )
    }
}

/// Whether program `prog_id` runs first at tcx egress of `iface`.
fn first_on(iface: &Interface, prog_id: u32) -> bool {
    match SchedClassifier::query_tcx(&iface.name, TcAttachType::Egress) {
        Ok((_, programs)) => programs.first().is_some_and(|p| p.id() == prog_id),
        // Unreadable (the interface going): judged next pass.
        Err(_) => true,
    }
}
