//! The pins under the bpffs directory: made ours alone, read back to
//! tell what is in place, removed only by `detach`.

use std::{
    fs::{self},
    path::{Path, PathBuf},
};

use aya::programs::{tc::SchedClassifierLink, TcAttachType};
use metaproxy_common::PROG_SK_LOOKUP;

use super::{
    interface_name, io_err, Pin, ProbeError, TcProg, BPFFS_ROOT, BPF_FS_MAGIC, LINKS_DIR,
    OPTIONAL_PROGRAMS, PROGRAMS,
};

/// Removes one pin: for a clsact filter, the filter first.
pub(super) fn unpin(path: &Path, pin: &Pin) -> Result<(), ProbeError> {
    if let Pin::Netlink {
        ifindex,
        priority,
        handle,
        ..
    } = pin
    {
        if let Some(name) = interface_name(*ifindex) {
            // Dropping the link deletes the filter.
            match SchedClassifierLink::attached(
                &name,
                TcAttachType::Egress,
                *priority,
                (*handle).into(),
                None,
            ) {
                Ok(link) => drop(link),
                Err(e) => {
                    tracing::warn!(interface = %name, error = %e, "cannot remove an old packet guard filter")
                }
            }
        }
    }
    fs::remove_file(path).map_err(io_err("unpinning", path))
}

/// The newest generation whose links are all pinned under `pin_dir`: a
/// pinned cgroup link is an attached one, so this is the redirect in place.
pub fn redirect_in_place(pin_dir: &Path) -> Result<Option<u64>, ProbeError> {
    let links_dir = pin_dir.join(LINKS_DIR);
    if !links_dir.exists() {
        return Ok(None);
    }
    let links = pinned_links(&links_dir)?;
    let complete = |g: u64| {
        PROGRAMS.iter().all(|prog| {
            links.iter().any(|(p, lg, _)| {
                *lg == g && p.file_name().and_then(|n| n.to_str()) == Some(&format!("{prog}-{g}"))
            })
        })
    };
    Ok(links
        .iter()
        .map(|(_, g, _)| *g)
        .filter(|g| complete(*g))
        .max())
}

/// Whether generation `generation`'s slot steering (`sk_lookup` on the
/// daemon's network namespace) is pinned. Without it every redirected
/// connect meets a port nothing listens on, and is refused.
pub fn steering_in_place(pin_dir: &Path, generation: u64) -> bool {
    pin_dir
        .join(LINKS_DIR)
        .join(format!("{PROG_SK_LOOKUP}-{generation}"))
        .exists()
}

/// The interfaces the pinned tc guard of generation `generation` is on, by
/// index, and how: what `metaproxy status` and doctor report without the
/// daemon.
pub fn guard_in_place(pin_dir: &Path, generation: u64) -> Result<Vec<u32>, ProbeError> {
    let links_dir = pin_dir.join(LINKS_DIR);
    if !links_dir.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<u32> = pinned_links(&links_dir)?
        .into_iter()
        .filter(|(_, g, _)| *g == generation)
        .filter_map(|(_, _, pin)| match pin {
            Pin::Tcx {
                prog: TcProg::Guard,
                ifindex,
            }
            | Pin::Netlink {
                prog: TcProg::Guard,
                ifindex,
                ..
            } => Some(ifindex),
            _ => None,
        })
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// The link pins in `dir` with their generation, e.g. `mp_connect4-3`.
pub(super) fn pinned_links(dir: &Path) -> Result<Vec<(PathBuf, u64, Pin)>, ProbeError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        if let Some((generation, pin)) = entry.file_name().to_str().and_then(parse_pin) {
            found.push((entry.path(), generation, pin));
        }
    }
    Ok(found)
}

/// A pin's generation and what it holds, from its name.
pub(super) fn parse_pin(name: &str) -> Option<(u64, Pin)> {
    let (stem, generation) = name.rsplit_once('-')?;
    let generation = generation.parse().ok()?;
    if PROGRAMS.contains(&stem) || OPTIONAL_PROGRAMS.contains(&stem) {
        return Some((generation, Pin::Cgroup));
    }
    if stem == PROG_SK_LOOKUP {
        return Some((generation, Pin::Netns));
    }
    for prog in [TcProg::Guard, TcProg::Deliver] {
        let (tcx, netlink) = prog.stems();
        // The clsact stem first: a tcx stem is not a prefix of it, but be
        // exact all the same.
        if let Some(rest) = stem.strip_prefix(netlink) {
            let (ifindex, rest) = rest.split_once("_p")?;
            let (priority, handle) = rest.split_once("_h")?;
            return Some((
                generation,
                Pin::Netlink {
                    prog,
                    ifindex: ifindex.parse().ok()?,
                    priority: priority.parse().ok()?,
                    handle: handle.parse().ok()?,
                },
            ));
        }
        if let Some(ifindex) = stem.strip_prefix(tcx) {
            return Some((
                generation,
                Pin::Tcx {
                    prog,
                    ifindex: ifindex.parse().ok()?,
                },
            ));
        }
    }
    None
}

