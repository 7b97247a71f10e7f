//! The kernel half, and the only module that touches aya: load the programs,
//! attach them to a cgroup, pin them so the redirect outlives the daemon,
//! and look up which cgroup opened an accepted connection.
//!
//! # Pins and restarts (fail closed)
//!
//! Everything lives under the pin directory (`/sys/fs/bpf/metaproxy` by
//! default):
//!
//! ```text
//! maps-v1/MP_PENDING   socket cookie -> record   (shared across restarts)
//! maps-v1/MP_CONNS     4-tuple -> record         (shared across restarts)
//! links/<prog>-<gen>   one bpf_link per program and generation
//!                      (bpffs refuses dots in names)
//! ```
//!
//! A link pinned in bpffs stays attached when the process that made it dies,
//! so a dead daemon leaves connects to IMDS rewritten to a listen address on
//! which nobody listens: containers get "connection refused", never the
//! real IMDS. A starting daemon loads fresh programs (with its own config)
//! against the same pinned maps, attaches them as generation N+1 alongside
//! the old ones, and only then unpins the older generations. Both
//! generations do the same thing, so there is no moment in which a connect
//! is not redirected; a crash half way leaves extra links, which the next
//! start removes.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, MapData, MapError},
    programs::{
        links::{FdLink, LinkError},
        CgroupAttachMode, CgroupSockAddr, SockOps,
    },
    Ebpf, EbpfLoader,
};
use metaproxy_common::{
    ConnKey, ConnRecord, ProbeConfig, GLOBAL_CONFIG, MAP_CONNS, MAP_PENDING, PROG_BIND4,
    PROG_BIND6, PROG_CONNECT4, PROG_CONNECT6, PROG_SOCK_OPS,
};

use crate::addrs::AddrPair;

/// The compiled kernel programs, built by build.rs.
static PROBE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/metaproxy-probe"));

/// Bump when a map's key or value layout changes: new maps are created
/// beside the old ones instead of reusing incompatible pins.
const MAPS_DIR: &str = "maps-v1";
const LINKS_DIR: &str = "links";
/// Attach order: the bind guards first, so the listen address is guarded
/// before anything is redirected to it.
const PROGRAMS: [&str; 5] = [
    PROG_BIND4,
    PROG_BIND6,
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SOCK_OPS,
];
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0} is not on a BPF filesystem (bpffs): give --pin-dir a directory on bpffs, or mount one (mount -t bpf bpf {BPFFS_ROOT})")]
    NotBpffs(PathBuf),
    #[error("bpffs is not mounted at {BPFFS_ROOT} and mounting it failed ({0}): mount it before starting (mount -t bpf bpf {BPFFS_ROOT}), or give metaproxy CAP_SYS_ADMIN")]
    Mount(nix::Error),
    #[error("loading the kernel programs")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("program {name}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("the kernel programs have no {0}")]
    Missing(&'static str),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ProbeError + 'a {
    move |source| ProbeError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Where to attach and what the programs must know.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// A cgroup v2 directory; every process below it is intercepted.
    pub cgroup: PathBuf,
    /// bpffs directory for this daemon's pins.
    pub pin_dir: PathBuf,
    pub config: ProbeConfig,
    /// Most verbose kernel log level to emit (aya-log's numbering).
    pub kernel_log_level: u8,
}

/// The attached probe. Dropping it leaves the programs attached (that is
/// the point of pinning); only [`detach`] removes them.
pub struct Probe {
    conns: HashMap<MapData, ConnKey, ConnRecord>,
    pending: HashMap<MapData, u64, ConnRecord>,
    generation: u64,
    // Keeps the programs' fds (and aya-log's ring buffer) open.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Reads the kernel programs' aya-log records into the daemon's log.
pub struct KernelLog(aya_log::EbpfLogger<&'static dyn log::Log>);

impl std::fmt::Debug for KernelLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelLog")
    }
}

impl KernelLog {
    /// Forwards records forever; run it as a task. The kernel programs log
    /// only rare events (refusals, failures; redirects at debug level), so
    /// draining the ring buffer a few times a second is plenty.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tick.tick().await;
            self.0.flush();
        }
    }
}

impl Probe {
    /// Loads the programs, attaches them to `opts.cgroup` and pins them,
    /// replacing any generation a previous daemon left (see the module docs).
    pub fn attach(opts: &ProbeOptions) -> Result<(Self, Option<KernelLog>), ProbeError> {
        let maps_dir = opts.pin_dir.join(MAPS_DIR);
        let links_dir = opts.pin_dir.join(LINKS_DIR);
        ensure_bpffs_dir(&maps_dir)?;
        ensure_bpffs_dir(&links_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(GLOBAL_CONFIG, &opts.config, true)
            .override_global(aya_log::LEVEL, &opts.kernel_log_level, false)
            .load(PROBE_OBJECT)?;
        let kernel_log = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(KernelLog(logger)),
            Err(e) => {
                tracing::warn!(error = %e, "kernel programs' log unavailable");
                None
            }
        };

        let old = pinned_links(&links_dir)?;
        let generation = old.iter().map(|(_, g)| *g).max().map_or(1, |g| g + 1);
        let cgroup =
            fs::File::open(&opts.cgroup).map_err(io_err("opening cgroup", &opts.cgroup))?;
        for name in PROGRAMS {
            let link = attach_program(&mut ebpf, name, &cgroup)?;
            let path = links_dir.join(format!("{name}-{generation}"));
            link.pin(&path)
                .map_err(|source| ProbeError::Pin { path, source })?;
        }
        // The new generation is live: the old ones can go without a gap.
        for (path, _) in old {
            fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
        }

        let conns = take_map(&mut ebpf, MAP_CONNS)?;
        let pending = take_map(&mut ebpf, MAP_PENDING)?;
        Ok((
            Self {
                conns,
                pending,
                generation,
                _ebpf: ebpf,
            },
            kernel_log,
        ))
    }

    /// This daemon's link generation (1 for a fresh attach).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the kernel recorded for the accepted connection `pair`, if
    /// anything.
    pub fn lookup(&self, pair: &AddrPair) -> Result<Option<ConnRecord>, ProbeError> {
        let Some(key) = pair.conn_key() else {
            return Ok(None);
        };
        match self.conns.get(&key, 0) {
            Ok(record) => Ok(Some(record)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(ProbeError::Map {
                name: MAP_CONNS,
                source,
            }),
        }
    }

    /// Entries in the two maps: (pending connects, open connections).
    /// Walks both maps, so it is for status pages, not the request path.
    pub fn map_sizes(&self) -> (usize, usize) {
        (self.pending.keys().count(), self.conns.keys().count())
    }
}

fn attach_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
) -> Result<FdLink, ProbeError> {
    let program = ebpf.program_mut(name).ok_or(ProbeError::Missing(name))?;
    let err = |source| ProbeError::Program { name, source };
    // Cgroup bpf_links always coexist with other programs on the cgroup (the
    // kernel attaches links as multi), so "Single" only means "no flags".
    if name == PROG_SOCK_OPS {
        let prog: &mut SockOps = program.try_into().map_err(err)?;
        prog.load().map_err(err)?;
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| ProbeError::Link { name, source })
    } else {
        let prog: &mut CgroupSockAddr = program.try_into().map_err(err)?;
        prog.load().map_err(err)?;
        let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
        let link = prog.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|source| ProbeError::Link { name, source })
    }
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    HashMap::try_from(map).map_err(|source| ProbeError::Map { name, source })
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
            links.iter().any(|(p, lg)| {
                *lg == g && p.file_name().and_then(|n| n.to_str()) == Some(&format!("{prog}-{g}"))
            })
        })
    };
    Ok(links.iter().map(|(_, g)| *g).filter(|g| complete(*g)).max())
}

/// The link pins in `dir` with their generation, e.g. `mp_connect4-3`.
fn pinned_links(dir: &Path) -> Result<Vec<(PathBuf, u64)>, ProbeError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let generation = name
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .filter(|(prog, _)| PROGRAMS.contains(prog))
            .and_then(|(_, g)| g.parse().ok());
        if let Some(g) = generation {
            found.push((entry.path(), g));
        }
    }
    Ok(found)
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
        for (path, _) in pinned_links(&links_dir)? {
            fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
            removed += 1;
        }
    }
    for entry in fs::read_dir(pin_dir).map_err(io_err("listing", pin_dir))? {
        let dir = entry.map_err(io_err("listing", pin_dir))?.path();
        let is_ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == LINKS_DIR || n.starts_with("maps-v"));
        if !is_ours {
            continue;
        }
        for pin in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let pin = pin.map_err(io_err("listing", &dir))?.path();
            fs::remove_file(&pin).map_err(io_err("unpinning", &pin))?;
        }
        fs::remove_dir(&dir).map_err(io_err("removing", &dir))?;
    }
    fs::remove_dir(pin_dir).map_err(io_err("removing", pin_dir))?;
    Ok(removed)
}

/// Creates `dir` on bpffs, mounting bpffs at /sys/fs/bpf first if nothing
/// is mounted there (some minimal hosts do not mount it).
fn ensure_bpffs_dir(dir: &Path) -> Result<(), ProbeError> {
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
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    if !is_bpffs(dir)? {
        return Err(ProbeError::NotBpffs(dir.to_owned()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool, ProbeError> {
    let dir = fs::File::open(path).map_err(io_err("opening", path))?;
    let stat = nix::sys::statfs::fstatfs(&dir).map_err(|e| ProbeError::Io {
        what: "statfs",
        path: path.to_owned(),
        source: e.into(),
    })?;
    Ok(stat.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_programs_count_as_link_pins() {
        let dir = std::env::temp_dir().join(format!("mp-links-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for n in ["mp_connect4-1", "mp_sock_ops-7", "mp_connect6-x", "other-3"] {
            fs::write(dir.join(n), b"").unwrap();
        }
        let mut gens: Vec<u64> = pinned_links(&dir)
            .unwrap()
            .into_iter()
            .map(|(_, g)| g)
            .collect();
        gens.sort();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(gens, vec![1, 7]);
    }
}