/// Removes the redirect for good: unpins every link (the kernel detaches a
/// link when its last reference goes) and the maps. Returns how many links
/// were removed; a missing pin directory is not an error.
pub fn detach(pin_dir: &Path) -> Result<usize, ProbeError> {
    if !pin_dir.exists() {
        return Ok(0);
    }
    let links_dir = pin_dir.join(LINKS_DIR);
    let mut removed = 0;
    if links_dir.exists() {
        for (path, _, pin) in pinned_links(&links_dir)? {
            unpin(&path, &pin)?;
            removed += 1;
        }
    }
    for entry in fs::read_dir(pin_dir).map_err(io_err("listing", pin_dir))? {
        let dir = entry.map_err(io_err("listing", pin_dir))?.path();
        let is_ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == LINKS_DIR || n.starts_with("maps-v"));
        if is_ours {
            remove_pins(&dir)?;
        }
    }
    fs::remove_dir(pin_dir).map_err(io_err("removing", pin_dir))?;
    Ok(removed)
}

/// Removes the directory of pins `dir` and the pins in it; never follows
/// a symbolic link (one in `dir`'s place is removed itself), so that what
/// someone planted there cannot point the daemon at another directory.
fn remove_pins(dir: &Path) -> Result<(), ProbeError> {
    let kind = fs::symlink_metadata(dir)
        .map_err(io_err("reading", dir))?
        .file_type();
    if !kind.is_dir() {
        return fs::remove_file(dir).map_err(io_err("unpinning", dir));
    }
    for pin in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let pin = pin.map_err(io_err("listing", dir))?.path();
        fs::remove_file(&pin).map_err(io_err("unpinning", &pin))?;
    }
    fs::remove_dir(dir).map_err(io_err("removing", dir))
}

/// Unpins the maps of older layouts (`maps-v<n>` other than `current`),
/// once nothing attached uses them: a daemon upgraded across a change of
/// layout starts with maps of its own, and those of the old one go.
pub(super) fn remove_old_maps(pin_dir: &Path, current: &str) -> Result<(), ProbeError> {
    for entry in fs::read_dir(pin_dir).map_err(io_err("listing", pin_dir))? {
        let dir = entry.map_err(io_err("listing", pin_dir))?.path();
        let old = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("maps-v") && n != current);
        if old {
            remove_pins(&dir)?;
        }
    }
    Ok(())
}

/// Creates `dir` on bpffs, mounting bpffs at /sys/fs/bpf first if nothing
/// is mounted there (some minimal hosts do not mount it).
pub(super) fn ensure_bpffs_dir(dir: &Path) -> Result<(), ProbeError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && !is_bpffs(root)? {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some("mode=0700"),
        )
        .map_err(ProbeError::Mount)?;
    }
    // Ours alone from the start: a directory others can write is one from
    // which they can unlink the pins, and so detach the redirect.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating", dir))?;
    }
    if !is_bpffs(dir)? {
        return Err(ProbeError::NotBpffs(dir.to_owned()));
    }
    Ok(())
}

/// Refuses a pin directory (or a directory in it) that is not ours (and
/// closes one that is ours but open to others), and one whose parents let
/// others rename it away: a local user who can
/// unlink the pins detaches the redirect and the guard. bpffs mounted by
/// hand is world-writable (1777): its sticky bit keeps others from
/// renaming our directory, but a directory they made first is theirs.
pub(super) fn check_pin_dir(pin_dir: &Path, dirs: &[&Path], owner: u32) -> Result<(), ProbeError> {
    use std::os::unix::fs::MetadataExt as _;
    let unsafe_dir = |path: &Path, why: String| ProbeError::UnsafePinDir {
        path: path.to_owned(),
        why,
    };
    for dir in std::iter::once(pin_dir).chain(dirs.iter().copied()) {
        let meta = fs::symlink_metadata(dir).map_err(io_err("reading", dir))?;
        if !meta.is_dir() {
            return Err(unsafe_dir(dir, "it is not a directory".into()));
        }
        if meta.uid() != owner {
            return Err(unsafe_dir(
                dir,
                format!("it is owned by uid {}", meta.uid()),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            // Ours, only too open (an older metaproxy made it 0755): no one
            // else could have written in it without the bits it has, which
            // only an owner can grant, so closing it is enough.
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("restricting", dir))?;
            tracing::warn!(path = %dir.display(), mode = format!("{:o}", meta.mode() & 0o7777), "pin directory was open to others; now 0700");
        }
    }
    let mut parent = pin_dir.parent();
    while let Some(dir) = parent {
        let Ok(meta) = fs::metadata(dir) else { break };
        let others_write = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if meta.uid() != owner && meta.uid() != 0 {
            return Err(unsafe_dir(
                dir,
                format!(
                    "a parent, {}, is owned by uid {}",
                    dir.display(),
                    meta.uid()
                ),
            ));
        }
        if others_write && !sticky {
            return Err(unsafe_dir(
                dir,
                format!(
                    "a parent, {}, is writable by others (mode {:o})",
                    dir.display(),
                    meta.mode() & 0o7777
                ),
            ));
        }
        parent = dir.parent();
    }
    Ok(())
}

pub(super) fn is_bpffs(path: &Path) -> Result<bool, ProbeError> {
    let dir = fs::File::open(path).map_err(io_err("opening", path))?;
    let stat = nix::sys::statfs::fstatfs(&dir).map_err(|e| ProbeError::Io {
        what: "statfs",
        path: path.to_owned(),
        source: e.into(),
    })?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}
